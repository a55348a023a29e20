"""A recipe's config: checked against its schema, and turned into the typed runtime config the recipe reads.

:func:`parse_config` is the one entry point: every recipe's constructor calls it. It merges the user's
config into ``OmegaConf.structured`` of the recipe's schema (:mod:`gqa_tune.schema`), in struct mode, so the
recipe reads typed fields whose defaults are written once, in the dataclass. Every problem is reported at
once, each led by the dotted key it is about::

    unknown key 'epcohs' (did you mean 'epochs'?)
    optimizer.lrr: unexpected keyword for torch.optim.AdamW (did you mean 'lr'?)
    gradient_accumulation_steps: expected an int >= 1 (micro-batches per optimizer step), got 0

OmegaConf checks and converts the types; the schema adds the ranges, choices and checks. Every
``_component_``, at any depth, is located with torchtune's own locator and its keywords checked with
torchtune's own validator (``torchtune.config.validate``); interpolations must resolve, no value may be
``???``, and input files must exist. Then the cheap components are built once (the tokenizer, the model on
the meta device, the optimizer over a dummy parameter), so a value one refuses is named before the recipe
builds anything. :func:`exits_on_config_error` turns the :class:`ConfigError` into a message and exit status 1.
:func:`validate_config` returns the same problems as a list (``gqa-tune validate``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import os
import sys
import typing
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gqa_tune._checks import ConfigError
from gqa_tune.catalog import config_recipe, find_recipe
from gqa_tune.schema import fields

#: Keyword arguments of components (at any depth) whose values name input files that must exist.
INPUT_FILE_KEYS = frozenset({"data_file", "data_files", "accuracy_file"})


def _did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _join(key: str, name: Any) -> str:
    return f"{key}[{name}]" if isinstance(name, int) else (f"{key}.{name}" if key else str(name))


# ---------------------------------------------------------------- the schema: types by OmegaConf, rules here


def _options(annotation: Any) -> List[Any]:
    """The alternatives of a field type: ``Optional[int]`` -> ``[int, None]``."""
    if typing.get_origin(annotation) is Union:
        return [None if a is type(None) else a for a in typing.get_args(annotation)]
    return [annotation]


def _describe(annotation: Any, meta: dict) -> str:
    """How a message names what a field takes: ``an int >= 1``, ``one of fp32, bf16``, ``a component or null``."""
    names = {int: "an int", float: "a number", str: "a string", bool: "true or false"}
    options = _options(annotation)
    if tuple(meta.get("choices", ())) == (None,):
        return "null"
    if meta.get("choices"):
        words = [("null" if c is None else str(c)) for c in meta["choices"]]
        return "one of " + ", ".join(words) + (" or null" if None in options and None not in meta["choices"] else "")
    words = []
    for option in options:
        if option is None:
            continue
        origin = typing.get_origin(option)
        if meta.get("component"):
            words.append("a component")
        elif dataclasses.is_dataclass(option) or origin is dict:
            words.append("a mapping")
        elif origin is list:
            words.append(f"a list of {names.get(typing.get_args(option)[0], 'values').split(' ', 1)[1]}s")
        else:
            words.append(names.get(option, getattr(option, "__name__", str(option))))
    text = " or ".join(words)
    if meta.get("minimum") is not None:
        text += f" {'>' if meta.get('exclusive') else '>='} {meta['minimum']:g}"
    return text + (" or null" if None in options else "")


def _rule(annotation: Any, meta: dict, value: Any) -> str:
    return f"expected {_describe(annotation, meta)} ({meta.get('doc', '')}), got {value!r}"


def value_problem(annotation: Any, meta: dict, value: Any) -> Optional[str]:
    """Why an already typed ``value`` breaks a field's range, choices or check (``expected an int >= 1 (...),
    got 0``), or None."""
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return _rule(annotation, meta, value)
    low = meta.get("minimum")
    if (
        low is not None
        and isinstance(value, (int, float))
        and (value < low or (meta.get("exclusive") and value == low))
    ):
        return _rule(annotation, meta, value)
    reason = meta["check"](value) if meta.get("check") else None
    return f"{_rule(annotation, meta, value)}: {reason}" if reason else None


def _shape_problem(annotation: Any, meta: dict, value: Any) -> Optional[str]:
    """What OmegaConf would accept but the schema does not: a number or string for a flag (OmegaConf reads
    ``1`` and ``'yes'`` as true), a mapping without ``_component_`` where a component goes."""
    if value is None:
        return None if None in _options(annotation) else _rule(annotation, meta, value)
    kinds = [o for o in _options(annotation) if o is not None]
    if kinds == [bool] and not isinstance(value, bool):
        return _rule(annotation, meta, value)
    if meta.get("component") and not (isinstance(value, DictConfig) and "_component_" in value):
        return _rule(annotation, meta, value)
    return None


def _read(node: Any, name: Any, key: str, problems: List[str]) -> Any:
    if isinstance(node, DictConfig) and OmegaConf.is_missing(node, name):
        problems.append(f"{key}: missing value ???; set it")
        return MissingValue
    try:
        return node[name]
    except OmegaConfBaseException as e:
        problems.append(f"{key}: {str(e).splitlines()[0]}")
        return MissingValue


class MissingValue:
    """A value that did not resolve (already reported)."""


def _merge(target: DictConfig, node: DictConfig, schema: type, key: str, problems: List[str], files: bool) -> None:
    """Merge ``node``'s keys into ``target`` (``OmegaConf.structured(schema)``), one key at a time so that every
    problem is reported; then the schema's rules on the merged values, and its missing keys."""
    known = fields(schema)
    hints = typing.get_type_hints(schema)
    for name in node.keys():
        if name not in known:
            hint = _did_you_mean(str(name), known, prefix=f"{key}." if key else "")
            if not hint:
                hint = f" ({key} takes: {', '.join(known)})" if key else f" (no such key in {schema.__name__})"
            problems.append(f"unknown key {_join(key, name)!r}{hint}")
    for name in known:  # in the schema's order
        where = _join(key, name)
        if name not in node.keys():
            continue
        if OmegaConf.is_missing(node, name):
            continue  # reported by _walk
        value = _read(node, name, where, problems)
        if value is MissingValue:
            continue
        annotation, meta = hints[name], known[name].metadata
        nested = next((o for o in _options(annotation) if o is not None and dataclasses.is_dataclass(o)), None)
        if nested is not None and isinstance(value, DictConfig):
            if target[name] is None:
                target[name] = OmegaConf.structured(nested)
            _merge(target[name], value, nested, where, problems, files)
            continue
        problem = _shape_problem(annotation, meta, value)
        if problem is None:
            try:
                OmegaConf.update(target, name, value, merge=False)  # OmegaConf checks and converts the type
            except OmegaConfBaseException:
                problem = _rule(annotation, meta, value)
        if problem is not None:
            problems.append(f"{where}: {problem}")
    for name, fld in known.items():
        where, meta = _join(key, name), fld.metadata
        if OmegaConf.is_missing(target, name):
            if name not in node.keys():
                problems.append(f"missing key {where!r}: {meta['doc']}")
            continue
        value = target[name]
        if name not in node.keys() or isinstance(value, DictConfig) and not meta.get("component"):
            continue  # a default (right by construction), or a nested mapping (checked above)
        problem = value_problem(hints[name], meta, value)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        for arg, rule in meta.get("args", {}).items():
            if isinstance(value, DictConfig) and arg in value:
                inner = _read(value, arg, f"{where}.{arg}", problems)
                arg_meta = dict(doc=rule.doc, minimum=rule.minimum, exclusive=rule.exclusive)
                kind = rule.type
                if inner is MissingValue:
                    continue
                if kind is float and isinstance(inner, int) and not isinstance(inner, bool):
                    inner = float(inner)
                if not isinstance(inner, kind) or isinstance(inner, bool):
                    problems.append(f"{where}.{arg}: {_rule(kind, arg_meta, inner)}")
                else:
                    arg_problem = value_problem(kind, arg_meta, inner)
                    if arg_problem:
                        problems.append(f"{where}.{arg}: {arg_problem}")
        if files and meta.get("input_file") and value is not None:
            _check_file(where, value, problems)


