"""Document-masked attention whose work follows the documents (``gqa_tune/ops/backends/blocks.py``), forward
and backward, on CPU, through the ``"blocks"`` backend: packed documents (our collate's BlockMask, or torchtune's dense
block-causal mask) one document group at a time; any other flex ``BlockMask`` (CPU flex has no backward) or
dense bool mask that hides most tiles over its kept tiles only. Checked against a float64 oracle written
out here from the document ids, under the FlashAttention 2x/3x rule."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torchtune.modules.attention_utils import create_block_causal_mask

import gqa_tune.ops.backends.blocks as blocks
from gqa_tune.data.packing import document_block_mask
from gqa_tune.ops import scaled_dot_product_gqa
from gqa_tune.testing import assert_within_precision

DOCS = [[100, 250, 200, 50], [37, 300, 263]]  # two packed rows of 600 tokens


def doc_ids(docs):
    return torch.stack([torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d)) for d in docs])


def oracle(q, k, v, visible, sinks=None):
    """Plain float64 attention with K/V repeated per query head; a row that sees nothing gives 0."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(group, 1).transpose(-2, -1) * q.shape[-1] ** -0.5
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)], -1)
    w = torch.softmax(s, -1).nan_to_num(0.0)[..., : k.shape[2]]
    return w @ v.repeat_interleave(group, 1)


def plain_fp32(q, k, v, visible, sinks=None):
    """The same computed plainly in float32: the rule's baseline."""
    group = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(group, 1).transpose(-2, -1) * q.shape[-1] ** -0.5).masked_fill(~visible, -torch.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)], -1)
    return torch.softmax(s, -1).nan_to_num(0.0)[..., : k.shape[2]] @ v.repeat_interleave(group, 1)


def grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def check(fn, q, k, v, visible, sinks=None):
    tensors = [q, k, v] + ([sinks] if sinks is not None else [])
    dout = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    out, got = grads(fn, tensors, dout)
    ref, ref_grads = grads(lambda *t: oracle(*t[:3], visible, *t[3:]), [t.double() for t in tensors], dout)
    base, base_grads = grads(lambda *t: plain_fp32(*t[:3], visible, *t[3:]), tensors, dout)
    assert_within_precision(out, ref, base)
    for name, g, r, bg in zip("qkvs", got, ref_grads, base_grads):
        assert_within_precision(g, r, bg, factor=3.0, what=f"d{name}")


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    return torch.randn(2, 8, 600, 32), torch.randn(2, 2, 600, 32), torch.randn(2, 2, 600, 32)


@pytest.fixture
def documents_spy(monkeypatch):
    """The document ids of each call that went document by document."""
    calls = []
    original = blocks.document_attention

    def spy(q, k, v, ids, *args, **kwargs):
        calls.append(ids)
        return original(q, k, v, ids, *args, **kwargs)

    monkeypatch.setattr("gqa_tune.ops.backends.blocks.document_attention", spy)
    return calls


