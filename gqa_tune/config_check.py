"""Check a recipe config before running it, and find the project's recipes and configs.

:func:`validate_config` returns a list of problems, each starting with the
dotted key it is about, e.g. ``optimizer.lrr: unexpected keyword for
torch.optim.AdamW (did you mean 'lr'?)``. It checks that

- every ``_component_`` (at any depth, e.g. ``eval.dataset``) imports the way
  ``torchtune.config.instantiate`` imports it, and that the keys given next to
  it are keyword arguments its signature accepts (anything goes for ``**kwargs``);
- interpolations such as ``${output_dir}/logs`` resolve and no value is ``???``;
- input files named by :data:`INPUT_FILE_KEYS` (``dataset.data_file``, ...) exist;
- for a fine-tuning recipe (one defining a :class:`~gqa_tune.training.finetune.FinetuneRecipe`
  subclass), every top-level key is one the recipe reads
  (``unknown key 'epcohs' (did you mean 'epochs'?)``) and the keys it always
  reads are there;
- the values of the keys in :data:`KEY_SPECS` have the type and range the recipes need
  (``gradient_accumulation_steps: expected an int >= 1 (...), got 0``), and the plain
  mappings of nested keys there (``eval``) hold no other keys.

The recipes run the same check when started with ``tune run`` (:func:`check_config`, before
anything is built); :class:`ConfigError` is what they raise for input they refuse, and
:func:`exits_on_config_error` turns it into a message and exit status 1 instead of a traceback.

Recipes are the modules of ``gqa_tune.recipes`` (the repository's ``recipes/``);
configs are the YAML files under ``gqa_tune.configs`` (``configs/``), named by
their path there without ``.yaml`` (``gqa_tiny/full``). A config belongs to the
recipes named in its header comment's ``tune run`` line, the one whose
``--config`` is the file itself::

    # tune run gqa_tune/recipes/full_finetune_single_device.py --config configs/gqa_tiny/full.yaml
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import sys
import textwrap
from argparse import Namespace
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Callable, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: Top-level keys :class:`gqa_tune.training.finetune.FinetuneRecipe` reads
#: (``tests/recipes/test_configs.py`` checks this against its source).
FINETUNE_KEYS = frozenset(
    {
        "output_dir",
        "model",
        "tokenizer",
        "dataset",
        "checkpointer",
        "init_from_scratch",
        "init_std",
        "optimizer",
        "lr_scheduler",
        "batch_size",
        "epochs",
        "max_steps_per_epoch",
        "gradient_accumulation_steps",
        "clip_grad_norm",
        "dtype",
        "device",
        "seed",
        "shuffle",
        "enable_activation_checkpointing",
        "compile",
        "save_every_n_steps",
        "resume_from_checkpoint",
        "metric_logger",
        "log_every_n_steps",
        "eval",
    }
)

#: The ones it reads as ``cfg.key`` and never through ``cfg.get``: a config must set them.
FINETUNE_REQUIRED_KEYS = frozenset(
    {"output_dir", "model", "tokenizer", "dataset", "optimizer", "batch_size", "epochs", "metric_logger"}
)

#: Keys (at any depth) whose string values, or lists of strings, name input files that must exist.
#: Relative paths are taken from the working directory, as the recipes take them.
INPUT_FILE_KEYS = frozenset({"data_file", "data_files", "accuracy_file"})


# ---------------------------------------------------------------- the values


class KeySpec(NamedTuple):
    """What a config key's value must be.

    One of ``types`` (``int`` never accepts a bool; ``float`` also takes an int), at least
    ``minimum`` (greater than it when ``exclusive``), one of ``choices`` when given, or null
    when ``nullable``; ``check``, when given, returns why an otherwise fine value is wrong
    (or None). ``doc`` says what the key does, and is shown with the problem.
    """

    types: Tuple[type, ...]
    doc: str
    minimum: Optional[float] = None
    exclusive: bool = False
    choices: Tuple[str, ...] = ()
    nullable: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None


def _torch_device(value: str) -> Optional[str]:
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return "not a torch device (e.g. cpu, cuda, cuda:1)"
    return None


def _not_empty(value: str) -> Optional[str]:
    return None if value.strip() else "empty"


INT, NUMBER, STRING, BOOL, MAPPING = (int,), (float,), (str,), (bool,), (DictConfig,)

#: The value rules, by dotted key, for every recipe that reads the key. A recipe class may
#: change a row for itself with a ``CONFIG_SPECS`` attribute (the uptrain recipe wants
#: ``epochs: null``). Children of a plain mapping listed here (``eval.*``) are its only keys.
KEY_SPECS: Mapping[str, KeySpec] = MappingProxyType(
    {
        "output_dir": KeySpec(STRING, "where checkpoints and logs go; created if missing", check=_not_empty),
        "batch_size": KeySpec(INT, "examples per micro-batch, per process", minimum=1),
        "epochs": KeySpec(INT, "passes over the dataset", minimum=1),
        "max_steps_per_epoch": KeySpec(INT, "optimizer steps per epoch at most; null: all", minimum=1, nullable=True),
        "gradient_accumulation_steps": KeySpec(INT, "micro-batches per optimizer step", minimum=1),
        "clip_grad_norm": KeySpec(NUMBER, "gradient norm clip; null: none", minimum=0, exclusive=True, nullable=True),
        "optimizer.lr": KeySpec(NUMBER, "learning rate; 0 keeps the weights", minimum=0),
        "lr_scheduler.num_warmup_steps": KeySpec(INT, "warm-up steps of the learning rate", minimum=0),
        "init_std": KeySpec(NUMBER, "std of the random initialization", minimum=0, exclusive=True),
        "seed": KeySpec(INT, "seed of data order, initialization and sampling; null: random", minimum=0, nullable=True),
        "shuffle": KeySpec(BOOL, "shuffle the dataset each epoch"),
        "dtype": KeySpec(STRING, "parameter and compute precision", choices=("fp32", "bf16", "fp16", "fp64")),
        "device": KeySpec(STRING, "the torch device", check=_torch_device),
        "init_from_scratch": KeySpec(BOOL, "random weights when nothing else loads them"),
        "resume_from_checkpoint": KeySpec(BOOL, "continue from output_dir's LATEST checkpoint"),
        "enable_activation_checkpointing": KeySpec(BOOL, "recompute activations in the backward pass"),
        "compile": KeySpec(BOOL, "torch.compile the model"),
        "save_every_n_steps": KeySpec(INT, "mid-epoch checkpoint interval; null: none", minimum=1, nullable=True),
        "log_every_n_steps": KeySpec(INT, "metric logging interval, in optimizer steps", minimum=1),
        "eval": KeySpec(MAPPING, "held-out evaluation after training; null: none", nullable=True),
        "eval.dataset": KeySpec(MAPPING, "the held-out dataset (a component)"),
        "eval.accuracy_file": KeySpec(STRING, "task file for the accuracy; null: none", nullable=True),
        "eval.max_examples": KeySpec(INT, "examples of accuracy_file scored at most", minimum=1),
        "max_new_tokens": KeySpec(INT, "tokens generated per prompt at most", minimum=1),
        "temperature": KeySpec(NUMBER, "sampling temperature; 0: greedy", minimum=0),
        "top_k": KeySpec(INT, "sample from the k most likely tokens; null: all", minimum=1, nullable=True),
    }
)


def recipe_specs(cls: type) -> Mapping[str, KeySpec]:
    """:data:`KEY_SPECS` with the rows the class and its bases change (``CONFIG_SPECS``, the nearest wins)."""
    specs = dict(KEY_SPECS)
    for base in reversed(cls.__mro__):
        specs.update(vars(base).get("CONFIG_SPECS", {}))
    return MappingProxyType(specs)


def describe_spec(spec: KeySpec) -> str:
    """The rule of ``spec`` in words: ``an int >= 1``, ``one of fp32, bf16 or null``, ..."""
    if spec.choices:
        text = "one of " + ", ".join(spec.choices)
    elif not spec.types:
        return "null"
    else:
        names = {int: "an int", float: "a number", str: "a string", bool: "true or false", DictConfig: "a mapping"}
        text = " or ".join(names.get(t, t.__name__) for t in spec.types)
    if spec.minimum is not None:
        text += f" {'>' if spec.exclusive else '>='} {spec.minimum:g}"
    return text + (" or null" if spec.nullable else "")


def value_problem(spec: KeySpec, value: Any) -> Optional[str]:
    """Why ``value`` breaks ``spec`` (``expected an int >= 1 (...), got 0``), or None when it keeps it."""
    rule = f"expected {describe_spec(spec)} ({spec.doc}), got {value!r}"
    if value is None:
        return None if spec.nullable else rule
    if isinstance(value, bool):
        fits = bool in spec.types
    elif isinstance(value, int):
        fits = int in spec.types or float in spec.types
    else:
        fits = isinstance(value, tuple(t for t in spec.types if t not in (int, bool)))
    if not fits or (spec.choices and value not in spec.choices):
        return rule
    if spec.minimum is not None and not isinstance(value, bool):
        if value < spec.minimum or (spec.exclusive and value == spec.minimum):
            return rule
    reason = spec.check(value) if spec.check is not None else None
    return f"{rule}: {reason}" if reason else None


def _check_values(cfg: DictConfig, specs: Mapping[str, KeySpec], read: Optional[frozenset], problems: List[str]):
    """Values against ``specs``, and the keys of the plain mappings that ``specs`` lists children of.

    ``read``: the top-level keys the recipe reads (None: unknown, check every key in ``specs``).
    Unresolvable or ``???`` values are left to :func:`_walk`, which reports them.
    """

    def applies(key: str) -> bool:
        return read is None or key.split(".")[0] in read

    for key, spec in specs.items():
        if not applies(key):
            continue
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or name not in node or OmegaConf.is_missing(node, name):
            continue
        try:
            value = node[name]
        except OmegaConfBaseException:
            continue
        problem = value_problem(spec, value)
        if problem:
            problems.append(f"{key}: {problem}")
    parents = sorted({k.rpartition(".")[0] for k in specs if "." in k})
    for parent in parents:
        if not applies(parent):
            continue
        node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False)
        if not isinstance(node, DictConfig) or "_component_" in node:
            continue  # a component's keywords are checked against its signature
        children = [k for k in specs if k.rpartition(".")[0] == parent]
        for name in node.keys():
            key = f"{parent}.{name}"
            if key not in children:
                hint = _did_you_mean(key, children) or f" ({parent} takes: {', '.join(children)})"
                problems.append(f"unknown key {key!r}{hint}")


_TUNE_RUN = re.compile(r"\btune\s+run\b.*?\bgqa_tune/recipes/(\w+)\.py\b(.*)")
_CONFIG_ARG = re.compile(r"--config[=\s]+(\S+)")


# ---------------------------------------------------------------- the catalog


def recipes_dir() -> Path:
    import gqa_tune.recipes

    return Path(gqa_tune.recipes.__path__[0])


def configs_dir() -> Path:
    import gqa_tune.configs

    return Path(gqa_tune.configs.__path__[0])


def recipe_names() -> List[str]:
    """The modules of ``gqa_tune.recipes``, sorted (private ``_*`` helper modules left out)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(recipes_dir())]) if not m.name.startswith("_"))


