"""gqa_tune.training.weights: a Hugging Face config.json -> the builder that computes what transformers does.

Every architecture is a tiny random ``transformers`` model saved with ``save_pretrained`` (nothing is
downloaded); our model, built from its ``config.json`` and loaded from its files, must give transformers'
float32 logits to 1e-4, and a checkpoint saved from it must reload in transformers with the same logits.
"""

import json
import re

import pytest
import torch
from helpers import TINY_HF, tiny_hf_model
from omegaconf import OmegaConf
from torchtune import config
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

from gqa_tune.hf import builder_from_hf_config, read_hf_config
from gqa_tune.training.checkpoint import load_checkpoint, resolve_checkpoint_dir, save_checkpoint
from gqa_tune.training.weights import load_weights

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

#: Longer than the tiny Mistral's window (16) and Gemma 2's (8).
SEQ = 40


@pytest.fixture(scope="module", params=sorted(TINY_HF))
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = tiny_hf_model(path, request.param)
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    return request.param, path, tokens, logits


def build(path):
    """Our model for a Hugging Face directory, through the recipes' loader."""
    cfg = OmegaConf.create({"hf_model_dir": str(path), "model": {"_component_": "gqa_tune.models.gqa_tiny"}})
    state_dict, builder, source = load_weights(cfg)
    model = config.instantiate(builder)
    model.load_state_dict(state_dict)  # strict: every weight, and nothing else
    return model.eval(), builder, source


def test_our_model_gives_transformers_logits(hf_dir):
    kind, path, tokens, expected = hf_dir
    model, builder, source = build(path)
    assert source.kind == "hf_model_dir" and source.path == path
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)


def test_a_saved_checkpoint_reloads_in_transformers_as_the_same_architecture(hf_dir, tmp_path):
    kind, path, tokens, expected = hf_dir
    model, builder, source = build(path)
    saved = save_checkpoint(
        tmp_path, "epoch_0", model, model.state_dict(), builder=OmegaConf.to_container(builder), source_dir=path
    )
    config_json = json.loads((saved / "config.json").read_text())
    assert config_json["model_type"] == TINY_HF[kind]["model_type"]
    assert config_json["architectures"] == json.loads((path / "config.json").read_text())["architectures"]
    assert (saved / "generation_config.json").read_text() == (path / "generation_config.json").read_text()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, expected, atol=1e-4, rtol=1e-4)
    # and our loader reads it back to the same weights
    again, config_back, _ = load_checkpoint(saved)
    ours = model.state_dict()
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    assert config_back["gqa_tune"]["model"]["_component_"] == builder["_component_"]


def test_llama3_rope_scaling_becomes_torchtunes_scaled_rope_with_the_configs_factors(tmp_path):
    tiny_hf_model(tmp_path, "llama3")
    builder = builder_from_hf_config(read_hf_config(tmp_path))
    assert builder == {
        "_component_": "gqa_tune.models.gqa_decoder",
        "vocab_size": 300, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64,
        "intermediate_dim": 96, "max_seq_len": 256, "head_dim": 16, "norm_eps": 1e-5, "attn_dropout": 0.0,
        "rope_base": 500_000.0, "rope_scale_factor": 8.0, "rope_low_freq_factor": 1.0,
        "rope_high_freq_factor": 4.0, "rope_old_context_len": 32, "tie_word_embeddings": False, "attn_bias": False,
    }  # fmt: skip
    rope = config.instantiate(OmegaConf.create(builder)).layers[0].attn.pos_embeddings
    assert isinstance(rope, Llama3ScaledRoPE)
    assert (rope.scale_factor, rope.low_freq_factor, rope.high_freq_factor, rope.old_context_len) == (8, 1, 4, 32)