def typed_config(cfg: DictConfig, schema: type, files: bool = True) -> Tuple[DictConfig, List[str]]:
    """``(config, problems)``: ``cfg`` merged into ``OmegaConf.structured(schema)`` (struct mode: every key typed,
    the schema's defaults for the keys ``cfg`` leaves out), and what breaks the schema."""
    typed = OmegaConf.structured(schema)
    problems: List[str] = []
    _merge(typed, cfg, schema, "", problems, files)
    OmegaConf.set_struct(typed, True)
    return typed, problems


# ---------------------------------------------------------------- components, interpolations, files


def locate(path: Any) -> Any:
    """The object at dotted ``path``, found by torchtune's own locator.

    Raises:
        ValueError: naming the part of the path that fails, with a close match when there is one.
    """
    from torchtune.config._utils import _get_component_from_path

    if not isinstance(path, str) or not path:
        raise ValueError(f"expected a dotted path such as 'torch.optim.AdamW', got {path!r}")
    try:
        return _get_component_from_path(path)
    except Exception as e:
        parts, obj, i = path.split("."), None, 1
        try:
            obj = importlib.import_module(parts[0])
            while i < len(parts) and hasattr(obj, parts[i]):
                obj, i = getattr(obj, parts[i]), i + 1
        except ModuleNotFoundError:
            raise ValueError(f"cannot import {path!r}: there is no module {parts[0]!r}") from None
        except Exception:
            pass
        if obj is None or i == len(parts):
            raise ValueError(f"cannot import {path!r}: {str(e).splitlines()[0]}") from None
        names = [n for n in dir(obj) if not n.startswith("_")]
        hint = _did_you_mean(parts[i], names)
        raise ValueError(
            f"cannot import {path!r}: {'.'.join(parts[:i])!r} has no attribute {parts[i]!r}{hint}"
        ) from None


