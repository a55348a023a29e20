"""The project's recipes and configs, by name: the files behind :data:`gqa_tune.schema.RECIPES`.

Found on disk without importing the recipes (the recipes are the top of the stack; nothing in the library
imports them).
"""

import importlib.util
import re
from pathlib import Path
from typing import List, Optional, Sequence, Union

from gqa_tune.schema import RECIPES


def _package_dir(name: str) -> Path:
    """Where an installed package of ours lies, found without importing (running) it."""
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0])


def recipes_dir() -> Path:
    return _package_dir("gqa_tune.recipes")


def configs_dir() -> Path:
    return _package_dir("gqa_tune.configs")


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
