"""Quantized KV caches (int8, float8_e4m3fn): scales per token and kv head, decode over the filled prefix only."""

import copy
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules.common_utils import delete_kv_caches

import gqa_tune
from gqa_tune import attention_ref, flash_decode_gqa
from gqa_tune.models import gqa_attention, gqa_tiny
from gqa_tune.modules import KVCache, setup_caches
from gqa_tune.ops import kv_quant
from gqa_tune.ops.dispatch import AttentionSpec, attend

INT8, FP8 = torch.int8, torch.float8_e4m3fn

pytestmark = pytest.mark.usefixtures("one_thread")


def expected_int8(x):
    """absmax symmetric int8, written out: scale = max|x| / 127 per [..., :] row, values round(x / scale)."""
    scale = x.abs().amax(-1) / 127
    return torch.round(x / scale[..., None]).clamp(-127, 127), scale


def readback(cache, length):
    """What a quantized cache holds in positions ``0..length-1``, in float64: values times their scales."""
    k = cache.k_cache[:, :, :length].double() * cache.k_scale[:, :, :length, None].double()
    v = cache.v_cache[:, :, :length].double() * cache.v_scale[:, :, :length, None].double()
    return k, v


# ---------------------------------------------------------------- quantization


def test_int8_worked_example():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    values, scale = kv_quant.quantize_kv(x, INT8)
    assert values.dtype == INT8 and scale.dtype == torch.float32
    assert values.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0]]  # -63.5 rounds to even
    torch.testing.assert_close(scale, torch.tensor([1 / 127, 0.0]))
    assert kv_quant.dequantize_kv(values, scale, torch.float32)[1].abs().max() == 0  # zeros read back as zeros


@pytest.mark.parametrize("dtype", [INT8, FP8])
def test_round_trip_error_is_bounded_per_token_and_head(dtype):
    x = torch.randn(2, 3, 17, 64) * torch.logspace(-3, 2, 17).view(1, 1, 17, 1)  # tokens of very different sizes
    values, scale = kv_quant.quantize_kv(x, dtype)
    assert values.shape == x.shape and scale.shape == (2, 3, 17)
    torch.testing.assert_close(scale, x.abs().amax(-1) / (127 if dtype == INT8 else 448))
    error = (kv_quant.dequantize_kv(values, scale, torch.float64) - x.double()).abs()
    if dtype == INT8:
        bound = scale.double()[..., None] / 2 * (1 + 1e-6)  # half a step of each token's own scale
    else:  # 3 mantissa bits: half an ulp is 1/16 of the value; subnormals: half of 2**-9 steps
        bound = torch.maximum(x.double().abs() / 16, scale.double()[..., None] * 2**-10) * (1 + 1e-6)
    assert bool((error <= bound).all()), float((error / bound).max())


def test_non_finite_tokens_read_back_as_nan():
    x = torch.randn(1, 2, 3, 8)
    x[0, 1, 2, 5] = float("nan")
    x[0, 0, 1, 0] = float("inf")
    back = kv_quant.dequantize_kv(*kv_quant.quantize_kv(x, INT8), torch.float32)
    assert back[0, 1, 2].isnan().all() and back[0, 0, 1].isnan().any()
    assert back[0, 0, 0].isfinite().all() and back[0, 1, :2].isfinite().all()


# ---------------------------------------------------------------- the cache


def test_update_writes_values_and_scales_per_token_and_head():
    cache = KVCache(2, 8, 2, 4, torch.float32, kv_cache_dtype=INT8)
    assert cache.quantized and cache.dtype == torch.float32 and cache.k_cache.dtype == INT8
    k1, k2 = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 1, 4)
    cache.update(k1, k1 * 3)
    k_out, v_out = cache.update(k2, k2 * 3)
    assert cache.size == 4 and k_out.dtype == INT8 and k_out.shape == (2, 2, 8, 4)
    k = torch.cat([k1, k2], dim=2)
    values, scale = expected_int8(k)
    assert torch.equal(cache.k_cache[:, :, :4].float(), values)
    torch.testing.assert_close(cache.k_scale[:, :, :4], scale)
    torch.testing.assert_close(cache.v_scale[:, :, :4], 3 * scale)
    assert cache.k_scale[:, :, 4:].abs().max() == 0
    cache.reset()
    assert cache.size == 0 and cache.k_scale.abs().max() == 0 and cache.k_cache.abs().max() == 0


