"""The Triton kernels as ``torch.library`` custom ops, with autograd.

Registered ops (``torch.compile`` traces around them as opaque calls):

- ``gqa_tune::flash_attn(q, k, v, mask, scale, causal, causal_offset, window, softcap, sinks) -> (out, lse)``
- ``gqa_tune::flash_attn_backward(do, q, k, v, out, lse, mask, scale, causal, causal_offset, window, softcap)
  -> (dq, dk, dv)``
- ``gqa_tune::flash_decode(q, k_cache, v_cache, cache_seqlens, mask, scale, causal, max_seqlen, window, softcap,
  sinks, k_scale, v_scale) -> out`` (int8 caches with their per-position scales, or float caches)

Importing this module imports Triton; :mod:`gqa_tune.ops.backends.triton`
does so only when the Triton backend is first used.
"""

from typing import Optional, Tuple

import torch

from gqa_tune.kernels.triton.flash_attn import LOG2E, flash_attn_backward, flash_attn_forward
from gqa_tune.kernels.triton.flash_decode import flash_decode_triton


@torch.library.custom_op("gqa_tune::flash_attn", mutates_args=())
def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    causal_offset: int,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return flash_attn_forward(q, k, v, mask, scale, causal, causal_offset, window, softcap, sinks)


@flash_attn.register_fake
def _(q, k, v, mask, scale, causal, causal_offset, window=0, softcap=0.0, sinks=None):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("gqa_tune::flash_attn_backward", mutates_args=())
def flash_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    causal_offset: int,
    window: int = 0,
    softcap: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attn_backward(do, q, k, v, out, lse, mask, scale, causal, causal_offset, window, softcap)


@flash_attn_bwd.register_fake
def _(do, q, k, v, out, lse, mask, scale, causal, causal_offset, window=0, softcap=0.0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, causal, causal_offset, window, softcap, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, sinks)
    ctx.scale, ctx.causal, ctx.causal_offset, ctx.window, ctx.softcap = scale, causal, causal_offset, window, softcap


def _backward(ctx, do, dlse):
    q, k, v, out, lse, mask, sinks = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(
        do, q, k, v, out, lse, mask, ctx.scale, ctx.causal, ctx.causal_offset, ctx.window, ctx.softcap
    )
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[9]:
        # d loss / d sink_h = -sum over rows of p_sink * (dO . O): the sink's value is zero.
        p_sink = torch.exp2(sinks.float().view(1, -1, 1) * LOG2E - lse)  # [b, n_h, s_q]
        delta = (do.float() * out.float()).sum(-1)
        dsinks = -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
    return dq, dk, dv, None, None, None, None, None, None, dsinks


flash_attn.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("gqa_tune::flash_decode", mutates_args=())
def flash_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    max_seqlen: int,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return flash_decode_triton(
        q, k_cache, v_cache, cache_seqlens, mask, scale, causal, max_seqlen, window, softcap, sinks, k_scale, v_scale
    )


@flash_decode.register_fake
def _(
    q, k_cache, v_cache, cache_seqlens, mask, scale, causal, max_seqlen, window=0, softcap=0.0, sinks=None,
    k_scale=None, v_scale=None,
):  # fmt: skip
    return torch.empty_like(q)
