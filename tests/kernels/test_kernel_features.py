"""Sliding windows, soft-capping and sinks in the Triton kernels (forward, backward and split-K decode), against
the float32 reference with a visibility worked out position by position; under TRITON_INTERPRET on CPU."""

import pytest
import torch

from gqa_tune import attention_ref
from gqa_tune.kernels.triton._common import runtime_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(runtime_problem(torch.device(DEVICE)) is not None, reason="no Triton here")

CASES = [
    dict(causal=True, window=5),
    dict(causal=False, window=6),
    dict(causal=True, softcap=2.0),
    dict(causal=True, sinks=True),
    dict(causal=True, window=4, softcap=1.5, sinks=True),
]


def visible(s_q, s_kv, causal, offset, window):
    allowed = torch.zeros(s_q, s_kv, dtype=torch.bool, device=DEVICE)
    for i in range(s_q):
        for j in range(s_kv):
            ok = j <= i + offset if causal else True
            allowed[i, j] = ok and (not window or abs(i + offset - j) < window)
    return allowed


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_flash_attn_forward_and_backward(case):
    from gqa_tune.kernels.triton.ops import flash_attn

    torch.manual_seed(0)
    q = torch.randn(1, 4, 20, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 37, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 37, 16, device=DEVICE, requires_grad=True)
    sinks = torch.randn(4, device=DEVICE, requires_grad=True) if case.get("sinks") else None
    window, softcap, offset = case.get("window", 0), case.get("softcap", 0.0), 17 if case["causal"] else 0
    out, _ = flash_attn(q, k, v, None, 0.25, case["causal"], offset, window, softcap, sinks)
    allowed = visible(20, 37, case["causal"], offset, window)
    ref = attention_ref(q, k, v, mask=allowed, scale=0.25, softcap=softcap or None, sinks=sinks)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    inputs = [q, k, v] + ([sinks] if sinks is not None else [])
    dout = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_split_k_decode(case):
    from gqa_tune.kernels.triton.ops import flash_decode

    torch.manual_seed(0)
    b, n_h, n_kv, s_q, max_len = 3, 4, 2, 2, 70
    q = torch.randn(b, n_h, s_q, 16, device=DEVICE)
    k, v = torch.randn(b, n_kv, max_len, 16, device=DEVICE), torch.randn(b, n_kv, max_len, 16, device=DEVICE)
    sinks = torch.randn(n_h, device=DEVICE) if case.get("sinks") else None
    window, softcap = case.get("window", 0), case.get("softcap", 0.0)
    lens = torch.tensor([5, 70, 33], dtype=torch.int32, device=DEVICE)
    out = flash_decode(q, k, v, lens, None, 0.25, case["causal"], -1, window, softcap, sinks)
    allowed = torch.zeros(b, 1, s_q, max_len, dtype=torch.bool, device=DEVICE)
    for row, length in enumerate(lens.tolist()):  # the new queries are the last s_q of each row's keys
        allowed[row, 0, :, :length] = visible(s_q, length, case["causal"], length - s_q, window)
    ref = attention_ref(q, k, v, mask=allowed, scale=0.25, softcap=softcap or None, sinks=sinks)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_window_bounds_the_keys_decode_reads():
    from gqa_tune.kernels.triton.ops import flash_decode

    torch.manual_seed(0)
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k, v = torch.randn(1, 2, 96, 16, device=DEVICE), torch.randn(1, 2, 96, 16, device=DEVICE)
    lens = torch.tensor([96], dtype=torch.int32, device=DEVICE)
    clean = flash_decode(q, k, v, lens, None, 0.25, True, -1, 8, 0.0, None)
    k[:, :, :64], v[:, :, :64] = float("nan"), float("nan")  # far outside the window of 8: never read
    torch.testing.assert_close(flash_decode(q, k, v, lens, None, 0.25, True, -1, 8, 0.0, None), clean)