def _check_component(node: DictConfig, key: str, problems: List[str]) -> None:
    from torchtune.config import validate

    where = f"{key}._component_" if key else "_component_"
    target = _read(node, "_component_", where, problems)
    if target is MissingValue:
        return
    try:
        obj = locate(target)
    except ValueError as e:
        problems.append(f"{where}: {e}")
        return
    if not callable(obj):
        problems.append(f"{where}: {target!r} is not callable")
        return
    try:
        resolved = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException:
        return  # reported by _walk
    try:
        validate(OmegaConf.create({"node": resolved}))  # torchtune's check of the keywords against the signature
        return
    except Exception as e:
        error = e
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        params = []
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unexpected = [n for n in node.keys() if n != "_component_" and n not in accepted]
    for name in unexpected:
        shown = ", ".join(accepted[:12]) + (", ..." if len(accepted) > 12 else "")
        hint = _did_you_mean(str(name), accepted) or (f" (it takes: {shown})" if accepted else " (it takes none)")
        problems.append(f"{_join(key, name)}: unexpected keyword for {target}{hint}")
    if not unexpected:
        problems.append(f"{key or '_component_'}: {str(error).splitlines()[-1].strip()}")


def _check_file(key: str, value: Any, problems: List[str]) -> None:
    from gqa_tune.data import resolve_data_file  # the data/tasks/ names fall back to the packaged copies

    for v in list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]:
        if not isinstance(v, str):
            problems.append(f"{key}: expected a file path, got {v!r}")
        elif not resolve_data_file(v).exists():
            problems.append(f"{key}: file {v!r} does not exist (relative paths are taken from {os.getcwd()})")


