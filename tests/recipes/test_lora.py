"""The LoRA recipe end to end through ``tune run``: adapters on a base checkpoint, merged + adapter files, resume.

One base checkpoint and one LoRA run (10 steps, a checkpoint at step 5) are shared by the tests of this module.
"""

import json
import math
import shutil

import pytest
import torch
from conftest import REPO, TINY, read_logged, run_tune
from safetensors.torch import load_file
from torchtune.modules.peft import LoRALinear

from gqa_tune.hf import model_shape
from gqa_tune.models import gqa_tiny, init_from_scratch
from gqa_tune.models._lora_builders import lora_gqa_tiny
from gqa_tune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gqa_tune.training.lora import adapter_from_peft, adapter_to_peft, base_builder_config

CONFIG = "configs/gqa_tiny/lora.yaml"
RECIPE = "lora_finetune_single_device"
FAST = [*TINY, "optimizer.lr=1e-2", "lr_scheduler.num_warmup_steps=0"]
LORA_RUN = [*FAST, "max_steps_per_epoch=10", "save_every_n_steps=5"]


def run(recipe, config, overrides):
    return run_tune(recipe, config, overrides, check=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An output_dir as the full recipe leaves it (LATEST names epoch_0), written directly: a fresh gqa_tiny."""
    out = tmp_path_factory.mktemp("base")
    torch.manual_seed(1)
    model = init_from_scratch(gqa_tiny(max_seq_len=128))
    save_checkpoint(out, "epoch_0", model, model.state_dict(), builder={"_component_": "gqa_tune.models.gqa_tiny"})
    return out


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    run(RECIPE, CONFIG, [*LORA_RUN, f"base_checkpoint_dir={base}", f"output_dir={out}"])
    return out


def lora_model_from(base_dir, checkpoint):
    """lora_gqa_tiny with the base's weights and the checkpoint's adapter, loaded by hand."""
    model = lora_gqa_tiny(max_seq_len=128)
    base_sd, _, _ = load_checkpoint(base_dir)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    peft = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    model.load_state_dict(adapter_from_peft(peft, expected, model_shape(model), "test"), strict=False)
    return model


def test_checkpoint_is_merged_model_plus_adapter(lora_run, base):
    losses = read_logged(lora_run / "logs")
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # falling: the adapters learn on a fresh base
    path = latest_checkpoint(lora_run)
    assert path == lora_run / "epoch_0"
    for name in ("model.safetensors", "config.json", "recipe_state.pt", "adapter/adapter_model.safetensors"):
        assert (path / name).is_file() and (lora_run / "step_5" / name).is_file(), name

    # The merged model is a plain gqa_tiny checkpoint: builder in config.json, loads strictly.
    merged, config, state = load_checkpoint(path)
    assert config["gqa_tune"]["model"] == {"_component_": "gqa_tune.models.gqa_tiny", "max_seq_len": 128}
    plain = gqa_tiny(max_seq_len=128)
    plain.load_state_dict(merged, strict=True)

    # The adapter: PEFT layout and config, with gqa_tune's settings.
    adapter_cfg = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert (adapter_cfg["peft_type"], adapter_cfg["r"], adapter_cfg["lora_alpha"]) == ("LORA", 8, 16)
    assert adapter_cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert adapter_cfg["gqa_tune"]["lora_attn_modules"] == ["q_proj", "k_proj", "v_proj", "output_proj"]
    assert adapter_cfg["gqa_tune"]["base_weights"] == str(base / "epoch_0")
    peft = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    assert len(peft) == 2 * 4 * 2 and "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight" in peft

    # Base + adapter gives the merged model's logits; only the adapted projections moved from the base.
    lora = lora_model_from(base / "epoch_0", path)
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), lora(tokens), rtol=1e-5, atol=1e-5)
    base_sd, _, _ = load_checkpoint(base / "epoch_0")
    moved = {k for k in merged if not torch.equal(merged[k], base_sd[k])}
    assert moved == {
        f"layers.{i}.attn.{m}.weight" for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "output_proj")
    }

    # Optimizer state covers the 16 adapter matrices only.
    assert state["global_step"] == 10 and len(state["optimizer"]["state"]) == 16


def test_resume_equals_uninterrupted(lora_run, base, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(lora_run / "step_5", out / "step_5")
    (out / "LATEST").write_text("step_5\n")
    run(RECIPE, CONFIG, [*LORA_RUN, f"base_checkpoint_dir={base}", f"output_dir={out}", "resume_from_checkpoint=true"])
    assert read_logged(out / "logs") == read_logged(lora_run / "logs")[5:]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        ours, theirs = load_file(str(out / "epoch_0" / name)), load_file(str(lora_run / "epoch_0" / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    state = torch.load(out / "epoch_0" / "recipe_state.pt", weights_only=False)
    assert state["global_step"] == 10 and state["loss_history"] == read_logged(lora_run / "logs")


def test_resume_refuses_a_changed_base(lora_run, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(lora_run / "step_5", out / "step_5")
    (out / "LATEST").write_text("step_5\n")
    other_base = lora_run / "epoch_0"  # a valid checkpoint, but not the weights step_5 was trained on
    proc = run_tune(
        RECIPE,
        CONFIG,
        [*LORA_RUN, f"base_checkpoint_dir={other_base}", f"output_dir={out}", "resume_from_checkpoint=true"],
    )
    assert proc.returncode != 0 and "the base weights have changed" in proc.stderr


def test_scratch_base_with_mlp_adapters_and_activation_checkpointing(tune, tmp_path):
    out = tmp_path / "run"
    overrides = [
        *FAST, "max_steps_per_epoch=4", "base_checkpoint_dir=null", "init_from_scratch=true",
        "model.apply_lora_to_mlp=true", "enable_activation_checkpointing=true", f"output_dir={out}",
    ]  # fmt: skip
    tune(RECIPE, CONFIG, overrides)
    losses = read_logged(out / "logs")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    merged, config, _ = load_checkpoint(out / "epoch_0")
    gqa_tiny(max_seq_len=128).load_state_dict(merged, strict=True)
    adapter_cfg = json.loads((out / "epoch_0" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["target_modules"][-3:] == ["gate_proj", "down_proj", "up_proj"]
    assert adapter_cfg["gqa_tune"]["base_weights"] == "init_from_scratch"


def test_peft_adapter_layout_round_trips():
    model = lora_gqa_tiny(apply_lora_to_mlp=True)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b.weight)
    adapter = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    shape = model_shape(model)
    peft = adapter_to_peft(dict(adapter), shape)
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in peft
    assert not torch.equal(peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], adapter[
        "layers.0.attn.q_proj.lora_b.weight"
    ])  # q/k rows in HF's rotary order  # fmt: skip
    back = adapter_from_peft(peft, adapter, shape, "test")
    assert back.keys() == adapter.keys() and all(torch.equal(back[k], adapter[k]) for k in adapter)
    with pytest.raises(ValueError, match="missing .*q_proj.lora_A"):
        adapter_from_peft({k: v for k, v in peft.items() if "layers.0.self_attn.q_proj.lora_A" not in k}, adapter,
                          shape, "test")  # fmt: skip


def test_base_builder_is_derived_from_the_lora_builder():
    lora = {"_component_": "gqa_tune.models.lora_gqa_tiny", "lora_rank": 4, "max_seq_len": 64}
    assert base_builder_config(lora) == {"_component_": "gqa_tune.models.gqa_tiny", "max_seq_len": 64}
    private = {"_component_": "gqa_tune.models._lora_builders.lora_gqa_decoder", "lora_attn_modules": ["q_proj"]}
    assert base_builder_config(private) == {"_component_": "gqa_tune.models.gqa_decoder"}
    with pytest.raises(ValueError, match="set base_model"):
        base_builder_config({"_component_": "gqa_tune.models.gqa_tiny"})


def test_lora_trains_on_packed_rows(base, tmp_path):
    out = tmp_path / "packed"
    packed = ["dataset.packed=true", "tokenizer.max_seq_len=256", "model.max_seq_len=256", "batch_size=2"]
    run(RECIPE, CONFIG, [*FAST, *packed, "max_steps_per_epoch=4", f"base_checkpoint_dir={base}", f"output_dir={out}"])
    losses = read_logged(out / "logs")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("init_from_scratch", ["absent", "false"])
def test_no_base_weights_is_refused_unless_init_from_scratch(tmp_path, monkeypatch, init_from_scratch):
    """LoRAConfig.init_from_scratch defaults to false; a config that leaves it out (or says false) and gives no base
    weights used to train silently from random base weights. Now it is refused, naming the keys."""
    from gqa_tune.recipes.lora_finetune_single_device import LoRAFinetuneRecipeSingleDevice
    from omegaconf import OmegaConf

    from gqa_tune.catalog import find_config
    from gqa_tune.config_check import ConfigError, load_config

    monkeypatch.chdir(REPO)
    cfg = load_config(find_config("gqa_tiny/lora"), [*TINY, "base_checkpoint_dir=null", f"output_dir={tmp_path}"])
    if init_from_scratch == "absent":
        cfg = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "init_from_scratch"})
    recipe = LoRAFinetuneRecipeSingleDevice(cfg)
    assert recipe.cfg.init_from_scratch is False  # the dataclass's default
    with pytest.raises(ConfigError, match="no weights to load: set base_checkpoint_dir or hf_model_dir .*init_from_sc"):
        recipe.setup()
