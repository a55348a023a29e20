"""Every config under configs/ validates and builds; config mistakes get messages naming the key or file."""

import dataclasses
import importlib
import inspect
import re

import pytest
import torch
from helpers import REPO
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config

from gqa_tune import catalog
from gqa_tune import config_check as cc
from gqa_tune.schema import RECIPES, FinetuneConfig, fields
from gqa_tune.training.finetune import FinetuneRecipe

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
IDS = [p.relative_to(REPO / "configs").with_suffix("").as_posix() for p in CONFIGS]
FULL = "gqa_tiny/full"
FULL_RECIPE = "full_finetune_single_device"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name data files relative to the repository root, as users run them


def full_problems(*overrides, check_files=True):
    cfg = cc.load_config(catalog.find_config(FULL), overrides)
    return cc.validate_config(cfg, recipe=FULL_RECIPE, check_files=check_files)


# ---------------------------------------------------------------- every config


def test_configs_found():
    assert CONFIGS, "no configs under configs/"
    assert sorted(catalog.find_config(n).resolve() for n in catalog.config_names()) == [p.resolve() for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_every_config_is_in_the_registry(path):
    """gqa_tune.schema.RECIPES lists every config under configs/ (gqa-tune ls prints it), under a recipe
    whose file exists, and the config's header comment shows the command that runs it."""
    name = path.relative_to(REPO / "configs").with_suffix("").as_posix()
    owners = [recipe for recipe, entry in RECIPES.items() if name in entry.configs]
    assert len(owners) == 1, f"{name} must be listed under exactly one recipe in gqa_tune.schema.RECIPES"
    assert catalog.recipe_file(owners[0]).is_file()
    assert catalog.config_recipe(path) == owners[0]
    assert f"gqa_tune/recipes/{owners[0]}.py --config configs/{name}.yaml" in path.read_text()


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


# ---------------------------------------------------------------- the schemas

#: Names read from nested nodes (``cfg = self.cfg.eval; cfg.max_examples``), not top-level keys.
NESTED_READS = {"max_examples", "accuracy_file", "_component_"}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_top_level_key_a_recipe_reads_is_in_its_schema(recipe):
    """A key the code reads but the schema lacks would be refused as unknown when a config sets it."""
    module = importlib.import_module(f"gqa_tune.recipes.{recipe}")
    sources = [inspect.getsource(module)]
    for cls in vars(module).values():
        if inspect.isclass(cls) and issubclass(cls, FinetuneRecipe):
            sources += [inspect.getsource(base) for base in cls.__mro__ if base.__module__.startswith("gqa_tune")]
    read = set()
    for source in sources:
        read |= set(re.findall(r"\bcfg\.get\(\"(\w+)\"", source)) | set(re.findall(r"\bcfg\[\"(\w+)\"\]", source))
        read |= set(re.findall(r"\bcfg\.(\w+)\b(?!\()", source))
    keys = set(fields(RECIPES[recipe].schema))
    assert read - NESTED_READS <= keys, f"{recipe} reads keys its schema lacks: {sorted(read - NESTED_READS - keys)}"


def test_schema_fields_are_documented():
    for entry in RECIPES.values():
        for name, fld in fields(entry.schema).items():
            assert fld.metadata.get("doc"), f"{entry.schema.__name__}.{name} has no doc"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_default_comes_from_the_schema_alone(recipe):
    """The typed config holds the dataclass's default for every key a config leaves out, and no recipe or library
    module writes a default a second time (``cfg.get("key", default)`` is how a default drifts)."""
    schema = RECIPES[recipe].schema
    typed, problems = cc.typed_config(OmegaConf.create({}), schema, files=False)
    assert all(p.startswith("missing key") for p in problems)  # only the required keys are missing
    for name, fld in fields(schema).items():
        if fld.default is not dataclasses.MISSING:
            assert typed[name] == fld.default, name
        elif fld.default_factory is not dataclasses.MISSING:
            assert OmegaConf.to_container(typed[name]) == fld.default_factory(), name
    sources = [REPO / "recipes" / f"{recipe}.py", *sorted((REPO / "gqa_tune").rglob("*.py"))]
    restated = [
        f"{path.name}: {match.group(0)}"
        for path in sources
        for match in re.finditer(r"\bcfg\.get\(\"\w+\", [^)]+\)", path.read_text())
    ]
    assert restated == [], restated


def test_the_typed_config_converts_and_refuses_by_the_schema():
    typed, problems = cc.typed_config(OmegaConf.create({"batch_size": "4", "clip_grad_norm": 1}), FinetuneConfig)
    assert typed.batch_size == 4 and typed.clip_grad_norm == 1.0 and isinstance(typed.clip_grad_norm, float)
    _, problems = cc.typed_config(OmegaConf.create({"batch_size": 0, "shuffle": 1}), FinetuneConfig, files=False)
    assert "batch_size: expected an int >= 1 (examples per micro-batch, per process), got 0" in problems
    assert "shuffle: expected true or false (shuffle the dataset each epoch), got 1" in problems
    with pytest.raises(Exception, match="Key 'batchsize' not in 'FinetuneConfig'. Did you mean: 'batch_size'"):
        _ = typed.batchsize  # struct mode: a misspelled read raises


# ---------------------------------------------------------------- mistakes, and their messages


def test_key_typo():
    assert full_problems("epcohs=2") == ["unknown key 'epcohs' (did you mean 'epochs'?)"]
    assert full_problems("banana=2") == ["unknown key 'banana' (no such key in FinetuneConfig)"]
    assert full_problems("eval.max_exmples=2") == ["unknown key 'eval.max_exmples' (did you mean 'eval.max_examples'?)"]


def test_missing_required_key():
    assert full_problems("~batch_size") == ["missing key 'batch_size': examples per micro-batch, per process"]


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
    cfg = cc.load_config(catalog.find_config(FULL), [f"dataset.data_file={missing}"])
    with pytest.raises(ValueError, match=re.escape(missing)):
        config.instantiate(cfg.dataset, config.instantiate(cfg.tokenizer))


def test_interpolation_and_missing_value(tmp_path):
    (problem,) = full_problems("metric_logger.log_dir=${outdir}/logs")
    assert problem.startswith("metric_logger.log_dir: ") and "outdir" in problem
    path = tmp_path / "missing_value.yaml"
    path.write_text(catalog.find_config(FULL).read_text().replace("\nseed: 0\n", "\nseed: ???\n"))
    (problem,) = cc.check_config_file(path)
    assert problem == "seed: missing value ???; set it", problem


def test_every_problem_is_reported():
    problems = full_problems("epcohs=2", "optimizer.lrr=1", "model=gqa_tune.models.gqa_tinyy", "dataset.data_file=x")
    assert [p.split(" ")[0] for p in problems] == [
        "unknown",
        "model._component_:",
        "dataset.data_file:",
        "optimizer.lrr:",
    ]


def test_generate_config_is_checked_against_its_schema_too():
    generate = catalog.find_config("gqa_tiny/generate")
    assert cc.check_config_file(generate, ["temprature=0.5"]) == [
        "unknown key 'temprature' (did you mean 'temperature'?)"
    ]
    assert cc.check_config_file(generate, ["something_else=1"]) == [
        "unknown key 'something_else' (no such key in GenerateConfig)"
    ]
    # prompt=TEXT with '=' in it is taken verbatim, as the generate recipe takes it
    assert cc.load_config(generate, ["prompt=a=3 b=41 ?b="]).prompt == "a=3 b=41 ?b="


def test_copied_config_keeps_its_recipe(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text(catalog.find_config(FULL).read_text())
    assert catalog.config_recipe(copy) == FULL_RECIPE  # from the tune run line of its header
    assert cc.check_config_file(copy, ["epcohs=1"]) == ["unknown key 'epcohs' (did you mean 'epochs'?)"]


def test_unloadable_config(tmp_path):
    assert cc.check_config_file(tmp_path / "nope.yaml") == [
        f"config file {str(tmp_path / 'nope.yaml')!r} does not exist"
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    (problem,) = cc.check_config_file(bad)
    assert problem.startswith(f"cannot load {str(bad)!r}")
    (problem,) = cc.check_config_file(catalog.find_config(FULL), ["epochs"])
    assert "key=value" in problem
