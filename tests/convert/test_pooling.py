"""MHA -> GQA pooling (gqa_tune.convert.pooling): tensors, state dicts and live models."""

import pytest
import torch
from torch import nn
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules import KVCache as TorchtuneKVCache
from torchtune.modules import MultiHeadAttention as TorchtuneMHA
from torchtune.modules.peft import LoRALinear

from gqa_tune.convert import METHODS, convert_attention_, convert_model_, convert_state_dict, pool_heads
from gqa_tune.models import gqa_decoder, lora_gqa_tiny
from gqa_tune.modules import KVCache, MultiHeadAttention

VOCAB, DIM, HEADS, HEAD_DIM, MAX_LEN = 64, 32, 4, 8, 32


def small_gqa(num_kv_heads=HEADS, **kwargs):
    return gqa_decoder(
        vocab_size=VOCAB, num_layers=2, num_heads=HEADS, num_kv_heads=num_kv_heads, embed_dim=DIM,
        intermediate_dim=64, max_seq_len=MAX_LEN, rope_base=10_000, **kwargs,
    ).eval()  # fmt: skip


def small_llama(num_kv_heads=HEADS):
    return llama3_2(
        vocab_size=VOCAB, num_layers=2, num_heads=HEADS, num_kv_heads=num_kv_heads, embed_dim=DIM,
        intermediate_dim=64, max_seq_len=MAX_LEN, rope_base=10_000, scale_factor=1,
    ).eval()  # fmt: skip


def per_head(n_kv, head_dim=4, d=3):
    """A k/v weight ``[n_kv * h_d, d]`` whose head ``h`` is ``100 * h + p`` (``p`` the same pattern in every head)."""
    pattern = torch.arange(head_dim * d, dtype=torch.float32).view(head_dim, d)
    return torch.cat([100.0 * h + pattern for h in range(n_kv)])


def heads(t, head_dim=4):
    return t.view(-1, head_dim, *t.shape[1:])


# --- tensors ---------------------------------------------------------------


@pytest.mark.parametrize("new", [4, 2, 1])
def test_mean_is_the_mean_of_each_group(new):
    t = per_head(8)
    pooled = pool_heads(t, 8, new, 4, "mean")
    r = 8 // new
    assert pooled.shape == (new * 4, 3)
    source = heads(t)
    pattern = torch.arange(12, dtype=torch.float32).view(4, 3)
    for j in range(new):
        expected = source[j * r : (j + 1) * r].mean(dim=0)
        assert torch.equal(heads(pooled)[j], expected)
        assert torch.equal(heads(pooled)[j], 100.0 * (j * r + (r - 1) / 2) + pattern)  # closed form


def test_mean_of_random_weights_and_dtype():
    t = torch.randn(8 * 4, 16, dtype=torch.bfloat16)
    pooled = pool_heads(t, 8, 2, 4)
    assert pooled.dtype == torch.bfloat16
    expected = t.float().view(2, 4, 4, 16).mean(dim=1).reshape(8, 16).to(torch.bfloat16)
    assert torch.equal(pooled, expected)


@pytest.mark.parametrize("new", [4, 2, 1])
def test_first_keeps_the_first_head_of_each_group(new):
    t = torch.randn(8 * 4, 3)
    pooled = pool_heads(t, 8, new, 4, "first")
    r = 8 // new
    for j in range(new):
        assert torch.equal(heads(pooled)[j], heads(t)[j * r])


def test_random_is_a_fresh_seeded_init():
    t = per_head(8, d=16)
    a = pool_heads(t, 8, 2, 4, "random", torch.Generator().manual_seed(1))
    b = pool_heads(t, 8, 2, 4, "random", torch.Generator().manual_seed(1))
    c = pool_heads(t, 8, 2, 4, "random", torch.Generator().manual_seed(2))
    assert a.shape == (8, 16) and a.dtype == t.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 16**-0.5  # nn.Linear's init range, nothing of the old weights (which are >= 0, up to 763)
    assert a.min() < 0
    assert torch.equal(pool_heads(torch.ones(8 * 4), 8, 2, 4, "random"), torch.zeros(8))  # biases start at zero
    sd = {"layers.0.attn.k_proj.weight": t, "layers.0.attn.v_proj.weight": t}
    once = convert_state_dict(sd, num_kv_heads=8, new_num_kv_heads=2, head_dim=4, method="random", seed=3)
    again = convert_state_dict(sd, num_kv_heads=8, new_num_kv_heads=2, head_dim=4, method="random", seed=3)
    assert all(torch.equal(once[k], again[k]) for k in sd)
    assert not torch.equal(once["layers.0.attn.k_proj.weight"], once["layers.0.attn.v_proj.weight"])