def recipe_file(name: str) -> Path:
    return recipes_dir() / f"{name}.py"


def config_files() -> List[Path]:
    """Every YAML file under ``configs/``, sorted."""
    root = configs_dir()
    return sorted(p for p in root.rglob("*.yaml") if p.is_file())


def config_name(path: Path) -> str:
    """``configs/gqa_tiny/full.yaml`` -> ``gqa_tiny/full``."""
    return Path(path).resolve().relative_to(configs_dir().resolve()).with_suffix("").as_posix()


def config_names() -> List[str]:
    return [config_name(p) for p in config_files()]


def _strip(name: str, prefixes: Sequence[str], suffix: str) -> str:
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    for prefix in prefixes:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name[: -len(suffix)] if name.endswith(suffix) else name


def find_recipe(name: str) -> Optional[str]:
    """Our recipe called ``name`` (also ``name.py``, ``recipes/name.py``, ``gqa_tune/recipes/name.py``), or None."""
    stem = _strip(name, ("gqa_tune/", "recipes/"), ".py")
    return stem if stem in recipe_names() else None


def find_config(name: str) -> Optional[Path]:
    """Our config called ``name`` (``gqa_tiny/full``, with or without ``configs/`` and ``.yaml``), or None."""
    stem = _strip(name, ("gqa_tune/", "configs/"), ".yaml")
    path = configs_dir() / f"{stem}.yaml"
    return path if stem and path.is_file() else None


