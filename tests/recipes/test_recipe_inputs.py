"""Bad recipe input is refused before training, naming the key and the value: in-process and through ``tune run``.

The ``tune run`` cases check a non-zero exit, the key in stderr, no traceback, and that nothing
trained (no progress bar, no log file, checkpoints untouched).
"""

import hashlib
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, run_tune
from gqa_tune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice
from gqa_tune.recipes.lora_finetune_single_device import LoRAFinetuneRecipeSingleDevice
from omegaconf import OmegaConf

from gqa_tune import catalog
from gqa_tune import config_check as cc
from gqa_tune.training.finetune import RESUME_SETTINGS, check_recipe_state, check_resume_settings

RECIPE, CONFIG = "full_finetune_single_device", "configs/gqa_tiny/full.yaml"
ONE_STEP = [*TINY, "max_steps_per_epoch=1"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name data files relative to the repository root


def problems(config, *overrides):
    return cc.check_config_file(catalog.find_config(config), list(overrides))


# ---------------------------------------------------------------- the value rules, in-process


@pytest.mark.parametrize(
    "override, problem",
    [
        ("epoch=1", "unknown key 'epoch' (did you mean 'epochs'?)"),
        ("epochs=three", "epochs: expected an int >= 1 (passes over the dataset), got 'three'"),
        ("epochs=0", "epochs: expected an int >= 1 (passes over the dataset), got 0"),
        ("epochs=null", "epochs: expected an int >= 1 (passes over the dataset), got None"),
        ("batch_size=0", "batch_size: expected an int >= 1 (examples per micro-batch, per process), got 0"),
        ("batch_size=8.0", "batch_size: expected an int >= 1 (examples per micro-batch, per process), got 8.0"),
        ("batch_size=true", "batch_size: expected an int >= 1 (examples per micro-batch, per process), got True"),
        (
            "gradient_accumulation_steps=0",
            "gradient_accumulation_steps: expected an int >= 1 (micro-batches per optimizer step), got 0",
        ),
        (
            "log_every_n_steps=0",
            "log_every_n_steps: expected an int >= 1 (metric logging interval, in optimizer steps), got 0",
        ),
        (
            "max_steps_per_epoch=0",
            "max_steps_per_epoch: expected an int >= 1 or null (optimizer steps per epoch at most; null: all), got 0",
        ),
        ("save_every_n_steps=-2", "save_every_n_steps: expected an int >= 1 or null"),
        ("clip_grad_norm=0", "clip_grad_norm: expected a number > 0 or null (gradient norm clip; null: none), got 0"),
        ("optimizer.lr=-1e-3", "optimizer.lr: expected a number >= 0 (learning rate; 0 keeps the weights), got -0.001"),
        ("optimizer.lr=fast", "optimizer.lr: expected a number >= 0 (learning rate; 0 keeps the weights), got 'fast'"),
        ("lr_scheduler.num_warmup_steps=-1", "lr_scheduler.num_warmup_steps: expected an int >= 0"),
        ("dtype=fp8", "dtype: expected one of fp32, bf16, fp16, fp64 (parameter and compute precision), got 'fp8'"),
        ("device=gpu", "device: expected a string (the torch device), got 'gpu': not a torch device"),
        ("seed=-1", "seed: expected an int >= 0 or null"),
        ("seed=1.5", "seed: expected an int >= 0 or null"),
        ("shuffle=maybe", "shuffle: expected true or false (shuffle the dataset each epoch), got 'maybe'"),
        ("resume_from_checkpoint=1", "resume_from_checkpoint: expected true or false"),
        ("output_dir=", "output_dir: expected a string (where checkpoints and logs go; created if missing), got None"),
        ("eval.max_exampels=3", "unknown key 'eval.max_exampels' (did you mean 'eval.max_examples'?)"),
        ("eval.max_examples=0", "eval.max_examples: expected an int >= 1"),
    ],
)
def test_a_bad_value_is_named_with_its_key(override, problem):
    (got,) = problems("gqa_tiny/full", override)
    assert got.startswith(problem), got


@pytest.mark.parametrize(
    "overrides",
    [["seed=null"], ["max_steps_per_epoch=null", "clip_grad_norm=null", "save_every_n_steps=null"], ["eval=null"]],
)
def test_null_where_allowed(overrides):
    assert problems("gqa_tiny/full", *overrides) == []


def test_every_problem_is_listed():
    got = problems("gqa_tiny/full", "epoch=1", "epochs=three", "gradient_accumulation_steps=0", "log_every_n_steps=0")
    assert [p.split(" ")[0] for p in got] == [
        "unknown",
        "epochs:",
        "gradient_accumulation_steps:",
        "log_every_n_steps:",
    ]


def test_uptrain_wants_the_length_keys_null():
    assert problems("gqa_small/uptrain") == []
    (got,) = problems("gqa_small/uptrain", "epochs=2")
    assert got == "epochs: expected null (derived from uptrain_steps / uptrain_fraction; leave null), got 2"
    assert problems("gqa_small/uptrain", "max_steps_per_epoch=4")[0].startswith("max_steps_per_epoch: expected null")


def test_generate_values():
    assert problems("gqa_tiny/generate", "top_k=null", "temperature=0.7") == []
    got = problems("gqa_tiny/generate", "max_new_tokens=0", "temperature=-1", "top_k=0")
    assert [p.split(":")[0] for p in got] == ["max_new_tokens", "temperature", "top_k"]


def test_the_constructor_checks_values_before_anything(tmp_path):
    overrides = [f"output_dir={tmp_path / 'out'}", "log_every_n_steps=0"]
    cfg = cc.load_config(catalog.find_config("gqa_tiny/full"), overrides)
    with pytest.raises(ValueError, match=r"log_every_n_steps: expected an int >= 1 .*got 0"):
        FullFinetuneRecipeSingleDevice(cfg)
    assert not (tmp_path / "out").exists()


def test_check_config_raises_naming_every_problem():
    cfg = cc.load_config(catalog.find_config("gqa_tiny/full"), ["epoch=1", "batch_size=0"])
    with pytest.raises(cc.ConfigError) as info:
        cc.parse_config(cfg, cc.schema_of(str(REPO / "recipes" / f"{RECIPE}.py")))
    assert isinstance(info.value, ValueError)
    assert info.value.problems == [
        "unknown key 'epoch' (did you mean 'epochs'?)",
        "batch_size: expected an int >= 1 (examples per micro-batch, per process), got 0",
    ]
    assert str(info.value).startswith("2 problems with the config; not starting:\n  unknown key 'epoch'")


# ---------------------------------------------------------------- output_dir, in-process


def test_writable_dir_is_created_and_left_clean(tmp_path):
    path = tmp_path / "a" / "b"
    assert cc.check_writable_dir(path) == path
    assert path.is_dir() and list(path.iterdir()) == []


def test_a_dir_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(cc.ConfigError, match=rf"output_dir: cannot create and write to the directory '{blocker}/sub'"):
        cc.check_writable_dir(blocker / "sub")


def test_a_dir_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    def refuse(self, data):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)  # root ignores chmod, so pretend
    with pytest.raises(cc.ConfigError, match=r"output_dir: cannot .*'.*ro': Permission denied"):
        cc.check_writable_dir(tmp_path / "ro")


