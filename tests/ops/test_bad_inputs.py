"""Bad and edge inputs of ``scaled_dot_product_gqa`` and ``flash_decode_gqa``: a ``ValueError`` naming the
value, or the right answer, on every backend, and one NaN rule for all of them."""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make_qkv

from gqa_tune.ops import attention_ref, flash_decode_gqa, scaled_dot_product_gqa

ALL = ["auto", "sdpa", "math", "triton", "flex"]


def qkv(b=1, n_h=4, n_kv=2, s_q=5, s_kv=5, h_d=16, h_dv=16, dtype=torch.float32):
    return make_qkv(b, n_h, n_kv, s_q, s_kv, h_d, h_dv, dtype)


def expected(q, k, v, **kwargs):
    """The float64 reference, with K/V expanded by hand (independent of the backends)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if kwargs.get("is_causal"):
        scores = scores.masked_fill(~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(), float("-inf"))
    if kwargs.get("mask") is not None:
        scores = scores.masked_fill(~kwargs["mask"], float("-inf"))
    return (torch.softmax(scores, -1) @ v).float()


# ---------------------------------------------------------------- shapes the op accepts


def test_triton_declines_a_value_head_dim_that_differs_and_auto_answers():
    q, k, v = qkv(h_d=16, h_dv=24)
    with pytest.raises(ValueError, match="value head_dim 24 differs from the query/key head_dim 16"):
        scaled_dot_product_gqa(q, k, v, backend="triton")
    out = scaled_dot_product_gqa(q, k, v, is_causal=True)
    assert out.shape == (1, 4, 5, 24)
    torch.testing.assert_close(out, expected(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math", "triton"])
@pytest.mark.parametrize(
    "dims", [dict(s_q=0), dict(s_kv=0), dict(b=0), dict(s_q=0, s_kv=0)], ids=["sq0", "skv0", "b0", "both0"]
)
def test_empty_inputs_give_the_defined_answer(backend, dims):
    q, k, v = qkv(**dims)
    out = scaled_dot_product_gqa(q, k, v, backend=backend)
    assert out.shape == (q.shape[0], 4, q.shape[2], 16)
    assert torch.count_nonzero(out) == 0  # no key: every row attends to nothing and gives 0


@pytest.mark.parametrize("dims", ["s_q=0", "s_kv=0", "b=0"])
def test_flex_with_empty_inputs_does_not_kill_the_process(dims):
    # torch's flex kernel dies of a floating point exception on these; run it where a crash cannot take pytest down.
    code = textwrap.dedent(
        f"""
        import torch
        from gqa_tune import scaled_dot_product_gqa
        b, s_q, s_kv = 1, 5, 5
        {dims.replace("=", " = ")}
        q, k = torch.randn(b, 4, s_q, 16), torch.randn(b, 2, s_kv, 16)
        out = scaled_dot_product_gqa(q, k, k, backend="flex")
        assert out.shape == (b, 4, s_q, 16) and torch.count_nonzero(out) == 0, out.shape
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_need_weights_with_no_keys():
    q, k, v = qkv(s_kv=0)
    out, weights = scaled_dot_product_gqa(q, k, v, need_weights=True)
    assert out.shape == (1, 4, 5, 16) and torch.count_nonzero(out) == 0
    assert weights.shape == (1, 4, 5, 0)
    out, _ = attention_ref(q, k, v)
    assert torch.count_nonzero(out) == 0


def test_empty_keys_keep_gradients_flowing():
    q, k, v = (t.requires_grad_() for t in qkv(s_kv=0))
    scaled_dot_product_gqa(q, k, v).sum().backward()
    assert torch.count_nonzero(q.grad) == 0


