"""Helpers for tests of attention implementations (used by our own suite).

The tolerance rule follows FlashAttention's tests: an implementation's max
error against the float32 reference may be at most ``factor`` times (plus
``atol``) the max error of a plain PyTorch computation in the same low
precision. In float32/float64 the baseline error is tiny, so the rule
amounts to a tight absolute tolerance.
"""

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_precision(
    out: torch.Tensor,
    ref: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 1e-5,
    what: str = "output",
) -> None:
    """``|out - ref| <= factor * |baseline - ref| + atol`` in max norm.

    Args:
        out: result of the implementation under test.
        ref: float32 (or float64) reference.
        baseline: the same computation done plainly in ``out``'s precision.
        factor: 2 for outputs, 3 for gradients.
    """
    err, base = max_err(out, ref), max_err(baseline, ref)
    bound = factor * base + atol
    if not err <= bound:
        raise AssertionError(f"{what}: max error {err:.3e} > {factor} x baseline {base:.3e} + {atol:g}")