def _walk(node: Any, key: str, problems: List[str], files: bool) -> None:
    """Every value below ``node``: interpolations, components (at any depth), components' input files."""
    if isinstance(node, DictConfig):
        if "_component_" in node:
            _check_component(node, key, problems)
        names: Iterable = node.keys()
    elif isinstance(node, ListConfig):
        names = range(len(node))
    else:
        return
    for name in names:
        value = _read(node, name, _join(key, name), problems)
        if files and name in INPUT_FILE_KEYS and value not in (None, MissingValue) and "_component_" in node:
            _check_file(_join(key, name), value, problems)
        _walk(value, _join(key, name), problems, files)


# ---------------------------------------------------------------- building the cheap components once


#: Builder arguments that are positive ints in every gqa_tune builder (checked in a ``model:`` that only
#: overrides a checkpoint's builder, which cannot be built before the checkpoint is read).
_POSITIVE_BUILDER_ARGS = (
    "vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "max_seq_len", "head_dim",
)  # fmt: skip


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _dry_build(cfg: DictConfig, problems: List[str]) -> None:
    """Build the cheap components once, so a value a component refuses is reported before the recipe starts:
    the tokenizer, the model on the meta device (no memory; its vocabulary against the tokenizer's ids), the
    optimizer over one dummy parameter and the scheduler over that optimizer."""
    import torch
    from torchtune import config as tt_config

    def build(key: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return tt_config.instantiate(cfg[key], *args, **kwargs)
        except Exception as err:  # the component's refusal of its arguments: name them with the reason
            node = OmegaConf.to_container(cfg[key], resolve=True)
            component = node.pop("_component_")
            given = ", ".join(f"{key}.{k}={v!r}" for k, v in node.items())
            problems.append(f"{key}: {component} refuses {given}: {_first_line(err)}")
        return None

    def has(key: str) -> bool:
        return OmegaConf.is_dict(cfg.get(key)) and "_component_" in cfg[key]

    tokenizer = build("tokenizer") if has("tokenizer") else None
    model_cfg = cfg.get("model")
    if has("model") and not cfg.get("hf_model_dir"):
        try:
            with torch.device("meta"):
                model = tt_config.instantiate(model_cfg)
        except ValueError as err:  # other errors (e.g. NF4 on the meta device) are for the recipe to meet
            problems.append(f"model: {_first_line(err).split(': ', 1)[1]}")
            model = None
        except Exception:
            model = None
        embedding = getattr(model, "tok_embeddings", None)
        if tokenizer is not None and isinstance(embedding, torch.nn.Embedding):
            from gqa_tune.training.weights import tokenizer_ids

            needed = tokenizer_ids(tokenizer)
            if embedding.num_embeddings < needed:
                problems.append(
                    f"model: vocab_size {embedding.num_embeddings} is smaller than the tokenizer's "
                    f"({cfg.tokenizer._component_}) {needed} ids"
                )
    elif OmegaConf.is_dict(model_cfg):
        for name in _POSITIVE_BUILDER_ARGS:
            value = model_cfg.get(name)
            if name in model_cfg and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"model.{name}: expected a positive int, got {value!r}")
    if has("optimizer"):
        optimizer = build("optimizer", [torch.nn.Parameter(torch.zeros(1))])
        if has("lr_scheduler") and optimizer is not None:
            if "num_training_steps" in cfg.lr_scheduler:
                problems.append(
                    "lr_scheduler.num_training_steps: the recipe sets it (epochs x optimizer steps per epoch); "
                    "remove it"
                )
            else:
                build("lr_scheduler", optimizer, num_training_steps=1)