def test_bytes_per_token_at_head_dim_64_are_68_of_256():
    fp32 = KVCache(1, 16, 8, 64, torch.float32)
    int8 = KVCache(1, 16, 8, 64, torch.float32, kv_cache_dtype=INT8)
    assert int8.nbytes / fp32.nbytes == 68 / 256  # 64 one-byte values + one 4-byte scale, against 64 x 4 bytes
    assert int8.nbytes / fp32.nbytes <= 0.27


def state(cache):
    return [t.clone() for t in (cache.k_cache, cache.v_cache, cache.k_scale, cache.v_scale, cache.cache_pos,
                                cache.rows)]  # fmt: skip


def assert_state(cache, before, size):
    for old, new in zip(before, state(cache)):
        assert torch.equal(old, new)
    assert cache.size == size


@pytest.mark.parametrize(
    "shape,message",
    [
        ((3, 2, 1, 4), "batch size 3 is larger than the cache's batch_size 2"),
        ((1, 2, 1, 4), r"holds 2 row\(s\) written since reset\(\), got a batch of 1"),
        ((2, 8, 1, 4), "got 8 key/value heads, the cache holds 2"),
        ((2, 2, 6, 4), r"cannot write 6 positions: 3 of max_seq_len 8 are filled \(5 free\)"),
    ],
)
def test_rejected_update_leaves_values_and_scales_unchanged(shape, message):
    cache = KVCache(2, 8, 2, 4, torch.float32, kv_cache_dtype=INT8)
    cache.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    before = state(cache)
    with pytest.raises(ValueError, match=message):
        cache.update(torch.randn(shape), torch.randn(shape))
    assert_state(cache, before, 3)


def test_compiled_updates_write_scales_and_refuse_overflow_without_change():
    cache = KVCache(1, 6, 2, 4, torch.float32, kv_cache_dtype=INT8)
    counter = CompileCounter()
    step = torch.compile(lambda k, v: cache.update(k, v)[0].float().sum(), backend=counter, fullgraph=True)
    written = [torch.randn(1, 2, 1, 4) for _ in range(6)]
    for k in written:
        step(k, -k)
    assert counter.frame_count == 1 and cache.size == 6
    values, scale = expected_int8(torch.cat(written, dim=2))
    assert torch.equal(cache.k_cache.float(), values)
    torch.testing.assert_close(cache.v_scale, scale)
    before = state(cache)
    with pytest.raises(ValueError, match="0 free"):
        step(written[0], written[0])
    assert_state(cache, before, 6)


def test_truncate_then_write_overwrites_values_and_scales():
    cache = KVCache(1, 8, 1, 4, torch.float32, kv_cache_dtype=INT8)
    k = torch.randn(1, 1, 5, 4)
    cache.update(k, k)
    cache.truncate(2)  # e.g. speculative tokens rejected
    new = torch.randn(1, 1, 1, 4) * 50
    cache.update(new, new)
    values, scale = expected_int8(torch.cat([k[:, :, :2], new], dim=2))
    assert torch.equal(cache.k_cache[:, :, :3].float(), values)
    torch.testing.assert_close(cache.k_scale[:, :, :3], scale)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dtype=INT8), "dtype torch.int8 is a storage dtype: pass dtype=<the model's floating dtype>"),
        (dict(kv_cache_dtype="int4"), "kv_cache_dtype must be None .* got 'int4'"),
        (dict(kv_cache_dtype=torch.float16), "kv_cache_dtype must be None .* got torch.float16"),
        (dict(dtype=torch.long, kv_cache_dtype=INT8), "dtype must be the floating dtype K/V are read back in"),
    ],
)
def test_bad_quantized_construction_raises(kwargs, message):
    kwargs = {"dtype": torch.float32, **kwargs}
    with pytest.raises(ValueError, match=message):
        KVCache(1, 8, 2, 4, **kwargs)


