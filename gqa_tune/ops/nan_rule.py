"""The one NaN rule every attention backend is held to.

A non-finite value (NaN, ``inf`` or ``-inf``) reaches exactly the output rows that attend to it:

* a non-finite value in a query row makes that row NaN (torch's SDPA and flex zero a
  NaN row when there is no mask; here it stays NaN, as plain arithmetic gives);
* a non-finite value in a key or value that a query may attend to makes that query's
  row NaN (plain arithmetic gives NaN for an infinite key, and ``inf`` or NaN in some
  columns for an infinite value: the rule makes the whole row NaN, on every backend);
* a key or value hidden from a query (by a bool mask, a ``-inf`` entry of a
  float mask, or the causal mask) never reaches its row, finite or not (torch's
  SDPA leaks a hidden NaN or ``inf`` key through the scores, and every backend
  leaks a hidden NaN or ``inf`` value through ``0 * NaN`` and ``0 * inf``, which
  made the whole head NaN).

A fully masked row still gives 0. With a flex ``BlockMask`` the hidden blocks
are never read; within its partial blocks flex's own masking applies.

:func:`hide_masked_nans` enforces this around any backend: it zeroes non-finite
keys/values before the call and sets to NaN the rows that could see one.
The cost is a few elementwise passes over ``q``/``k``/``v`` (``O(s h_d)``) plus,
with a dense mask, one pass over the mask (``O(s_q s_kv)``), with no host sync. On
CPU, in eager mode, K/V are first looked at (a host read is free there) and
the work is skipped when they hold only finite values, which is the usual case.
"""

from typing import Callable, Optional, Tuple

import torch
from torch.nn.attention.flex_attention import BlockMask

from gqa_tune.ops.masks import MaskType
from gqa_tune.ops.tracing import may_read_host

Restore = Callable[[torch.Tensor], torch.Tensor]


def _propagate_query_nans(q: torch.Tensor) -> Restore:
    poison = q.sum(-1, keepdim=True) * 0.0  # [b, n_h, s_q, 1]: NaN where a query row holds a NaN or inf

    def restore(out: torch.Tensor) -> torch.Tensor:
        return out + poison.to(out.dtype)

    return restore


def _rows_seeing(
    nan_keys: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool, n_h: int, s_q: int, offset: int = 0
) -> torch.Tensor:
    """Bool ``[b, n_h, s_q, 1]``: rows that may attend to a key flagged in ``nan_keys`` ``[b, n_kv, s_kv]``."""
    group = n_h // nan_keys.shape[1]
    flagged = nan_keys.repeat_interleave(group, dim=1) if group > 1 else nan_keys  # [b, n_h, s_kv]
    s_kv = flagged.shape[-1]
    if mask is None:
        # Causal: row i sees keys 0..i + offset, so it sees a NaN once one stands at or before i + offset.
        seen = flagged.cumsum(-1) > 0
        last = torch.arange(s_q, device=seen.device) + offset
        rows = last.clamp(min=0, max=s_kv - 1)
        return (seen[..., rows] & (last >= 0)).unsqueeze(-1)
    visible = mask if mask.dtype == torch.bool else mask != float("-inf")
    if is_causal:
        visible = visible & torch.ones(s_q, s_kv, dtype=torch.bool, device=mask.device).tril(offset)
    return (visible & flagged[:, :, None, :]).any(-1, keepdim=True)


def _surely_no_nans(*tensors: Optional[torch.Tensor]) -> bool:
    """On CPU, eagerly: look (one pass over each tensor, a host read that costs nothing there) so the
    rule's work is skipped when every value is finite, the usual case. On an accelerator or under
    ``torch.compile`` a host read would stall the device or break the graph: there the sync-free
    path always runs."""
    present = [t for t in tensors if t is not None]
    if not present or not may_read_host(present[0]):
        return False
    with torch.no_grad():
        # A NaN or an infinity anywhere makes the sum non-finite (so does a sum that overflows: a false
        # alarm only costs the full path). One reduction per tensor, far cheaper than isfinite().all().
        return all(bool(torch.isfinite(t.sum())) for t in present)


def _keep(out: torch.Tensor) -> torch.Tensor:
    return out


def hide_masked_nans(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[MaskType],
    is_causal: bool,
    fix_query_rows: bool = True,
    causal_offset: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, Restore]:
    """``(k, v, restore)``: K/V with hidden non-finite values made harmless, and the function to apply to the
    output.

    Args:
        q (torch.Tensor): ``[b, n_h, s_q, h_d]``.
        k, v (torch.Tensor): ``[b, n_kv, s_kv, h_d]`` / ``[b, n_kv, s_kv, h_dv]``.
        mask: ``None``, a bool or float tensor broadcastable to ``[b, n_h, s_q, s_kv]``, or a ``BlockMask``.
        is_causal (bool): causal masking, query ``i`` at key position ``i + causal_offset``.
        fix_query_rows (bool): whether the backend may zero a NaN query row (torch's SDPA and flex do;
            a plain softmax, as in the math and Triton backends, keeps it NaN by itself).
    """
    hidden = not (isinstance(mask, BlockMask) or (mask is None and not is_causal) or k.shape[2] == 0)
    if not (hidden or fix_query_rows):
        return k, v, _keep
    if _surely_no_nans(q if fix_query_rows else None, *((k, v) if hidden else ())):
        return k, v, _keep
    restore_q = _propagate_query_nans(q) if fix_query_rows else _keep
    if not hidden:
        return k, v, restore_q  # no key is hidden (or flex reads only the blocks it keeps)
    k_bad, v_bad = ~torch.isfinite(k), ~torch.isfinite(v)
    nan_keys = k_bad.any(-1) | v_bad.any(-1)  # [b, n_kv, s_kv]: keys holding a NaN or an infinity
    k = torch.where(k_bad, 0.0, k)
    v = torch.where(v_bad, 0.0, v)
    sees = _rows_seeing(nan_keys, mask, is_causal, q.shape[1], q.shape[2], causal_offset)

    def restore(out: torch.Tensor) -> torch.Tensor:
        return restore_q(torch.where(sees, float("nan"), out))

    return k, v, restore