def _check_hf_model_dir(cfg: DictConfig, problems: List[str]) -> None:
    """``hf_model_dir``: the directory exists with a readable ``config.json`` of an architecture gqa_tune builds,
    and its vocabulary holds the config's tokenizer's ids."""
    value = cfg.get("hf_model_dir")
    if not isinstance(value, str) or not value.strip():
        return
    if value.lower().endswith(".gguf"):  # converted when the recipe loads it; here: that it is a GGUF file
        from gqa_tune.hf.gguf import gguf_problem

        problem = gguf_problem(Path(value))
        if problem:
            problems.append(f"hf_model_dir {value!r}: {problem}")
        return
    from gqa_tune.hf import builder_from_hf_config, read_hf_config
    from gqa_tune.training.weights import tokenizer_ids

    try:
        config = read_hf_config(Path(value))
        builder_from_hf_config(config, f"hf_model_dir {value!r}: config.json")
    except ValueError as err:
        problems.append(str(err))
        return
    tokenizer = cfg.get("tokenizer")
    if not OmegaConf.is_dict(tokenizer) or "_component_" not in tokenizer:
        return
    from torchtune import config as tt_config

    try:
        needed = tokenizer_ids(tt_config.instantiate(tokenizer))
    except Exception as err:  # the tokenizer's own problem, reported as such
        problems.append(f"tokenizer: cannot build {tokenizer.get('_component_')}: {err}")
        return
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and vocab < needed:
        problems.append(
            f"hf_model_dir {value!r}: config.json: vocab_size {vocab} is smaller than the tokenizer's "
            f"({tokenizer.get('_component_')}) {needed} ids; use the model's own tokenizer"
        )


def empty_overrides(overrides: Sequence[str], schema: Optional[type]) -> List[str]:
    """Problems with command-line overrides ``key=`` that give a key no value.

    ``tune run`` reads ``hf_model_dir=`` as null, so a shell variable that is unset (``hf_model_dir=$DIR``)
    silently drops the key. Where the key's rule refuses an empty string (directories and files to read or
    write), the empty override is refused too.
    """
    if schema is None:
        return []
    known, hints = fields(schema), typing.get_type_hints(schema)
    problems = []
    for override in overrides:
        key, sep, value = str(override).partition("=")
        fld = known.get(key)
        check = fld.metadata.get("check") if fld is not None else None
        nullable = fld is not None and None in _options(hints[key])  # (a required key's None is refused anyway)
        if sep and value == "" and nullable and check is not None and check("") is not None:
            problems.append(
                f"{key}: given no value on the command line ({key}=), which would read as null; give a value, "
                f"or {key}=null to mean none"
            )
    return problems


# ---------------------------------------------------------------- entry points


def schema_of(recipe: Union[str, os.PathLike, type, None]) -> Optional[type]:
    """The schema of a recipe (a name, a path to one of ours or a copy of one, or a schema itself)."""
    from gqa_tune.schema import RECIPES, schema_named

    if recipe is None or isinstance(recipe, type):
        return recipe
    name = find_recipe(str(recipe)) or find_recipe(Path(recipe).stem)
    if name is None and Path(recipe).is_file():  # a recipe of one's own: it names its schema
        import re

        match = re.search(r"^CONFIG_SCHEMA\s*=\s*(\w+)", Path(recipe).read_text(), re.M)
        return schema_named(match.group(1)) if match else None
    return RECIPES[name].schema if name else None


