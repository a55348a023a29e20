"""``attn_implementation="gqa_tune"``: transformers decoders on gqa_tune's op, against transformers' own
implementations, in forward, ``generate`` and its caches, with windows, soft-caps and sinks."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import gqa_tune  # noqa: E402,F401  (registers the door)
import gqa_tune.hf.attention as door  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_importing_gqa_tune_registers_the_door_in_either_order_without_importing_transformers():
    check = "from transformers import AttentionInterface; print('gqa_tune' in AttentionInterface._global_mapping)"
    assert _run(f"import sys, gqa_tune; print('transformers' in sys.modules); {check}").split() == ["False", "True"]
    assert _run(f"import transformers.modeling_utils, gqa_tune; {check}").split() == ["True"]


@pytest.fixture
def kv_heads_seen(monkeypatch):
    """The kv-head count of every key the door hands to gqa_tune's op."""
    seen = []

    def spy(query, key, value, **kwargs):
        seen.append(key.shape[1])
        return gqa_tune.scaled_dot_product_gqa(query, key, value, **kwargs)

    monkeypatch.setattr(door, "scaled_dot_product_gqa", spy)
    return seen


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def _batch():
    ids = torch.randint(3, 120, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _logits(model, implementation, ids, mask):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_llama_logits_equal_sdpas_on_a_padded_batch_with_the_kv_heads_never_repeated(kv_heads_seen):
    model, (ids, mask) = _llama(), _batch()
    ref = _logits(model, "sdpa", ids, mask)
    out = _logits(model, "gqa_tune", ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)
    assert kv_heads_seen and set(kv_heads_seen) == {2}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_transformers_caches_gives_sdpas_tokens(cache, kv_heads_seen):
    model, (ids, mask) = _llama(), _batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    tokens = {}
    for implementation in ("sdpa", "gqa_tune"):
        model.set_attn_implementation(implementation)
        tokens[implementation] = model.generate(ids, **kwargs)
    assert torch.equal(tokens["gqa_tune"], tokens["sdpa"])
    assert set(kv_heads_seen) == {2}


def test_mistral_sliding_window_longer_than_the_window():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, sliding_window=5)  # fmt: skip
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(0, 120, (2, 17))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(_logits(model, "gqa_tune", ids, mask), _logits(model, "sdpa", ids, mask),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.set_attn_implementation("gqa_tune")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), ref)


def test_gemma2_softcap_and_window_match_eager_where_sdpa_refuses():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                          attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                          query_pre_attn_scalar=16)  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    ids, mask = _batch()
    keep = mask.bool()
    out, ref = _logits(model, "gqa_tune", ids, mask), _logits(model, "eager", ids, mask)
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-4)


def test_gpt_oss_sinks_match_eager():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no GPT-OSS")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=120, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    ids = torch.randint(0, 120, (2, 13))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(_logits(model, "gqa_tune", ids, mask), _logits(model, "eager", ids, mask),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_a_position_bias_is_refused_with_the_t5_door_named():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="takes no position_bias; for T5 use gqa_tune.convert.t5"):
        door.gqa_tune_attention(torch.nn.Module(), q, k, k, None, position_bias=torch.zeros(1, 4, 3, 3))
