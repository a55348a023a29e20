"""Mask helpers: causal alignments and ``BlockMask`` materialization."""

import pytest
import torch
from helpers import causal_mod as _causal
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

from gqa_tune.ops.masks import block_mask_to_dense, dense_mask, top_left_causal


def _noop(b, h, q_idx, kv_idx):
    return q_idx >= 0


def _bool(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------- causal alignments


def test_top_left_causal_examples():
    assert torch.equal(top_left_causal(2, 4, "cpu"), _bool([[1, 0, 0, 0], [1, 1, 0, 0]]))
    assert torch.equal(top_left_causal(1, 3, "cpu"), _bool([[1, 0, 0]]))  # a single query sees key 0
    assert torch.equal(top_left_causal(3, 2, "cpu"), _bool([[1, 0], [1, 1], [1, 1]]))


@pytest.mark.parametrize("s", [1, 4, 9])
def test_top_left_is_tril_for_square_masks(s):
    expected = torch.ones(s, s, dtype=torch.bool).tril()
    assert torch.equal(top_left_causal(s, s, "cpu"), expected)


# ---------------------------------------------------------------- BlockMask -> dense


@pytest.mark.parametrize("s_q,s_kv", [(5, 7), (200, 200), (130, 260)])
def test_block_mask_to_dense_matches_create_mask(s_q, s_kv):
    block_mask = create_block_mask(_causal, None, None, s_q, s_kv, device="cpu")
    dense = block_mask_to_dense(block_mask, s_q, s_kv, "cpu")
    assert dense.dtype == torch.bool and dense.shape == (1, 1, s_q, s_kv)
    assert torch.equal(dense, create_mask(_causal, 1, 1, s_q, s_kv, device="cpu"))
    assert torch.equal(dense[0, 0], top_left_causal(s_q, s_kv, "cpu"))


def test_block_mask_to_dense_keeps_batch_and_heads():
    docs = torch.tensor([[0] * 100 + [1] * 60, [0] * 30 + [1] * 130])

    def same_document_causal(b, h, q_idx, kv_idx):
        return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx) & (h <= 1)

    block_mask = create_block_mask(same_document_causal, 2, 3, 160, 160, device="cpu")
    dense = block_mask_to_dense(block_mask, 160, 160, "cpu")
    assert dense.shape == (2, 3, 160, 160)
    assert torch.equal(dense, create_mask(same_document_causal, 2, 3, 160, 160, device="cpu"))
    assert not dense[:, 2].any() and dense[0, 0, 99, 0] and not dense[0, 0, 100, 99]


def test_block_mask_to_dense_drops_blocks_the_block_mask_drops():
    # 16 x 24 with 8 x 8 blocks; query block 0 keeps kv block 0 only, query block 1 keeps kv blocks 2 and 0.
    block_mask = BlockMask.from_kv_blocks(
        torch.tensor([[[1, 2]]], dtype=torch.int32),
        torch.tensor([[[[0, 0, 0], [2, 0, 0]]]], dtype=torch.int32),
        BLOCK_SIZE=8,
        mask_mod=_noop,
        seq_lengths=(16, 24),
    )
    expected = torch.zeros(16, 24, dtype=torch.bool)
    expected[:8, :8] = True
    expected[8:, :8] = True
    expected[8:, 16:] = True
    assert torch.equal(block_mask_to_dense(block_mask, 16, 24, "cpu"), expected.view(1, 1, 16, 24))


def test_block_mask_to_dense_applies_mask_mod_inside_kept_blocks():
    # Kept blocks: (0, 0) and (1, 1) on the diagonal; the mask_mod is causal inside them, (1, 0) is dropped.
    block_mask = BlockMask.from_kv_blocks(
        torch.tensor([[[1, 1]]], dtype=torch.int32),
        torch.tensor([[[[0, 0], [1, 0]]]], dtype=torch.int32),
        BLOCK_SIZE=8,
        mask_mod=_causal,
        seq_lengths=(16, 16),
    )
    expected = torch.ones(16, 16, dtype=torch.bool).tril()
    expected[8:, :8] = False
    assert torch.equal(block_mask_to_dense(block_mask, 16, 16, "cpu"), expected.view(1, 1, 16, 16))


def test_block_mask_to_dense_full_blocks_are_fully_attended():
    # flex_attention never calls mask_mod in a BlockMask's full blocks: they are attended entirely.
    block_mask = BlockMask.from_kv_blocks(
        torch.tensor([[[0, 1]]], dtype=torch.int32),
        torch.tensor([[[[0, 0], [1, 0]]]], dtype=torch.int32),
        full_kv_num_blocks=torch.tensor([[[1, 1]]], dtype=torch.int32),
        full_kv_indices=torch.tensor([[[[0, 0], [0, 0]]]], dtype=torch.int32),
        BLOCK_SIZE=8,
        mask_mod=_causal,
        seq_lengths=(16, 16),
    )
    expected = torch.ones(16, 16, dtype=torch.bool)
    expected[:8, 8:] = False
    expected[8:, 8:] = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(block_mask_to_dense(block_mask, 16, 16, "cpu"), expected.view(1, 1, 16, 16))


def test_dense_mask_passes_tensors_through_and_materializes_block_masks():
    assert dense_mask(None, 2, 8, 5, 7, "cpu") is None
    mask = torch.ones(5, 7, dtype=torch.bool)
    assert dense_mask(mask, 2, 8, 5, 7, "cpu") is mask
    block_mask = create_block_mask(_causal, None, None, 5, 7, device="cpu")
    assert torch.equal(dense_mask(block_mask, 2, 8, 5, 7, "cpu"), top_left_causal(5, 7, "cpu").view(1, 1, 5, 7))
