"""``sliding_window``, ``softcap`` and ``sinks`` of ``scaled_dot_product_gqa`` against a float64 oracle written
out here (loops over positions, not the package's mask helpers), with gradients; each backend serves a
combination correctly or refuses it with ``ValueError``, and ``"auto"`` and ``"math"`` serve them all."""

import itertools

import pytest
import torch

from gqa_tune.ops import scaled_dot_product_gqa

BACKENDS = ["auto", "math", "sdpa", "flex", "triton"]


def oracle(q, k, v, *, is_causal=False, mask=None, window=None, softcap=None, sinks=None):
    """Row by row in float64: scores, cap, visibility by explicit position tests, softmax with the sink."""
    q, k, v = q.double(), k.double(), v.double()
    b, n_h, s_q, h_d = q.shape
    group = n_h // k.shape[1]
    out = torch.zeros(b, n_h, s_q, v.shape[-1], dtype=torch.float64)
    for bi, h, i in itertools.product(range(b), range(n_h), range(s_q)):
        logits, values = [], []
        for j in range(k.shape[2]):
            if is_causal and j > i:
                continue
            if window is not None and abs(i - j) >= window:
                continue
            if mask is not None and not bool(mask[..., i, j].expand(b, n_h)[bi, h]):
                continue
            s = float(q[bi, h, i] @ k[bi, h // group, j]) * h_d**-0.5
            logits.append(softcap * torch.tanh(torch.tensor(s / softcap)).item() if softcap else s)
            values.append(v[bi, h // group, j])
        if sinks is not None:
            logits.append(float(sinks[h]))
            values.append(torch.zeros(v.shape[-1], dtype=torch.float64))
        if logits:
            weights = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
            out[bi, h, i] = sum(w * val for w, val in zip(weights, values))
    return out


def dense_oracle(q, k, v, sinks, case):
    """The same definition in differentiable float64 tensor ops (for gradients), independent of the package."""
    group = q.shape[1] // k.shape[1]
    keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ keys.transpose(-2, -1) * q.shape[-1] ** -0.5
    if case.get("softcap"):
        s = case["softcap"] * torch.tanh(s / case["softcap"])
    i, j = torch.arange(q.shape[2]).view(-1, 1), torch.arange(k.shape[2]).view(1, -1)
    seen = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    if case.get("is_causal"):
        seen &= j <= i
    if case.get("window"):
        seen &= (i - j).abs() < case["window"]
    s = s.masked_fill(~seen, float("-inf"))
    if case.get("sinks"):
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)], -1)
    weights = torch.softmax(s, -1)[..., : k.shape[2]]
    return weights @ values


def inputs(requires_grad=False):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    sinks = torch.randn(4)
    if requires_grad:
        for t in (q, k, v, sinks):
            t.requires_grad_()
    return q, k, v, sinks


CASES = {
    "window": dict(window=3),
    "window-causal": dict(window=2, is_causal=True),
    "window-mask": dict(window=4, mask=torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) < 0.7),
    "softcap": dict(softcap=1.5),
    "softcap-causal": dict(softcap=0.7, is_causal=True),
    "sinks": dict(sinks=True),
    "sinks-causal": dict(sinks=True, is_causal=True),
    "all": dict(sinks=True, softcap=2.0, window=3, is_causal=True),
}


def run(q, k, v, sinks, case, backend):
    return scaled_dot_product_gqa(
        q,
        k,
        v,
        attn_mask=case.get("mask"),
        is_causal=case.get("is_causal", False),
        sliding_window=case.get("window"),
        softcap=case.get("softcap"),
        sinks=sinks if case.get("sinks") else None,
        backend=backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_the_oracle_or_is_refused(name, backend):
    case = CASES[name]
    q, k, v, sinks = inputs()
    expected = oracle(q, k, v, **{**case, "sinks": sinks if case.get("sinks") else None})
    try:
        with torch.no_grad():
            out = run(q, k, v, sinks, case, backend)
    except ValueError as err:
        assert backend not in ("auto", "math"), err
        assert f"backend='{backend}' cannot run this call" in str(err)
        return
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "math", "sdpa"])
@pytest.mark.parametrize("name", ["window-causal", "sinks-causal", "all"])
def test_gradients_match_float64(name, backend):
    case = CASES[name]
    if backend == "sdpa" and "softcap" in case:
        pytest.skip("sdpa refuses softcap (covered above)")
    q, k, v, sinks = inputs(requires_grad=True)
    dout = torch.randn(1, 4, 6, 16)
    run(q, k, v, sinks, case, backend).backward(dout)
    used = (q, k, v, sinks) if case.get("sinks") else (q, k, v)
    ours = [t.grad.clone() for t in used]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    dense_oracle(*ref, case).backward(dout.double())
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got.double(), want.grad, atol=1e-5, rtol=1e-5)


