"""The uptrain recipe: MHA checkpoint -> pooled GQA -> a few steps -> a checkpoint the other recipes load.

One short MHA pre-training run (``tune run``, TINY overrides) is shared by the module; the uptraining
runs once through ``tune run`` (as users run it) and otherwise in-process (fast error checks).
"""

import json
import math
import shutil

import pytest
import torch
from conftest import REPO, TINY, read_logged, run_tune
from gqa_tune.recipes.generate import GenerateRecipe
from gqa_tune.recipes.uptrain import UptrainRecipe
from omegaconf import OmegaConf
from torchtune import training
from torchtune.training import FullModelHFCheckpointer

from gqa_tune.models import gqa_decoder, gqa_tiny
from gqa_tune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

PRETRAIN = "configs/gqa_small/mha_pretrain.yaml"
UPTRAIN = "configs/gqa_small/uptrain.yaml"
SMALL = dict(
    vocab_size=260, num_layers=2, num_heads=8, embed_dim=128, intermediate_dim=384, max_seq_len=128, rope_base=10000
)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name data files relative to the repository root


@pytest.fixture(scope="module")
def mha_run(tmp_path_factory):
    """An output_dir holding a 6-step MHA (8 kv heads) pre-training run."""
    out = tmp_path_factory.mktemp("mha")
    proc = run_tune("full_finetune_single_device", PRETRAIN, [*TINY, f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def uptrain_cfg(source, out, **overrides):
    cfg = OmegaConf.load(REPO / UPTRAIN)
    base = {
        "source_checkpoint_dir": None if source is None else str(source),
        "output_dir": str(out),
        "batch_size": 8,
        "tokenizer.max_seq_len": 48,
        "eval": None,
        "eval_before_uptrain": False,
        "log_every_n_steps": 1,
    }
    if "uptrain_steps" in overrides and "uptrain_fraction" not in overrides:
        base["uptrain_fraction"] = None  # the config's default budget is a fraction
    for key, value in {**base, **overrides}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def run_in_process(cfg):
    recipe = UptrainRecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    return recipe


def test_uptrain_end_to_end_and_the_checkpoint_loads_everywhere(mha_run, tmp_path):
    out = tmp_path / "gqa"
    overrides = [*TINY[:1], "tokenizer.max_seq_len=48", "log_every_n_steps=1", "eval=null"]
    overrides += [f"source_checkpoint_dir={mha_run}", f"output_dir={out}", "num_kv_heads=2", "method=mean"]
    overrides += ["uptrain_fraction=0.5"]  # of the source's 6 steps: 3 steps
    proc = run_tune("uptrain", UPTRAIN, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 kv heads) -> 2 kv heads" in proc.stdout
    losses = read_logged(out / "logs")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    path = latest_checkpoint(out)
    hf = json.loads((path / "config.json").read_text())
    assert hf["num_key_value_heads"] == 2 and hf["num_attention_heads"] == 8
    assert hf["gqa_tune"]["model"]["num_kv_heads"] == 2
    assert hf["gqa_tune"]["model"]["_component_"] == "gqa_tune.models.gqa_decoder"

    state_dict, _, state = load_checkpoint(path)
    assert state["global_step"] == 3
    model = gqa_decoder(num_kv_heads=2, **SMALL)
    model.load_state_dict(state_dict)  # strict
    assert model.layers[0].attn.k_proj.weight.shape == (2 * 16, 128)
    # torchtune's HF checkpointer (what the fine-tune recipes' `checkpointer:` uses) reads it too
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(path), checkpoint_files=["model.safetensors"], output_dir=str(tmp_path / "tt"),
        model_type="LLAMA3_2",
    )  # fmt: skip
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])

    cfg = OmegaConf.load(REPO / "configs/gqa_tiny/generate.yaml")
    OmegaConf.update(cfg, "checkpoint_dir", str(out), force_add=True)
    OmegaConf.update(cfg, "prompts", ["12+34="], force_add=True)
    OmegaConf.update(cfg, "max_new_tokens", 4, force_add=True)
    OmegaConf.update(cfg, "output_file", None, force_add=True)
    gen = GenerateRecipe(cfg)
    gen.setup(cfg)
    assert gen.model.layers[0].attn.num_kv_heads == 2
    result = gen.generate(cfg)
    assert result["kv_cache_bytes"] > 0 and len(result["tokens"]) == 1


def test_converting_to_the_source_kv_heads_keeps_its_weights(mha_run, tmp_path):
    """num_kv_heads = the source's is the identity (the benchmark's continued-MHA baseline)."""
    recipe = run_in_process(uptrain_cfg(mha_run, tmp_path / "same", num_kv_heads=8, uptrain_steps=2))
    assert recipe.total_steps == 2 and recipe.global_step == 2
    source, _, _ = load_checkpoint(latest_checkpoint(mha_run))
    built = UptrainRecipe(uptrain_cfg(mha_run, tmp_path / "x", num_kv_heads=8, uptrain_steps=1))
    model, _, _ = built.load_model(built.cfg, None)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, source[key])


