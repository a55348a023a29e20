"""The flex backend in a long-running process: many call structures and sizes, and never dynamo's
recompile limit (past it, dynamo runs flex eagerly: an unfused kernel that materializes every score)."""

import functools
import warnings

import torch
from torch._dynamo.utils import counters

import gqa_tune.ops.backends.flex as flex
from gqa_tune import scaled_dot_product_gqa


def _mask(kind, b, s):
    if kind == "causal":
        return {"is_causal": True}
    if kind == "bool":
        return {"attn_mask": torch.ones(s, s, dtype=torch.bool).tril()}
    if kind == "bool per row":
        return {"attn_mask": torch.rand(b, 1, s, s) > 0.3}
    return {"attn_mask": torch.randn(s, s)}  # additive


def test_twelve_structures_at_two_sizes_each_never_reach_the_recompile_limit(monkeypatch):
    # dynamo's "eager" backend: the same tracing, guards and recompile counting as inductor, without its
    # minutes of C++ builds on a CPU.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(flex, "_COMPILED", {}, raising=False)
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # flex run eagerly warns; so does a recompile-limit fallback
        for head_dim in (8, 16, 24):
            for kind in ("causal", "bool", "bool per row", "additive"):
                for b, s in ((2, 5), (3, 9)):
                    q, k, v = (
                        torch.randn(b, 4, s, head_dim),
                        torch.randn(b, 2, s, head_dim),
                        torch.randn(b, 2, s, head_dim),
                    )
                    mask = _mask(kind, b, s)
                    out = scaled_dot_product_gqa(q, k, v, backend="flex", **mask)
                    expected = scaled_dot_product_gqa(q, k, v, backend="math", **mask)
                    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not counters["unimplemented"], dict(counters["unimplemented"])


def test_head_dims_torchs_cpu_flex_miscomputes_get_the_right_answer():
    """torch 2.13's compiled CPU flex gives wrong rows (or NaN) at head dim 8 or 16 when the key length is
    8 mod 16; the backend zero-pads such heads to 32 (compiled by inductor here: the bug is in its kernel)."""
    for head_dim, s_kv in ((16, 24), (8, 8)):
        q, k, v = torch.randn(2, 4, 5, head_dim), torch.randn(2, 2, s_kv, head_dim), torch.randn(2, 2, s_kv, head_dim)
        out = scaled_dot_product_gqa(q, k, v, backend="flex")
        expected = scaled_dot_product_gqa(q, k, v, backend="math")
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
