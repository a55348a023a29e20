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
  reads are there.

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
from types import ModuleType
from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

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
    for cls in finetune or classes:
        known.update(getattr(cls, "CONFIG_KEYS", ()))
        for base in cls.__mro__[1:]:
            if base.__module__.split(".")[0] == "gqa_tune" and base.__module__ not in sources:
                sources[base.__module__] = inspect.getsource(base)
    for source in sources.values():
        known.update(config_reads(source)[0])
    if finetune:
        return RecipeKeys(frozenset(known), FINETUNE_REQUIRED_KEYS, complete=True)
    return RecipeKeys(frozenset(known), frozenset(), complete=False) if known else None


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

    recipes = [str(recipe)] if isinstance(recipe, (str, os.PathLike)) else [str(r) for r in recipe or []]
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

    _walk(cfg, "", problems, check_files)
    return problems


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
