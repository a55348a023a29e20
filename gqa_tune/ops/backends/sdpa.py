"""The ``"sdpa"`` backend: ``F.scaled_dot_product_attention`` with ``enable_gqa``. A ``BlockMask`` is made dense
(``"auto"`` gives one to ``"flex"`` or ``"blocks"`` first).

K/V stay at ``n_kv`` heads. For a single query position (decoding) the group
of query heads that share a kv head is folded into the query rows, so the
call is one ``[b, n_kv, G, h_d] x [b, n_kv, s_kv, h_d]`` attention: each kv
head is read once for its whole group, whatever kernel torch picks.
"""

import torch
import torch.nn.functional as F

from gqa_tune.ops.masks import dense_mask, top_left_causal


def _with_sink_key(q, k, v, mask, is_causal, sinks):
    """Sinks as one more key: a zero key (score 0) whose additive mask entry is the head's sink logit, and a
    zero value. Returns ``(k, v, mask)`` with ``s_kv + 1`` keys and a float ``[1 or b, n_h, s_q, s_kv + 1]`` mask."""
    b, n_h, s_q, _ = q.shape
    s_kv = k.shape[2]
    zeros = k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])
    k = torch.cat([k, zeros], dim=2)
    v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], 1, v.shape[3])], dim=2)
    if mask is None:
        additive = q.new_zeros(1, 1, s_q, s_kv)
    elif mask.dtype == torch.bool:
        additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    else:
        additive = mask.to(q.dtype)
    if is_causal:
        additive = additive.masked_fill(~top_left_causal(s_q, s_kv, q.device), float("-inf"))
    additive = additive.view((1,) * (4 - additive.dim()) + tuple(additive.shape))
    additive = additive.expand(additive.shape[0], n_h, s_q, s_kv)
    sink = sinks.to(q.dtype).view(1, n_h, 1, 1).expand(additive.shape[0], n_h, s_q, 1)
    return k, v, torch.cat([additive, sink], dim=-1)


def sdpa_backend(q, k, v, *, mask, scale, is_causal, dropout_p, softcap=None, sinks=None):
    b, n_h, s_q, _ = q.shape
    n_kv, s_kv = k.shape[1], k.shape[2]
    group = n_h // n_kv
    mask = dense_mask(mask, b, n_h, s_q, s_kv, q.device)
    if sinks is not None:
        k, v, mask = _with_sink_key(q, k, v, mask, is_causal, sinks)
        is_causal = False
    head_free_mask = mask is None or mask.dim() < 3 or mask.shape[-3] == 1
    if group > 1 and s_q == 1 and not is_causal and dropout_p == 0.0 and head_free_mask:
        # [b, n_h, 1, h_d] -> [b, n_kv, G, h_d]: rows are independent, so this is exact.
        folded = q.reshape(b, n_kv, group, q.shape[-1])
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, n_h, 1, v.shape[-1])
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=group > 1,
    )


def sdpa_limits(call) -> "str | None":
    """Why ``"sdpa"`` cannot serve ``call``, or ``None``."""
    if call.need_weights:
        return "it cannot return attention weights (use backend='math')"
    if call.softcap is not None:
        return "torch's SDPA has no logit soft-capping (softcap)"
    return None