def _problems(
    cfg: Any, schema: Optional[type], check_files: bool, overrides: Sequence[str]
) -> Tuple[Optional[DictConfig], List[str]]:
    """``(typed config or None, problems)``: every check, in order (each later one only on a clean config)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if os.getcwd() not in sys.path:  # as torchtune.config.instantiate does, for components in local modules
        sys.path.append(os.getcwd())
    problems: List[str] = empty_overrides(overrides, schema)
    typed = None
    if schema is not None:
        typed, found = typed_config(cfg, schema, check_files)
        problems += found
    _walk(cfg, "", problems, check_files)
    problems = list(dict.fromkeys(problems))
    if check_files and not problems:
        _check_hf_model_dir(cfg, problems)
    if check_files and not problems and schema is not None:
        _dry_build(typed, problems)
    return typed, problems


def validate_config(
    cfg: Any, recipe: Union[str, os.PathLike, type, None] = None, check_files: bool = True
) -> List[str]:
    """Problems with a recipe config, each led by its dotted key; empty when it is valid.

    ``recipe`` (a name, a path or a schema) gives the keys; without one only components,
    interpolations and files are checked.
    """
    return _problems(cfg, schema_of(recipe), check_files, ())[1]


def parse_config(cfg: Any, schema: type, overrides: Sequence[str] = (), check_files: bool = True) -> DictConfig:
    """The one check of a recipe's config, and the typed config the recipe then reads: ``cfg`` merged into
    ``OmegaConf.structured(schema)`` in struct mode (:func:`typed_config`).

    Args:
        cfg: the user's config (a YAML file with its command-line overrides, as ``tune run`` parsed it).
        schema: the recipe's dataclass.
        overrides: the command line's ``key=value`` arguments, for :func:`empty_overrides`.
        check_files: also check input files, ``hf_model_dir`` and build the cheap components.

    Raises:
        ConfigError: every problem found, each led by its key.
    """
    typed, problems = _problems(cfg, schema, check_files, overrides)
    if problems:
        raise ConfigError(problems)
    return typed


def build_component(node: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """``torchtune.config.instantiate(node, *args, **kwargs)``, with a ``ValueError`` the component raises
    (one of its arguments has a value it refuses, e.g. ``lora_rank: 0``) reported as a :class:`ConfigError`
    naming ``key``, so the recipe refuses cleanly before it trains instead of printing a traceback.
    """
    from torchtune import config as tt_config

    try:
        return tt_config.instantiate(node, *args, **kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{key}: {err}", what=f"the {key}") from err


def exits_on_config_error(recipe_main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a recipe's main (under ``@config.parse``) so that a :class:`ConfigError` ends the process
    with its message on stderr and exit status 1, not a traceback."""

    @functools.wraps(recipe_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return recipe_main(*args, **kwargs)
        except ConfigError as e:
            sys.stdout.flush()
            sys.exit(f"gqa_tune: {e}")

    return wrapper


def check_writable_dir(path: Union[str, Path], key: str = "output_dir") -> Path:
    """Create directory ``path`` if missing, and write and remove a probe file in it.

    Raises:
        ConfigError: naming ``key`` and the path, when either fails.
    """
    path = Path(path).expanduser()
    probe = path / f".gqa_tune_write_probe_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        problem = f"{key}: cannot create and write to the directory {str(path)!r}: {e.strerror or e}"
        raise ConfigError(problem, what=key) from None
    return path


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> DictConfig:
    """A YAML config with ``key=value`` / ``~key`` overrides merged as ``tune run`` merges them. An override
    whose value contains ``=`` (which torchtune's parser rejects) is set verbatim as a string.

    Raises:
        ValueError: for a malformed override or file.
    """
    from torchtune.config._utils import _merge_yaml_and_cli_args

    flags = [o for o in overrides if o.startswith("--")]
    if flags:
        raise ValueError(f"overrides must be key=value (or ~key), not flags: {flags}")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{str(path)!r} does not hold a mapping of keys to values")
    if "config" in cfg:
        raise ValueError("a config cannot have a top-level key 'config' (tune run's --config takes that name)")
    verbatim = [o for o in overrides if not o.startswith("~") and o.count("=") > 1]
    cfg = _merge_yaml_and_cli_args(
        Namespace(**OmegaConf.to_container(cfg, resolve=False)), [o for o in overrides if o not in verbatim]
    )
    for override in verbatim:
        key, value = override.split("=", 1)
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def check_config_file(path: Union[str, Path], overrides: Sequence[str] = (), recipe: Any = None,
                      check_files: bool = True) -> List[str]:  # fmt: skip
    """:func:`validate_config` of a file with overrides; the recipe defaults to :func:`config_recipe`'s."""
    if not isinstance(path, (str, os.PathLike)):
        return [f"config file must be a path, got {path!r}"]
    path = Path(path)
    if not path.is_file():
        return [f"config file {str(path)!r} does not exist"]
    try:
        cfg = load_config(path, overrides)
    except Exception as e:
        return [f"cannot load {str(path)!r}: {e}"]
    return _problems(cfg, schema_of(recipe or config_recipe(path)), check_files, overrides)[1]
