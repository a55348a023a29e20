"""Packed batches: the BlockMask built from document lengths, labels that stop at document ends, and a packed
batch whose loss and gradients equal those of its documents unpacked."""

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.modules.attention_utils import create_block_causal_mask

from gqa_tune.data import byte_tokenizer, task_dataset
from gqa_tune.data.packing import document_block_mask, packed_collate, packed_labels
from gqa_tune.models import gqa_tiny
from gqa_tune.ops.masks import block_mask_to_dense
from gqa_tune.training.evaluate import shift_labels


@pytest.mark.parametrize("seed", range(6))
def test_the_block_mask_is_torchtunes_block_causal_mask(seed):
    rng = random.Random(seed)
    s, block = rng.choice([(64, 16), (300, 64), (512, 128), (700, 128)])
    rows = []
    for _ in range(2):
        cuts = sorted(rng.sample(range(1, s), rng.randint(0, 20)))
        rows.append(torch.tensor([b - a for a, b in zip([0, *cuts], [*cuts, s])]))
    block_mask = document_block_mask(rows, s, block=block)
    got = block_mask_to_dense(block_mask, s, s, torch.device("cpu"))[:, 0]
    assert torch.equal(got, create_block_causal_mask(rows))
    # tiles that mix documents or straddle the diagonal are partial; none is full unless one document covers it
    assert int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()) < 2 * (s // block + 1) ** 2


def test_lengths_that_do_not_fill_the_row_are_refused():
    with pytest.raises(ValueError, match=r"seq_lens of row 0 must be non-negative and add up to 10, got \[4, 5\]"):
        document_block_mask([torch.tensor([4, 5])], 10)


def test_labels_stop_at_document_ends():
    labels = torch.tensor([[10, 11, 12, 20, 21, 30]])
    input_pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    ignore = CROSS_ENTROPY_IGNORE_IDX
    assert packed_labels(labels, input_pos).tolist() == [[11, 12, ignore, 21, ignore, ignore]]


def _loss_and_grads(model, logits, labels):
    loss = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=CROSS_ENTROPY_IGNORE_IDX, reduction="sum"
    )
    model.zero_grad()
    loss.backward()
    return loss.detach(), int((labels != CROSS_ENTROPY_IGNORE_IDX).sum()), [p.grad.clone() for p in model.parameters()]


def test_a_packed_batch_has_the_loss_and_gradients_of_its_documents_unpacked(monkeypatch):
    monkeypatch.chdir(REPO)
    tokenizer = byte_tokenizer(max_seq_len=256)
    packs = task_dataset(tokenizer, max_examples=120, packed=True, train_on_input=True)  # labels on every token
    rows = [packs[0], packs[1]]
    n_docs = sum(len(r["seq_lens"]) for r in rows) - sum(int(r["seq_lens"][-1] > 0) for r in rows)  # less padding
    docs = [task_dataset(tokenizer, max_examples=120, train_on_input=True)[i] for i in range(n_docs)]
    torch.manual_seed(0)
    model = gqa_tiny(max_seq_len=256)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)

    batch = packed_collate(rows)
    labels = packed_labels(batch["labels"], batch["input_pos"])
    packed = _loss_and_grads(model, model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"]), labels)
    plain = padded_collate_sft(docs, padding_idx=tokenizer.pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX)
    unpacked = _loss_and_grads(model, model(plain["tokens"]), shift_labels(plain["labels"]))

    assert packed[1] == unpacked[1] > 400  # the same supervised tokens
    torch.testing.assert_close(packed[0], unpacked[0], rtol=1e-5, atol=1e-4)
    for got, expected in zip(packed[2], unpacked[2]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