def test_a_torchtune_checkpointer_source_with_an_explicit_model(mha_run, tmp_path):
    ckpt = latest_checkpoint(mha_run)
    checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(ckpt),
        "checkpoint_files": ["model.safetensors"],
        "output_dir": str(tmp_path / "tt"),
        "model_type": "LLAMA3_2",
    }
    model = {"_component_": "gqa_tune.models.gqa_decoder", "num_kv_heads": 8, **SMALL}
    cfg = uptrain_cfg(None, tmp_path / "out", num_kv_heads=4, method="first", uptrain_steps=2)
    OmegaConf.update(cfg, "checkpointer", checkpointer, force_add=True)
    OmegaConf.update(cfg, "model", model, force_add=True)
    recipe = run_in_process(cfg)
    hf = json.loads((latest_checkpoint(tmp_path / "out") / "config.json").read_text())
    assert hf["num_key_value_heads"] == 4 and hf["gqa_tune"]["model"]["num_kv_heads"] == 4
    assert recipe.global_step == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_kv_heads": 3}, "does not divide"),
        ({"num_kv_heads": 16}, "cannot convert to more kv heads"),
        ({"method": "median"}, "method: expected one of mean, first, random"),
        ({"uptrain_steps": 5, "uptrain_fraction": 0.05}, "set exactly one of uptrain_steps"),
        ({"uptrain_fraction": None}, "set exactly one of uptrain_steps"),
        ({"uptrain_fraction": None, "uptrain_steps": 0}, "uptrain_steps: expected an int >= 1"),
        ({"epochs": 2}, "epochs: expected null"),
        ({"source_checkpoint_dir": "/nonexistent/run"}, "does not exist"),
    ],
)
def test_bad_requests_give_clear_errors(mha_run, tmp_path, overrides, message):
    cfg = uptrain_cfg(mha_run, tmp_path / "out", **overrides)
    with pytest.raises(ValueError, match=message):
        run_in_process(cfg)


def test_a_builder_without_num_kv_heads_is_refused(tmp_path):
    model = gqa_tiny(max_seq_len=64)
    builder = {"_component_": "gqa_tune.models.gqa_tiny", "max_seq_len": 64}
    save_checkpoint(tmp_path / "tiny", "epoch_0", model, model.state_dict(), builder=builder,
                    recipe_state={"global_step": 20})  # fmt: skip
    cfg = uptrain_cfg(tmp_path / "tiny", tmp_path / "out", num_kv_heads=1)
    with pytest.raises(ValueError, match="gqa_tune.models.gqa_tiny has no num_kv_heads argument"):
        run_in_process(cfg)


def test_a_fraction_without_the_source_steps_says_what_to_set(tmp_path):
    model = gqa_decoder(num_kv_heads=8, **SMALL)
    builder = {"_component_": "gqa_tune.models.gqa_decoder", "num_kv_heads": 8, **SMALL}
    save_checkpoint(tmp_path / "src", "epoch_0", model, model.state_dict(), builder=builder)
    cfg = uptrain_cfg(tmp_path / "src", tmp_path / "out")
    with pytest.raises(ValueError, match="source_global_step"):
        run_in_process(cfg)


def test_resuming_an_interrupted_uptraining_gives_the_same_run(mha_run, tmp_path):
    common = {"num_kv_heads": 2, "uptrain_steps": 6, "save_every_n_steps": 3}
    full = run_in_process(uptrain_cfg(mha_run, tmp_path / "full", **common))
    assert len(full.loss_history) == 6
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "step_3", resumed_dir / "step_3")
    (resumed_dir / "LATEST").write_text("step_3\n")
    resumed = run_in_process(uptrain_cfg(mha_run, resumed_dir, resume_from_checkpoint=True, **common))
    assert resumed.loss_history == pytest.approx(full.loss_history, rel=1e-6, abs=1e-7)
    final_a, config_a, _ = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    final_b, config_b, _ = load_checkpoint(latest_checkpoint(resumed_dir))
    assert config_a == config_b and config_b["num_key_value_heads"] == 2
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-5, atol=1e-6)


def test_uptrain_trains_on_packed_rows(mha_run, tmp_path):
    cfg = uptrain_cfg(mha_run, tmp_path / "packed", uptrain_steps=3, batch_size=2,
                      **{"dataset.packed": True, "tokenizer.max_seq_len": 256, "model.max_seq_len": 256})  # fmt: skip
    recipe = run_in_process(cfg)
    assert recipe.packed and recipe.global_step == 3
    assert all(math.isfinite(x) for x in recipe.loss_history)