def _header_runs(path: Path) -> List[Tuple[str, Optional[str]]]:
    """``(recipe, --config argument)`` of each ``tune run gqa_tune/recipes/X.py`` line in the header comment."""
    runs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break  # the header comment ends at the first line of YAML
        match = _TUNE_RUN.search(stripped)
        if match:
            config = _CONFIG_ARG.search(match.group(2))
            runs.append((match.group(1), config.group(1) if config else None))
    return runs


def config_recipes(path: Union[str, Path], strict: bool = True) -> List[str]:
    """The recipes a config belongs to, from its header comment's ``tune run`` lines.

    ``strict``: only lines whose ``--config`` is this file (by path under
    ``configs/`` or name). Otherwise, when no line is, every recipe the header
    names (a config copied out with ``gqa-tune cp`` still names its recipe).
    """
    path = Path(path)
    runs = _header_runs(path)
    try:
        own = config_name(path)
    except ValueError:  # not under configs/
        own = None
    recipes = [r for r, c in runs if c is not None and _strip(c, ("gqa_tune/", "configs/"), ".yaml") == own]
    if not recipes and not strict:
        recipes = [r for r, _ in runs]
    return list(dict.fromkeys(recipes))


def recipe_configs() -> dict:
    """``{recipe: [config names]}`` for every recipe, plus ``None: [...]`` for configs that name no recipe."""
    table: dict = {name: [] for name in recipe_names()}
    for path in config_files():
        recipes = config_recipes(path) or [None]
        for recipe in recipes:
            table.setdefault(recipe, []).append(config_name(path))
    return table


