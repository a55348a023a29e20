"""Triton flash attention (fwd + bwd) against the float32 reference.

On CPU these run in Triton's interpreter (set by tests/conftest.py), so the
shapes stay tiny. Tolerances follow FlashAttention's rule: the kernel's error
against the float32 reference is at most 2x (outputs) or 3x (gradients), plus
1e-5, the error of plain PyTorch in the same precision.
"""

import pytest
import torch

from gqa_tune import attention_ref, scaled_dot_product_gqa
from gqa_tune.kernels.triton._common import runtime_problem
from gqa_tune.testing import assert_within_precision

pytestmark = pytest.mark.skipif(
    runtime_problem(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None,
    reason="Triton kernels cannot run here",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(b, n_h, n_kv, s_q, s_kv, d, dtype):
    shapes = ((b, n_h, s_q, d), (b, n_kv, s_kv, d), (b, n_kv, s_kv, d))
    return [torch.randn(s, device=DEVICE, dtype=dtype, requires_grad=True) for s in shapes]


def check_against_reference(q, k, v, *, mask=None, is_causal=False, backward=True):
    """Kernel vs float32 reference, with plain low-precision PyTorch as the yardstick."""
    out = scaled_dot_product_gqa(q, k, v, attn_mask=mask, is_causal=is_causal, backend="triton")
    ref, _ = attention_ref(q, k, v, mask=mask, is_causal=is_causal)
    base, _ = attention_ref(q, k, v, mask=mask, is_causal=is_causal, upcast=False)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert_within_precision(out, ref, base, what="output")
    if not backward:
        return
    grad = torch.randn_like(out)
    results = []
    for y in (out, ref, base):
        for t in (q, k, v):
            t.grad = None
        y.backward(grad)
        results.append([t.grad.clone() for t in (q, k, v)])
    for name, g, g_ref, g_base in zip("qkv", *results):
        assert torch.isfinite(g).all()
        assert_within_precision(g, g_ref, g_base, factor=3.0, what=f"d{name}")


# (n_h, n_kv): G in {1, 2, 4, 8}, MQA included.
HEADS = [(2, 2), (4, 2), (4, 1), (8, 2), (8, 1)]


@pytest.mark.parametrize("n_h,n_kv", HEADS, ids=lambda x: str(x))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gqa_groups_float32(n_h, n_kv, is_causal):
    check_against_reference(*make_inputs(1, n_h, n_kv, 17, 17, 24, torch.float32), is_causal=is_causal)


@pytest.mark.parametrize(
    "s_q,s_kv,d",
    [(1, 1, 16), (1, 17, 64), (17, 67, 24), (67, 17, 80), (130, 33, 16), (33, 130, 16)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_odd_lengths_and_head_dims(s_q, s_kv, d, is_causal):
    """Masked tails, s_q != s_kv (top-left causal, so rows past s_kv see every key), head_dim 24/80."""
    check_against_reference(*make_inputs(2, 4, 2, s_q, s_kv, d, torch.float32), is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_low_precision(dtype, is_causal):
    check_against_reference(*make_inputs(2, 8, 2, 19, 23, 24, dtype), is_causal=is_causal)


def test_bool_mask_with_fully_masked_rows_gives_zeros_and_finite_grads():
    q, k, v = make_inputs(2, 4, 2, 9, 13, 16, torch.float32)
    mask = torch.rand(2, 1, 9, 13, device=DEVICE) > 0.4
    mask[:, :, 3] = False  # row 3 sees nothing
    mask[1, :, 5] = False
    check_against_reference(q, k, v, mask=mask)
    out = scaled_dot_product_gqa(q, k, v, attn_mask=mask, backend="triton")
    assert out[:, :, 3].abs().max() == 0 and out[1, :, 5].abs().max() == 0


def test_per_head_bool_mask():
    q, k, v = make_inputs(1, 4, 2, 7, 11, 16, torch.float32)
    mask = torch.rand(1, 4, 7, 11, device=DEVICE) > 0.3
    check_against_reference(q, k, v, mask=mask)


def test_causal_rows_before_the_first_key_are_zero():
    """The module's cache layout: queries at the end of the keys (offset s_kv - s_q) and, here, before key 0."""
    from gqa_tune.kernels.triton.ops import flash_attn

    q, k, v = (t.detach() for t in make_inputs(1, 4, 2, 6, 6, 16, torch.float32))
    out, lse = flash_attn(q, k, v, None, 0.25, True, -2)  # query i sees keys <= i - 2
    visible = torch.ones(6, 6, dtype=torch.bool, device=DEVICE).tril(diagonal=-2)
    ref, _ = attention_ref(q, k, v, mask=visible, scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[:, :, :2].abs().max() == 0 and torch.isinf(lse[:, :, :2]).all()


def test_head_mapping_query_head_i_uses_kv_head_i_over_group():
    b, n_h, n_kv, s, d = 1, 8, 2, 5, 16
    q = torch.randn(b, n_h, s, d, device=DEVICE)
    k = torch.randn(b, n_kv, s, d, device=DEVICE)
    v = torch.stack([torch.full((s, d), float(j + 1), device=DEVICE) for j in range(n_kv)])[None]
    out = scaled_dot_product_gqa(q, k, v, backend="triton")
    expected = torch.tensor([i // (n_h // n_kv) + 1.0 for i in range(n_h)], device=DEVICE)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_deterministic_backward():
    q, k, v = make_inputs(1, 8, 2, 33, 33, 16, torch.float32)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        scaled_dot_product_gqa(q, k, v, is_causal=True, backend="triton").sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_torch_compile_traces_around_the_kernel():
    q, k, v = make_inputs(1, 4, 2, 17, 17, 16, torch.float32)
    compiled = torch.compile(
        lambda q, k, v: scaled_dot_product_gqa(q, k, v, is_causal=True, backend="triton") * 2,
        backend="aot_eager",
        fullgraph=True,
    )
    out = compiled(q, k, v)
    ref, _ = attention_ref(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref * 2, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert q.grad is not None and k.grad.shape == k.shape


def test_module_with_triton_backend_matches_sdpa_backend():
    from gqa_tune.models import gqa_attention

    torch.manual_seed(0)
    ours = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, qk_norm=True, backend="triton").to(DEVICE)
    ref = gqa_attention(embed_dim=64, num_heads=8, num_kv_heads=2, qk_norm=True, backend="sdpa").to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 11, 64, device=DEVICE, requires_grad=True)
    out, expected = ours(x, x), ref(x, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