# ---------------------------------------------------------------- recipe_state.pt, in-process

STATE = {
    "epoch": 0,
    "global_step": 1,
    "epoch_step": 1,
    "seed": 0,
    "optimizer": {},
    "lr_scheduler": None,
    "rng": {"torch": None, "python": None},
}


def test_recipe_state_with_missing_keys_is_named(tmp_path):
    path = tmp_path / "recipe_state.pt"
    check_recipe_state(STATE, path)
    broken = {k: v for k, v in STATE.items() if k not in ("optimizer", "epoch_step")}
    with pytest.raises(ValueError, match=rf"'{path}' lacks 'epoch_step', 'optimizer', so the run cannot be resumed"):
        check_recipe_state(broken, path)
    with pytest.raises(ValueError, match="lacks 'rng.python'"):
        check_recipe_state({**STATE, "rng": {"torch": None}}, path)
    with pytest.raises(ValueError, match="holds a list, not a recipe state"):
        check_recipe_state([], path)


def test_resume_settings_must_match(tmp_path):
    saved = {"batch_size": 8, "seed": 0, "dataset": {"data_file": "a.jsonl"}}
    check_resume_settings(saved, dict(saved), tmp_path)
    with pytest.raises(cc.ConfigError) as info:
        check_resume_settings(saved, {**saved, "batch_size": 4, "seed": 1}, tmp_path)
    first, second = info.value.problems
    assert first.startswith(f"batch_size: the checkpoint '{tmp_path}' was trained with batch_size=8, this run has ")
    assert "batch_size=4" in first and "start a fresh output_dir" in first
    assert second.startswith("seed: ") and "seed=0" in second and "seed=1" in second
    with pytest.warns(UserWarning, match="older gqa_tune"):
        check_resume_settings(None, saved, tmp_path)


