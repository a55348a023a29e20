"""Checkpoints: Hugging Face layout (``model.safetensors`` + ``config.json``), written atomically.

A checkpoint is a directory::

    <output_dir>/<name>/
        model.safetensors       weights in Hugging Face Llama layout (loadable by torchtune's
                                FullModelHFCheckpointer with model_type LLAMA3_2, by gqa_tune, and by
                                ``transformers.AutoModelForCausalLM.from_pretrained``)
        config.json             Hugging Face Llama config (RoPE type and parameters, norm eps, tied
                                embeddings, bos/eos/pad ids), plus a "gqa_tune" entry with the model builder
        generation_config.json  copied from the source checkpoint, when it has one
        recipe_state.pt         optimizer, scheduler, counters and RNG states (for exact resume)
        adapter/...             LoRA runs: the adapter alone

``<output_dir>/LATEST`` names the newest complete one.

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
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import hf_to_tune, tune_to_hf
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import RotaryPositionalEmbeddings, TiedLinear

WEIGHTS, CONFIG, STATE, LATEST = "model.safetensors", "config.json", "recipe_state.pt", "LATEST"
GENERATION_CONFIG = "generation_config.json"
#: The Hugging Face config keys of the special token ids.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def model_shape(model: torch.nn.Module) -> Dict[str, int]:
    """Head counts and widths of a torchtune ``TransformerDecoder`` (ours or torchtune's)."""
    attn = model.layers[0].attn
    return {
        "num_heads": attn.num_heads,
        "num_kv_heads": attn.num_kv_heads,
        "dim": attn.embed_dim,
        "head_dim": attn.head_dim,
    }


def rope_config(rope: torch.nn.Module, head_dim: int) -> Dict[str, Any]:
    """Hugging Face ``rope_parameters`` describing torchtune's RoPE module ``rope``.

    ``RotaryPositionalEmbeddings`` is ``rope_type`` ``"default"``; ``Llama3ScaledRoPE`` is ``"llama3"`` with its
    ``scale_factor``, ``low_freq_factor``, ``high_freq_factor`` and ``old_context_len`` (read off the module).

    Raises:
        ValueError: another position embedding, or one that rotates fewer than ``head_dim`` features.
    """
    if isinstance(rope, Llama3ScaledRoPE):
        params = {
            "rope_type": "llama3",
            "rope_theta": float(rope.base),
            "factor": float(rope.scale_factor),
            "low_freq_factor": float(rope.low_freq_factor),
            "high_freq_factor": float(rope.high_freq_factor),
            "original_max_position_embeddings": int(rope.old_context_len),
        }
    elif isinstance(rope, RotaryPositionalEmbeddings):
        params = {"rope_type": "default", "rope_theta": float(rope.base)}
    else:
        raise ValueError(
            f"cannot describe position embeddings {type(rope).__name__} in a Hugging Face Llama config "
            "(expected torchtune's RotaryPositionalEmbeddings or Llama3ScaledRoPE)"
        )
    if rope.dim != head_dim:
        raise ValueError(f"RoPE rotates {rope.dim} of head_dim {head_dim} features; a Llama config cannot say so")
    return params


def tokenizer_token_ids(tokenizer: Any) -> Dict[str, Optional[int]]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of a torchtune tokenizer (``None`` where it has none)."""
    return {key: getattr(tokenizer, key.replace("_token", ""), None) for key in TOKEN_ID_KEYS}


def _source_config(source_dir: Optional[Path]) -> Dict[str, Any]:
    """The source checkpoint's ``config.json`` (``{}`` without one, or when it cannot be read)."""
    if source_dir is None or not (Path(source_dir) / CONFIG).is_file():
        return {}
    try:
        config = json.loads((Path(source_dir) / CONFIG).read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"cannot read {str(Path(source_dir) / CONFIG)!r} for its token ids: {err}", stacklevel=3)
        return {}
    return config if isinstance(config, dict) else {}


def hf_config(
    model: torch.nn.Module,
    builder: Optional[Dict[str, Any]] = None,
    token_ids: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A Hugging Face Llama ``config.json`` from which ``LlamaForCausalLM`` rebuilds the function of ``model``.

    RoPE goes in ``rope_parameters`` (transformers 5) and, as before, in ``rope_theta`` / ``rope_scaling``
    (transformers 4, and other readers of Llama 3.x configs).

    Args:
        model: a torchtune ``TransformerDecoder`` (gqa_tune's or torchtune's Llama-style ones).
        builder: the config of the model builder, stored under ``gqa_tune.model``.
        token_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``; missing ones are written as ``null``
            (transformers' Llama defaults, 1 and 2, would be wrong for most tokenizers).

    Raises:
        ValueError: a part a Llama config cannot describe (q/k/v biases, q/k norms, other position embeddings).
    """
    shape = model_shape(model)
    attn = model.layers[0].attn
    mlp = model.layers[0].mlp
    if getattr(attn.q_proj, "bias", None) is not None or getattr(attn, "q_norm", None) is not None:
        raise ValueError(
            "the model has q/k/v biases or q/k norms, which a Hugging Face Llama config.json cannot describe"
        )
    rope = rope_config(attn.pos_embeddings, shape["head_dim"])
    tied = isinstance(model.output, TiedLinear)
    if not tied and not hasattr(model.output, "weight"):
        raise ValueError(f"cannot describe the output projection {type(model.output).__name__} in a Llama config")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.tok_embeddings.num_embeddings,
        "hidden_size": shape["dim"],
        "intermediate_size": getattr(mlp.w1, "out_features", None) or mlp.w1.out_dim,  # nn.Linear or LoRALinear
        "num_hidden_layers": len(model.layers),
        "num_attention_heads": shape["num_heads"],
        "num_key_value_heads": shape["num_kv_heads"],
        "head_dim": shape["head_dim"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": float(model.norm.eps),
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "tie_word_embeddings": tied,
        **{key: (token_ids or {}).get(key) for key in TOKEN_ID_KEYS},
        "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "gqa_tune": {"model": builder or {}},
    }
    if rope["rope_type"] != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


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


def _write_atomically(final: Path, write: Callable[[Path], None], *, point_latest: bool = False) -> None:
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
            ``generation_config.json`` is copied, and its ``config.json``'s token ids fill those
            ``token_ids`` does not give.

    Raises:
        ValueError: a model a Llama ``config.json`` cannot describe (see :func:`hf_config`).
    """
    shape = model_shape(model)
    source = _source_config(source_dir)
    ids = {key: source.get(key) for key in TOKEN_ID_KEYS}
    ids.update({key: value for key, value in (token_ids or {}).items() if key in TOKEN_ID_KEYS and value is not None})
    config = hf_config(model, builder, ids)
    hf_sd = tune_to_hf(
        {k: v.detach().cpu() for k, v in state_dict.items()},
        num_heads=shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        dim=shape["dim"],
        head_dim=shape["head_dim"],
    )
    hf_sd = {k: v.contiguous() for k, v in hf_sd.items()}
    generation = Path(source_dir) / GENERATION_CONFIG if source_dir is not None else None

    def write(tmp: Path) -> None:
        save_file(hf_sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
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
    _write_atomically(final, write, point_latest=True)
    cleanup_stale(output_dir)
    return final


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The checkpoint ``LATEST`` names in ``output_dir``, or ``None`` without ``LATEST``.

    If ``LATEST`` names no complete checkpoint, the newest complete one in ``output_dir`` (by the time
    its weights were written) is returned instead, with a warning; ``None`` if there is none.
    """
    output_dir = Path(output_dir)
    named = _pointer_target(output_dir)
    if named is None:
        return None
    if named and _is_complete(output_dir / named):
        return output_dir / named
    candidates = [p for p in output_dir.iterdir() if not p.name.startswith(".") and _is_complete(p)]
    newest = max(candidates, key=lambda p: (p / WEIGHTS).stat().st_mtime_ns, default=None)
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


def resolve_checkpoint_dir(value: str, key: str, hint: str) -> Path:
    """A checkpoint directory, or the one an ``output_dir``'s ``LATEST`` names (see :func:`latest_checkpoint`).

    Raises:
        ValueError: naming ``key`` and the path, plus ``hint`` (how to make one), if it does not exist or
            its ``LATEST`` leads to no complete checkpoint.
    """
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"{key} {str(path)!r} does not exist (relative paths are taken from {Path.cwd()}); {hint}")
    if not (path / LATEST).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{key} {str(path)!r}: its LATEST names no complete checkpoint and it holds none; {hint}")
    return latest


def stored_builder(config: Dict[str, Any], model_cfg: Optional[Any], path: Path) -> DictConfig:
    """The model builder for a checkpoint: ``model_cfg`` if it names a ``_component_``, else the builder
    recorded in ``config.json`` with ``model_cfg``'s arguments merged over it.

    Raises:
        ValueError: if neither says how to build the model.
    """
    if model_cfg is not None and "_component_" in model_cfg:
        return OmegaConf.create(model_cfg) if not isinstance(model_cfg, DictConfig) else model_cfg
    stored = config.get("gqa_tune", {}).get("model") or {}
    if not stored:
        raise ValueError(
            f"checkpoint {str(path)!r} does not say how to build its model (no gqa_tune.model in "
            "config.json): give `model:` with a _component_ in the config"
        )
    return OmegaConf.merge(OmegaConf.create(stored), model_cfg or {})


def _head_counts(path: Path, config: Dict[str, Any], hf_sd: Dict[str, torch.Tensor]) -> Tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) from ``config.json``, checked against the q/k/v weights' rows."""
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size"):
        if key not in config:
            raise ValueError(f"checkpoint {str(path)!r}: config.json lacks {key!r}")
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or (dim // heads if isinstance(dim, int) and isinstance(heads, int) else None)
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"checkpoint {str(path)!r}: config.json's {key} must be a positive int, got {value!r}")
    for key, weight in hf_sd.items():
        proj = next((p for p in ("q_proj", "k_proj", "v_proj") if key.endswith(f".self_attn.{p}.weight")), None)
        if proj is None:
            continue
        name, count = ("num_attention_heads", heads) if proj == "q_proj" else ("num_key_value_heads", kv_heads)
        rows = weight.shape[0]
        if rows != count * head_dim:
            raise ValueError(
                f"checkpoint {str(path)!r}: config.json says {name}={count}, but {key} has {rows} rows, i.e. "
                f"{rows / head_dim:g} heads of head_dim {head_dim}; the config does not match the weights"
            )
    return heads, kv_heads, head_dim


def load_checkpoint(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Optional[Dict[str, Any]]]:
    """Read a checkpoint directory written by :func:`save_checkpoint`.

    Returns:
        (torchtune-format state dict, config.json contents, recipe state or ``None``).

    Raises:
        ValueError: a missing directory or file, a file that cannot be read, or a ``config.json`` whose
            head counts disagree with the weights (checked before any tensor is reshaped).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist")
    for needed in (WEIGHTS, CONFIG):
        if not (path / needed).is_file():
            raise ValueError(f"checkpoint {str(path)!r} has no {needed}")
    try:
        config = json.loads((path / CONFIG).read_text())
        hf_sd = load_file(str(path / WEIGHTS))
    except Exception as err:  # corrupt JSON or safetensors
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    heads, kv_heads, head_dim = _head_counts(path, config, hf_sd)
    tune_sd = hf_to_tune(hf_sd, num_heads=heads, num_kv_heads=kv_heads, dim=config["hidden_size"], head_dim=head_dim)
    state = None
    if (path / STATE).is_file():
        try:
            state = torch.load(path / STATE, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"cannot read {str(path / STATE)!r}: {err}") from err
    return tune_sd, config, state