def test_the_oracle_is_not_the_code_under_test():
    # A worked example: one query, keys 0..2, window 2 aligned top-left at query 0 sees keys 0 and 1 only.
    q = torch.zeros(1, 1, 1, 4)
    k = torch.zeros(1, 1, 3, 4)
    v = torch.tensor([1.0, 2.0, 100.0]).view(1, 1, 3, 1).expand(1, 1, 3, 4).contiguous()
    out = scaled_dot_product_gqa(q, k, v, sliding_window=2)
    torch.testing.assert_close(out, torch.full((1, 1, 1, 4), 1.5))
    # A sink of logit 0 next to two keys of score 0 takes a third of the weight.
    out = scaled_dot_product_gqa(q, k[:, :, :2], v[:, :, :2], sinks=torch.zeros(1))
    torch.testing.assert_close(out, torch.full((1, 1, 1, 4), 1.0))
    # Soft-capping at c bounds every score by c: a huge score stays below c.
    big = torch.full((1, 1, 1, 4), 100.0)
    out = scaled_dot_product_gqa(big, torch.stack([big[0, 0, 0], -big[0, 0, 0]]).view(1, 1, 2, 4),
                                 torch.tensor([1.0, 0.0]).view(1, 1, 2, 1).expand(1, 1, 2, 4).contiguous(),
                                 softcap=1.0)  # fmt: skip
    expected = torch.sigmoid(torch.tensor(2.0 * torch.tanh(torch.tensor(100.0)).item()))
    torch.testing.assert_close(out[0, 0, 0, 0], expected)


def test_fully_masked_rows_give_zero_with_sinks_and_windows():
    q, k, v, sinks = inputs()
    mask = torch.zeros(6, 8, dtype=torch.bool)
    for backend in ("auto", "math", "sdpa"):
        out = scaled_dot_product_gqa(q, k, v, attn_mask=mask, sinks=sinks, backend=backend)
        assert torch.count_nonzero(out) == 0 and not out.isnan().any()
        out = scaled_dot_product_gqa(q, k, v, attn_mask=mask, sliding_window=2, backend=backend)
        assert torch.count_nonzero(out) == 0 and not out.isnan().any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sliding_window=0), "sliding_window must be None or a positive int, got 0"),
        (dict(sliding_window=-3), "sliding_window must be None or a positive int, got -3"),
        (dict(sliding_window=2.5), "sliding_window must be None or a positive int, got 2.5"),
        (dict(sliding_window=True), "sliding_window must be None or a positive int, got True"),
        (dict(softcap=0.0), "softcap must be None or a finite positive number, got 0.0"),
        (dict(softcap=-1.0), "softcap must be None or a finite positive number, got -1.0"),
        (dict(softcap=float("inf")), "softcap must be None or a finite positive number, got inf"),
        (dict(softcap=1e39), "softcap must be at most 3.403e+38 (float32's largest value"),
        (dict(softcap=1e300), "softcap must be at most 3.403e+38 (float32's largest value"),
        (dict(sinks=torch.zeros(2)), "sinks must be a floating-point tensor of shape [n_h] = [4], got (2,)"),
        (dict(sinks=torch.zeros(1, 4)), "sinks must be a floating-point tensor of shape [n_h] = [4], got (1, 4)"),
        (dict(sinks=torch.zeros(4, dtype=torch.long)), "sinks must be a floating-point tensor of shape [n_h]"),
        (dict(sinks=[0.0] * 4), "sinks must be a floating-point tensor of shape [n_h] = [4], got list"),
    ],
)
def test_bad_feature_values_raise(kwargs, message):
    q, k, v, _ = inputs()
    with pytest.raises(ValueError) as info:
        scaled_dot_product_gqa(q, k, v, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("backend", ["auto", "math", "flex", "triton"])
@pytest.mark.parametrize("softcap", [1e4, 1e8, 1e30, 3e38])
def test_a_large_softcap_caps_nothing_on_every_backend(softcap, backend):
    """``c * tanh(s / c)`` tends to ``s``: a cap far above the scores, up to float32's largest, gives the uncapped
    answer (the Triton kernel's ``2 sigmoid(2x) - 1`` rounded tanh to 0 there: uniform attention)."""
    q, k, v, _ = inputs()
    q = q * 3
    with torch.no_grad():
        out = scaled_dot_product_gqa(q, k, v, is_causal=True, softcap=softcap, backend=backend)
    torch.testing.assert_close(out.double(), oracle(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_a_large_softcap_has_the_uncapped_gradients_in_the_kernels():
    q, k, v, _ = inputs(requires_grad=True)
    dout = torch.randn(1, 4, 6, 16)
    grads = {}
    for softcap in (None, 1e8):
        for t in (q, k, v):
            t.grad = None
        scaled_dot_product_gqa(q, k, v, is_causal=True, softcap=softcap, backend="triton").backward(dout)
        grads[softcap] = [t.grad.clone() for t in (q, k, v)]
    for got, want in zip(grads[1e8], grads[None]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "math", "sdpa", "triton"])
def test_an_infinite_sink_takes_its_heads_whole_softmax(backend):
    """A ``+inf`` sink logit has all the weight and a zero value: its head's output is 0, with zero gradients;
    a ``-inf`` sink is no sink; the other heads are unchanged."""
    q, k, v, sinks = inputs()
    sinks = sinks.clone()
    sinks[1], sinks[2] = float("inf"), -float("inf")
    sinks.requires_grad_()
    out = scaled_dot_product_gqa(q, k, v, is_causal=True, sinks=sinks, backend=backend)
    assert not out.isnan().any()
    assert torch.count_nonzero(out[0, 1]) == 0
    expected = oracle(q, k, v, is_causal=True, sinks=sinks.detach())
    expected[0, 1] = 0.0  # the oracle's softmax over an inf logit is NaN: the limit is all weight on the sink
    torch.testing.assert_close(out.detach().double(), expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert sinks.grad[1] == 0 and sinks.grad[2] == 0 and torch.isfinite(sinks.grad).all()