@pytest.mark.parametrize("method", METHODS)
def test_converting_to_the_current_heads_is_the_identity(method):
    t = torch.randn(8 * 4, 3)
    same = pool_heads(t, 8, 8, 4, method)
    assert torch.equal(same, t) and same.data_ptr() != t.data_ptr()
    model = small_gqa(num_kv_heads=2, attn_bias=True)
    tokens = torch.randint(0, VOCAB, (2, 10))
    sd = model.state_dict()
    converted = convert_state_dict(sd, num_kv_heads=2, new_num_kv_heads=2, head_dim=HEAD_DIM, method=method)
    assert all(torch.equal(converted[k], sd[k]) for k in sd)
    with torch.no_grad():
        before = model(tokens)
        assert convert_model_(model, 2, method) == 2
        assert torch.equal(model(tokens), before)


def test_biases_are_pooled():
    bias = torch.arange(8 * 4, dtype=torch.float32)
    pooled = pool_heads(bias, 8, 2, 4)
    assert torch.equal(pooled, bias.view(2, 4, 4).mean(dim=1).reshape(8))
    assert torch.equal(pool_heads(bias, 8, 2, 4, "first"), bias.view(2, 4, 4)[:, 0].reshape(8))
    model = small_gqa(attn_bias=True)
    attn = model.layers[0].attn
    k_bias, v_bias = attn.k_proj.bias.detach().clone(), attn.v_proj.bias.detach().clone()
    sd = convert_state_dict(model.state_dict(), num_kv_heads=HEADS, new_num_kv_heads=2, head_dim=HEAD_DIM)
    assert torch.equal(sd["layers.0.attn.k_proj.bias"], pool_heads(k_bias, HEADS, 2, HEAD_DIM))
    convert_model_(model, 2)
    assert torch.equal(attn.k_proj.bias.detach(), pool_heads(k_bias, HEADS, 2, HEAD_DIM))
    assert torch.equal(attn.v_proj.bias.detach(), pool_heads(v_bias, HEADS, 2, HEAD_DIM))
    assert attn.k_proj.bias.requires_grad and attn.k_proj.weight.requires_grad


@pytest.mark.parametrize("method", ["mean", "first"])
def test_pooling_a_grouped_model_again_equals_pooling_once(method):
    t = per_head(8)
    twice = pool_heads(pool_heads(t, 8, 4, 4, method), 4, 2, 4, method)
    assert torch.equal(twice, pool_heads(t, 8, 2, 4, method))
    # live: 8 -> 4 -> 2 equals 8 -> 2 (up to float rounding of the means)
    model = gqa_decoder(vocab_size=VOCAB, num_layers=1, num_heads=8, num_kv_heads=8, embed_dim=DIM,
                        intermediate_dim=64, max_seq_len=MAX_LEN)  # fmt: skip
    sd = model.state_dict()
    convert_model_(model, 4, method)
    convert_model_(model, 2, method)
    once = convert_state_dict(sd, num_kv_heads=8, new_num_kv_heads=2, head_dim=4, method=method)
    for key in ("layers.0.attn.k_proj.weight", "layers.0.attn.v_proj.weight"):
        torch.testing.assert_close(model.state_dict()[key], once[key], rtol=0, atol=1e-7)


def test_convert_state_dict_leaves_other_keys_untouched():
    sd = small_gqa().state_dict()
    out = convert_state_dict(sd, num_kv_heads=HEADS, new_num_kv_heads=1, head_dim=HEAD_DIM)
    assert out.keys() == sd.keys()
    pooled = {k for k in sd if ".attn.k_proj." in k or ".attn.v_proj." in k}
    assert len(pooled) == 4
    for key in sd:
        if key in pooled:
            assert out[key].shape == (HEAD_DIM, DIM)
        else:
            assert out[key] is sd[key]
    loaded = small_gqa(num_kv_heads=1)
    loaded.load_state_dict(out)  # the pooled state dict fits a model built with the new head count


