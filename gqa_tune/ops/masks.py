"""Mask helpers shared by the backends and the attention module.

Conventions (torch's): a bool mask is True where a query may attend; a float
mask is added to the scores. ``is_causal`` in the functional op is top-left
aligned (``ones(s_q, s_kv).tril()``), as in ``F.scaled_dot_product_attention``.
The module's KV-cache path places the queries at the end of the keys
(bottom-right alignment), which is what decoding a chunk needs.
"""

import weakref
from typing import Optional, Union

import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

MaskType = Union[torch.Tensor, BlockMask]

# The packed documents a block-causal BlockMask keeps apart, per mask (while it lives).
_DOCUMENTS: "weakref.WeakKeyDictionary[BlockMask, torch.Tensor]" = weakref.WeakKeyDictionary()


def with_documents(block_mask: BlockMask, document_ids: torch.Tensor) -> BlockMask:
    """Record that ``block_mask`` is block-causal over the packed documents ``document_ids`` ``[b, s]``, so
    that a call given it can say so in its ``AttentionSpec`` (:func:`documents_of`). Returns ``block_mask``."""
    _DOCUMENTS[block_mask] = document_ids
    return block_mask


def documents_of(mask: Optional[MaskType]) -> Optional[torch.Tensor]:
    """The document ids :func:`with_documents` recorded for ``mask``, else ``None``."""
    return _DOCUMENTS.get(mask) if isinstance(mask, BlockMask) else None


def top_left_causal(s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """Bool ``[s_q, s_kv]``: query ``i`` sees keys ``0..i``."""
    return torch.ones(s_q, s_kv, dtype=torch.bool, device=device).tril()


def _expand_blocks(blocks: torch.Tensor, block_size: tuple, s_q: int, s_kv: int) -> torch.Tensor:
    """Block-level ``[B, H, n_q_blocks, n_kv_blocks]`` -> element-level ``[B, H, s_q, s_kv]``."""
    blocks = blocks.bool().repeat_interleave(block_size[0], dim=2)[:, :, :s_q]
    return blocks.repeat_interleave(block_size[1], dim=3)[:, :, :, :s_kv]


def block_mask_to_dense(block_mask: BlockMask, s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """Materialize a ``BlockMask`` as a bool ``[B, H, s_q, s_kv]`` tensor, as flex reads it.

    Full blocks are attended entirely, partial blocks where ``mask_mod`` says
    so, and blocks the ``BlockMask`` leaves out never.
    """
    batch, heads = block_mask.shape[0], block_mask.shape[1]
    size = tuple(block_mask.BLOCK_SIZE)
    partial_blocks = BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks, block_mask.kv_indices, BLOCK_SIZE=size, seq_lengths=(s_q, s_kv)
    ).to_dense()
    full_blocks = block_mask.to_dense().bool() & ~partial_blocks.bool()
    mod = create_mask(block_mask.mask_mod, batch, heads, s_q, s_kv, device=device)
    partial = _expand_blocks(partial_blocks.to(device), size, s_q, s_kv)
    return _expand_blocks(full_blocks.to(device), size, s_q, s_kv) | (partial & mod)


def dense_mask(
    mask: Optional[MaskType], b: int, h: int, s_q: int, s_kv: int, device: torch.device
) -> Optional[torch.Tensor]:
    """A tensor mask as it is; a ``BlockMask`` materialized (see above)."""
    if isinstance(mask, BlockMask):
        return block_mask_to_dense(mask, s_q, s_kv, device)
    return mask