# ---------------------------------------------------------------- which keys a recipe reads


def config_reads(source: str) -> Tuple[set, set]:
    """Top-level config keys some Python source reads: ``(all keys, keys read through .get / in)``.

    Counts ``self.cfg.X``, ``self.cfg["X"]``, ``self.cfg.get("X")``, ``"X" in self.cfg``, and the
    same on a function's ``cfg`` parameter (unless the function rebinds ``cfg``, as
    ``cfg = self.cfg.eval`` does).
    """
    tree = ast.parse(textwrap.dedent(source))
    keys, optional = set(), set()

    def scan(root: ast.AST, bare_cfg: bool) -> None:
        def is_cfg(node: ast.AST) -> bool:
            if isinstance(node, ast.Attribute) and node.attr == "cfg":
                return isinstance(node.value, ast.Name) and node.value.id == "self"
            return bare_cfg and isinstance(node, ast.Name) and node.id == "cfg"

        called = {id(n.func) for n in ast.walk(root) if isinstance(n, ast.Call)}
        for node in ast.walk(root):
            if isinstance(node, ast.Attribute) and is_cfg(node.value) and id(node) not in called:
                keys.add(node.attr)
            elif isinstance(node, ast.Subscript) and is_cfg(node.value):
                index = node.slice
                if isinstance(index, ast.Constant) and isinstance(index.value, str):
                    keys.add(index.value)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_cfg(node.func.value):
                if node.func.attr in ("get", "pop") and node.args:
                    arg = node.args[0]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        keys.add(arg.value)
                        optional.add(arg.value)
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant):
                if isinstance(node.left.value, str) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                    if any(is_cfg(c) for c in node.comparators):
                        keys.add(node.left.value)
                        optional.add(node.left.value)

    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for fn in functions:
        args = fn.args
        params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        rebinds = any(isinstance(n, ast.Name) and n.id == "cfg" and isinstance(n.ctx, ast.Store) for n in ast.walk(fn))
        scan(fn, bare_cfg="cfg" in params and not rebinds)
    return keys, optional


class RecipeKeys(NamedTuple):
    known: frozenset  # the top-level keys the recipe reads
    required: frozenset  # the ones a config must set
    complete: bool  # known is every key it reads (fine-tuning recipes); else only near misses are reported
    specs: Mapping[str, KeySpec] = KEY_SPECS  # the value rules, with the recipe's CONFIG_SPECS rows