def test_convert_state_dict_refuses_unmerged_lora_keys():
    sd = lora_gqa_tiny().state_dict()
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.k_proj\.lora_a\.weight.*merge LoRA"):
        convert_state_dict(sd, num_kv_heads=2, new_num_kv_heads=1, head_dim=16)


def test_convert_state_dict_names_a_misshapen_key():
    sd = {"layers.0.attn.k_proj.weight": torch.zeros(12, 3)}
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.k_proj\.weight.*\(12, 3\).*4 heads x head_dim 4"):
        convert_state_dict(sd, num_kv_heads=4, new_num_kv_heads=2, head_dim=4)


# --- live models -------------------------------------------------------------


@pytest.mark.parametrize("kv", [HEADS, 2])  # from MHA and from an already grouped model
def test_gqa_decoder_is_converted_in_place(kv):
    model = small_gqa(num_kv_heads=kv)
    tokens = torch.randint(0, VOCAB, (2, 10))
    assert convert_model_(model, 1) == 2
    for layer in model.layers:
        attn = layer.attn
        assert isinstance(attn, MultiHeadAttention) and attn.num_kv_heads == 1
        assert attn.k_proj.out_features == attn.v_proj.out_features == HEAD_DIM
    reference = small_gqa(num_kv_heads=1)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = model(tokens)
        assert out.shape == (2, 10, VOCAB) and torch.isfinite(out).all()
        assert torch.equal(out, reference(tokens))


def test_torchtune_llama_is_converted_in_place():
    model = small_llama()
    tokens = torch.randint(0, VOCAB, (2, 10))
    expected_sd = convert_state_dict(model.state_dict(), num_kv_heads=HEADS, new_num_kv_heads=2, head_dim=HEAD_DIM)
    assert convert_model_(model, 2) == 2
    for layer in model.layers:
        assert isinstance(layer.attn, TorchtuneMHA) and layer.attn.num_kv_heads == 2
        assert layer.attn.k_proj.out_features == 2 * HEAD_DIM
    reference = small_llama(num_kv_heads=2)  # torchtune's own GQA model with the pooled weights
    reference.load_state_dict(expected_sd)
    with torch.no_grad():
        out = model(tokens)
        assert out.shape == (2, 10, VOCAB)
        torch.testing.assert_close(out, reference(tokens), rtol=0, atol=0)


def causal_decode(model, tokens, prefill):
    """Prefill ``prefill`` tokens, then decode the rest one at a time, with torchtune's masks and input_pos."""
    b, s = tokens.shape
    causal = torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool).tril()
    pos = torch.arange(s).expand(b, -1)
    outs = [model(tokens[:, :prefill], mask=causal[None, :prefill].expand(b, -1, -1), input_pos=pos[:, :prefill])]
    for i in range(prefill, s):
        outs.append(
            model(tokens[:, i : i + 1], mask=causal[None, i : i + 1].expand(b, -1, -1), input_pos=pos[:, i : i + 1])
        )
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(
    "build, cache_type", [(small_gqa, KVCache), (small_llama, TorchtuneKVCache)], ids=["gqa_tune", "torchtune"]
)
def test_a_set_up_kv_cache_gets_the_new_head_count(build, cache_type):
    model = build()
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=MAX_LEN)
        model(tokens[:, :3], mask=torch.ones(2, 3, MAX_LEN, dtype=torch.bool).tril(), input_pos=torch.arange(3)[None])
        convert_model_(model, 2)
        for layer in model.layers:
            cache = layer.attn.kv_cache
            assert type(cache) is cache_type and layer.attn.cache_enabled
            assert cache.k_cache.shape == cache.v_cache.shape == (2, 2, MAX_LEN, HEAD_DIM)
            assert cache.size == 0  # the old keys/values do not fit the new heads: the cache starts empty
        cached = causal_decode(model, tokens, prefill=5)
        model.reset_caches()
        full = build(num_kv_heads=2)
        full.load_state_dict(model.state_dict())
        torch.testing.assert_close(cached, full(tokens), rtol=1e-5, atol=1e-5)


