"""Packed batches: several documents per row, attending only within themselves, positions restarting.

torchtune's ``PackedDataset`` concatenates examples into rows of ``max_seq_len`` tokens and records
each row's ``seq_lens`` (the padding at the end counts as one more sequence). torchtune's own
``padded_collate_packed`` then builds, on a CPU, a dense ``[b, s, s]`` block-causal mask: memory and
attention work grow with ``s ** 2``. :func:`packed_collate` builds a flex ``BlockMask`` straight from
the document lengths instead, tile by tile (never an ``s x s`` tensor), which the attention reads
natively: compiled flex on a GPU, the block-sparse path on a CPU (:mod:`gqa_tune.ops.backends.blocks`).

:func:`packed_labels` shifts labels for next-token prediction without letting a document's last token
predict the next document's first one, so a packed batch has exactly the loss of its documents unpacked.
"""

import math
from typing import Dict, List, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from gqa_tune.ops.masks import with_documents

BLOCK = 128


def document_ids(seq_lens: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """``[b, length]``: the index of the document each position belongs to.

    Raises:
        ValueError: a row whose lengths do not add up to ``length``, or a negative length.
    """
    rows = []
    for i, lens in enumerate(seq_lens):
        lens = torch.as_tensor(lens, dtype=torch.long).flatten()
        if (lens < 0).any() or int(lens.sum()) != length:
            raise ValueError(f"seq_lens of row {i} must be non-negative and add up to {length}, got {lens.tolist()}")
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), lens))
    return torch.stack(rows)


def _sorted_blocks(keep: torch.Tensor):
    """``(count [b, n], indices [b, n, n])``: each query block's kept key blocks first, in order."""
    order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return keep.sum(-1).to(torch.int32), order.to(torch.int32)


def document_block_mask(seq_lens: Sequence[torch.Tensor], length: int, block: int = BLOCK) -> BlockMask:
    """The block-causal ``BlockMask`` of packed rows: query ``i`` sees key ``j <= i`` of its own document.

    Built from each block's first and last document (documents are contiguous), so it costs
    ``O(b * (length / block) ** 2)``: a tile whose keys and queries all lie in one document, strictly
    below the diagonal, is full; one that shares a document otherwise is partial (the ``mask_mod``
    decides there); the rest are never read.
    """
    ids = document_ids(seq_lens, length)  # [b, s]
    n = math.ceil(length / block)
    starts = torch.arange(n) * block
    ends = torch.clamp(starts + block, max=length) - 1
    first, last = ids[:, starts], ids[:, ends]  # [b, n]: documents at each block's first and last position
    q_first, q_last = first[:, :, None], last[:, :, None]
    k_first, k_last = first[:, None, :], last[:, None, :]
    below = torch.ones(n, n, dtype=torch.bool).tril(-1)
    diagonal = torch.eye(n, dtype=torch.bool)
    shares = k_last >= q_first  # key block j <= query block i shares a document with it
    whole = (starts + block <= length).view(1, -1)  # tiles that do not hang past the end
    full = below & (q_first == q_last) & (k_first == k_last) & (k_first == q_first) & whole[:, :, None] & whole
    partial = ((below & shares) | diagonal) & ~full
    kv_num, kv_idx = _sorted_blocks(partial)
    full_num, full_idx = _sorted_blocks(full)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

    block_mask = BlockMask.from_kv_blocks(
        kv_num[:, None], kv_idx[:, None], full_num[:, None], full_idx[:, None],
        BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(length, length),
    )  # fmt: skip
    return with_documents(block_mask, ids)  # on a CPU, attention then runs each document on its own


def packed_labels(labels: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Next-token labels of packed rows: position ``t`` predicts ``t + 1`` unless ``t + 1`` starts a document
    (its position is 0), and the last position predicts nothing."""
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)], dim=1)
    starts = torch.cat([input_pos[:, 1:] == 0, torch.ones_like(input_pos[:, :1], dtype=torch.bool)], dim=1)
    return shifted.masked_fill(starts, CROSS_ENTROPY_IGNORE_IDX)


def packed_collate(batch: List[Dict[str, torch.Tensor]]) -> Dict[str, object]:
    """Stack ``PackedDataset`` rows: ``tokens``, ``labels``, ``input_pos`` ``[b, s]`` and ``mask``, the
    rows' :func:`document_block_mask` (what torchtune's ``padded_collate_packed`` returns, with a
    ``BlockMask`` in place of its dense CPU mask).

    Raises:
        ValueError: an empty batch.
    """
    if len(batch) == 0:
        raise ValueError("packed_collate needs at least one packed row, got an empty batch")
    tokens = torch.stack([row["tokens"] for row in batch])
    return {
        "tokens": tokens,
        "labels": torch.stack([row["labels"] for row in batch]),
        "input_pos": torch.stack([row["input_pos"] for row in batch]),
        "mask": document_block_mask([row["seq_lens"] for row in batch], tokens.shape[1]),
    }


def packing_stats(rows: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """``rows``, ``documents_per_row`` and ``padding_fraction`` of ``PackedDataset`` rows.

    A document starts where ``input_pos`` is 0; torchtune's padding continues the last document's positions and
    is recorded as one more entry of ``seq_lens``, past the documents'.
    """
    documents = padding = total = 0
    for row in rows:
        starts = int((row["input_pos"] == 0).sum())
        lens = torch.as_tensor(row["seq_lens"]).flatten()
        documents += starts
        padding += int(lens[starts:].sum())
        total += int(lens.sum())
    count = len(rows)
    return {
        "rows": count,
        "documents_per_row": documents / count if count else 0.0,
        "padding_fraction": padding / total if total else 0.0,
    }
