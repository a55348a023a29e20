"""Mask helpers shared by the backends and the attention module.

Conventions (torch's): a bool mask is True where a query may attend; a float
mask is added to the scores. ``is_causal`` in the functional op is top-left
aligned (``ones(s_q, s_kv).tril()``), as in ``F.scaled_dot_product_attention``.
The module's KV-cache path places the queries at the end of the keys
(bottom-right alignment), which is what decoding a chunk needs.
"""

from typing import Optional, Union

import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

MaskType = Union[torch.Tensor, BlockMask]


def top_left_causal(s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """Bool ``[s_q, s_kv]``: query ``i`` sees keys ``0..i``."""
    return torch.ones(s_q, s_kv, dtype=torch.bool, device=device).tril()


def bottom_right_causal(s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """Bool ``[s_q, s_kv]``: query ``i`` sits at key position ``s_kv - s_q + i``."""
    return torch.ones(s_q, s_kv, dtype=torch.bool, device=device).tril(diagonal=s_kv - s_q)


def block_mask_to_dense(block_mask: BlockMask, s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """Materialize a ``BlockMask`` as a bool ``[B, H, s_q, s_kv]`` tensor.

    The element-level mask is ``mask_mod`` evaluated everywhere, restricted to
    the blocks the ``BlockMask`` keeps (blocks it drops are never attended).
    """
    batch, heads = block_mask.shape[0], block_mask.shape[1]
    dense = create_mask(block_mask.mask_mod, batch, heads, s_q, s_kv, device=device)
    q_block, kv_block = block_mask.BLOCK_SIZE
    kept = block_mask.to_dense().to(device).bool()  # [B, H, n_q_blocks, n_kv_blocks]
    kept = kept.repeat_interleave(q_block, dim=2)[:, :, :s_q]
    kept = kept.repeat_interleave(kv_block, dim=3)[:, :, :, :s_kv]
    return dense & kept


def dense_mask(
    mask: Optional[MaskType], b: int, h: int, s_q: int, s_kv: int, device: torch.device
) -> Optional[torch.Tensor]:
    """A tensor mask as it is; a ``BlockMask`` materialized (see above)."""
    if isinstance(mask, BlockMask):
        return block_mask_to_dense(mask, s_q, s_kv, device)
    return mask
