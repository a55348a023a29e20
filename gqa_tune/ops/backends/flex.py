"""The ``"flex"`` backend: compiled ``flex_attention`` with ``enable_gqa=True``.

``flex_attention`` is compiled the first time it is used (never at import)
and the compiled callable is reused. Causal masks become cached
``BlockMask``s. Limits, all reported by :func:`flex_limits`: no dropout, no
attention weights, no dense tensor masks (pass a ``BlockMask``), and on CPU
no backward and no float64 (torch's CPU flex kernel has neither).
"""

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _top_left_causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=32)
def _causal_block_mask(s_q: int, s_kv: int, device: str) -> BlockMask:
    return create_block_mask(_top_left_causal_mod, None, None, s_q, s_kv, device=device)


@torch.compiler.disable(recursive=False)
def flex_backend(q, k, v, *, mask, scale, is_causal, dropout_p):
    block_mask = mask
    if is_causal:
        block_mask = _causal_block_mask(q.shape[2], k.shape[2], str(q.device))
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def flex_limits(call) -> "str | None":
    """Why ``"flex"`` cannot serve ``call``, or ``None``."""
    if call.need_weights:
        return "it cannot return attention weights (use backend='math')"
    if call.dropout_p > 0.0:
        return f"it has no dropout (dropout_p={call.dropout_p})"
    if isinstance(call.mask, torch.Tensor):
        return "it takes a BlockMask, not a dense tensor mask"
    if call.device.type == "cpu":
        if call.needs_grad:
            return "torch's flex_attention has no backward on CPU"
        if call.dtype == torch.float64:
            return "torch's CPU flex_attention does not support float64"
    return None
