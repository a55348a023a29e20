"""Split-K decode kernel and its PyTorch fallback, against the float32 reference."""

import pytest
import torch

import gqa_tune.kernels.triton.ops as kernel_ops
from gqa_tune import attention_ref, flash_decode_gqa
from gqa_tune.kernels.triton._common import runtime_problem
from gqa_tune.models import gqa_attention
from gqa_tune.testing import assert_within_precision

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(runtime_problem(torch.device(DEVICE)) is not None, reason="no Triton here")


def cache_inputs(b, n_h, n_kv, s_q, max_len, d, dtype):
    q = torch.randn(b, n_h, s_q, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, n_kv, max_len, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, n_kv, max_len, d, device=DEVICE, dtype=dtype)
    return q, k, v


def visibility(seqlens, s_q, max_len, causal, mask=None):
    """Which slots each new query sees, worked out slot by slot (not with the code's own helper):
    row ``b`` holds ``seqlens[b]`` keys; with ``causal`` new query ``i`` is key ``seqlens[b] - s_q + i``."""
    b = seqlens.shape[0]
    visible = torch.zeros(b, 1, s_q, max_len, dtype=torch.bool, device=seqlens.device)
    for row, length in enumerate(seqlens.tolist()):
        for i in range(s_q):
            last = length - s_q + i if causal else length - 1
            for slot in range(min(length, last + 1)):
                visible[row, 0, i, slot] = mask is None or bool(mask[row if mask.shape[0] > 1 else 0, i, slot])
    return visible


def reference(q, k, v, seqlens, *, causal=True, mask=None, upcast=True):
    return attention_ref(q, k, v, mask=visibility(seqlens, q.shape[2], k.shape[2], causal, mask), upcast=upcast)[0]


def test_the_oracle_on_a_worked_example():
    # 2 new queries, row lengths 3 and 1, 4 slots: causal row 0 sees slots {0, 1} then {0, 1, 2};
    # row 1 (one key, its second query's own) sees nothing, then slot 0.
    got = visibility(torch.tensor([3, 1]), 2, 4, causal=True)[:, 0].int().tolist()
    assert got == [[[1, 1, 0, 0], [1, 1, 1, 0]], [[0, 0, 0, 0], [1, 0, 0, 0]]]
    assert visibility(torch.tensor([3, 1]), 2, 4, causal=False)[1, 0].int().tolist() == [[1, 0, 0, 0]] * 2


@needs_kernels
@pytest.mark.parametrize("n_h,n_kv", [(2, 2), (4, 2), (8, 2), (8, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("s_q", [1, 3])
@pytest.mark.parametrize("d", [24, 64, 80])
def test_mixed_lengths_float32(n_h, n_kv, s_q, d):
    q, k, v = cache_inputs(3, n_h, n_kv, s_q, 70, d, torch.float32)
    seqlens = torch.tensor([3, 70, 37], device=DEVICE)
    out = flash_decode_gqa(q, k, v, seqlens)
    torch.testing.assert_close(out, reference(q, k, v, seqlens), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_plain_pytorch_error(dtype):
    q, k, v = cache_inputs(2, 8, 2, 1, 67, 64, dtype)
    seqlens = torch.tensor([67, 20], device=DEVICE)
    out = flash_decode_gqa(q, k, v, seqlens)
    assert_within_precision(out, reference(q, k, v, seqlens), reference(q, k, v, seqlens, upcast=False))


@needs_kernels
def test_mask_non_causal_and_empty_rows():
    q, k, v = cache_inputs(3, 4, 2, 2, 40, 16, torch.float32)
    seqlens = torch.tensor([0, 25, 40], device=DEVICE)
    mask = torch.rand(3, 2, 40, device=DEVICE) > 0.3
    for causal in (True, False):
        out = flash_decode_gqa(q, k, v, seqlens, causal=causal, mask=mask, scale=0.3)
        ref = attention_ref(q, k, v, mask=visibility(seqlens, 2, 40, causal, mask), scale=0.3)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert out[0].abs().max() == 0  # an empty cache row gives zeros, not NaN


def test_pytorch_fallback_matches_reference(monkeypatch):
    monkeypatch.setattr("gqa_tune.ops.backends.triton.kernel_problem", lambda *args: "forced fallback")
    monkeypatch.setattr(kernel_ops, "flash_decode", None)  # the kernel must not be reached
    q, k, v = cache_inputs(3, 8, 2, 2, 33, 24, torch.float32)
    seqlens = torch.tensor([2, 33, 10], device=DEVICE)
    torch.testing.assert_close(flash_decode_gqa(q, k, v, seqlens), reference(q, k, v, seqlens), atol=1e-5, rtol=1e-5)


def test_float64_runs_the_fallback():
    q, k, v = cache_inputs(2, 4, 1, 1, 16, 8, torch.float64)
    seqlens = torch.tensor([5, 16], device=DEVICE)
    torch.testing.assert_close(flash_decode_gqa(q, k, v, seqlens), reference(q, k, v, seqlens))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(q=(2, 6, 1, 16)), r"query heads \(6\) must be a multiple of cache heads \(4\)"),
        (dict(q=(2, 8, 1, 12)), "must agree on batch and head_dim"),
        (dict(q=(3, 8, 1, 16)), "must agree on batch and head_dim"),
        (dict(v=(2, 4, 9, 16)), "differ"),
        (dict(seqlens=torch.tensor([1.0, 2.0])), "cache_seqlens must be an integer tensor of shape"),
        (dict(seqlens=torch.tensor([1, 2, 3])), "cache_seqlens must be an integer tensor of shape"),
        (dict(mask=torch.ones(2, 1, 5, dtype=torch.bool)), r"mask must be bool \[b, s_q, max_len\]"),
        (dict(q=(2, 8, 11, 16)), "11 query positions do not fit a cache of length 10"),
    ],
)
def test_bad_inputs_raise(change, message):
    q = torch.randn(change.get("q", (2, 8, 1, 16)))
    k = torch.randn(2, 4, 10, 16)
    v = torch.randn(change.get("v", (2, 4, 10, 16)))
    with pytest.raises(ValueError, match=message):
        flash_decode_gqa(q, k, v, change.get("seqlens", torch.tensor([3, 4])), mask=change.get("mask"))


@needs_kernels
def test_module_decode_uses_the_kernel_and_matches_full_forward(monkeypatch):
    calls = []
    real = kernel_ops.flash_decode

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_ops, "flash_decode", spy)
    attn = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, max_seq_len=32, backend="triton").eval()
    seq = torch.randn(2, 12, 64)
    with torch.no_grad():
        full = attn(seq, seq)
        attn.setup_cache(2, torch.float32, 32)
        pieces = [attn(seq[:, lo:hi], seq[:, lo:hi]) for lo, hi in [(0, 5), (5, 6), (6, 9), (9, 10), (10, 12)]]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
        # torchtune-style call: [b, s, max_seq_len] masks and positions
        attn.reset_cache()
        causal = torch.ones(32, 32, dtype=torch.bool).tril()[None].expand(2, -1, -1)
        pos = torch.arange(32)[None].expand(2, -1)
        steps = [attn(seq[:, i : i + 1], seq[:, i : i + 1], mask=causal[:, i : i + 1], input_pos=pos[:, i : i + 1])
                 for i in range(12)]  # fmt: skip
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert len(calls) == 5 + 12