def recipe_name(recipe: Union[str, os.PathLike]) -> str:
    """Our recipe's name for a name or a path to one of ``gqa_tune.recipes``' files (what ``tune run``'s
    ``__file__`` is), else ``recipe`` as given."""
    recipe = str(recipe)
    name = find_recipe(recipe)
    if name is not None:
        return name
    path = Path(recipe)
    if path.suffix == ".py" and path.is_file() and path.resolve() == recipe_file(path.stem).resolve():
        return path.stem
    return recipe


def _load_recipe_module(recipe: str) -> ModuleType:
    name = find_recipe(recipe)
    if name is not None:
        return importlib.import_module(f"gqa_tune.recipes.{name}")
    path = Path(recipe)
    if path.suffix == ".py" and path.is_file():
        spec = importlib.util.spec_from_file_location(f"_gqa_tune_checked_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # recipes run only under `if __name__ == "__main__"`
        return module
    raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(recipe_names())} or a .py file")


@functools.cache
def recipe_keys(recipe: str) -> Optional[RecipeKeys]:
    """The top-level keys a recipe (a name in ``gqa_tune.recipes`` or a ``.py`` path) reads.

    For a fine-tuning recipe (the module defines a ``FinetuneRecipe`` subclass) the set
    is complete: :data:`FINETUNE_KEYS`, plus what the module and the subclasses' other
    bases read (:func:`config_reads`), plus any ``CONFIG_KEYS`` class attribute (for keys
    read where :func:`config_reads` cannot see). For other recipes it is what
    :func:`config_reads` finds in the module and its classes' gqa_tune bases, which may
    miss keys read elsewhere, so it is marked incomplete; None when that finds nothing.
    """
    from gqa_tune.training.finetune import FinetuneRecipe

    module = _load_recipe_module(recipe)
    classes = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
    finetune = [c for c in classes if issubclass(c, FinetuneRecipe)]
    known = set(FINETUNE_KEYS) if finetune else set()
    sources = {module.__name__: inspect.getsource(module)}
    specs = dict(KEY_SPECS)
    for cls in finetune or classes:
        known.update(getattr(cls, "CONFIG_KEYS", ()))
        specs.update(recipe_specs(cls))
        for base in cls.__mro__[1:]:
            if base.__module__.split(".")[0] == "gqa_tune" and base.__module__ not in sources:
                sources[base.__module__] = inspect.getsource(base)
    for source in sources.values():
        known.update(config_reads(source)[0])
    specs = MappingProxyType(specs)
    if finetune:
        return RecipeKeys(frozenset(known), FINETUNE_REQUIRED_KEYS, complete=True, specs=specs)
    return RecipeKeys(frozenset(known), frozenset(), complete=False, specs=specs) if known else None


# ---------------------------------------------------------------- components


class ComponentError(Exception):
    """A ``_component_`` path that does not import."""


def _public_names(obj: Any) -> List[str]:
    names = [n for n in dir(obj) if not n.startswith("_")]
    if isinstance(obj, ModuleType) and hasattr(obj, "__path__"):
        names += [m.name for m in pkgutil.iter_modules(obj.__path__)]
    return names


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_component(path: Any) -> Any:
    """The object at dotted ``path``, imported as ``torchtune.config.instantiate`` does.

    Raises:
        ComponentError: naming the part of the path that fails, with a close match when there is one.
    """
    if not isinstance(path, str) or not path:
        raise ComponentError(f"expected a dotted path such as 'torch.optim.AdamW', got {path!r}")
    parts = path.split(".")
    if not all(parts):
        raise ComponentError(f"{path!r} is not a dotted path (relative imports are not supported)")
    try:
        obj = importlib.import_module(parts[0])
    except ModuleNotFoundError as e:
        if e.name != parts[0]:
            raise ComponentError(f"cannot import {path!r}: importing {parts[0]!r} failed: {e}") from e
        raise ComponentError(f"cannot import {path!r}: there is no module {parts[0]!r}") from e
    except Exception as e:
        raise ComponentError(f"cannot import {path!r}: importing {parts[0]!r} raised {e!r}") from e
    for i in range(1, len(parts)):
        part, parent = parts[i], ".".join(parts[:i])
        try:
            obj = getattr(obj, part)
            continue
        except AttributeError:
            pass
        if isinstance(obj, ModuleType):
            module = ".".join(parts[: i + 1])
            try:
                obj = importlib.import_module(module)
                continue
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise ComponentError(f"cannot import {path!r}: importing {module!r} failed: {e}") from e
            except Exception as e:
                raise ComponentError(f"cannot import {path!r}: importing {module!r} raised {e!r}") from e
        hint = _did_you_mean(part, _public_names(obj))
        raise ComponentError(f"cannot import {path!r}: {parent!r} has no attribute {part!r}{hint}")
    return obj


