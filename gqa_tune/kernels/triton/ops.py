"""The Triton kernels as ``torch.library`` custom ops, with autograd.

Registered ops (``torch.compile`` traces around them as opaque calls):

- ``gqa_tune::flash_attn(q, k, v, mask, scale, causal, causal_offset) -> (out, lse)``
- ``gqa_tune::flash_attn_backward(do, q, k, v, out, lse, mask, scale, causal, causal_offset) -> (dq, dk, dv)``
- ``gqa_tune::flash_decode(q, k_cache, v_cache, cache_seqlens, mask, scale, causal, max_seqlen) -> out``

Importing this module imports Triton; :mod:`gqa_tune.ops.backends.triton`
does so only when the Triton backend is first used.
"""

from typing import Optional, Tuple

import torch

from gqa_tune.kernels.triton.flash_attn import flash_attn_backward, flash_attn_forward
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    return flash_attn_forward(q, k, v, mask, scale, causal, causal_offset)


@flash_attn.register_fake
def _(q, k, v, mask, scale, causal, causal_offset):
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attn_backward(do, q, k, v, out, lse, mask, scale, causal, causal_offset)


@flash_attn_bwd.register_fake
def _(do, q, k, v, out, lse, mask, scale, causal, causal_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, causal, causal_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.scale, ctx.causal, ctx.causal_offset = scale, causal, causal_offset


def _backward(ctx, do, dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, out, lse, mask, ctx.scale, ctx.causal, ctx.causal_offset)
    return dq, dk, dv, None, None, None, None


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
) -> torch.Tensor:
    return flash_decode_triton(q, k_cache, v_cache, cache_seqlens, mask, scale, causal, max_seqlen)


@flash_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, mask, scale, causal, max_seqlen):
    return torch.empty_like(q)