@pytest.fixture
def tiles_spy(monkeypatch):
    """Counts the calls that went over tiles, and fails any that would materialize a BlockMask."""
    calls = []
    original = blocks.block_sparse_attention

    def spy(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    def no_dense(*args, **kwargs):
        raise AssertionError("the BlockMask was materialized as a dense s_q x s_kv mask")

    monkeypatch.setattr("gqa_tune.ops.backends.blocks.block_sparse_attention", spy)
    monkeypatch.setattr("gqa_tune.ops.masks.block_mask_to_dense", no_dense)
    return calls


def _doc_block_mask(docs, s_q=600, s_kv=600, heads=None):
    ids = doc_ids(docs)

    def mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

    return create_block_mask(mod, len(docs), heads, s_q, s_kv, device="cpu")


def _visible(docs):
    ids = doc_ids(docs)
    s = ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return (causal & (ids[:, :, None] == ids[:, None, :]))[:, None]  # [b, 1, s, s]


def test_a_block_mask_trains_on_cpu_over_its_tiles_only(qkv, tiles_spy):
    q, k, v = qkv
    block_mask = _doc_block_mask(DOCS)
    check(lambda q, k, v: scaled_dot_product_gqa(q, k, v, block_mask), q, k, v, _visible(DOCS))
    assert tiles_spy and all(layout.idx.shape[-1] <= 3 for layout in tiles_spy)  # at most 3 of 5 key blocks


def test_torchtunes_dense_packed_mask_runs_document_by_document(qkv, tiles_spy, documents_spy):
    q, k, v = qkv
    mask = create_block_causal_mask([torch.tensor(d) for d in DOCS])  # what torchtune's packed collate builds
    check(lambda q, k, v: scaled_dot_product_gqa(q, k, v, mask[:, None]), q, k, v, _visible(DOCS))
    assert len(documents_spy) == 1 and torch.equal(documents_spy[0], doc_ids(DOCS)) and tiles_spy == []


def test_our_packed_collates_block_mask_runs_document_by_document(tiles_spy, documents_spy):
    torch.manual_seed(2)
    docs = [[1, 1, 300, 2, 96], [400]]  # single tokens, a long document, a whole row
    q, k, v = torch.randn(2, 4, 400, 16), torch.randn(2, 1, 400, 16), torch.randn(2, 1, 400, 16)
    block_mask = document_block_mask([torch.tensor(d) for d in docs], 400)
    check(lambda q, k, v: scaled_dot_product_gqa(q, k, v, block_mask), q, k, v, _visible(docs))
    assert len(documents_spy) == 1 and tiles_spy == []


def test_a_dense_mask_that_is_not_by_document_is_not_taken_for_one():
    mask = create_block_causal_mask([torch.tensor(d) for d in DOCS])[:, None].clone()
    assert torch.equal(blocks.documents_of_dense(mask), doc_ids(DOCS))
    mask[1, 0, 400, 390] = False  # one hidden key inside a document
    assert blocks.documents_of_dense(mask) is None


def test_sinks_and_dead_rows_over_tiles(qkv, tiles_spy):
    q, k, v = qkv
    visible = _visible(DOCS).clone()
    visible[0, 0, 5:20] = False  # rows that see no key give 0
    sinks = torch.randn(8)
    check(lambda q, k, v, s: scaled_dot_product_gqa(q, k, v, visible, sinks=s), q, k, v, visible, sinks)
    check(lambda q, k, v: scaled_dot_product_gqa(q, k, v, visible), q, k, v, visible)
    assert len(tiles_spy) == 2


def test_a_per_head_block_mask_and_cross_attention_lengths(tiles_spy):
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 700, 16), torch.randn(1, 2, 700, 16)

    def mod(b, h, q_idx, kv_idx):  # each head sees a different band of keys
        return (kv_idx // 100 - q_idx // 60 - h).abs() <= 1

    block_mask = create_block_mask(mod, None, 4, 300, 700, device="cpu")
    i, j = torch.arange(300).view(-1, 1), torch.arange(700).view(1, -1)
    visible = torch.stack([(j // 100 - i // 60 - h).abs() <= 1 for h in range(4)])[None]
    check(lambda q, k, v: scaled_dot_product_gqa(q, k, v, block_mask), q, k, v, visible)
    assert tiles_spy and tiles_spy[0].idx.shape[1] == 4


def test_a_dense_mask_that_keeps_most_tiles_stays_dense(qkv, tiles_spy):
    q, k, v = qkv
    causal = torch.ones(600, 600, dtype=torch.bool).tril()
    check(lambda q, k, v: scaled_dot_product_gqa(q, k, v, causal), q, k, v, causal)
    assert tiles_spy == []  # a causal mask keeps more than half its tiles: one dense SDPA call is cheaper


def test_tile_layout_of_a_dense_mask():
    mask = torch.zeros(1, 1, 300, 260, dtype=torch.bool)
    mask[..., :128, :128] = True  # a full tile
    mask[..., 290, 258] = True  # one position of the last (edge) tile
    layout = blocks.layout_of_dense(mask)
    assert layout.idx.shape == (1, 1, 3, 1)  # at most one kept key block per query block
    assert layout.kind[0, 0, :, 0].tolist() == [blocks.FULL, blocks.EMPTY, blocks.PARTIAL]
    assert layout.idx[0, 0, 2, 0] == 2
