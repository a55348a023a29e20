"""The ``"sdpa"`` backend: ``F.scaled_dot_product_attention`` with ``enable_gqa``.

K/V stay at ``n_kv`` heads. For a single query position (decoding) the group
of query heads that share a kv head is folded into the query rows, so the
call is one ``[b, n_kv, G, h_d] x [b, n_kv, s_kv, h_d]`` attention: each kv
head is read once for its whole group, whatever kernel torch picks.
"""

import torch.nn.functional as F

from gqa_tune.ops.masks import dense_mask


def sdpa_backend(q, k, v, *, mask, scale, is_causal, dropout_p):
    b, n_h, s_q, _ = q.shape
    n_kv, s_kv = k.shape[1], k.shape[2]
    group = n_h // n_kv
    mask = dense_mask(mask, b, n_h, s_q, s_kv, q.device)
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
    return None