def _accepted_keywords(obj: Any) -> Optional[List[str]]:
    """Names ``obj`` accepts as keyword arguments, or None when it takes ``**kwargs`` or has no signature."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds]


def _check_component(node: DictConfig, key: str, problems: List[str]) -> None:
    where = f"{key}._component_" if key else "_component_"
    try:
        target = node["_component_"]
        obj = resolve_component(target)
    except (ComponentError, OmegaConfBaseException) as e:
        problems.append(f"{where}: {e}")
        return
    if not callable(obj):
        problems.append(f"{where}: {target!r} is not callable")
        return
    accepted = _accepted_keywords(obj)
    if accepted is None:
        return
    for name in node.keys():
        if name == "_component_" or name in accepted:
            continue
        hint = _did_you_mean(str(name), accepted)
        if not hint:
            shown = ", ".join(accepted[:12]) + (", ..." if len(accepted) > 12 else "")
            hint = f" (it takes: {shown})" if accepted else " (it takes no keyword arguments)"
        problems.append(f"{_join(key, name)}: unexpected keyword for {target}{hint}")


def _join(key: str, name: Any) -> str:
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else str(name)


def _check_file(key: str, value: Any, problems: List[str]) -> None:
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    for v in values:
        if isinstance(v, str) and not Path(v).expanduser().exists():
            problems.append(
                f"{key}: file {v!r} does not exist (relative paths are taken from the working directory, {os.getcwd()})"
            )


def _walk(node: Any, key: str, problems: List[str], check_files: bool) -> None:
    """Visit every value below ``node``: interpolations, components, input files."""
    if isinstance(node, DictConfig):
        if "_component_" in node:
            _check_component(node, key, problems)
        names: Iterable = node.keys()
    elif isinstance(node, ListConfig):
        names = range(len(node))
    else:
        return
    for name in names:
        child_key = _join(key, name)
        try:
            value = node[name]
        except OmegaConfBaseException as e:
            message = str(e).splitlines()[0]
            problems.append(f"{child_key}: {message}")
            continue
        if check_files and name in INPUT_FILE_KEYS and value is not None:
            _check_file(child_key, value, problems)
        _walk(value, child_key, problems, check_files)


# ---------------------------------------------------------------- validation


def validate_config(
    cfg: Any,
    recipe: Union[str, Sequence[str], None] = None,
    check_files: bool = True,
) -> List[str]:
    """Problems with a recipe config, each led by its dotted key; empty when the config is valid.

    Args:
        cfg: the config (a ``DictConfig`` or a mapping), with any overrides already merged.
        recipe: the recipe(s) that will read it (a name in ``gqa_tune.recipes`` or a ``.py``
            path). Top-level keys are checked against the keys they read (:func:`recipe_keys`):
            for fine-tuning recipes every key they do not read is reported, for others the
            near misses of keys they read; with several recipes, a key any of them reads is fine.
        check_files: check that the input files named by :data:`INPUT_FILE_KEYS` exist.
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    if os.getcwd() not in sys.path:  # as torchtune.config.instantiate does, for components in local modules
        sys.path.append(os.getcwd())
    problems: List[str] = []

    recipes = [recipe] if isinstance(recipe, (str, os.PathLike)) else list(recipe or [])
    recipes = [recipe_name(r) for r in recipes]
    keys: List[RecipeKeys] = []
    for name in recipes:
        try:
            found = recipe_keys(name)
        except Exception as e:
            problems.append(f"recipe {name!r} cannot be loaded: {e!r}")
            continue
        if found is not None:
            keys.append(found)
    if keys and len(keys) == len(recipes):
        known = frozenset().union(*(k.known for k in keys))
        complete = all(k.complete for k in keys)
        for name in cfg.keys():
            if name in known:
                continue
            hint = _did_you_mean(str(name), known)
            if complete and not hint:
                hint = f" (not read by {', '.join(recipes)})"
            if hint:
                problems.append(f"unknown key {name!r}{hint}")
        required = frozenset.intersection(*(k.required for k in keys))
        for name in sorted(required - set(cfg.keys())):
            problems.append(f"missing key {name!r} (the recipe reads cfg.{name})")
        specs = {key: spec for k in keys for key, spec in k.specs.items()}
        _check_values(cfg, specs, known, problems)
    else:
        _check_values(cfg, KEY_SPECS, None, problems)

    _walk(cfg, "", problems, check_files)
    return problems


