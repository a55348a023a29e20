"""Every config under configs/ validates and builds; config mistakes get messages naming the key or file."""

import inspect
import re

import pytest
import torch
from helpers import REPO
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config

from gqa_tune import config_check as cc
from gqa_tune.training.finetune import FinetuneRecipe

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
IDS = [p.relative_to(REPO / "configs").with_suffix("").as_posix() for p in CONFIGS]
FULL = "gqa_tiny/full"
FULL_RECIPE = "full_finetune_single_device"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name data files relative to the repository root, as users run them


def full_problems(*overrides, check_files=True):
    cfg = cc.load_config(cc.find_config(FULL), overrides)
    return cc.validate_config(cfg, recipe=FULL_RECIPE, check_files=check_files)


# ---------------------------------------------------------------- every config


def test_configs_found():
    assert CONFIGS, "no configs under configs/"
    assert [p.resolve() for p in cc.config_files()] == [p.resolve() for p in CONFIGS]  # the installed package's


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_names_its_recipe(path):
    """The association rule `gqa-tune ls` uses: a header `tune run gqa_tune/recipes/X.py --config <this file>`."""
    recipes = cc.config_recipes(path)
    assert recipes, (
        f"{path.name}: its header comment needs a line "
        f"`tune run gqa_tune/recipes/<recipe>.py --config configs/{cc.config_name(path)}.yaml`"
    )
    for recipe in recipes:
        assert cc.find_recipe(recipe) == recipe, f"{path.name} names recipe {recipe!r}, not in {cc.recipe_names()}"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_is_valid(path):
    assert cc.check_config_file(path) == []


