"""Checkpoint directories: their layout, crash-safe writes, ``LATEST``, pruning, and finding the one to load.

A checkpoint is a directory::

    <output_dir>/<name>/
        model.safetensors       weights in Hugging Face layout (loadable by gqa_tune, by
                                ``transformers.AutoModelForCausalLM.from_pretrained`` and, for Llama-style
                                models, by torchtune's FullModelHFCheckpointer with model_type LLAMA3_2)
        config.json             Hugging Face config of the source's architecture (:func:`gqa_tune.hf.hf_config`),
                                plus a "gqa_tune" entry with the model builder
        generation_config.json  copied from the source checkpoint, when it has one
        recipe_state.pt         optimizer, scheduler, counters and RNG states (for exact resume)
        adapter/...             LoRA runs: the adapter alone

``<output_dir>/LATEST`` names the newest complete one. What the files mean (the Hugging Face format, both
ways) is :mod:`gqa_tune.hf`'s; this module owns where they go and that they are written safely.
:func:`load_checkpoint` reads these and any Hugging Face model directory gqa_tune builds
(:func:`gqa_tune.hf.load_model_dir`), with the recipe state.

Atomic writes. Invariant: at every instant, (a) ``LATEST``, if it exists, names a complete
directory (it loads), and (b) ``<name>``, if it exists, is complete and holds the old or the new
checkpoint. A save never moves a live checkpoint aside while anything points at it:

1. Everything is written into a fresh ``.<name>.tmp-<pid>-<uuid>``; its files, its directories and
   the parent are fsynced.
2. If ``<name>`` does not exist, the temporary directory is renamed to it.
   If it does, the two are swapped in one step with ``renameat2(RENAME_EXCHANGE)`` (Linux); the old
   checkpoint is then in the temporary directory, which nothing names. Where the exchange is not
   available (other systems, some file systems), ``LATEST`` is first pointed at the temporary
   directory (complete), the old ``<name>`` renamed to ``.<name>.old-<pid>-<uuid>``, ``LATEST``
   pointed at that (still complete), the new directory renamed to ``<name>``. ``LATEST`` is only
   redirected when it named ``<name>``; ``<name>`` is missing (never partial) between the two renames.
3. ``LATEST`` is replaced atomically (temporary file, fsync, ``os.replace``) to name ``<name>``;
   then the old copy is removed.

Leftovers of killed saves (``.<name>.tmp-*``, ``.<name>.old-*``, ``.LATEST.tmp-*``) are removed by
:func:`cleanup_stale` at the start and end of every save: those whose process is dead, or which are
this process's own but no save of it is writing them; never the one ``LATEST`` names, never one of a
live process (a process id reused by an unrelated live process only delays the cleanup; on a file
system shared between machines a live writer on another host is not detected). If ``LATEST`` names a
missing directory (a state older versions could leave), :func:`latest_checkpoint` falls back to the
newest complete checkpoint, with a warning.
"""

import ctypes
import errno
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from gqa_tune.hf.config import CONFIG, GENERATION_CONFIG, TOKEN_ID_KEYS, hf_config, read_config
from gqa_tune.hf.files import WEIGHTS, weight_files, write_weights
from gqa_tune.hf.model_dir import load_model_dir
from gqa_tune.hf.names import tune_to_hf_weights

STATE, LATEST = "recipe_state.pt", "LATEST"


def _source_config(source_dir: Optional[Path]) -> Dict[str, Any]:
    """The source checkpoint's ``config.json`` (``{}`` without one, or when it cannot be read)."""
    if source_dir is None or not (Path(source_dir) / CONFIG).is_file():
        return {}
    try:
        return read_config(source_dir, f"the source {str(source_dir)!r}")
    except ValueError as err:
        warnings.warn(f"{err}; its token ids are not carried over", stacklevel=3)
        return {}


# ------------------------------------------------------------ atomic writes