def test_a_device_without_the_ops_is_refused_at_setup_naming_dtype_and_device(monkeypatch):
    def missing(*args, **kwargs):
        raise NotImplementedError("\"mul_cpu\" not implemented for 'Float8_e4m3fn'")

    kv_quant._probe.cache_clear()
    monkeypatch.setattr(kv_quant, "dequantize_kv", missing)
    attn = gqa_attention(embed_dim=32, num_heads=4, num_kv_heads=2, max_seq_len=16)
    try:
        with pytest.raises(ValueError, match=r"kv_cache_dtype torch.float8_e4m3fn is not supported on device cpu: "
                                             r"NotImplementedError: \"mul_cpu\" not implemented"):  # fmt: skip
            attn.setup_cache(1, FP8, 16)
        assert attn.kv_cache is None
    finally:
        kv_quant._probe.cache_clear()


# ---------------------------------------------------------------- decode


def decode_inputs(b=3, n_h=8, n_kv=2, max_len=40, d=16, lengths=(1, 40, 23)):
    q = torch.randn(b, n_h, 1, d)
    k, v = torch.randn(b, n_kv, max_len, d), torch.randn(b, n_kv, max_len, d) * 2
    (kq, ks), (vq, vs) = kv_quant.quantize_kv(k, INT8), kv_quant.quantize_kv(v, INT8)
    return q, (k, v), (kq, ks, vq, vs), torch.tensor(lengths)


def oracle(q, k, v, lengths):
    """Float64 attention of one new query per row over keys ``< lengths[b]`` (all of them: a decode step)."""
    visible = torch.arange(k.shape[2]).view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1)
    return attention_ref(q.double(), k.double(), v.double(), mask=visible)[0]


def quantization_tolerance(q, v, k_scale, v_scale, scale):
    """A bound on |int8 decode - float decode|: values move by at most half a step, and each score by at most
    ``delta = scale * ||q||_1 * max step / 2``, which moves the softmax weights by at most ``e^(2 delta) - 1``
    (in L1) and so the output by that times ``max |v|``."""
    delta = scale * q.abs().sum(-1).max() * k_scale.max() / 2
    return float(v_scale.max() / 2 + v.abs().max() * (math.exp(2 * delta) - 1))


@pytest.mark.parametrize("path", ["dispatcher", "flash_decode_gqa"])
def test_decode_matches_float64_oracle_of_the_dequantized_cache_and_the_float_cache(path, monkeypatch):
    monkeypatch.setattr("gqa_tune.ops.backends.triton.kernel_problem", lambda *args: "forced: the CPU path")
    q, (k, v), (kq, ks, vq, vs), lengths = decode_inputs()
    if path == "dispatcher":  # the module's call: whole buffers, a host-side bound of the fill
        spec = AttentionSpec(seqlens=lengths, max_seqlen=int(lengths.max()), kv_scales=(ks, vs))
        out = attend(q, kq, vq, spec)
    else:
        out = flash_decode_gqa(q, kq, vq, lengths, k_scale=ks, v_scale=vs)
    dequantized = kv_quant.dequantize_kv(kq, ks, torch.float64), kv_quant.dequantize_kv(vq, vs, torch.float64)
    torch.testing.assert_close(out.double(), oracle(q, *dequantized, lengths), atol=2e-6, rtol=2e-6)
    tolerance = quantization_tolerance(q, v, ks, vs, q.shape[-1] ** -0.5)
    error = (out.double() - oracle(q, k, v, lengths)).abs().max().item()
    assert 0 < error <= tolerance, (error, tolerance)


def test_cpu_path_dequantizes_only_the_filled_prefix(monkeypatch):
    lengths_seen = []
    real = kv_quant.dequantize_kv

    def spy(values, scale, dtype):
        lengths_seen.append(values.shape[2])
        return real(values, scale, dtype)

    monkeypatch.setattr(kv_quant, "dequantize_kv", spy)
    attn = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, max_seq_len=256).eval()
    seq = torch.randn(1, 12, 64)
    with torch.no_grad():
        attn.setup_cache(1, torch.float32, 256, kv_cache_dtype=INT8)
        lengths_seen.clear()  # the setup's probe of the dtype on this device
        attn(seq[:, :9], seq[:, :9])
        for i in range(9, 12):
            attn(seq[:, i : i + 1], seq[:, i : i + 1])
        assert lengths_seen == [9, 9, 10, 10, 11, 11, 12, 12]  # K and V of each call, up to its fill
        lengths_seen.clear()
        step = torch.compile(lambda t: attn(t, t), backend=CompileCounter(), fullgraph=True)
        step(torch.randn(1, 1, 64))  # compiled: the fill is read on the device, still only that much
    assert lengths_seen == [13, 13]