class ConfigError(ValueError):
    """Input a recipe refuses before it trains: ``problems`` lists them, each led by its key."""

    def __init__(self, problems: Union[str, Sequence[str]], what: str = "the config") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{count} with {what}; not starting:\n{lines}")


def check_config(cfg: Any, recipe: Union[str, Sequence[str], None] = None, check_files: bool = True) -> None:
    """:func:`validate_config`, raising instead of returning the problems.

    Raises:
        ConfigError: listing every problem (a ``ValueError``).
    """
    problems = validate_config(cfg, recipe=recipe, check_files=check_files)
    if problems:
        raise ConfigError(problems)


def check_values(cfg: DictConfig, specs: Mapping[str, KeySpec] = KEY_SPECS) -> None:
    """Only the value rules of :func:`validate_config` (no imports, no files): cheap enough for any constructor.

    Raises:
        ConfigError: listing every value that breaks ``specs``.
    """
    problems: List[str] = []
    _check_values(cfg, specs, None, problems)
    if problems:
        raise ConfigError(problems)


def exits_on_config_error(recipe_main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a recipe's main so that a :class:`ConfigError` ends the process with its message on
    stderr and exit status 1, not a traceback. Put it under ``@config.parse``."""

    @functools.wraps(recipe_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return recipe_main(*args, **kwargs)
        except ConfigError as e:
            sys.stdout.flush()
            sys.exit(f"gqa_tune: {e}")

    return wrapper


def check_writable_dir(path: Union[str, Path], key: str = "output_dir") -> Path:
    """Create directory ``path`` (and its parents) if missing, and write and remove a probe file in it.

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
        reason = e.strerror or str(e)
        problem = f"{key}: cannot create and write to the directory {str(path)!r}: {reason}"
        raise ConfigError(problem, what=key) from None
    return path


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> DictConfig:
    """A YAML config with ``key=value`` / ``~key`` overrides merged in the way ``tune run`` merges them.

    An override whose value contains ``=`` (which torchtune's parser rejects; the generate
    recipe takes ``prompt=TEXT`` off the command line itself) is set verbatim as a string.

    Raises:
        ValueError: for a malformed override (e.g. ``--flag`` or a missing ``=``).
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
    plain = [o for o in overrides if o not in verbatim]
    cfg = _merge_yaml_and_cli_args(Namespace(**OmegaConf.to_container(cfg, resolve=False)), plain)
    for override in verbatim:
        key, value = override.split("=", 1)
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def check_config_file(
    path: Union[str, Path],
    overrides: Sequence[str] = (),
    recipe: Union[str, Sequence[str], None] = None,
    check_files: bool = True,
) -> List[str]:
    """:func:`validate_config` of a file and overrides; the recipe defaults to the one(s) its header names."""
    path = Path(path)
    if not path.is_file():
        return [f"config file {str(path)!r} does not exist"]
    try:
        cfg = load_config(path, overrides)
    except Exception as e:
        return [f"cannot load {str(path)!r}: {e}"]
    if recipe is None:
        recipe = config_recipes(path, strict=False)
    return validate_config(cfg, recipe=recipe, check_files=check_files)
