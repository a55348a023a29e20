"""Check a recipe config against its schema before running it, and find the project's recipes and configs.

:func:`validate_config` returns a list of problems, each led by the dotted key it is about::

    unknown key 'epcohs' (did you mean 'epochs'?)
    optimizer.lrr: unexpected keyword for torch.optim.AdamW (did you mean 'lr'?)
    gradient_accumulation_steps: expected an int >= 1 (micro-batches per optimizer step), got 0

The keys, types, defaults and ranges are the recipe's schema (:mod:`gqa_tune.schema`). Every
``_component_``, at any depth, is located with torchtune's own locator and its keywords
checked with torchtune's own validator (``torchtune.config.validate``); interpolations must
resolve, no value may be ``???``, and input files must exist. The recipes run this check
when started with plain ``tune run`` (:func:`check_config`, before anything is built);
:func:`exits_on_config_error` turns a :class:`ConfigError` into a message and exit status 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import os
import re
import sys
import typing
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gqa_tune.schema import RECIPES, Component, fields

# Config keys are declared once, in gqa_tune/schema.py (the FINETUNE_KEYS / KEY_SPECS tables are gone):
# to add a key, add a field to the recipe's dataclass there.

#: Keyword arguments of components (at any depth) whose values name input files that must exist.
INPUT_FILE_KEYS = frozenset({"data_file", "data_files", "accuracy_file"})


class ConfigError(ValueError):
    """Input a recipe refuses before it trains: ``problems`` lists them, each led by its key."""

    def __init__(self, problems: Union[str, Sequence[str]], what: str = "the config") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{count} with {what}; not starting:\n{lines}")


def _did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _join(key: str, name: Any) -> str:
    return f"{key}[{name}]" if isinstance(name, int) else (f"{key}.{name}" if key else str(name))


# ---------------------------------------------------------------- values against the schema


def _options(annotation: Any) -> List[Any]:
    """The alternatives of a field type: ``Optional[int]`` -> ``[int, None]``."""
    if typing.get_origin(annotation) is Union:
        return [None if a is type(None) else a for a in typing.get_args(annotation)]
    return [annotation]


def _describe(annotation: Any, meta: dict) -> str:
    names = {int: "an int", float: "a number", str: "a string", bool: "true or false", Component: "a component"}
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
        if dataclasses.is_dataclass(option) or origin is dict:
            words.append("a mapping")
        elif origin is list:
            words.append(f"a list of {names.get(typing.get_args(option)[0], 'values').split(' ', 1)[1]}s")
        else:
            words.append(names.get(option, getattr(option, "__name__", str(option))))
    text = " or ".join(words)
    if meta.get("minimum") is not None:
        text += f" {'>' if meta.get('exclusive') else '>='} {meta['minimum']:g}"
    return text + (" or null" if None in options else "")


def _fits(option: Any, value: Any) -> bool:
    if option is None:
        return value is None
    if option is Any:
        return True
    if option is Component:
        return isinstance(value, DictConfig) and "_component_" in value
    if dataclasses.is_dataclass(option) or typing.get_origin(option) is dict:
        return isinstance(value, DictConfig)
    if typing.get_origin(option) is list:
        item = typing.get_args(option)[0]
        return isinstance(value, ListConfig) and all(_fits(item, v) for v in value)
    if isinstance(value, bool):
        return option is bool
    if option is float:
        return isinstance(value, (int, float))
    return isinstance(value, option)


def value_problem(annotation: Any, meta: dict, value: Any) -> Optional[str]:
    """Why ``value`` breaks a field (``expected an int >= 1 (...), got 0``), or None."""
    rule = f"expected {_describe(annotation, meta)} ({meta.get('doc', '')}), got {value!r}"
    if not any(_fits(option, value) for option in _options(annotation)):
        return rule
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return rule
    low = meta.get("minimum")
    if (
        low is not None
        and isinstance(value, (int, float))
        and (value < low or (meta.get("exclusive") and value == low))
    ):
        return rule
    reason = meta["check"](value) if meta.get("check") else None
    return f"{rule}: {reason}" if reason else None


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


def _check_schema(node: DictConfig, schema: type, key: str, problems: List[str], files: bool, strict: bool) -> None:
    """``node``'s keys and values against ``schema``; ``strict``: also required keys (not for values-only checks)."""
    known = fields(schema)
    hints = typing.get_type_hints(schema)
    for name in node.keys():
        if name not in known:
            hint = _did_you_mean(str(name), known, prefix=f"{key}." if key else "")
            if not hint:
                hint = f" ({key} takes: {', '.join(known)})" if key else f" (no such key in {schema.__name__})"
            problems.append(f"unknown key {_join(key, name)!r}{hint}")
    for name, fld in known.items():
        where = _join(key, name)
        if name not in node.keys():
            if strict and fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                problems.append(f"missing key {where!r}: {fld.metadata['doc']}")
            continue
        if OmegaConf.is_missing(node, name):
            continue  # reported by _walk
        value = _read(node, name, where, problems)
        if value is MissingValue:
            continue
        problem = value_problem(hints[name], fld.metadata, value)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        for arg, rule in fld.metadata.get("args", {}).items():
            if isinstance(value, DictConfig) and arg in value:
                meta = dict(doc=rule.doc, minimum=rule.minimum, exclusive=rule.exclusive)
                inner = _read(value, arg, f"{where}.{arg}", problems)
                problem = None if inner is MissingValue else value_problem(rule.type, meta, inner)
                if problem:
                    problems.append(f"{where}.{arg}: {problem}")
        if files and fld.metadata.get("input_file") and value is not None:
            _check_file(where, value, problems)
        nested = [o for o in _options(hints[name]) if o is not None and dataclasses.is_dataclass(o)]
        if nested and isinstance(value, DictConfig):
            _check_schema(value, nested[0], where, problems, files, strict)


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