# ---------------------------------------------------------------- values the op refuses


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), -float("inf"), True, "0.5"])
def test_bad_scales_raise(backend, scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"scale must be None or a finite positive number, got " + repr(scale)[:3]):
        scaled_dot_product_gqa(q, k, v, is_causal=True, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", ["sdpa", "math", "triton"])
def test_small_positive_scale_is_answered(backend):
    q, k, v = qkv()
    out = scaled_dot_product_gqa(q, k, v, is_causal=True, scale=1e-3, backend=backend)
    ref = attention_ref(q, k, v, is_causal=True, scale=1e-3)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(is_causal=1), "is_causal must be True or False, got 1"),
        (dict(is_causal="yes"), "is_causal must be True or False, got 'yes'"),
        (dict(dropout_p=float("nan")), "dropout_p must be in [0, 1], got nan"),
        (dict(dropout_p="0.1"), "dropout_p must be in [0, 1], got '0.1'"),
        (dict(dropout_p=True), "dropout_p must be in [0, 1], got True"),
        (dict(need_weights=1), "need_weights must be True or False, got 1"),
    ],
)
def test_bad_flags_raise(kwargs, message):
    q, k, v = qkv()
    with pytest.raises(ValueError) as info:
        scaled_dot_product_gqa(q, k, v, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_tensors_raise(dtype):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=f"must be a floating-point tensor, got {dtype}"):
        scaled_dot_product_gqa(q.to(dtype), k.to(dtype), v.to(dtype))


def test_zero_head_dim_raises():
    q, k, v = qkv(h_d=0)
    with pytest.raises(ValueError, match="head_dim must be positive"):
        scaled_dot_product_gqa(q, k, v)
    q, k, v = qkv(h_dv=0)
    with pytest.raises(ValueError, match="head_dim must be positive"):
        scaled_dot_product_gqa(q, k, v)


def test_mask_on_another_device_raises():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask is on meta, query on cpu"):
        scaled_dot_product_gqa(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool, device="meta"))


# ---------------------------------------------------------------- the NaN rule


def _backends_for(mask_kind):
    return [b for b in ALL if not (b == "triton" and mask_kind == "float")]


MASKS = {
    "causal": dict(is_causal=True),
    "bool": dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).tril()),
    "float": dict(attn_mask=torch.zeros(5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -float("inf"))),
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("masking", ["none", "causal", "bool"])
def test_a_nan_query_row_gives_a_nan_row_and_nothing_else(backend, masking):
    q, k, v = qkv()
    q[0, 1, 2, 3] = float("nan")
    out = scaled_dot_product_gqa(q, k, v, backend=backend, **MASKS.get(masking, {}))
    assert out[0, 1, 2].isnan().all()
    rest = torch.ones_like(out, dtype=torch.bool)
    rest[0, 1, 2] = False
    assert not out[rest].isnan().any()


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("masking", ["causal", "bool", "float"])
@pytest.mark.parametrize("which", ["key", "value"])
def test_a_non_finite_hidden_key_or_value_never_reaches_the_output(masking, which, poison):
    """The NaN rule holds for every non-finite value: a hidden inf value used to turn the whole head NaN
    through ``0 * inf``."""
    for backend in _backends_for(masking):
        q, k, v = qkv()
        clean = scaled_dot_product_gqa(q, k, v, backend=backend, **MASKS[masking])
        poisoned = (k if which == "key" else v).clone()
        poisoned[0, 0, 4, 0] = poison  # key 4: hidden from rows 0..3, seen by row 4 (kv head 0 = q heads 0, 1)
        k2, v2 = (poisoned, v) if which == "key" else (k, poisoned)
        out = scaled_dot_product_gqa(q, k2, v2, backend=backend, **MASKS[masking])
        torch.testing.assert_close(out[:, :, :4], clean[:, :, :4], msg=backend)
        assert out[0, :2, 4].isnan().all(), backend  # the rows that see it
        torch.testing.assert_close(out[0, 2:, 4], clean[0, 2:, 4], msg=backend)  # the other kv head's rows


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_rule_with_weights(poison):
    q, k, v = qkv()
    v[0, 0, 4, 0] = poison
    out, _ = scaled_dot_product_gqa(q, k, v, is_causal=True, need_weights=True)
    assert not out[:, :, :4].isnan().any() and out[0, :2, 4].isnan().all()


@pytest.mark.parametrize("backend", ALL)
def test_an_infinite_query_row_gives_a_nan_row_and_nothing_else(backend):
    q, k, v = qkv()
    q[0, 1, 2, 3] = float("inf")
    out = scaled_dot_product_gqa(q, k, v, backend=backend, is_causal=True)
    assert out[0, 1, 2].isnan().all()
    rest = torch.ones_like(out, dtype=torch.bool)
    rest[0, 1, 2] = False
    assert torch.isfinite(out[rest]).all()


# ---------------------------------------------------------------- flash_decode_gqa


def cache(b=2, n_h=4, n_kv=2, s_q=1, max_len=8, h_d=16):
    return torch.randn(b, n_h, s_q, h_d), torch.randn(b, n_kv, max_len, h_d), torch.randn(b, n_kv, max_len, h_d)