def test_module_decode_with_int8_matches_float64_oracle_and_float_cache():
    attn = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, max_seq_len=64).eval()
    seq = torch.randn(2, 20, 64)
    with torch.no_grad():
        full = attn(seq, seq)
        attn.setup_cache(2, torch.float32, 64, kv_cache_dtype=INT8)
        pieces = [attn(seq[:, lo:hi], seq[:, lo:hi]) for lo, hi in [(0, 7), (7, 8), (8, 13), (13, 14), (14, 20)]]
        k_read, v_read = readback(attn.kv_cache, 20)
        # The last token's output from the float64 oracle over what the cache holds.
        q = attn.pos_embeddings(attn.q_proj(seq[:, -1:]).view(2, 1, 8, 8), input_pos=torch.tensor([19]))
        ref = attention_ref(q.transpose(1, 2).double(), k_read, v_read)[0]  # [2, 8, 1, 8]
        last = attn.output_proj(ref.transpose(1, 2).reshape(2, 1, 64).float())
    torch.testing.assert_close(pieces[-1][:, -1:], last, atol=1e-5, rtol=1e-5)
    error = (torch.cat(pieces, dim=1) - full).abs().max().item()
    assert 0 < error < 0.02  # int8 noise, not a wrong answer (outputs are of order 0.3)


def test_compiled_int8_decode_has_one_graph_and_matches_eager():
    attn = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, max_seq_len=32).eval()
    seq = torch.randn(1, 12, 64)
    with torch.no_grad():
        attn.setup_cache(1, torch.float32, 32, kv_cache_dtype=INT8)
        eager = [attn(seq[:, :4], seq[:, :4])] + [attn(seq[:, i : i + 1], seq[:, i : i + 1]) for i in range(4, 12)]
        attn.reset_cache()
        attn(seq[:, :4], seq[:, :4])
        counter = CompileCounter()
        step = torch.compile(lambda t: attn(t, t), backend=counter, fullgraph=True)
        compiled = [step(seq[:, i : i + 1]) for i in range(4, 12)]
    assert counter.frame_count == 1
    torch.testing.assert_close(torch.cat(compiled, dim=1), torch.cat(eager[1:], dim=1), atol=1e-6, rtol=1e-6)


def test_rejected_module_call_leaves_the_int8_cache_unchanged():
    attn = gqa_attention(embed_dim=32, num_heads=4, num_kv_heads=2, max_seq_len=8).eval()
    seq = torch.randn(1, 8, 32)
    with torch.no_grad():
        attn.setup_cache(1, torch.float32, 8, kv_cache_dtype=INT8)
        attn(seq[:, :6], seq[:, :6])
        before = state(attn.kv_cache)
        with pytest.raises(ValueError, match=r"cannot write 3 positions: 6 of max_seq_len 8 are filled"):
            attn(seq[:, :3], seq[:, :3])
    assert_state(attn.kv_cache, before, 6)


def test_sliding_window_ring_cache_int8_matches_the_float_ring():
    attn = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, max_seq_len=32, sliding_window_size=5).eval()
    seq = torch.randn(1, 14, 64)
    outs = {}
    with torch.no_grad():
        for dtype in (None, INT8):
            attn.kv_cache = None
            attn.setup_cache(1, torch.float32, 32, kv_cache_dtype=dtype)
            assert attn.kv_cache.k_cache.shape[2] == 5  # a ring of the window
            outs[dtype] = torch.cat([attn(seq[:, lo:hi], seq[:, lo:hi]) for lo, hi in
                                     [(0, 3), (3, 9), (9, 10), (10, 11), (11, 14)]], dim=1)  # fmt: skip
    error = (outs[INT8] - outs[None]).abs().max().item()
    assert 0 < error < 0.02