# ---------------------------------------------------------------- through tune run


def files_of(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*")
            if p.is_file()}  # fmt: skip


def assert_refused_before_training(proc, *named):
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for text in named:
        assert text in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train:" not in proc.stderr and "saved checkpoint" not in proc.stdout + proc.stderr  # no progress bar


@pytest.mark.parametrize(
    "override, named",
    [
        ("epoch=1", "unknown key 'epoch' (did you mean 'epochs'?)"),
        ("epochs=three", "epochs: expected an int >= 1 (passes over the dataset), got 'three'"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps: expected an int >= 1"),
        ("log_every_n_steps=0", "log_every_n_steps: expected an int >= 1"),
    ],
)
def test_tune_run_refuses_a_bad_key_or_value(tmp_path, override, named):
    out = tmp_path / "out"
    proc = run_tune(RECIPE, CONFIG, [*ONE_STEP, f"output_dir={out}", override], timeout=120)
    assert_refused_before_training(proc, named)
    assert not out.exists()  # refused before the recipe was built


def test_tune_run_refuses_an_output_dir_it_cannot_create(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_tune(RECIPE, CONFIG, [*ONE_STEP, f"output_dir={blocker / 'sub'}"], timeout=120)
    assert_refused_before_training(proc, f"output_dir: cannot create and write to the directory '{blocker / 'sub'}'")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An output_dir after one optimizer step (batch 8, seed 0)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    run_tune(RECIPE, CONFIG, [*ONE_STEP, f"output_dir={out}"], check=True, timeout=120)
    return out


def resume(trained, tmp_path, overrides, edit_state=None):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    if edit_state is not None:
        path = out / "epoch_0" / "recipe_state.pt"
        torch.save(edit_state(torch.load(path, weights_only=False)), path)
    before = files_of(out)
    proc = run_tune(RECIPE, CONFIG, [*ONE_STEP, f"output_dir={out}", "resume_from_checkpoint=true", *overrides])
    return proc, out, before


@pytest.mark.parametrize(
    "override, named",
    [
        ("batch_size=4", ["batch_size: the checkpoint", "batch_size=8", "batch_size=4", "fresh output_dir"]),
        ("seed=1", ["seed: the checkpoint", "seed=0", "seed=1", "fresh output_dir"]),
    ],
)
def test_tune_run_refuses_to_resume_with_other_data_settings(trained, tmp_path, override, named):
    proc, out, before = resume(trained, tmp_path, [override])
    assert_refused_before_training(proc, *named)
    assert files_of(out) == before  # checkpoints (and logs) untouched


def test_tune_run_refuses_a_recipe_state_with_missing_keys(trained, tmp_path):
    def drop(state):
        del state["optimizer"], state["rng"]
        return state

    proc, out, before = resume(trained, tmp_path, [], edit_state=drop)
    state_file = out / "epoch_0" / "recipe_state.pt"
    assert_refused_before_training(proc, f"'{state_file}' lacks 'optimizer', 'rng'")
    assert files_of(out) == before


# ---------------------------------------------------------------- the LoRA recipe's resume, in-process


def test_lora_resume_checks_the_settings_too(tmp_path, one_thread):
    out = tmp_path / "lora"
    overrides = [*ONE_STEP, "base_checkpoint_dir=null", "init_from_scratch=true", f"output_dir={out}"]
    cfg = cc.load_config(catalog.find_config("gqa_tiny/lora"), overrides)
    recipe = LoRAFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    assert torch.load(out / "epoch_0" / "recipe_state.pt", weights_only=False)[RESUME_SETTINGS]["batch_size"] == 8

    before = files_of(out)
    again = OmegaConf.merge(cfg, {"resume_from_checkpoint": True, "gradient_accumulation_steps": 2})
    recipe = LoRAFinetuneRecipeSingleDevice(again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ValueError, match="gradient_accumulation_steps=1, this run has gradient_accumulation_steps=2"
        ):
            recipe.setup(again)
    assert files_of(out) == before