def test_converted_gqa_model_decodes_like_its_full_forward():
    model = small_gqa()
    tokens = torch.randint(0, VOCAB, (2, 12))
    convert_model_(model, 2)
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=MAX_LEN)
        torch.testing.assert_close(causal_decode(model, tokens, prefill=6), full, rtol=1e-5, atol=1e-5)
    # gqa_tune's attention module decodes without mask or input_pos
    attn = small_gqa().layers[0].attn
    convert_attention_(attn, 1)
    x = torch.randn(2, 12, DIM)
    with torch.no_grad():
        full = attn(x, x)
        attn.setup_cache(batch_size=2, dtype=torch.float32, max_seq_len=MAX_LEN)
        steps = [attn(x[:, :6], x[:, :6])] + [attn(x[:, i : i + 1], x[:, i : i + 1]) for i in range(6, 12)]
        assert attn.kv_cache.k_cache.shape[1] == 1 and attn.kv_cache.size == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [small_gqa, small_llama], ids=["gqa_tune", "torchtune"])
def test_mha_with_identical_heads_in_each_group_keeps_its_outputs(build):
    model = build()
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.attn.k_proj, layer.attn.v_proj):
                w = proj.weight.view(2, 2, HEAD_DIM, DIM)  # [group, head in group, h_d, d]
                w[:, 1] = w[:, 0]
        w_first = {
            layer: [p.weight.view(2, 2, HEAD_DIM, DIM)[:, 0].clone() for p in (layer.attn.k_proj, layer.attn.v_proj)]
            for layer in model.layers
        }
        tokens = torch.randint(0, VOCAB, (2, 10))
        before = model(tokens)
        convert_model_(model, 2, "mean")
        for layer in model.layers:  # the mean of two equal heads is that head, exactly
            assert torch.equal(layer.attn.k_proj.weight.view(2, HEAD_DIM, DIM), w_first[layer][0])
            assert torch.equal(layer.attn.v_proj.weight.view(2, HEAD_DIM, DIM), w_first[layer][1])
        torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)


def test_lora_projections_are_refused_and_the_model_is_unchanged():
    model = lora_gqa_tiny()
    with pytest.raises(ValueError, match="LoRALinear k_proj.*merge LoRA adapters"):
        convert_model_(model, 1)
    for layer in model.layers:
        assert layer.attn.num_kv_heads == 2 and isinstance(layer.attn.k_proj, LoRALinear)
    with pytest.raises(ValueError, match="LoRALinear"):
        convert_attention_(model.layers[0].attn, 1)
    assert model.layers[0].attn.num_kv_heads == 2


@pytest.mark.parametrize(
    "new, method, match",
    [
        (3, "mean", "num_kv_heads 3 does not divide the current 4"),
        (8, "mean", r"more kv heads \(8\) than the model has \(4\)"),
        (0, "mean", "positive int, got 0"),
        (True, "mean", "positive int, got True"),
        (2, "median", "unknown pooling method 'median'"),
    ],
)
def test_bad_requests_name_the_values(new, method, match):
    model = small_gqa()
    with pytest.raises(ValueError, match=match):
        convert_model_(model, new, method)
    assert model.layers[0].attn.num_kv_heads == HEADS
    with pytest.raises(ValueError, match=match):
        convert_state_dict(
            model.state_dict(), num_kv_heads=HEADS, new_num_kv_heads=new, head_dim=HEAD_DIM, method=method
        )
    with pytest.raises(ValueError, match=match):
        pool_heads(torch.zeros(HEADS * HEAD_DIM, 3), HEADS, new, HEAD_DIM, method)


def test_state_dicts_and_models_without_kv_projections_are_refused():
    with pytest.raises(ValueError, match=r"no key/value projection weights of 'torchtune' format"):
        convert_state_dict({"tok_embeddings.weight": torch.zeros(3, 4)}, num_kv_heads=4, new_num_kv_heads=2, head_dim=4)
    hf_sd = {"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 4)}
    with pytest.raises(ValueError, match=r"'torchtune' format"):  # an HF state dict read as torchtune's
        convert_state_dict(hf_sd, num_kv_heads=4, new_num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="unknown state-dict format 'meta'"):
        convert_state_dict(hf_sd, num_kv_heads=4, new_num_kv_heads=2, head_dim=4, fmt="meta")
    with pytest.raises(ValueError, match="Sequential has no attention modules"):
        convert_model_(nn.Sequential(nn.Linear(4, 4)), 1)