# ---------------------------------------------------------------- entry points


def schema_of(recipe: Union[str, os.PathLike, type, None]) -> Optional[type]:
    """The schema of a recipe (a name, a path to one of ours or a copy of one, or a schema itself)."""
    if recipe is None or isinstance(recipe, type):
        return recipe
    name = find_recipe(str(recipe)) or find_recipe(Path(recipe).stem)
    if name is None and Path(recipe).is_file():  # a recipe of one's own: it names its schema
        match = re.search(r"^CONFIG_SCHEMA\s*=\s*(\w+)", Path(recipe).read_text(), re.M)
        return getattr(importlib.import_module("gqa_tune.schema"), match.group(1)) if match else None
    return RECIPES[name].schema if name else None


def validate_config(
    cfg: Any, recipe: Union[str, os.PathLike, type, None] = None, check_files: bool = True
) -> List[str]:
    """Problems with a recipe config, each led by its dotted key; empty when it is valid.

    ``recipe`` (a name, a path or a schema) gives the keys; without one only components,
    interpolations and files are checked.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if os.getcwd() not in sys.path:  # as torchtune.config.instantiate does, for components in local modules
        sys.path.append(os.getcwd())
    problems: List[str] = []
    schema = schema_of(recipe)
    if schema is not None:
        _check_schema(cfg, schema, "", problems, check_files, strict=True)
    _walk(cfg, "", problems, check_files)
    if check_files and not problems:
        _check_hf_model_dir(cfg, problems)
    if check_files and not problems and schema is not None:
        _dry_build(cfg, problems)
    return list(dict.fromkeys(problems))


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


def empty_overrides(overrides: Sequence[str], recipe: Union[str, os.PathLike, type, None]) -> List[str]:
    """Problems with command-line overrides ``key=`` that give a key no value.

    ``tune run`` reads ``hf_model_dir=`` as null, so a shell variable that is unset (``hf_model_dir=$DIR``)
    silently drops the key. Where the key's rule refuses an empty string (directories and files to read or
    write), the empty override is refused too.
    """
    schema = schema_of(recipe)
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


def check_config(
    cfg: Any,
    recipe: Union[str, os.PathLike, type, None] = None,
    check_files: bool = True,
    overrides: Sequence[str] = (),
) -> None:
    """:func:`validate_config` (and :func:`empty_overrides` of the command line's ``overrides``), raising
    :class:`ConfigError` listing every problem instead."""
    problems = empty_overrides(overrides, recipe) + validate_config(cfg, recipe=recipe, check_files=check_files)
    if problems:
        raise ConfigError(problems)


def check_values(cfg: DictConfig, schema: type) -> None:
    """Only the value rules of ``schema`` (no imports, no files, no required keys): cheap enough for a constructor."""
    problems: List[str] = []
    _check_schema(cfg, schema, "", problems, files=False, strict=False)
    if problems:
        raise ConfigError(problems)


def with_defaults(cfg: DictConfig, schema: type) -> DictConfig:
    """``cfg`` with the schema's defaults for the keys it leaves out (a new config)."""
    defaults = {}
    for name, fld in fields(schema).items():
        if fld.default is not dataclasses.MISSING:
            defaults[name] = fld.default
        elif fld.default_factory is not dataclasses.MISSING:
            defaults[name] = fld.default_factory()
    return OmegaConf.merge(OmegaConf.create(defaults), cfg)


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
    recipe = recipe or config_recipe(path)
    return empty_overrides(overrides, recipe) + validate_config(cfg, recipe=recipe, check_files=check_files)


# ---------------------------------------------------------------- the catalog (gqa_tune.schema.RECIPES)


def recipes_dir() -> Path:
    import gqa_tune.recipes

    return Path(gqa_tune.recipes.__path__[0])


def configs_dir() -> Path:
    import gqa_tune.configs

    return Path(gqa_tune.configs.__path__[0])


def recipe_names() -> List[str]:
    return sorted(RECIPES)


def recipe_file(name: str) -> Path:
    return recipes_dir() / f"{name}.py"


def config_names() -> List[str]:
    return sorted(c for r in RECIPES.values() for c in r.configs)


def _stem(name: str, prefixes: Sequence[str], suffix: str) -> str:
    name = name.strip().replace("\\", "/").removeprefix("./")
    for prefix in prefixes:
        name = name.removeprefix(prefix)
    return name.removesuffix(suffix)


def find_recipe(name: str) -> Optional[str]:
    """Our recipe called ``name`` (also ``name.py``, ``recipes/name.py``, ``gqa_tune/recipes/name.py``), or None."""
    stem = _stem(name, ("gqa_tune/", "recipes/"), ".py")
    return stem if stem in RECIPES else None


def find_config(name: str) -> Optional[Path]:
    """Our config called ``name`` (``gqa_tiny/full``, with or without ``configs/`` and ``.yaml``), or None."""
    stem = _stem(name, ("gqa_tune/", "configs/"), ".yaml")
    return configs_dir() / f"{stem}.yaml" if stem in config_names() else None


def config_recipe(path: Union[str, Path]) -> Optional[str]:
    """The recipe a config belongs to: the registry's, or, for a copy, the first recipe its header's
    ``tune run gqa_tune/recipes/<name>.py`` line names."""
    path = Path(path)
    for recipe, entry in RECIPES.items():
        if any(path.resolve() == (configs_dir() / f"{c}.yaml").resolve() for c in entry.configs):
            return recipe
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    match = re.search(r"^#.*\btune\s+run\b.*?\bgqa_tune/recipes/(\w+)\.py", text, re.M)
    return match.group(1) if match and match.group(1) in RECIPES else None