#: Hidden names of a save in progress: ``.<name>.tmp-<pid>-<uuid>`` and ``.<name>.old-<pid>-<uuid>``.
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
#: Hidden paths this process is writing right now (a dead process's pid may be ours again, e.g. in a container).
_IN_PROGRESS: Set[Path] = set()
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _hidden(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    try:
        renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        renameat2 = None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({str(a)!r}, {str(b)!r}, RENAME_EXCHANGE): {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first, ``root`` last."""
    dirs = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in reversed(dirs):
        _fsync_dir(directory)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _pointer_target(output_dir: Path) -> Optional[str]:
    pointer = Path(output_dir) / LATEST
    try:
        return pointer.read_text().strip() if pointer.is_file() else None
    except OSError:
        return None


def cleanup_stale(output_dir: Path, name: Optional[str] = None) -> List[Path]:
    """Remove what killed saves left in ``output_dir``: ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*``.

    Only entries of dead processes (or this process's own that no save of it is writing), never the
    directory ``LATEST`` names. ``name`` restricts the cleanup to one checkpoint name's leftovers.

    Returns:
        The removed paths.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    named = _pointer_target(output_dir)
    removed = []
    for path in sorted(output_dir.iterdir()):
        match = _HIDDEN.match(path.name)
        if match is None or path.name == named or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"])
        if _pid_alive(pid) and (pid != os.getpid() or path in _IN_PROGRESS):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` in one step (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    tmp = _hidden(path, "tmp")
    _IN_PROGRESS.add(tmp)
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _IN_PROGRESS.discard(tmp)
    _fsync_dir(path.parent)


def write_atomically(final: Path, write: Callable[[Path], None], *, point_latest: bool = False) -> None:
    """Call ``write(tmp_dir)``, then put ``tmp_dir`` in the place of ``final`` keeping the module's invariant.

    ``LATEST`` in ``final``'s parent names ``final`` afterwards when ``point_latest`` is set (a checkpoint
    save); otherwise it is only kept valid (redirected for the moment when it names ``final``). An
    exception in ``write`` removes the temporary directory and leaves everything else as it was.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp, old, redirected = _hidden(final, "tmp"), None, False
    _IN_PROGRESS.add(tmp)
    try:
        try:
            tmp.mkdir()
            write(tmp)
            _fsync_tree(tmp)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pointer = parent / LATEST
        if not final.exists():
            os.rename(tmp, final)
        elif _exchange(tmp, final):
            old = tmp  # now holds the previous checkpoint; nothing names it
        else:
            redirected = _pointer_target(parent) == final.name
            if redirected:
                write_text_atomically(pointer, tmp.name + "\n")
            old = _hidden(final, "old")
            _IN_PROGRESS.add(old)
            os.rename(final, old)
            if redirected:
                write_text_atomically(pointer, old.name + "\n")
            os.rename(tmp, final)
        _fsync_dir(parent)
        if point_latest or redirected:
            write_text_atomically(pointer, final.name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        _IN_PROGRESS.discard(tmp)
        _IN_PROGRESS.discard(old)


def save_checkpoint(
    output_dir: Path,
    name: str,
    model: torch.nn.Module,
    state_dict: Dict[str, torch.Tensor],
    *,
    builder: Optional[Dict[str, Any]] = None,
    recipe_state: Optional[Dict[str, Any]] = None,
    extra: Optional[Callable[[Path], None]] = None,
    token_ids: Optional[Dict[str, Any]] = None,
    source_dir: Optional[Path] = None,
) -> Path:
    """Write checkpoint ``output_dir/name`` atomically and point ``LATEST`` at it (see the module docstring).

    Args:
        model: the model (for its shape, RoPE, norms and tying; ``state_dict`` is what is saved).
        state_dict: torchtune-format weights (``layers.0.attn.q_proj.weight`` ...).
        builder: the config of the model builder, stored in ``config.json``.
        recipe_state: training state for resuming, saved as ``recipe_state.pt``.
        extra: called with the temporary directory to add more files.
        token_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the tokenizer the run used
            (:func:`tokenizer_token_ids`); they win over ``source_dir``'s.
        source_dir: the checkpoint directory the weights came from (Hugging Face or gqa_tune): its
            ``generation_config.json`` is copied, its ``config.json``'s token ids fill those ``token_ids``
            does not give, and its architecture is kept (a Qwen2 source saves a Qwen2 config; see
            :func:`hf_config`).

    Raises:
        ValueError: a model no supported ``config.json`` describes (see :func:`hf_config`).
    """
    source = _source_config(source_dir)
    ids = {key: source.get(key) for key in TOKEN_ID_KEYS}
    ids.update({key: value for key, value in (token_ids or {}).items() if key in TOKEN_ID_KEYS and value is not None})
    config = hf_config(model, builder, ids, source=source)
    hf_sd = tune_to_hf_weights({k: v.detach().cpu() for k, v in state_dict.items()}, config)
    generation = Path(source_dir) / GENERATION_CONFIG if source_dir is not None else None

    def write(tmp: Path) -> None:
        write_weights(tmp, hf_sd)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if generation is not None and generation.is_file():
            shutil.copyfile(generation, tmp / GENERATION_CONFIG)
        if recipe_state is not None:
            torch.save(recipe_state, tmp / STATE)
        if extra is not None:
            extra(tmp)

    output_dir = Path(output_dir)
    final = output_dir / name
    cleanup_stale(output_dir)
    write_atomically(final, write, point_latest=True)
    cleanup_stale(output_dir)
    return final


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The checkpoint ``LATEST`` names in ``output_dir``.

    If ``LATEST`` is missing or names no complete checkpoint, the newest complete one in ``output_dir`` (by
    the time its weights were written) is returned instead, with a warning; ``None`` if there is none.
    """
    output_dir = Path(output_dir)
    named = _pointer_target(output_dir)
    if named and _is_complete(output_dir / named):
        return output_dir / named
    children = output_dir.iterdir() if output_dir.is_dir() else ()
    candidates = [p for p in children if not p.name.startswith(".") and _is_complete(p)]
    newest = max(candidates, key=lambda p: (p / WEIGHTS).stat().st_mtime_ns, default=None)
    if named is None:
        if newest is None:
            return None
        # A save killed after its directory was in place but before LATEST was first written.
        warnings.warn(
            f"{str(output_dir)!r} has no {LATEST} file; using its newest complete checkpoint, {str(newest)!r}",
            stacklevel=2,
        )
        return newest
    warnings.warn(
        f"{str(output_dir / LATEST)!r} names {named!r}, which is not a complete checkpoint; "
        + (f"using the newest complete one, {str(newest)!r}" if newest else "and there is no other checkpoint"),
        stacklevel=2,
    )
    return newest


#: The names the fine-tuning loop gives its checkpoints (:func:`prune_checkpoints` removes only these).
_LOOP_CHECKPOINT = re.compile(r"^(?:epoch|step)_\d+$")


def prune_checkpoints(output_dir: Path, keep: int) -> List[Path]:
    """Remove all but the ``keep`` newest complete ``epoch_N`` / ``step_N`` checkpoints of ``output_dir``.

    Never the one ``LATEST`` names (it counts as one of the ``keep``), and nothing at all unless ``LATEST``
    names a complete checkpoint, so a loadable checkpoint always stays. Newest is by the time its
    ``config.json`` was written. Each one removed is first renamed, in one step, to a hidden
    ``.<name>.old-<pid>-*`` that nothing names, then deleted; a prune killed midway leaves only that, for
    :func:`cleanup_stale`.

    Returns:
        The removed checkpoints' paths.

    Raises:
        ValueError: ``keep`` is not an int >= 1 (named as ``keep_last_n_checkpoints``).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep_last_n_checkpoints: expected an int >= 1 or null (keep all), got {keep!r}")
    output_dir = Path(output_dir)
    named = _pointer_target(output_dir)
    if not named or not _is_complete(output_dir / named):
        return []
    others = [
        path
        for path in output_dir.iterdir()
        if path.name != named and _LOOP_CHECKPOINT.match(path.name) and not path.is_symlink() and _is_complete(path)
    ]
    others.sort(key=lambda path: ((path / CONFIG).stat().st_mtime_ns, path.name), reverse=True)
    removed = []
    for path in others[keep - 1 :]:
        hidden = _hidden(path, "old")
        _IN_PROGRESS.add(hidden)
        try:
            os.rename(path, hidden)
            _fsync_dir(output_dir)
            shutil.rmtree(hidden, ignore_errors=True)
        finally:
            _IN_PROGRESS.discard(hidden)
        removed.append(path)
    return removed


def _torchtune_epochs(path: Path) -> List[Path]:
    """``epoch_N`` subdirectories holding a ``config.json`` and weights (what torchtune's checkpointers write
    into their ``output_dir``), by ``N``."""
    found = []
    for child in path.iterdir() if path.is_dir() else ():
        match = re.fullmatch(r"epoch_(\d+)", child.name)
        if match and child.is_dir() and (child / CONFIG).is_file():
            try:
                weight_files(child)
            except ValueError:
                continue
            found.append((int(match.group(1)), child))
    return [child for _, child in sorted(found)]


def resolve_checkpoint_dir(value: str, key: str, hint: str) -> Path:
    """A checkpoint directory, the one an ``output_dir``'s ``LATEST`` names (see :func:`latest_checkpoint`), or,
    for a torchtune checkpointer's ``output_dir`` (``epoch_N/`` subdirectories, no weights of its own), the
    highest ``epoch_N``.

    Raises:
        ValueError: naming ``key`` and the path, plus ``hint`` (how to make one), if it does not exist or
            its ``LATEST`` leads to no complete checkpoint.
    """
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"{key} {str(path)!r} does not exist (relative paths are taken from {Path.cwd()}); {hint}")
    if not (path / LATEST).is_file():
        if not (path / CONFIG).is_file():
            epochs = _torchtune_epochs(path)
            if epochs:
                return epochs[-1]
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{key} {str(path)!r}: its LATEST names no complete checkpoint and it holds none; {hint}")
    return latest


def load_checkpoint(
    path: Path, where: Optional[str] = None, config: Optional[Dict[str, Any]] = None
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Optional[Dict[str, Any]]]:
    """Read a checkpoint directory: one :func:`save_checkpoint` wrote, or any Hugging Face model directory of an
    architecture gqa_tune builds (:func:`gqa_tune.hf.load_model_dir`), e.g. a torchtune
    ``FullModelHFCheckpointer``'s output.

    ``where`` names the checkpoint in messages (default ``checkpoint '<path>'``; e.g. the config key);
    ``config``: its ``config.json`` when the caller has read it already.

    Returns:
        (torchtune-format state dict, config.json contents, recipe state or ``None``).

    Raises:
        ValueError: as :func:`gqa_tune.hf.load_model_dir`, or an unreadable ``recipe_state.pt``.
    """
    state_dict, config = load_model_dir(path, where, config)
    return state_dict, config, read_recipe_state(path)


def read_recipe_state(path: Path) -> Optional[Dict[str, Any]]:
    """A checkpoint's ``recipe_state.pt``, or ``None`` without one.

    Raises:
        ValueError: a file that cannot be read.
    """
    path = Path(path)
    if not (path / STATE).is_file():
        return None
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read {str(path / STATE)!r}: {err}") from err
