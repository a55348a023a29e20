"""Backend table and the per-call choice of ``backend="auto"``.

=========  ===========================================================
backend    what it is
=========  ===========================================================
sdpa       ``F.scaled_dot_product_attention(..., enable_gqa=True)``
flex       compiled ``flex_attention`` (``BlockMask`` or causal)
math       float32 reference, the only one that returns weights
triton     gqa_tune's flash attention kernels (GQA-native, fwd + bwd)
=========  ===========================================================

``"auto"`` walks :data:`AUTO_ORDER` and takes the first backend whose limits
allow the call; an explicit backend that cannot serve the call raises a
``ValueError`` saying why, it never falls back silently.
"""

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import BlockMask

from gqa_tune.ops.backends.flex import flex_backend, flex_limits
from gqa_tune.ops.backends.math import math_backend
from gqa_tune.ops.backends.sdpa import sdpa_backend, sdpa_limits
from gqa_tune.ops.backends.triton import auto_validated, triton_backend, triton_limits
from gqa_tune.ops.masks import MaskType
from gqa_tune.ops.nan_rule import hide_masked_nans


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to accept or decline a call."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    mask: Optional[MaskType]
    dropout_p: float
    need_weights: bool
    needs_grad: bool
    #: V's head dim where it differs from ``head_dim`` (``None``: the same).
    value_head_dim: Optional[int] = None
    #: Nothing to attend or nothing to compute (``b``, ``n_h`` or ``s_q`` is 0, or ``s_kv`` is 0).
    empty: bool = False
    #: Logit soft-cap (``None``: none).
    softcap: Optional[float] = None
    #: Whether per-head attention sinks join the softmax.
    sinks: bool = False

    @property
    def mask_kind(self) -> str:
        if self.mask is None:
            return "none"
        if isinstance(self.mask, BlockMask):
            return "block"
        return "bool" if self.mask.dtype == torch.bool else "float"


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    limits: Callable[[AttentionCall], Optional[str]]
    #: Whether its kernel returns 0 for a query row holding a NaN (the NaN rule then puts the NaN back).
    zeroes_nan_query_rows: bool = False


def _no_limits(call: AttentionCall) -> Optional[str]:
    return None


BACKENDS = {
    "sdpa": Backend("sdpa", sdpa_backend, sdpa_limits, zeroes_nan_query_rows=True),
    "flex": Backend("flex", flex_backend, flex_limits, zeroes_nan_query_rows=True),
    "math": Backend("math", math_backend, _no_limits),
    "triton": Backend("triton", triton_backend, triton_limits),
}
BACKEND_NAMES = ("auto", *BACKENDS)

#: Backends ``"auto"`` stopped using in this process because their kernels
#: failed to build on this machine (see :func:`call_guarded`).
AUTO_DISABLED: set = set()


def auto_order(call: AttentionCall) -> tuple:
    """Backends ``"auto"`` tries, best first, for this call."""
    if call.need_weights:
        return ("math",)
    if call.mask_kind == "block":
        # flex reads the BlockMask natively; where it cannot (CPU training),
        # SDPA takes the mask materialized from its mask_mod.
        return ("flex", "sdpa", "math")
    if call.device.type == "cuda" and auto_validated(call.device):
        # Our kernels where they serve the call (no mask, causal, bool masks), on GPUs where they were
        # measured correct and faster (kernels/triton/validated.json); elsewhere SDPA's flash / cuDNN.
        return ("triton", "sdpa", "math")
    return ("sdpa", "math")


def check_backend_name(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")


def make_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask,
    dropout_p: float,
    need_weights: bool,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
):
    grads = (q.requires_grad or k.requires_grad or v.requires_grad) or (sinks is not None and sinks.requires_grad)
    needs_grad = torch.is_grad_enabled() and grads
    value_head_dim = v.shape[-1] if v.shape[-1] != q.shape[-1] else None
    # With sinks and no keys every row still gives 0, so the reference answers that too.
    empty = q.numel() == 0 or k.shape[2] == 0
    return AttentionCall(
        q.device, q.dtype, q.shape[-1], mask, dropout_p, need_weights, needs_grad, value_head_dim, empty,
        softcap, sinks is not None,
    )  # fmt: skip


def select_backend(call: AttentionCall, backend: str = "auto") -> Backend:
    """The backend that will run ``call``; ``ValueError`` if ``backend`` cannot."""
    check_backend_name(backend)
    if call.empty:
        # Nothing to attend (or nothing asks): the answer is defined (an empty output,
        # or zeros for s_kv = 0) and the reference computes it for any backend.
        return BACKENDS["math"]
    if backend != "auto":
        reason = BACKENDS[backend].limits(call)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
        return BACKENDS[backend]
    for name in auto_order(call):
        if name not in AUTO_DISABLED and BACKENDS[name].limits(call) is None:
            return BACKENDS[name]
    raise AssertionError("the math backend accepts every call")  # pragma: no cover


def run_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Optional[MaskType] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    backend: str = "auto",
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dispatch already-validated grouped inputs to a backend (no weights)."""
    call = make_call(q, k, v, mask, dropout_p, False, softcap, sinks)
    chosen = select_backend(call, backend)
    return run_backend(chosen, call, backend, q, k, v, mask, scale, is_causal, dropout_p, softcap, sinks)


def run_backend(
    chosen: Backend,
    call: AttentionCall,
    requested: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[MaskType],
    scale: Optional[float],
    is_causal: bool,
    dropout_p: float,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run ``chosen`` (from :func:`select_backend`) under the NaN rule of :mod:`gqa_tune.ops.nan_rule`."""
    extra = {} if softcap is None and sinks is None else {"softcap": softcap, "sinks": sinks}

    def run(backend: Backend) -> torch.Tensor:
        k_in, v_in, restore = hide_masked_nans(q, k, v, mask, is_causal, backend.zeroes_nan_query_rows)
        return restore(
            backend.fn(q, k_in, v_in, mask=mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p, **extra)
        )

    return call_guarded(chosen.name, requested, lambda: run(chosen), lambda: run(select_backend(call, "auto")))


def call_guarded(name: str, requested: str, run: Callable, rerun: Callable):
    """Run ``name``'s kernel; under ``"auto"``, a Triton kernel that fails to *build*
    on this machine (e.g. out of shared memory) is dropped from ``"auto"`` with a
    warning and ``rerun`` picks the next backend. An explicit backend, or any other
    error, propagates.
    """
    if requested != "auto" or name != "triton":
        return run()
    try:
        return run()
    except Exception as err:
        if not type(err).__module__.startswith("triton"):
            raise
        warnings.warn(
            f"backend='auto': the Triton kernels failed to build here ({err!r}); using the next backend", stacklevel=2
        )
        AUTO_DISABLED.add(name)
        return rerun()
