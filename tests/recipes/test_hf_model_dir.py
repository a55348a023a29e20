"""``hf_model_dir=DIR``: every recipe starts from a Hugging Face model directory, given in one key.

The sources are tiny random ``transformers`` models saved in temporary directories (nothing is
downloaded), of every architecture gqa_tune builds from a ``config.json``. Their vocabularies (300) hold
the byte tokenizer's ids, so the configs' tokenizer stays as it is. With ``optimizer.lr=0`` two steps
change nothing, so the checkpoint must give the source's logits when transformers reloads it.
"""

import json

import pytest
import torch
from conftest import REPO, run_tune
from gqa_tune.recipes.generate import GenerateRecipe
from helpers import TINY_HF, tiny_hf_model
from omegaconf import OmegaConf
from safetensors.torch import load_file

from gqa_tune.training.checkpoint import latest_checkpoint, load_checkpoint

transformers = pytest.importorskip("transformers")

#: Two steps of the configs' recipes, nothing else.
TWO_STEPS = ["max_steps_per_epoch=2", "epochs=1", "eval=null", "batch_size=4", "tokenizer.max_seq_len=48"]
#: Longer than the tiny Mistral's window (16) and Gemma 2's (8).
TOKENS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """``{kind: (directory, its logits on TOKENS)}``; the Mistral source is sharded (with an index)."""
    out = {}
    for kind in TINY_HF:
        path = tmp_path_factory.mktemp(kind)
        model = tiny_hf_model(path, kind)
        if kind == "mistral":
            for file in path.glob("model*.safetensors*"):
                file.unlink()
            model.save_pretrained(path, max_shard_size="40KB")
            assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
        with torch.no_grad():
            out[kind] = (path, model(TOKENS).logits)
    return out


def hf_logits(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits, model


def generate(**overrides):
    cfg = OmegaConf.load(REPO / "configs/gqa_tiny/generate.yaml")
    for key, value in {"prompts": ["12+34="], "max_new_tokens": 4, **overrides}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    recipe = GenerateRecipe(cfg)
    recipe.setup(cfg)
    return recipe, recipe.generate(cfg)


@pytest.fixture(scope="module")
def full_runs(sources, tmp_path_factory):
    """The full recipe's config with ``hf_model_dir`` added, two steps at lr 0, for every architecture."""
    runs = {}
    for kind, (path, _) in sources.items():
        out = tmp_path_factory.mktemp(f"full_{kind}")
        overrides = [f"hf_model_dir={path}", "optimizer.lr=0", *TWO_STEPS, f"output_dir={out}"]
        proc = run_tune("full_finetune_single_device", "configs/gqa_tiny/full.yaml", overrides, check=True)
        runs[kind] = (out, proc)
    return runs


@pytest.mark.parametrize("kind", sorted(TINY_HF))
def test_full_recipe_saves_what_transformers_reloads_to_the_source_logits(kind, sources, full_runs):
    path, expected = sources[kind]
    out, proc = full_runs[kind]
    # one line says what hf_model_dir replaced in configs/gqa_tiny/full.yaml
    assert f"hf_model_dir={path}: a {TINY_HF[kind]['model_type']} model" in proc.stderr
    assert "it replaces model (gqa_tune.models.gqa_tiny), init_from_scratch=true" in proc.stderr
    checkpoint = latest_checkpoint(out)
    config = json.loads((checkpoint / "config.json").read_text())
    source_config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (
        source_config["model_type"],
        source_config["architectures"],
    )
    assert (checkpoint / "generation_config.json").read_text() == (path / "generation_config.json").read_text()
    got, _ = hf_logits(checkpoint)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if kind == "qwen2":
        saved = load_file(str(checkpoint / "model.safetensors"))
        assert {"model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias"} <= saved.keys()

    # the generate recipe runs from that output_dir, and from the source itself to the same tokens
    recipe, from_run = generate(checkpoint_dir=str(out))
    assert recipe.source == str(checkpoint)
    _, from_source = generate(checkpoint_dir=None, hf_model_dir=str(path))
    assert from_run["tokens"] == from_source["tokens"] and len(from_run["tokens"][0]) > 0


def test_generate_recipe_with_hf_model_dir_through_tune_run(sources, tmp_path, tune):
    path, _ = sources["llama3"]
    out_file = tmp_path / "gen.json"
    proc = tune("generate", "configs/gqa_tiny/generate.yaml",
                [f"hf_model_dir={path}", "prompt=1+2=", "max_new_tokens=3", f"output_file={out_file}"])  # fmt: skip
    assert "it replaces checkpoint_dir=outputs/gqa_tiny_full" in proc.stderr
    data = json.loads(out_file.read_text())
    assert data["num_heads"] == 4 and data["num_kv_heads"] == 2 and len(data["tokens"][0]) == 3


def test_generate_reads_a_torchtune_checkpointer_output_dir(sources, tmp_path):
    from torchtune.training import FullModelHFCheckpointer

    path, _ = sources["qwen2"]
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(path), checkpoint_files=["model.safetensors"], model_type="QWEN2",
        output_dir=str(tmp_path / "tt"),
    )  # fmt: skip
    checkpointer.save_checkpoint(checkpointer.load_checkpoint(), epoch=0)
    recipe, from_torchtune = generate(checkpoint_dir=str(tmp_path / "tt"))
    assert recipe.source == str(tmp_path / "tt" / "epoch_0")
    _, from_source = generate(checkpoint_dir=None, hf_model_dir=str(path))
    assert from_torchtune["tokens"] == from_source["tokens"]