def test_the_mapping_of_each_architecture():
    base = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 128}  # fmt: skip
    qwen = builder_from_hf_config({**base, "model_type": "qwen2", "num_key_value_heads": 2, "rope_theta": 1e6})
    assert (qwen["attn_bias"], qwen["rope_base"], qwen["num_kv_heads"], qwen["tie_word_embeddings"]) == (
        True, 1e6, 2, False
    )  # fmt: skip
    # transformers' defaults where config.json is silent: Mistral's 4096 window, Gemma's head_dim 256 and ties
    mistral = builder_from_hf_config({**base, "model_type": "mistral", "num_key_value_heads": 2})
    assert mistral["sliding_window_size"] == 4096 and mistral["norm_eps"] == 1e-6 and mistral["rope_base"] == 1e4
    assert (
        builder_from_hf_config({**base, "model_type": "mistral", "sliding_window": None})["sliding_window_size"] is None
    )
    gemma = builder_from_hf_config({**base, "model_type": "gemma", "num_key_value_heads": 1})
    assert gemma["_component_"] == "gqa_tune.models.gqa_gemma_decoder" and gemma["head_dim"] == 256
    gemma2 = builder_from_hf_config({**base, "model_type": "gemma2", "final_logit_softcapping": None})
    assert (gemma2["final_capping_value"], gemma2["hidden_capping_value"], gemma2["query_pre_attn_scalar"]) == (
        None, 50.0, 256
    )  # fmt: skip
    assert gemma2["cap_logits"] is True and gemma2["sliding_window_size"] == 4096
    # transformers 4 configs: rope_theta beside rope_scaling, the type under "type"
    scaling = {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    old = {**base, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": scaling}
    llama = builder_from_hf_config(old)
    assert (llama["rope_base"], llama["rope_scale_factor"], llama["rope_old_context_len"]) == (5e5, 32.0, 128)
    assert llama["num_kv_heads"] == 4 and llama["head_dim"] == 16  # kv heads default to the heads


BASE = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}  # fmt: skip


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"model_type": None}, "model_type=None"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures=['LlamaForSequenceClassification']"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters.rope_type='yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config="),
        ({"hidden_size": None}, "lacks 'hidden_size'"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive int, got 0"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=True"),
        ({"model_type": "gemma", "tie_word_embeddings": False}, "tie_word_embeddings=False"),
        ({"model_type": "gemma", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
        ({"model_type": "gemma2", "layer_types": ["full_attention"] * 2}, "layer_types=['full_attention', "),
        ({"model_type": "gemma2", "hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    ],
)
def test_unsupported_values_are_value_errors_naming_key_and_value(change, named):
    with pytest.raises(ValueError, match=r"config\.json.*" + re.escape(named)):
        builder_from_hf_config({**BASE, **change}, "config.json")


def test_sharded_and_pytorch_bin_sources_load_to_the_same_weights(tmp_path):
    model = tiny_hf_model(tmp_path / "one", "qwen2")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    (tmp_path / "bin").mkdir()
    (tmp_path / "one" / "config.json").rename(tmp_path / "bin" / "config.json")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    reference, _, _ = load_checkpoint(tmp_path / "sharded")
    weights, _, _ = load_checkpoint(tmp_path / "bin")
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


def test_a_torchtune_checkpointer_output_dir_resolves_to_its_newest_epoch(tmp_path):
    from torchtune.training import FullModelHFCheckpointer

    tiny_hf_model(tmp_path / "hf", "llama3")
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(tmp_path / "hf"), checkpoint_files=["model.safetensors"], model_type="LLAMA3",
        output_dir=str(tmp_path / "tt"),
    )  # fmt: skip
    state = checkpointer.load_checkpoint()
    for epoch in (0, 1):
        checkpointer.save_checkpoint({"model": dict(state["model"])}, epoch=epoch)
    assert resolve_checkpoint_dir(str(tmp_path / "tt"), "checkpoint_dir", "") == tmp_path / "tt" / "epoch_1"
    ours, _, _ = load_checkpoint(tmp_path / "tt" / "epoch_1")
    direct, _, _ = load_checkpoint(tmp_path / "hf")
    assert ours.keys() == direct.keys() and all(torch.equal(ours[k], direct[k]) for k in ours)


def test_hf_model_dir_wins_over_model_and_keeps_the_lora_settings(tmp_path):
    tiny_hf_model(tmp_path, "mistral")
    lora = {"_component_": "gqa_tune.models.lora_gqa_tiny", "lora_attn_modules": ["q_proj"], "lora_rank": 4,
            "lora_alpha": 8, "max_seq_len": 128, "backend": "math"}  # fmt: skip
    cfg = OmegaConf.create({"hf_model_dir": str(tmp_path), "model": lora, "base_checkpoint_dir": "/elsewhere"})
    _, builder, source = load_weights(cfg, checkpoint_key="base_checkpoint_dir")
    assert builder["_component_"] == "gqa_tune.models.lora_gqa_decoder" and source.kind == "hf_model_dir"
    assert (builder.lora_rank, builder.lora_alpha, builder.backend, builder.sliding_window_size) == (4, 8, "math", 16)
    assert builder.max_seq_len == 256  # the architecture's, not the replaced model's
    # without hf_model_dir, the checkpoint directory and the checkpointer are exclusive
    both = OmegaConf.create({"checkpointer": {"_component_": "x.Y"}, "checkpoint_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="set only one of checkpoint_dir and checkpointer"):
        load_weights(both, checkpoint_key="checkpoint_dir")
    with pytest.raises(ValueError, match="hf_model_dir '/nowhere' does not exist"):
        load_weights(OmegaConf.create({"hf_model_dir": "/nowhere"}))
