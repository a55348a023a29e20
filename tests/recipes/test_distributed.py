"""The FSDP2 recipe on 2 CPU processes (gloo) takes the single-device recipe's steps, end to end through ``tune run``.

2 processes x batch 4 see the same examples per step as 1 process x batch 8 (``DistributedSampler``
deals a shuffled order round-robin), and the loss is normalized by the global supervised-token
count, so losses, weights and optimizer states agree up to float rounding.
"""

import math
import shutil

import pytest
import torch
from conftest import REPO, TINY, read_logged, run_tune

from gqa_tune.catalog import find_config
from gqa_tune.config_check import ConfigError, load_config
from gqa_tune.data import byte_tokenizer, task_dataset
from gqa_tune.models import gqa_tiny
from gqa_tune.training.checkpoint import latest_checkpoint, load_checkpoint
from gqa_tune.training.evaluate import heldout_loss

SINGLE = ("full_finetune_single_device", "configs/gqa_tiny/full.yaml")
DISTRIBUTED = ("full_finetune_distributed", "configs/gqa_tiny/full_distributed.yaml")
STEPS_PER_EPOCH, EPOCHS = 3, 2
COMMON = [*TINY, f"max_steps_per_epoch={STEPS_PER_EPOCH}", f"epochs={EPOCHS}"]
TIMEOUT = 180  # a hung collective fails the test instead of stalling the suite


def _run(recipe, overrides, nproc=None):
    return run_tune(*recipe, list(overrides), nproc=nproc, timeout=TIMEOUT, check=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-device run (batch 8) and one 2-process run (batch 4 per process), 6 steps each."""
    root = tmp_path_factory.mktemp("distributed")
    single, dist = root / "single", root / "dist"
    _run(SINGLE, [*COMMON, "batch_size=8", f"output_dir={single}"])
    _run(DISTRIBUTED, [*COMMON, "batch_size=4", f"output_dir={dist}"], nproc=2)
    return single, dist


def _assert_weights_close(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def test_two_processes_log_the_single_device_losses_and_save_its_weights(runs):
    single, dist = runs
    expected, got = read_logged(single / "logs"), read_logged(dist / "logs")
    assert len(expected) == len(got) == STEPS_PER_EPOCH * EPOCHS
    assert all(math.isfinite(v) for v in got)
    assert got == pytest.approx(expected, rel=0, abs=1e-4)
    assert got[-1] < got[0]  # it trains
    assert read_logged(dist / "logs", "grad_norm") == pytest.approx(read_logged(single / "logs", "grad_norm"), abs=1e-4)

    # Rank 0 wrote full (gathered) weights, and a recipe state in the single-device format.
    path = latest_checkpoint(dist)
    assert path == dist / f"epoch_{EPOCHS - 1}" and (path / "model.safetensors").is_file()
    weights, config, state = load_checkpoint(path)
    ref_weights, _, ref_state = load_checkpoint(latest_checkpoint(single))
    _assert_weights_close(weights, ref_weights)
    gqa_tiny(max_seq_len=128).load_state_dict(weights)
    assert config["num_key_value_heads"] == 2 and state["global_step"] == STEPS_PER_EPOCH * EPOCHS
    optim, ref_optim = state["optimizer"], ref_state["optimizer"]
    assert [g["params"] for g in optim["param_groups"]] == [g["params"] for g in ref_optim["param_groups"]]
    assert sorted(optim["state"]) == sorted(ref_optim["state"])
    for index, ref in ref_optim["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optim["state"][index][name], ref[name], rtol=1e-4, atol=1e-6)
    assert len(state["rng_per_rank"]) == 2


def test_two_processes_resume_a_single_device_checkpoint_and_evaluate(runs, tmp_path):
    single, _ = runs
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(single / "epoch_0", resumed / "epoch_0")
    (resumed / "LATEST").write_text("epoch_0\n")
    with_eval = [o for o in COMMON if o != "eval=null"] + ["eval.dataset.max_examples=32", "eval.max_examples=16"]
    overrides = [*with_eval, "batch_size=4", f"output_dir={resumed}", "resume_from_checkpoint=True"]
    proc = _run(DISTRIBUTED, overrides, nproc=2)
    expected = read_logged(single / "logs")[STEPS_PER_EPOCH:]
    assert read_logged(resumed / "logs") == pytest.approx(expected, rel=0, abs=1e-4)
    weights, _, _ = load_checkpoint(latest_checkpoint(resumed))
    _assert_weights_close(weights, load_checkpoint(latest_checkpoint(single))[0])

    # Eval ran once (rank 0) on the gathered weights, and all processes finished.
    assert proc.stdout.count("eval after 6 steps: heldout_loss") == 1
    assert "accuracy_all" in proc.stdout
    logged = read_logged(resumed / "logs", "heldout_loss")
    model = gqa_tiny(max_seq_len=128)
    model.load_state_dict(weights)
    tokenizer = byte_tokenizer(max_seq_len=48)
    data = task_dataset(tokenizer, data_file="data/tasks/val.jsonl", max_examples=32)
    assert logged == pytest.approx([heldout_loss(model, data, tokenizer)], abs=1e-4)


def test_an_optimizer_state_that_does_not_fit_is_refused_by_name(tmp_path, monkeypatch):
    """torchtune's load_from_full_optimizer_state_dict pairs states by position: a mismatch must not reach it."""
    from gqa_tune.recipes.full_finetune_distributed import FullFinetuneRecipeDistributed

    monkeypatch.chdir(REPO)
    cfg = load_config(find_config("gqa_tiny/full_distributed"), [*TINY, f"output_dir={tmp_path}"])
    recipe = FullFinetuneRecipeDistributed(cfg)  # without torchrun: a process group of one
    try:
        recipe.setup(cfg)
        state = recipe.optimizer.state_dict()
        count = len(state["param_groups"][0]["params"])
        fewer = {"state": {}, "param_groups": [{**state["param_groups"][0], "params": list(range(count - 1))}]}
        with pytest.raises(ConfigError, match=rf"resume_from_checkpoint: .* \[{count - 1}\] parameters per group"):
            recipe._check_optimizer_state(fewer)
        no_state = {"state": {}, "param_groups": [{**state["param_groups"][0], "params": list(range(count))}]}
        with pytest.raises(ConfigError, match=r"no state for parameters \[0, 1, 2, 3, 4\]"):
            recipe._check_optimizer_state(no_state)
    finally:
        recipe.cleanup()


def test_two_processes_train_on_packed_rows(tmp_path):
    out = tmp_path / "packed"
    packed = ["dataset.packed=true", "tokenizer.max_seq_len=256", "model.max_seq_len=256", "batch_size=2"]
    _run(DISTRIBUTED, [*TINY, *packed, "max_steps_per_epoch=3", f"output_dir={out}"], nproc=2)
    losses = read_logged(out / "logs")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
