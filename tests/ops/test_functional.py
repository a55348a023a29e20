"""``scaled_dot_product_gqa`` against torch's SDPA on expanded K/V, and its input checks."""

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import make_qkv
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import gqa_tune.ops.backends.sdpa as sdpa_module
from gqa_tune.ops import attention_ref, scaled_dot_product_gqa
from gqa_tune.ops.dispatch import AttentionSpec, plan_attention
from gqa_tune.testing import assert_within_precision

BACKENDS = ["auto", "sdpa", "math"]
HEADS = [pytest.param(8, 8, id="mha"), pytest.param(8, 2, id="gqa"), pytest.param(8, 1, id="mqa")]
# (s_q, s_kv, h_d, h_dv): lengths that differ, a single query, odd lengths, head dims that are not powers of two.
SIZES = [
    pytest.param(5, 7, 24, 16, id="q5-kv7-d24-dv16"),
    pytest.param(1, 9, 16, 16, id="q1-kv9-d16"),
    pytest.param(17, 17, 24, 40, id="q17-kv17-d24-dv40"),
]
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
MASK_KINDS = ["bool-b1", "bool-2d", "bool-per-head", "float-b1", "float-2d", "float-per-head"]


def expanded_sdpa(q, k, v, mask=None, is_causal=False, scale=None, dropout_p=0.0):
    """The oracle: torch's SDPA on K/V repeated to every query head."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def make_mask(kind, b, n_h, s_q, s_kv, dtype):
    """A random mask of the given kind; every row keeps at least one key."""
    shape = {"b1": (b, 1, s_q, s_kv), "2d": (s_q, s_kv), "per-head": (b, n_h, s_q, s_kv)}[kind.split("-", 1)[1]]
    allowed = torch.rand(shape) < 0.6
    allowed[..., torch.randint(s_kv, ())] = True
    if kind.startswith("bool"):
        return allowed
    return (2 * torch.randn(shape, dtype=dtype)).masked_fill(~allowed, float("-inf"))


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads_of(fn, inputs, dout):
    out = fn(*inputs)
    out.backward(dout)
    return out, [t.grad for t in inputs]


# ---------------------------------------------------------------- forward vs expanded SDPA


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s_q,s_kv,h_d,h_dv", SIZES)
@pytest.mark.parametrize("n_h,n_kv", HEADS)
def test_forward_matches_expanded_sdpa(n_h, n_kv, s_q, s_kv, h_d, h_dv, backend):
    for dtype, is_causal in itertools.product((torch.float64, torch.float32), (False, True)):
        q, k, v = make_qkv(2, n_h, n_kv, s_q, s_kv, h_d, h_dv, dtype)
        out = scaled_dot_product_gqa(q, k, v, is_causal=is_causal, backend=backend)
        assert out.shape == (2, n_h, s_q, h_dv) and out.dtype == dtype
        torch.testing.assert_close(out, expanded_sdpa(q, k, v, is_causal=is_causal), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks_match_expanded_sdpa(kind, backend):
    # s_q=1 also takes the sdpa backend's decode fold for the head-free masks.
    for dtype, (s_q, s_kv) in itertools.product((torch.float64, torch.float32), ((5, 7), (1, 9))):
        q, k, v = make_qkv(2, 8, 2, s_q, s_kv, 24, 16, dtype)
        mask = make_mask(kind, 2, 8, s_q, s_kv, dtype)
        out = scaled_dot_product_gqa(q, k, v, mask, backend=backend)
        torch.testing.assert_close(out, expanded_sdpa(q, k, v, mask), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_scale(backend):
    q, k, v = make_qkv(2, 8, 2, 5, 7, 24, 16, torch.float64)
    for is_causal in (False, True):
        out = scaled_dot_product_gqa(q, k, v, is_causal=is_causal, scale=0.37, backend=backend)
        torch.testing.assert_close(out, expanded_sdpa(q, k, v, is_causal=is_causal, scale=0.37), **TOL[torch.float64])
        default = scaled_dot_product_gqa(q, k, v, is_causal=is_causal, backend=backend)
        assert (out - default).abs().max() > 1e-3  # the scale is not ignored


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal", "float-mask"])
@pytest.mark.parametrize("n_h,n_kv", HEADS[1:])
def test_bf16_forward_within_precision(n_h, n_kv, case, backend):
    q, k, v = make_qkv(2, n_h, n_kv, 11, 19, 24, 16, torch.bfloat16)
    mask = make_mask("float-b1", 2, n_h, 11, 19, torch.bfloat16) if case == "float-mask" else None
    kw = dict(mask=mask, is_causal=case == "causal")
    out = scaled_dot_product_gqa(q, k, v, mask, is_causal=kw["is_causal"], backend=backend)
    assert out.dtype == torch.bfloat16
    ref = attention_ref(q.float(), k.float(), v.float(), **kw)[0]
    baseline = attention_ref(q, k, v, upcast=False, **kw)[0]
    assert_within_precision(out, ref, baseline, factor=2.0)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal", "float-mask"])
@pytest.mark.parametrize("n_h,n_kv", HEADS)
def test_grads_match_expanded_sdpa(n_h, n_kv, case, backend):
    for dtype in (torch.float64, torch.float32):
        q, k, v = make_qkv(2, n_h, n_kv, 6, 9, 24, 16, dtype)
        mask = make_mask("float-per-head", 2, n_h, 6, 9, dtype) if case == "float-mask" else None
        causal = case == "causal"
        dout = torch.randn(2, n_h, 6, 16, dtype=dtype)
        out, grads = grads_of(
            lambda q, k, v, mask=mask, causal=causal: scaled_dot_product_gqa(
                q, k, v, mask, is_causal=causal, backend=backend
            ),
            leaves(q, k, v),
            dout,
        )
        ref, ref_grads = grads_of(
            lambda q, k, v, mask=mask, causal=causal: expanded_sdpa(q, k, v, mask, causal), leaves(q, k, v), dout
        )
        torch.testing.assert_close(out, ref, **TOL[dtype])
        for name, g, r in zip("qkv", grads, ref_grads):
            assert g.shape == r.shape, name
            torch.testing.assert_close(g, r, **TOL[dtype], msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal", "float-mask"])
def test_bf16_grads_within_precision(case, backend):
    q, k, v = make_qkv(2, 8, 2, 11, 19, 24, 16, torch.bfloat16)
    mask = make_mask("float-b1", 2, 8, 11, 19, torch.bfloat16) if case == "float-mask" else None
    causal = case == "causal"
    dout = torch.randn(2, 8, 11, 16, dtype=torch.bfloat16)
    _, grads = grads_of(
        lambda q, k, v: scaled_dot_product_gqa(q, k, v, mask, is_causal=causal, backend=backend), leaves(q, k, v), dout
    )
    _, ref_grads = grads_of(
        lambda q, k, v: attention_ref(q, k, v, mask=mask, is_causal=causal)[0],
        leaves(q.float(), k.float(), v.float()),
        dout.float(),
    )
    _, base_grads = grads_of(
        lambda q, k, v: attention_ref(q, k, v, mask=mask, is_causal=causal, upcast=False)[0], leaves(q, k, v), dout
    )
    for name, g, r, base in zip("qkv", grads, ref_grads, base_grads):
        assert g.dtype == torch.bfloat16
        assert_within_precision(g, r, base, factor=3.0, what=f"d{name}")


# ---------------------------------------------------------------- conventions


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_is_top_left_aligned(backend):
    q, k, v = make_qkv(2, 8, 2, 1, 5, 16, 16, torch.float64)
    out = scaled_dot_product_gqa(q, k, v, is_causal=True, backend=backend)
    # A single query with is_causal=True sees key 0 only (torch's convention), for its kv head i // 4.
    expected = v[:, :, :1].repeat_interleave(4, dim=1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s_q", [1, 4])
@pytest.mark.parametrize("n_h,n_kv", [(8, 2), (8, 1), (6, 3)])
def test_query_head_uses_kv_head_i_div_group(n_h, n_kv, s_q, backend):
    group = n_h // n_kv
    expected = (torch.arange(n_h) // group).double().view(1, n_h, 1, 1).expand(2, n_h, s_q, 8)
    # Values: kv head j holds the constant j, whatever the weights.
    q, k, _ = make_qkv(2, n_h, n_kv, s_q, 6, 8, 8, torch.float64)
    v = torch.arange(n_kv, dtype=torch.float64).view(1, n_kv, 1, 1).expand(2, n_kv, 6, 8).contiguous()
    torch.testing.assert_close(scaled_dot_product_gqa(q, k, v, backend=backend), expected, atol=1e-12, rtol=0)
    # Keys: query head i is the unit vector e_i and matches only key e_i, which sits at position i
    # of kv head i // group (value i); any other pairing of query and kv heads gives another output.
    q = torch.eye(n_h, dtype=torch.float64).view(1, n_h, 1, n_h).expand(2, n_h, s_q, n_h)
    k = torch.zeros(2, n_kv, n_h, n_h, dtype=torch.float64)
    for i in range(n_h):
        k[:, i // group, i, i] = 1.0
    v = torch.arange(n_h, dtype=torch.float64).view(1, 1, n_h, 1).expand(2, n_kv, n_h, 8).contiguous()
    out = scaled_dot_product_gqa(q, k, v, scale=100.0, backend=backend)
    expected = torch.arange(n_h, dtype=torch.float64).view(1, n_h, 1, 1).expand(2, n_h, s_q, 8)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s_q", [1, 4])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_fully_masked_rows_give_zeros(mask_dtype, s_q, backend):
    q, k, v = make_qkv(2, 8, 2, s_q, 6, 16, 16)
    allowed = torch.ones(2, 1, s_q, 6, dtype=torch.bool)
    allowed[0, :, 0] = False  # batch 0, query 0 sees nothing
    mask = allowed if mask_dtype == torch.bool else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    out = scaled_dot_product_gqa(q, k, v, mask, backend=backend)
    assert not out.isnan().any()
    assert (out[0, :, 0] == 0).all()
    torch.testing.assert_close(out[1], expanded_sdpa(q[1:], k[1:], v[1:])[0], atol=2e-5, rtol=2e-5)


DECODE_MASKS = ["none", "bool-b11", "float-b11", "bool-1d", "bool-per-head"]


@pytest.mark.parametrize("mask_kind", DECODE_MASKS)
@pytest.mark.parametrize("n_h,n_kv", [(8, 2), (8, 1)])
def test_decode_fold_is_exact(n_h, n_kv, mask_kind):
    q, k, v = make_qkv(3, n_h, n_kv, 1, 10, 24, 16, torch.float64)
    allowed = torch.rand(3, 1, 1, 10) < 0.6
    allowed[..., 3] = True
    mask = {
        "none": None,
        "bool-b11": allowed,
        "float-b11": torch.randn(3, 1, 1, 10, dtype=torch.float64).masked_fill(~allowed, float("-inf")),
        "bool-1d": allowed[0, 0],
        "bool-per-head": torch.rand(3, n_h, 1, 10) < 0.6,
    }[mask_kind]
    out = scaled_dot_product_gqa(q, k, v, mask, backend="sdpa")
    ref = scaled_dot_product_gqa(q, k, v, mask, backend="math")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, expanded_sdpa(q, k, v, mask), atol=1e-12, rtol=0)


def test_decode_fold_reads_each_kv_head_once(monkeypatch):
    seen = []
    real = sdpa_module.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((tuple(q.shape), kwargs.get("enable_gqa", False)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", spy)
    q, k, v = make_qkv(3, 8, 2, 1, 10, 24, 16)
    out = scaled_dot_product_gqa(q, k, v, torch.ones(3, 1, 1, 10, dtype=torch.bool), backend="sdpa")
    assert seen == [((3, 2, 4, 24), False)]  # [b, n_kv, G, h_d]: the group folded into the query rows
    assert out.shape == (3, 8, 1, 16)
    seen.clear()
    scaled_dot_product_gqa(q, k, v, is_causal=True, backend="sdpa")  # causal: no fold
    assert seen == [((3, 8, 1, 24), True)]


# ---------------------------------------------------------------- need_weights


@pytest.mark.parametrize("backend", ["auto", "math"])
@pytest.mark.parametrize("case", ["plain", "causal", "bool-mask-dead-row"])
def test_need_weights(case, backend):
    q, k, v = make_qkv(2, 8, 2, 5, 7, 24, 16, torch.float64)
    mask = None
    if case == "bool-mask-dead-row":
        mask = torch.rand(2, 1, 5, 7) < 0.6
        mask[..., 2] = True
        mask[1, 0, 3] = False
    causal = case == "causal"
    out, weights = scaled_dot_product_gqa(q, k, v, mask, is_causal=causal, need_weights=True, backend=backend)
    assert weights.shape == (2, 8, 5, 7) and weights.dtype == torch.float64
    row_sums = torch.ones(2, 8, 5, dtype=torch.float64)
    if mask is not None:
        row_sums[1, :, 3] = 0.0
        assert (weights.masked_select(~mask.expand(2, 8, 5, 7)) == 0).all()
    if causal:
        assert (weights.masked_select(~torch.ones(5, 7, dtype=torch.bool).tril()) == 0).all()
    torch.testing.assert_close(weights.sum(-1), row_sums, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, weights @ v.repeat_interleave(4, dim=1), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, expanded_sdpa(q, k, v, mask, causal), **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_need_weights_refused_by_backends_without_weights(backend):
    q, k, v = make_qkv(1, 4, 2, 3, 3, 8, 8)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run this call: .*weights"):
        scaled_dot_product_gqa(q, k, v, need_weights=True, backend=backend)


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s_q", [1, 5])
def test_dropout_one_gives_zeros(s_q, backend):
    q, k, v = make_qkv(2, 8, 2, s_q, 7, 16, 16)
    out = scaled_dot_product_gqa(q, k, v, dropout_p=1.0, backend=backend)
    assert out.shape == (2, 8, s_q, 16)
    assert (out == 0).all()


@pytest.mark.parametrize("s_q", [1, 5])
def test_dropout_is_stochastic_and_zero_is_deterministic(s_q):
    q, k, v = make_qkv(2, 8, 2, s_q, 7, 16, 16)
    a = scaled_dot_product_gqa(q, k, v, dropout_p=0.5)
    b = scaled_dot_product_gqa(q, k, v, dropout_p=0.5)
    assert not a.isnan().any()
    assert (a - b).abs().max() > 1e-3
    c = scaled_dot_product_gqa(q, k, v, dropout_p=0.0)
    assert torch.equal(c, scaled_dot_product_gqa(q, k, v, dropout_p=0.0))
    torch.testing.assert_close(c, expanded_sdpa(q, k, v))


# ---------------------------------------------------------------- flex backend (CPU forward)

# Few distinct shapes on purpose: each one costs a flex_attention compile.
DOCS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])


def _same_document(b, h, q_idx, kv_idx):
    return DOCS[q_idx] == DOCS[kv_idx]


@pytest.fixture(scope="module")
def doc_block_mask():
    return create_block_mask(_same_document, None, None, 12, 12, device="cpu")


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_flex_matches_math(is_causal):
    q, k, v = make_qkv(2, 8, 2, 5, 7, 24, 16)
    out = scaled_dot_product_gqa(q, k, v, is_causal=is_causal, backend="flex")
    ref = scaled_dot_product_gqa(q, k, v, is_causal=is_causal, backend="math")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, expanded_sdpa(q, k, v, is_causal=is_causal), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_flex_block_mask_matches_dense(doc_block_mask, backend):
    q, k, v = make_qkv(2, 8, 2, 12, 12, 24, 16)
    assert plan_attention(q, k, v, AttentionSpec(mask=doc_block_mask), backend).backend.name == "flex"
    out = scaled_dot_product_gqa(q, k, v, doc_block_mask, backend=backend)
    dense = create_mask(_same_document, 1, 1, 12, 12, device="cpu")
    torch.testing.assert_close(out, attention_ref(q, k, v, mask=dense)[0], atol=2e-5, rtol=2e-5)


def test_block_mask_with_grad_on_cpu_goes_through_blocks(doc_block_mask):
    q, k, v = make_qkv(2, 8, 2, 12, 12, 24, 16, requires_grad=True)
    assert plan_attention(q, k, v, AttentionSpec(mask=doc_block_mask)).backend.name == "blocks"
    dense = create_mask(_same_document, 1, 1, 12, 12, device="cpu")
    dout = torch.randn(2, 8, 12, 16)
    out, grads = grads_of(lambda q, k, v: scaled_dot_product_gqa(q, k, v, doc_block_mask), leaves(q, k, v), dout)
    ref, ref_grads = grads_of(
        lambda q, k, v: scaled_dot_product_gqa(q, k, v, dense, backend="math"), leaves(q, k, v), dout
    )
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- input checks


def _qkv(q=(2, 8, 5, 16), k=(2, 2, 7, 16), v=(2, 2, 7, 16), dtypes=(torch.float32,) * 3):
    return [torch.randn(s, dtype=d) for s, d in zip((q, k, v), dtypes)]


def _block_mask(b, h, s_q, s_kv):
    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, b, h, s_q, s_kv, device="cpu")


BAD_INPUTS = [
    ("q-3d", dict(q=(2, 8, 5)), {}, "query must be 4-D (b, h, s, d), got shape (2, 8, 5)"),
    ("k-5d", dict(k=(2, 2, 7, 16, 1)), {}, "key must be 4-D (b, h, s, d), got shape (2, 2, 7, 16, 1)"),
    ("batch", dict(k=(3, 2, 7, 16)), {}, "batch sizes differ: query (2, 8, 5, 16), key (3, 2, 7, 16)"),
    ("head-dim", dict(k=(2, 2, 7, 12)), {}, "query and key head_dim differ: query (2, 8, 5, 16), key (2, 2, 7, 12)"),
    ("kv-len", dict(v=(2, 2, 6, 16)), {}, "key and value must have the same heads and length: query (2, 8, 5, 16)"),
    ("kv-heads", dict(v=(2, 4, 7, 16)), {}, "key and value must have the same heads and length"),
    ("not-multiple", dict(k=(2, 3, 7, 16), v=(2, 3, 7, 16)), {}, "query heads (8) must be a multiple of"),
    ("more-kv", dict(q=(2, 2, 5, 16), k=(2, 4, 7, 16), v=(2, 4, 7, 16)), {}, "query heads (2) must be a multiple"),
    ("zero-kv", dict(k=(2, 0, 7, 16), v=(2, 0, 7, 16)), {}, "key/value heads (0): query (2, 8, 5, 16)"),
    ("dtype", dict(dtypes=(torch.float32, torch.float64, torch.float32)), {}, "dtypes differ: query torch.float32"),
    ("dropout-neg", {}, dict(dropout_p=-0.1), "dropout_p must be in [0, 1], got -0.1"),
    ("dropout-big", {}, dict(dropout_p=1.5), "dropout_p must be in [0, 1], got 1.5"),
    ("mask-and-causal", {}, dict(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True), "not both"),
    ("mask-int", {}, dict(attn_mask=torch.ones(5, 7, dtype=torch.int64)), "got torch.int64"),
    ("mask-float-dtype", {}, dict(attn_mask=torch.zeros(5, 7, dtype=torch.float64)), "query's dtype torch.float32"),
    ("mask-shape", {}, dict(attn_mask=torch.ones(3, 7, dtype=torch.bool)), "(3, 7) does not broadcast to"),
    ("mask-heads", {}, dict(attn_mask=torch.ones(2, 2, 5, 7, dtype=torch.bool)), "= (2, 8, 5, 7)"),
    ("mask-5d", {}, dict(attn_mask=torch.ones(1, 2, 8, 5, 7, dtype=torch.bool)), "(1, 2, 8, 5, 7) does not broadcast"),
    ("mask-list", {}, dict(attn_mask=[[True]]), "attn_mask must be a tensor or BlockMask, got list"),
]


@pytest.mark.parametrize("shapes,kwargs,message", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_inputs_raise(shapes, kwargs, message):
    q, k, v = _qkv(**shapes)
    with pytest.raises(ValueError, match=re.escape(message)):
        scaled_dot_product_gqa(q, k, v, **kwargs)


def test_non_tensor_input_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="value must be a torch.Tensor, got ndarray"):
        scaled_dot_product_gqa(q, k, v.numpy())


@pytest.mark.parametrize(
    "b,h,s_q,s_kv,message",
    [
        pytest.param(None, None, 6, 7, "lengths (6, 7) does not fit (b=2, n_h=8, s_q=5, s_kv=7)", id="s_q"),
        pytest.param(None, None, 5, 8, "lengths (5, 8) does not fit", id="s_kv"),
        pytest.param(3, None, 5, 7, "BlockMask of shape (3, 1, 5, 7)", id="batch"),
        pytest.param(None, 2, 5, 7, "BlockMask of shape (1, 2, 5, 7)", id="heads"),
    ],
)
def test_block_mask_that_does_not_fit_raises(b, h, s_q, s_kv, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=re.escape(message)):
        scaled_dot_product_gqa(q, k, v, _block_mask(b, h, s_q, s_kv))


@pytest.mark.parametrize("mask_shape", [(5, 1), (1, 5, 7), (2, 1, 1, 7)])
def test_broadcastable_masks_are_accepted(mask_shape):
    q, k, v = _qkv()
    mask = torch.rand(mask_shape) < 0.7
    mask[..., 0] = True
    out = scaled_dot_product_gqa(q, k, v, mask)
    torch.testing.assert_close(out, expanded_sdpa(q, k, v, mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_1d_mask_broadcasts_like_torch(backend):
    q, k, v = _qkv()
    mask = torch.tensor([True, True, False, True, True, False, True])  # broadcastable to (2, 8, 5, 7)
    out = scaled_dot_product_gqa(q, k, v, mask, backend=backend)
    torch.testing.assert_close(out, attention_ref(q, k, v, mask=mask)[0], atol=2e-5, rtol=2e-5)