def test_lora_recipe_with_hf_model_dir(sources, tmp_path, tune):
    path, expected = sources["qwen2"]
    out = tmp_path / "lora"
    proc = tune("lora_finetune_single_device", "configs/gqa_tiny/lora.yaml",
                [f"hf_model_dir={path}", "optimizer.lr=0", *TWO_STEPS, f"output_dir={out}"])  # fmt: skip
    assert (
        "base_checkpoint_dir=outputs/gqa_tiny_full" in proc.stderr
        and "keeping model's lora_attn_modules" in proc.stderr
    )
    checkpoint = latest_checkpoint(out)
    merged, config, state = load_checkpoint(checkpoint)
    assert (
        config["model_type"] == "qwen2" and config["gqa_tune"]["model"]["_component_"] == "gqa_tune.models.gqa_decoder"
    )
    assert state["global_step"] == 2 and "layers.0.attn.v_proj.bias" in merged
    adapter = json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(path) and adapter["r"] == 8
    got, _ = hf_logits(checkpoint)  # lr 0: lora_b stays zero, so the merged model is the source
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_uptrain_recipe_with_hf_model_dir(sources, tmp_path, tune):
    path, _ = sources["gemma2"]
    out = tmp_path / "uptrain"
    overrides = [f"hf_model_dir={path}", "num_kv_heads=1", "uptrain_steps=2", "uptrain_fraction=null",
                 "eval=null", "batch_size=4", "tokenizer.max_seq_len=48", f"output_dir={out}"]  # fmt: skip
    proc = tune("uptrain", "configs/gqa_small/uptrain.yaml", overrides)
    assert "(2 kv heads) -> 1 kv heads" in proc.stdout and "source_checkpoint_dir=outputs/gqa_small_mha" in proc.stderr
    checkpoint = latest_checkpoint(out)
    config = json.loads((checkpoint / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"]) == ("gemma2", 1)
    assert config["gqa_tune"]["model"]["num_kv_heads"] == 1
    got, _ = hf_logits(checkpoint)  # transformers computes what our model of the checkpoint does
    recipe, _ = generate(checkpoint_dir=str(out))
    with torch.no_grad():
        torch.testing.assert_close(got, recipe.model(TOKENS), atol=1e-4, rtol=1e-4)


def test_an_unsupported_config_is_refused_before_training(sources, tmp_path):
    path, _ = sources["llama3"]
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    out = tmp_path / "out"
    proc = run_tune("full_finetune_single_device", "configs/gqa_tiny/full.yaml",
                    [f"hf_model_dir={bad}", *TWO_STEPS, f"output_dir={out}"])  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"hf_model_dir '{bad}': config.json: hidden_act='relu' is not supported" in proc.stderr
    assert latest_checkpoint(out) is None