@needs_kernels
def test_module_compiled_decode_with_kernel_has_one_graph():
    from torch._dynamo.testing import CompileCounter

    attn = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, max_seq_len=32, backend="triton").eval()
    seq = torch.randn(1, 9, 64)
    with torch.no_grad():
        full = attn(seq, seq)
        attn.setup_cache(1, torch.float32, 32)
        attn(seq[:, :4], seq[:, :4])
        counter = CompileCounter()
        step = torch.compile(lambda t: attn(t, t), backend=counter, fullgraph=True)
        outs = [step(seq[:, i : i + 1]) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


@needs_kernels
def test_max_seqlen_bound_splits_only_the_filled_part():
    q, k, v = cache_inputs(2, 8, 2, 1, 200, 16, torch.float32)
    seqlens = torch.tensor([9, 40], device=DEVICE)
    out = flash_decode_gqa(q, k, v, seqlens, max_seqlen=40)
    torch.testing.assert_close(out, reference(q, k, v, seqlens), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"max_seqlen \(39\) is below the longest cache_seqlens entry \(40\)"):
        flash_decode_gqa(q, k, v, seqlens, max_seqlen=39)


# ---------------------------------------------------------------- int8 caches: the kernel reads int8 tiles


def int8_cache(b, n_kv, max_len, d, dtype=torch.int8):
    """A quantized cache and what it holds in float32: ``(k, k_scale, v, v_scale), (k_float, v_float)``."""
    from gqa_tune.ops.kv_quant import dequantize_kv, quantize_kv

    (kq, ks), (vq, vs) = (quantize_kv(torch.randn(b, n_kv, max_len, d, device=DEVICE), dtype) for _ in range(2))
    return (kq, ks, vq, vs), (dequantize_kv(kq, ks, torch.float32), dequantize_kv(vq, vs, torch.float32))


@needs_kernels
@pytest.mark.parametrize("n_h,n_kv", [(4, 2), (8, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("s_q", [1, 3])
@pytest.mark.parametrize("d", [24, 64])
def test_int8_cache_matches_reference_over_what_it_holds(n_h, n_kv, s_q, d, monkeypatch):
    calls = []
    real = kernel_ops.flash_decode
    monkeypatch.setattr(kernel_ops, "flash_decode", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    (kq, ks, vq, vs), (k, v) = int8_cache(3, n_kv, 45, d)
    q = torch.randn(3, n_h, s_q, d, device=DEVICE)
    seqlens = torch.tensor([3, 45, 20], device=DEVICE)
    out = flash_decode_gqa(q, kq, vq, seqlens, k_scale=ks, v_scale=vs)
    assert calls and calls[0]["k_scale"] is not None  # the kernel itself read the int8 cache
    torch.testing.assert_close(out, reference(q, k, v, seqlens), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_int8_cache_with_bf16_queries_within_twice_plain_pytorch_error():
    (kq, ks, vq, vs), (k, v) = int8_cache(2, 2, 67, 64)
    q = torch.randn(2, 8, 1, 64, device=DEVICE, dtype=torch.bfloat16)
    seqlens = torch.tensor([67, 20], device=DEVICE)
    out = flash_decode_gqa(q, kq, vq, seqlens, k_scale=ks, v_scale=vs)
    low = reference(q, k.bfloat16(), v.bfloat16(), seqlens, upcast=False)
    assert_within_precision(out, reference(q.float(), k, v, seqlens), low)


@needs_kernels
def test_int8_cache_with_mask_non_causal_and_empty_rows():
    (kq, ks, vq, vs), (k, v) = int8_cache(3, 2, 40, 16)
    q = torch.randn(3, 4, 2, 16, device=DEVICE)
    seqlens = torch.tensor([0, 25, 40], device=DEVICE)
    mask = torch.rand(3, 2, 40, device=DEVICE) > 0.3
    for causal in (True, False):
        out = flash_decode_gqa(q, kq, vq, seqlens, causal=causal, mask=mask, scale=0.3, k_scale=ks, v_scale=vs)
        ref = attention_ref(q, k, v, mask=visibility(seqlens, 2, 40, causal, mask), scale=0.3)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert out[0].abs().max() == 0


def test_float8_cache_is_dequantized_for_a_backend_that_reads_floats():
    (kq, ks, vq, vs), (k, v) = int8_cache(2, 2, 30, 16, dtype=torch.float8_e4m3fn)
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    seqlens = torch.tensor([7, 12], device=DEVICE)
    out = flash_decode_gqa(q, kq, vq, seqlens, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, reference(q, k, v, seqlens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(v_scale=None), "k_scale and v_scale must be given together"),
        (dict(k=torch.randn(2, 4, 10, 16)), "with scales, k_cache and v_cache must both be int8 or float8_e4m3fn"),
        (dict(k_scale=torch.ones(2, 4, 9)), r"k_scale must be a floating tensor \[b, n_kv, max_len\] = \[2, 4, 10\]"),
        (dict(v_scale=torch.ones(2, 4, 10, dtype=torch.long)), "v_scale must be a floating tensor"),
    ],
)
def test_bad_quantized_inputs_raise(change, message):
    values = torch.zeros(2, 4, 10, 16, dtype=torch.int8)
    args = dict(k=values, k_scale=torch.ones(2, 4, 10), v_scale=torch.ones(2, 4, 10))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        flash_decode_gqa(torch.randn(2, 8, 1, 16), args["k"], values, torch.tensor([3, 4]),
                         k_scale=args["k_scale"], v_scale=args["v_scale"])  # fmt: skip


@needs_kernels
def test_module_int8_decode_uses_the_kernel_and_matches_the_cpu_path(monkeypatch):
    calls = []
    real = kernel_ops.flash_decode
    monkeypatch.setattr(kernel_ops, "flash_decode", lambda *a, **kw: calls.append(a[1].dtype) or real(*a, **kw))
    seq = torch.randn(2, 12, 64)
    outs = {}
    with torch.no_grad():
        for backend in ("triton", "sdpa"):
            torch.manual_seed(1)
            attn = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, max_seq_len=32, backend=backend).eval()
            attn.setup_cache(2, torch.float32, 32, kv_cache_dtype=torch.int8)
            outs[backend] = torch.cat([attn(seq[:, lo:hi], seq[:, lo:hi]) for lo, hi in
                                       [(0, 5), (5, 6), (6, 9), (9, 10), (10, 12)]], dim=1)  # fmt: skip
    assert calls == [torch.int8] * 5  # the triton module's calls; the sdpa one dequantizes the prefix
    torch.testing.assert_close(outs["triton"], outs["sdpa"], atol=1e-5, rtol=1e-5)


@needs_kernels
def test_module_compiled_int8_decode_with_kernel_has_one_graph():
    from torch._dynamo.testing import CompileCounter

    attn = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, max_seq_len=32, backend="triton").eval()
    seq = torch.randn(1, 9, 64)
    with torch.no_grad():
        attn.setup_cache(1, torch.float32, 32, kv_cache_dtype=torch.int8)
        eager = [attn(seq[:, :4], seq[:, :4])] + [attn(seq[:, i : i + 1], seq[:, i : i + 1]) for i in range(4, 9)]
        attn.reset_cache()
        attn(seq[:, :4], seq[:, :4])
        counter = CompileCounter()
        step = torch.compile(lambda t: attn(t, t), backend=counter, fullgraph=True)
        outs = [step(seq[:, i : i + 1]) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(outs, dim=1), torch.cat(eager[1:], dim=1), atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1
