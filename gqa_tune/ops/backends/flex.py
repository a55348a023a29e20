"""The ``"flex"`` backend: compiled ``flex_attention`` with ``enable_gqa=True``.

``flex_attention`` is compiled the first time it is used (never at import)
and the compiled callable is reused. It is compiled with automatic dynamic
shapes, so a decode loop whose key length grows every step compiles once or
twice, not once per length (``dynamic=False`` recompiled every step and fell
back to eager flex after 8). Causal masks become cached ``BlockMask``s; a
dense bool mask becomes a ``BlockMask`` whose ``mask_mod`` reads it, and an
additive float mask a ``score_mod`` that adds it. Limits, all reported by
:func:`flex_limits`: no dropout, no attention weights, and on CPU no backward
and no float64 (torch's CPU flex kernel has neither).
"""

import functools
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=None)


@functools.cache
def _static_flex():
    return torch.compile(flex_attention, dynamic=False)


def _inductor_failed(err: Exception) -> bool:
    return type(err).__module__.startswith(("torch._inductor", "torch._dynamo")) and "Inductor" in repr(err)


def _run_flex(*args, **kwargs):
    """Compiled flex; where inductor fails to build the dynamic-shape kernel for a call (torch's CPU flex
    template emits C++ that does not compile for some size-1 shapes), the same call compiled for its static
    shapes, with a warning, rather than an error no user input caused."""
    try:
        return _compiled_flex()(*args, **kwargs)
    except Exception as err:  # only inductor's own build failures are retried
        if not _inductor_failed(err):
            raise
        warnings.warn(f"flex_attention's dynamic-shape kernel failed to build ({type(err).__name__}); "
                      "compiling this call for its static shapes", stacklevel=3)  # fmt: skip
        return _static_flex()(*args, **kwargs)


def _top_left_causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=32)
def _causal_block_mask(s_q: int, s_kv: int, device: str) -> BlockMask:
    return create_block_mask(_top_left_causal_mod, None, None, s_q, s_kv, device=device)


def _indexer(mask: torch.Tensor, s_q: int, s_kv: int) -> Tuple[Callable, Optional[int], Optional[int]]:
    """``(read(b, h, q_idx, kv_idx), B, H)`` for a mask broadcastable to ``[b, n_h, s_q, s_kv]``."""
    batch = mask.shape[0] if mask.shape[0] > 1 else None
    heads = mask.shape[1] if mask.shape[1] > 1 else None
    full = mask.expand(mask.shape[0], mask.shape[1], s_q, s_kv)

    def read(b, h, q_idx, kv_idx):
        return full[b if batch else 0, h if heads else 0, q_idx, kv_idx]

    return read, batch, heads


def _from_dense(mask: torch.Tensor, s_q: int, s_kv: int) -> Tuple[Optional[BlockMask], Optional[Callable]]:
    """``(block_mask, score_mod)`` for a 4-D dense mask (bool: which keys; float: added to the scores)."""
    read, batch, heads = _indexer(mask, s_q, s_kv)
    if mask.dtype == torch.bool:

        def mask_mod(b, h, q_idx, kv_idx):
            return read(b, h, q_idx, kv_idx)

        return create_block_mask(mask_mod, batch, heads, s_q, s_kv, device=str(mask.device)), None

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + read(b, h, q_idx, kv_idx)

    return None, score_mod


def _with_softcap(score_mod: Optional[Callable], softcap: float, device: torch.device) -> Callable:
    # A captured tensor, not a Python float: compiled flex turns a float into a graph input that it cannot lower.
    cap = torch.tensor(softcap, dtype=torch.float32, device=device)

    def capped(score, b, h, q_idx, kv_idx):
        score = cap * torch.tanh(score / cap)
        return score if score_mod is None else score_mod(score, b, h, q_idx, kv_idx)

    return capped


@torch.compiler.disable(recursive=False)
def flex_backend(q, k, v, *, mask, scale, is_causal, dropout_p, softcap=None, sinks=None):
    s_q, s_kv = q.shape[2], k.shape[2]
    block_mask, score_mod = mask, None
    if isinstance(mask, torch.Tensor):
        block_mask, score_mod = _from_dense(mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape)), s_q, s_kv)
    if is_causal:
        block_mask = _causal_block_mask(s_q, s_kv, str(q.device))
    if softcap is not None:
        score_mod = _with_softcap(score_mod, softcap, q.device)  # on the scaled scores, before the mask
    result = _run_flex(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        return_lse=sinks is not None,
    )
    out = result
    if sinks is not None:
        # softmax over the keys and a zero-valued sink = (softmax over the keys) * Z / (Z + e^sink).
        out, lse = result  # lse [b, n_h, s_q], natural log; -inf for a row that sees no key
        keep = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
        out = out * keep.unsqueeze(-1).to(out.dtype)
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        # A row whose float mask is -inf everywhere: flex gives NaN, the rule is 0.
        dead = torch.isneginf(mask).all(-1, keepdim=True)
        out = torch.where(dead, 0.0, out)
    return out


def flex_limits(call) -> "str | None":
    """Why ``"flex"`` cannot serve ``call``, or ``None``."""
    if call.need_weights:
        return "it cannot return attention weights (use backend='math')"
    if call.dropout_p > 0.0:
        return f"it has no dropout (dropout_p={call.dropout_p})"
    if call.device.type == "cpu":
        if call.needs_grad:
            return "torch's flex_attention has no backward on CPU"
        if call.dtype == torch.float64:
            return "torch's CPU flex_attention does not support float64"
        if call.sinks:
            return "torch's compiled CPU flex_attention cannot return the log-sum-exp that sinks need"
    return None