@pytest.mark.parametrize(
    "seqlens, message",
    [
        (torch.tensor([9, 3]), "cache_seqlens must lie in [0, max_len=8], got [9, 3]"),
        (torch.tensor([-1, 3]), "cache_seqlens must lie in [0, max_len=8], got [-1, 3]"),
        (torch.tensor([True, False]), "cache_seqlens must be an integer tensor of shape (2,)"),
        (torch.tensor([3.0, 4.0]), "cache_seqlens must be an integer tensor of shape (2,)"),
        (torch.tensor([3]), "cache_seqlens must be an integer tensor of shape (2,)"),
        (torch.tensor([[3, 4]]), "cache_seqlens must be an integer tensor of shape (2,)"),
        ([3, 4], "cache_seqlens must be an integer tensor of shape (2,)"),
        (torch.tensor([3, 4], device="meta"), "cache_seqlens is on meta, query on cpu"),
    ],
)
def test_flash_decode_refuses_bad_lengths(seqlens, message):
    q, k, v = cache()
    with pytest.raises(ValueError) as info:
        flash_decode_gqa(q, k, v, seqlens)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=0.0), "scale must be None or a finite positive number, got 0.0"),
        (dict(scale=float("nan")), "scale must be None or a finite positive number, got nan"),
        (dict(causal=None), "causal must be True or False, got None"),
        (dict(max_seqlen=-1), "max_seqlen must be None or a non-negative int, got -1"),
        (dict(max_seqlen=True), "max_seqlen must be None or a non-negative int, got True"),
        (dict(max_seqlen=2), "max_seqlen (2) is below the longest cache_seqlens entry (4)"),
    ],
)
def test_flash_decode_refuses_bad_arguments(kwargs, message):
    q, k, v = cache()
    with pytest.raises(ValueError) as info:
        flash_decode_gqa(q, k, v, torch.tensor([3, 4]), **kwargs)
    assert message in str(info.value)


def test_flash_decode_refuses_integer_queries():
    q, k, v = cache()
    with pytest.raises(ValueError, match="query must be a floating-point tensor, got torch.int64"):
        flash_decode_gqa(q.long(), k.long(), v.long(), torch.tensor([3, 4]))


def test_flash_decode_with_no_rows_or_no_queries():
    q, k, v = cache(b=0)
    assert flash_decode_gqa(q, k, v, torch.zeros(0, dtype=torch.long)).shape == (0, 4, 1, 16)
    q, k, v = cache(s_q=0)
    assert flash_decode_gqa(q, k, v, torch.tensor([3, 4])).shape == (2, 4, 0, 16)


@pytest.mark.parametrize("kernel", [True, False], ids=["triton", "pytorch"])
def test_flash_decode_never_reads_past_a_rows_length(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr("gqa_tune.ops.backends.triton.kernel_problem", lambda *args: "forced fallback")
    q, k, v = cache()
    lens = torch.tensor([3, 6])
    clean = flash_decode_gqa(q, k, v, lens)
    k[0, :, 3:], v[0, :, 3:] = float("nan"), float("nan")  # garbage past row 0's length (a torch.empty cache)
    k[1, :, 6:], v[1, :, 6:] = float("nan"), float("nan")
    out = flash_decode_gqa(q, k, v, lens)
    torch.testing.assert_close(out, clean)


class InductorError(RuntimeError):
    pass


InductorError.__module__ = "torch._inductor.exc"


def test_flex_retries_a_call_whose_dynamic_kernel_fails_to_build(monkeypatch):
    import gqa_tune.ops.backends.flex as flex

    def broken(*args, **kwargs):
        raise InductorError("CppCompileError: C++ compile error")

    monkeypatch.setattr(flex, "_compiled_flex", lambda key: broken)
    q, k, v = qkv()
    with torch.no_grad(), pytest.warns(UserWarning, match="dynamic-shape kernel failed to build"):
        out = scaled_dot_product_gqa(q, k, v, is_causal=True, backend="flex")
    torch.testing.assert_close(out, expected(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(flex, "_compiled_flex", lambda key: lambda *a, **kw: (_ for _ in ()).throw(KeyError("other")))
    with torch.no_grad(), pytest.raises(KeyError):  # anything else propagates
        scaled_dot_product_gqa(q, k, v, is_causal=True, backend="flex")
