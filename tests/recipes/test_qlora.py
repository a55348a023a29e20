"""QLoRA through ``tune run``: the LoRA recipe with ``configs/gqa_tiny/qlora.yaml`` (an NF4 base).

Checkpoints must hold the model QLoRA trained, in the base dtype: the NF4 base dequantized, plus the adapter,
merged. So the oracle is built by hand from torchao's ``to_nf4`` of the base checkpoint and the adapter
file, and transformers, the plain ``gqa_tiny`` and the generate recipe must all compute what it computes.
"""

import json
import shutil

import pytest
import torch
from conftest import REPO, TINY, read_logged, run_tune
from helpers import greedy_without_cache, tiny_hf_model
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
from torchtune.modules.peft import LoRALinear

from gqa_tune.data import ByteTokenizer
from gqa_tune.hf import model_shape
from gqa_tune.models import gqa_tiny, init_from_scratch, qlora_gqa_tiny
from gqa_tune.models._lora_builders import nf4_kwargs
from gqa_tune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gqa_tune.training.lora import adapter_from_peft

CONFIG = "configs/gqa_tiny/qlora.yaml"
RECIPE = "lora_finetune_single_device"
FAST = [*TINY, "optimizer.lr=1e-2", "lr_scheduler.num_warmup_steps=0"]
RUN = [*FAST, "max_steps_per_epoch=10", "save_every_n_steps=5"]
ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An output_dir as the full recipe leaves it: a fresh gqa_tiny in epoch_0."""
    out = tmp_path_factory.mktemp("base")
    torch.manual_seed(1)
    model = init_from_scratch(gqa_tiny(max_seq_len=128))
    save_checkpoint(out, "epoch_0", model, model.state_dict(), builder={"_component_": "gqa_tune.models.gqa_tiny"})
    return out


@pytest.fixture(scope="module")
def qlora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    run_tune(RECIPE, CONFIG, [*RUN, f"base_checkpoint_dir={base}", f"output_dir={out}"], check=True)
    return out


def nf4_values(weight, name):
    """What an NF4 parameter holding ``weight`` computes with: torchao's dequantization of its NF4."""
    return to_nf4(weight, **nf4_kwargs(weight, name)).get_original_weight()


def by_hand(base_dir, checkpoint):
    """(the merged weights, gqa_tiny's keys) QLoRA trained: NF4 of the base + the adapter file's ``alpha/r B A``."""
    base_sd, _, _ = load_checkpoint(base_dir)
    adapter_cfg = json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())
    scale = adapter_cfg["lora_alpha"] / adapter_cfg["r"]
    template = qlora_gqa_tiny(max_seq_len=128)
    expected = {k: v for k, v in template.state_dict().items() if "lora_" in k}
    peft = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    adapter = adapter_from_peft(peft, expected, model_shape(template), "test")
    merged = {}
    for name, value in base_sd.items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module.rpartition(".")[2] in (*ATTN, "w1", "w2", "w3"):
            value = nf4_values(value, module)
            if f"{module}.lora_a.weight" in adapter:
                value = value + scale * adapter[f"{module}.lora_b.weight"] @ adapter[f"{module}.lora_a.weight"]
        merged[name] = value
    return merged


def test_checkpoint_is_the_trained_qlora_model_in_the_base_dtype(qlora_run, base):
    losses = read_logged(qlora_run / "logs")
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # the adapters learn on the NF4 base
    checkpoint = latest_checkpoint(qlora_run)
    assert checkpoint == qlora_run / "epoch_0"
    raw = load_file(str(checkpoint / "model.safetensors"))
    assert raw and all(v.dtype == torch.float32 for v in raw.values())  # no NF4 codes in the file
    merged, config, state = load_checkpoint(checkpoint)
    assert config["gqa_tune"]["model"] == {"_component_": "gqa_tune.models.gqa_tiny", "max_seq_len": 128}
    assert state["global_step"] == 10 and len(state["optimizer"]["state"]) == 16  # 2 layers x 4 x (A, B)

    expected = by_hand(base / "epoch_0", checkpoint)
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
    base_sd, _, _ = load_checkpoint(base / "epoch_0")
    assert not torch.equal(merged["layers.0.mlp.w1.weight"], base_sd["layers.0.mlp.w1.weight"])  # the NF4 rounding

    # The plain model and transformers load it and compute the same.
    plain = gqa_tiny(max_seq_len=128)
    plain.load_state_dict(merged, strict=True)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, plain(tokens), rtol=1e-4, atol=1e-4)


