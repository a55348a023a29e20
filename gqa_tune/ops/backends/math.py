"""Float32 reference attention (the ``"math"`` backend and the test oracle).

It folds each group's query heads into rows (so K/V are never copied, nor expanded),
upcasts to float32 (float64 stays float64), and returns the attention weights
on request. Fully masked rows give zeros, as torch's SDPA does.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from gqa_tune.ops.masks import MaskType, dense_mask


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Optional[MaskType] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    upcast: bool = True,
    return_weights: bool = False,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    causal_offset: int = 0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain attention with grouped K/V.

    Args:
        q (torch.Tensor): queries ``[b, n_h, s_q, h_d]``.
        k (torch.Tensor): keys ``[b, n_kv, s_kv, h_d]``.
        v (torch.Tensor): values ``[b, n_kv, s_kv, h_dv]``.
        mask: bool (True = attend) or additive float tensor broadcastable to
            ``[b, n_h, s_q, s_kv]``, or a flex ``BlockMask``.
        scale (Optional[float]): multiplier of ``q @ k^T``; default ``h_d ** -0.5``.
        is_causal (bool): causal mask, top-left aligned (torch's convention) unless ``causal_offset``
            places query ``i`` at key position ``i + causal_offset`` (``s_kv - s_q``: bottom-right).
        dropout_p (float): dropout on the attention weights.
        upcast (bool): compute in float32 (float64 stays float64). With
            ``upcast=False`` the computation runs in the input dtype, which is
            the "plain PyTorch in low precision" baseline of the kernel tests.
        return_weights (bool): also return the weights ``[b, n_h, s_q, s_kv]``.
        softcap (Optional[float]): the scaled scores ``s`` become ``softcap * tanh(s / softcap)``
            before masking (Gemma 2's logit soft-capping).
        sinks (Optional[torch.Tensor]): ``[n_h]`` per-head logits, each joining its rows' softmax as an
            extra key with a zero value (gpt-oss style); the weights then sum to less than 1.

    Returns:
        ``(out, weights)``: ``out`` ``[b, n_h, s_q, h_dv]`` in ``q``'s dtype;
        ``weights`` (before dropout) or ``None``.

    Query head ``i`` uses kv head ``i // (n_h // n_kv)``.
    """
    out_dtype = q.dtype
    if upcast and q.dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    b, n_h, s_q, h_d = q.shape
    n_kv, s_kv = k.shape[1], k.shape[2]
    group = n_h // n_kv
    scale = h_d**-0.5 if scale is None else scale
    # The group's query heads fold into rows, so K/V are read per kv head and never copied:
    # [b, n_kv, G * s_q, h_d] @ [b, n_kv, h_d, s_kv] -> [b, n_h, s_q, s_kv] (query head i uses kv head i // G).
    scores = torch.matmul(q.reshape(b, n_kv, group * s_q, h_d), k.transpose(-2, -1)).view(b, n_h, s_q, s_kv)
    scores = scores * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)

    allowed = None
    mask = dense_mask(mask, q.shape[0], q.shape[1], s_q, s_kv, q.device)
    if is_causal:
        allowed = torch.ones(s_q, s_kv, dtype=torch.bool, device=q.device).tril(causal_offset)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask if allowed is None else allowed & mask
        else:
            scores = scores + mask.to(scores.dtype)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))

    if sinks is not None:
        # The sink is one more logit per row whose value is zero: [b, n_h, s_q, s_kv + 1], dropped after the softmax.
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(scores.shape[0], -1, s_q, 1)
        scores = torch.cat([scores, sink], dim=-1)
    if scores.shape[-1] == 0:
        weights = scores  # [b, n_h, s_q, 0]: nothing to attend, so every row gives 0
    else:
        # A row with no finite score attends to nothing: weights 0, not NaN.
        row_max = scores.amax(dim=-1, keepdim=True)
        dead = torch.isneginf(row_max)
        scores = scores - torch.where(dead, torch.zeros_like(row_max), row_max)
        weights = torch.exp(scores)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        weights = torch.where(dead, torch.zeros_like(weights), weights)
    if sinks is not None:
        weights = weights[..., :s_kv]

    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    out = torch.matmul(dropped.reshape(b, n_kv, group * s_q, s_kv), v)  # [b, n_kv, G * s_q, h_dv]
    out = out.view(b, n_h, s_q, v.shape[-1]).to(out_dtype)
    return out, (weights.to(out_dtype) if return_weights else None)


def math_backend(q, k, v, *, mask, scale, is_causal, dropout_p, softcap=None, sinks=None, causal_offset=0):
    """The ``"math"`` backend: :func:`attention_ref` without weights."""
    return attention_ref(
        q, k, v, mask=mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p, softcap=softcap, sinks=sinks,
        causal_offset=causal_offset,
    )[0]  # fmt: skip


def math_weights(q, k, v, *, mask, scale, is_causal, dropout_p, softcap=None, sinks=None, causal_offset=0):
    """:func:`math_backend` with the attention weights: ``(out, weights)``."""
    return attention_ref(
        q, k, v, mask=mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p, softcap=softcap, sinks=sinks,
        causal_offset=causal_offset, return_weights=True,
    )  # fmt: skip