def test_fp8_cache_decodes_on_this_cpu():
    """Until now an fp8 cache was accepted at setup and failed when attending; it is a quantized cache now."""
    attn = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, max_seq_len=32).eval()
    seq = torch.randn(1, 10, 64)
    with torch.no_grad():
        full = attn(seq, seq)
        attn.setup_cache(1, FP8, 32)  # torchtune's setup_caches(batch, dtype) door
        assert attn.kv_cache.kv_cache_dtype == FP8 and attn.kv_cache.dtype == torch.float32
        out = torch.cat([attn(seq[:, :6], seq[:, :6])] + [attn(seq[:, i : i + 1], seq[:, i : i + 1])
                                                         for i in range(6, 10)], dim=1)  # fmt: skip
    error = (out - full).abs().max().item()
    assert 0 < error < 0.05


# ---------------------------------------------------------------- models


@pytest.fixture(scope="module")
def swapped_llama():
    torch.manual_seed(0)
    model = llama3_2(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64,
                     intermediate_dim=64, tie_word_embeddings=False).eval()  # fmt: skip
    ours = copy.deepcopy(model)
    gqa_tune.swap_attention(ours)
    return ours, model


def test_swapped_torchtune_model_generates_the_fp32_greedy_tokens_with_int8_caches(swapped_llama):
    ours, _ = swapped_llama
    prompt = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    fp32, fp32_logits = gqa_tune.generate(ours, prompt, 10)
    setup_caches(ours, 2, torch.float32, decoder_max_seq_len=16, kv_cache_dtype=INT8)
    try:
        assert all(m.kv_cache.kv_cache_dtype == INT8 for m in ours.modules() if hasattr(m, "kv_cache"))
        int8, int8_logits = gqa_tune.generate(ours, prompt, 10)
    finally:
        delete_kv_caches(ours)
    assert torch.equal(int8, fp32)
    assert 0 < (int8_logits - fp32_logits).abs().max() < 0.05


def test_compiled_generation_with_int8_caches_gives_the_eager_tokens(swapped_llama):
    ours, _ = swapped_llama
    prompt = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    setup_caches(ours, 2, torch.float32, decoder_max_seq_len=16, kv_cache_dtype=INT8)
    try:
        eager, eager_logits = gqa_tune.generate(ours, prompt, 10)
        compiled, compiled_logits = gqa_tune.generate(ours, prompt, 10, compile=True)  # inductor: ~10 s
    finally:
        delete_kv_caches(ours)
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-4, rtol=1e-4)


def test_gqa_tiny_through_torchtunes_setup_caches_door():
    torch.manual_seed(0)
    model = gqa_tiny(max_seq_len=64).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)  # clear margins between the top logits
    prompt = torch.randint(1, 200, (1, 8), generator=torch.Generator().manual_seed(2))
    fp32, _ = gqa_tune.generate(model, prompt, 12)
    model.setup_caches(1, torch.int8, decoder_max_seq_len=20)  # torchtune's own call
    int8, _ = gqa_tune.generate(model, prompt, 12)
    assert model.layers[0].attn.kv_cache.k_cache.dtype == INT8
    assert torch.equal(int8, fp32)


def test_setup_caches_refuses_what_it_cannot_quantize(swapped_llama):
    ours, theirs = swapped_llama
    with pytest.raises(ValueError, match="torchtune MultiHeadAttention layer.*swap_attention"):
        setup_caches(copy.deepcopy(theirs), 1, torch.float32, decoder_max_seq_len=8, kv_cache_dtype="int8")
    with pytest.raises(
        ValueError, match=r"dtype torch.bfloat16 differs from the attention weights' \['torch.float32'\]"
    ):
        setup_caches(ours, 1, torch.bfloat16, decoder_max_seq_len=8, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="got 'int4'"):
        setup_caches(ours, 1, torch.float32, decoder_max_seq_len=8, kv_cache_dtype="int4")
    assert not ours.caches_are_setup()
    attn = gqa_attention(embed_dim=32, num_heads=4, num_kv_heads=2, max_seq_len=16)
    with pytest.raises(ValueError, match="dtype torch.int8 and kv_cache_dtype torch.float8_e4m3fn disagree"):
        attn.setup_cache(1, INT8, 16, kv_cache_dtype=FP8)