def test_resume_equals_uninterrupted(qlora_run, base, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(qlora_run / "step_5", out / "step_5")
    (out / "LATEST").write_text("step_5\n")
    overrides = [*RUN, f"base_checkpoint_dir={base}", f"output_dir={out}", "resume_from_checkpoint=true"]
    run_tune(RECIPE, CONFIG, overrides, check=True)
    assert read_logged(out / "logs") == read_logged(qlora_run / "logs")[5:]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        ours, theirs = load_file(str(out / "epoch_0" / name)), load_file(str(qlora_run / "epoch_0" / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_generate_recipe_loads_the_checkpoint(qlora_run, tmp_path):
    out_file = tmp_path / "gen.json"
    overrides = [f"checkpoint_dir={qlora_run}", "prompt=37+45=", "max_new_tokens=6", f"output_file={out_file}"]
    run_tune("generate", "configs/gqa_tiny/generate.yaml", overrides, check=True)
    data = json.loads(out_file.read_text())
    merged, _, _ = load_checkpoint(latest_checkpoint(qlora_run))
    plain = gqa_tiny(max_seq_len=128)
    plain.load_state_dict(merged, strict=True)
    tok = ByteTokenizer()
    prompt = torch.tensor([tok.encode("37+45=", add_bos=True, add_eos=False)])
    expected = greedy_without_cache(plain.eval(), prompt, 6)[0, prompt.shape[1] :].tolist()
    stop = expected.index(tok.eos_id) if tok.eos_id in expected else len(expected)
    assert data["tokens"][0] == expected[:stop]


def test_hf_model_dir_builds_the_qlora_variant_of_its_architecture(tmp_path):
    pytest.importorskip("transformers")
    source = tmp_path / "src"
    tiny_hf_model(source, "llama3")
    out = tmp_path / "run"
    overrides = [f"hf_model_dir={source}", *FAST, "max_steps_per_epoch=2", "batch_size=4", f"output_dir={out}"]
    proc = run_tune(RECIPE, CONFIG, overrides, check=True)
    log = proc.stdout + proc.stderr
    assert "built by gqa_tune.models.lora_gqa_decoder from its config.json, with its weights (its base in NF4" in log
    merged, config, _ = load_checkpoint(latest_checkpoint(out))
    assert (
        config["model_type"] == "llama" and config["gqa_tune"]["model"]["_component_"] == "gqa_tune.models.gqa_decoder"
    )
    assert "quantize_base" not in config["gqa_tune"]["model"]
    source_sd, _, _ = load_checkpoint(source)
    # The MLP is not adapted: the checkpoint holds its NF4 values, in the base dtype.
    torch.testing.assert_close(merged["layers.1.mlp.w2.weight"], nf4_values(source_sd["layers.1.mlp.w2.weight"], "w2"))


def test_quantize_base_on_the_lora_config(tmp_path, base):
    """``model.quantize_base=true`` on configs/gqa_tiny/lora.yaml: the LoRA recipe builds the NF4 base."""
    from gqa_tune.recipes.lora_finetune_single_device import LoRAFinetuneRecipeSingleDevice

    cfg = OmegaConf.load(REPO / "configs/gqa_tiny/lora.yaml")
    for key, value in {"model.quantize_base": True, "base_checkpoint_dir": str(base), "output_dir": str(tmp_path),
                       "eval": None, "batch_size": 8, "max_steps_per_epoch": 2}.items():  # fmt: skip
        OmegaConf.update(cfg, key, value, force_add=True)
    recipe = LoRAFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    params = dict(recipe.model.named_parameters())
    assert isinstance(params["layers.0.attn.q_proj.weight"], NF4Tensor)
    assert isinstance(params["layers.1.mlp.w3.weight"], NF4Tensor)
    assert {n for n, p in params.items() if p.requires_grad} == {
        f"layers.{i}.attn.{m}.lora_{ab}.weight" for i in range(2) for m in ATTN for ab in "ab"
    }
    assert all(isinstance(m, LoRALinear) for m in (recipe.model.layers[0].attn.k_proj,))
    assert recipe.base_builder(recipe.builder) == {"_component_": "gqa_tune.models.gqa_tiny", "max_seq_len": 128}


def test_the_plain_builder_of_a_qlora_builder():
    from gqa_tune.training.lora import base_builder_config

    qlora = {"_component_": "gqa_tune.models.qlora_gqa_tiny", "lora_rank": 4, "max_seq_len": 64}
    assert base_builder_config(qlora) == {"_component_": "gqa_tune.models.gqa_tiny", "max_seq_len": 64}
    flag = {"_component_": "gqa_tune.models._lora_builders.lora_gqa_decoder", "quantize_base": True, "num_layers": 2}
    assert base_builder_config(flag) == {"_component_": "gqa_tune.models.gqa_decoder", "num_layers": 2}