def _components(node, key=""):
    """(dotted key, component node) for every ``_component_`` in a config."""
    if isinstance(node, DictConfig):
        if "_component_" in node:
            yield key, node
        items = [(k, node[k]) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = list(enumerate(node))
    else:
        return
    for k, v in items:
        yield from _components(v, f"{key}.{k}" if key else str(k))


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_components_build(path):
    """The tokenizer, the model (on the meta device: any size is cheap) and the datasets build."""
    cfg = cc.load_config(path)
    built = []
    tokenizer = None
    if OmegaConf.is_dict(cfg.get("tokenizer")):
        tokenizer = config.instantiate(cfg.tokenizer)
        built.append("tokenizer")
    if OmegaConf.is_dict(cfg.get("model")) and "_component_" in cfg.model:
        with torch.device("meta"):
            model = config.instantiate(cfg.model)
        assert sum(p.numel() for p in model.parameters()) > 0
        built.append("model")
    for key, node in _components(cfg):
        if key.split(".")[-1] == "dataset" and tokenizer is not None:
            dataset = config.instantiate(node, tokenizer)
            assert len(dataset) > 0, key
            sample = dataset[0]
            assert len(sample["tokens"]) == len(sample["labels"]) > 1, key
            built.append(key)
    if not built:
        pytest.skip(f"{path.name} has no tokenizer, model or dataset to build")


# ---------------------------------------------------------------- the known keys


def test_finetune_keys_are_what_finetune_recipe_reads():
    source = inspect.getsource(FinetuneRecipe)
    for key in cc.FINETUNE_KEYS:
        assert re.search(rf"\bcfg(\.{key}\b|\.get\(\"{key}\")", source), f"FinetuneRecipe does not read {key!r}"
    keys, optional = cc.config_reads(source)
    assert keys == cc.FINETUNE_KEYS
    assert keys - optional == cc.FINETUNE_REQUIRED_KEYS
    documented = set(re.findall(r"``(\w+)``", FinetuneRecipe.__doc__))
    assert documented <= cc.FINETUNE_KEYS


def test_config_reads_follows_cfg_not_its_children():
    source = """
class R:
    def __init__(self, cfg):
        self.cfg = cfg
        self.a = cfg.alpha
        self.b = cfg.get("beta", 1)
        self.c = cfg["gamma"]
        self.d = "delta" in cfg

    def evaluate(self):
        cfg = self.cfg.eval
        return cfg.dataset, cfg.get("max_examples"), self.cfg.get("seed")

def helper(node):
    return node.not_top_level
"""
    keys, optional = cc.config_reads(source)
    assert keys == {"alpha", "beta", "gamma", "delta", "eval", "seed"}
    assert optional == {"beta", "delta", "seed"}


# ---------------------------------------------------------------- mistakes, and their messages


def test_key_typo():
    assert full_problems("epcohs=2") == ["unknown key 'epcohs' (did you mean 'epochs'?)"]
    assert full_problems("banana=2") == [f"unknown key 'banana' (not read by {FULL_RECIPE})"]


def test_missing_required_key():
    assert full_problems("~batch_size") == ["missing key 'batch_size' (the recipe reads cfg.batch_size)"]


def test_bad_component_path():
    problems = full_problems("model._component_=gqa_tune.models.gqa_tinyy")
    assert problems == [
        "model._component_: cannot import 'gqa_tune.models.gqa_tinyy': "
        "'gqa_tune.models' has no attribute 'gqa_tinyy' (did you mean 'gqa_tiny'?)"
    ]
    # the shorthand tune run takes for a component's path
    assert full_problems("model=gqa_tune.models.gqa_tinyy") == problems
    (problem,) = full_problems("optimizer=torch.optimm.AdamW")
    assert problem.startswith("optimizer._component_: cannot import 'torch.optimm.AdamW'"), problem
    assert "did you mean 'optim'" in problem
    (problem,) = full_problems("optimizer=no_such_package.AdamW")
    assert (
        problem == "optimizer._component_: cannot import 'no_such_package.AdamW': there is no module 'no_such_package'"
    )


def test_bad_keyword():
    assert full_problems("optimizer.lrr=0.1") == [
        "optimizer.lrr: unexpected keyword for torch.optim.AdamW (did you mean 'lr'?)"
    ]


def test_bad_nested_keyword():
    assert full_problems("eval.dataset.data_fil=data/tasks/val.jsonl") == [
        "eval.dataset.data_fil: unexpected keyword for gqa_tune.data.task_dataset (did you mean 'data_file'?)"
    ]
    (problem,) = full_problems("tokenizer.zzz=1")
    assert problem.startswith("tokenizer.zzz: unexpected keyword for gqa_tune.data.byte_tokenizer (it takes: ")


def test_missing_dataset_file():
    missing = "data/tasks/missing.jsonl"
    (problem,) = full_problems(f"dataset.data_file={missing}")
    assert problem.startswith(f"dataset.data_file: file '{missing}' does not exist"), problem
    assert full_problems(f"dataset.data_file={missing}", check_files=False) == []
    # and the dataset builder says which file when it is built anyway
    cfg = cc.load_config(cc.find_config(FULL), [f"dataset.data_file={missing}"])
    with pytest.raises(ValueError, match=re.escape(missing)):
        config.instantiate(cfg.dataset, config.instantiate(cfg.tokenizer))


def test_interpolation_and_missing_value(tmp_path):
    (problem,) = full_problems("metric_logger.log_dir=${outdir}/logs")
    assert problem.startswith("metric_logger.log_dir: ") and "outdir" in problem
    path = tmp_path / "missing_value.yaml"
    path.write_text(cc.find_config(FULL).read_text().replace("\nseed: 0\n", "\nseed: ???\n"))
    (problem,) = cc.check_config_file(path)
    assert problem.startswith("seed: Missing mandatory value"), problem


def test_every_problem_is_reported():
    problems = full_problems("epcohs=2", "optimizer.lrr=1", "model=gqa_tune.models.gqa_tinyy", "dataset.data_file=x")
    assert [p.split(" ")[0] for p in problems] == [
        "unknown",
        "model._component_:",
        "dataset.data_file:",
        "optimizer.lrr:",
    ]


def test_non_finetune_recipe_gets_near_misses_only(tmp_path):
    generate = cc.find_config("gqa_tiny/generate")
    if generate is None or "generate" not in cc.recipe_names():
        pytest.skip("no generate recipe/config")
    assert cc.check_config_file(generate, ["temprature=0.5"]) == [
        "unknown key 'temprature' (did you mean 'temperature'?)"
    ]
    assert cc.check_config_file(generate, ["something_else=1"]) == []
    # prompt=TEXT with '=' in it is taken verbatim, as the generate recipe takes it
    assert cc.load_config(generate, ["prompt=a=3 b=41 ?b="]).prompt == "a=3 b=41 ?b="


def test_copied_config_keeps_its_recipe(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text(cc.find_config(FULL).read_text())
    assert cc.config_recipes(copy) == []  # its header's --config is the original
    assert cc.config_recipes(copy, strict=False) == [FULL_RECIPE]
    assert cc.check_config_file(copy, ["epcohs=1"]) == ["unknown key 'epcohs' (did you mean 'epochs'?)"]


def test_unloadable_config(tmp_path):
    assert cc.check_config_file(tmp_path / "nope.yaml") == [
        f"config file {str(tmp_path / 'nope.yaml')!r} does not exist"
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    (problem,) = cc.check_config_file(bad)
    assert problem.startswith(f"cannot load {str(bad)!r}")
    (problem,) = cc.check_config_file(cc.find_config(FULL), ["epochs"])
    assert "key=value" in problem
