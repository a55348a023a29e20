"""The ``"blocks"`` backend: block-sparse attention in plain PyTorch, with a backward, on any device, for a
``BlockMask``, and on CPU for a bool mask that hides most tiles; packed documents run one by one.

A mask is read as a grid of tiles (query block x key block, 128 x 128 by default): a tile is *empty*
(skipped: never read, never computed), *full* (attended without evaluating any mask) or *partial*
(the mask is evaluated on that tile only). Each query block gathers its kept key blocks, at most ``M``
of them, and attends over those ``M * 128`` keys, so the work is ``O(s_q * M * 128)``, not
``O(s_q * s_kv)``: for packed documents it follows the documents. Autograd gives the backward (the
gathers' backward sums into K/V), which is what torch's CPU ``flex_attention`` lacks.

It reads a flex ``BlockMask`` natively (its partial and full block lists and its ``mask_mod``), and a
dense bool mask (such as the block-causal mask torchtune's packed collate builds on CPU) by summarizing
it into tiles first. A group's query heads share each gathered key block when the mask is the same for
every head (K/V are never copied per query head); a per-head mask gathers per query head.
"""

import math
import weakref
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

#: Tile size for dense masks (a BlockMask brings its own).
BLOCK = 128
#: A dense bool mask goes over its tiles when it keeps at most this fraction of them.
SPARSE_ENOUGH = 0.5

EMPTY, PARTIAL, FULL = 0, 1, 2


class TileLayout(NamedTuple):
    """Which key blocks each query block reads: ``idx`` and ``kind`` ``[B, H, n_q_blocks, M]`` (``B``/``H``
    1 when shared), ``kind`` EMPTY (padding), PARTIAL or FULL. Partial tiles are masked by ``mask_mod``
    ``(b, h, q_idx, kv_idx) -> bool``, broadcasting."""

    q_block: int
    kv_block: int
    idx: torch.Tensor
    kind: torch.Tensor
    mask_mod: Optional[Callable]
    #: For a dense mask: the mask cut into tiles, ``[B, H, n_q_blocks, n_kv_blocks, q_block, kv_block]``.
    tiles: Optional[torch.Tensor] = None


def _compact(idx: torch.Tensor, kind: torch.Tensor) -> TileLayout:
    """Kept slots first (in key-block order), then cut to the largest count of any query block."""
    order = torch.sort((kind != EMPTY).to(torch.int8), dim=-1, descending=True, stable=True).indices
    idx, kind = idx.gather(-1, order), kind.gather(-1, order)
    width = max(int((kind != EMPTY).sum(-1).max()), 1) if kind.numel() else 1
    return idx[..., :width].contiguous(), kind[..., :width].contiguous()


def layout_of_block_mask(block_mask: BlockMask) -> TileLayout:
    """A BlockMask's partial and full block lists as one tile layout."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    n = block_mask.kv_indices.shape[-1]
    slots = torch.arange(n, device=block_mask.kv_indices.device)
    idx = [block_mask.kv_indices.long()]
    kind = [torch.where(slots < block_mask.kv_num_blocks[..., None], PARTIAL, EMPTY)]
    if block_mask.full_kv_num_blocks is not None:
        idx.append(block_mask.full_kv_indices.long())
        kind.append(torch.where(slots < block_mask.full_kv_num_blocks[..., None], FULL, EMPTY))
    idx, kind = _compact(torch.cat(idx, -1), torch.cat(kind, -1).to(torch.int8))
    return TileLayout(q_block, kv_block, idx, kind, block_mask.mask_mod)


def layout_of_dense(mask: torch.Tensor, block: int = BLOCK) -> TileLayout:
    """The tiles of a bool mask ``[B, H, s_q, s_kv]`` (``B``/``H`` may be 1): one pass over it."""
    batch, heads, s_q, s_kv = mask.shape
    n_q, n_kv = math.ceil(s_q / block), math.ceil(s_kv / block)
    padded = F.pad(mask, (0, n_kv * block - s_kv, 0, n_q * block - s_q))  # False outside
    tiles = padded.view(batch, heads, n_q, block, n_kv, block)
    count = tiles.sum((3, 5), dtype=torch.int32)  # [B, H, n_q, n_kv]
    q_rows = torch.full((n_q,), block, dtype=torch.int32, device=mask.device)
    kv_cols = torch.full((n_kv,), block, dtype=torch.int32, device=mask.device)
    q_rows[-1], kv_cols[-1] = s_q - (n_q - 1) * block, s_kv - (n_kv - 1) * block
    size = q_rows.view(-1, 1) * kv_cols.view(1, -1)  # the tile's positions inside the mask
    kind = torch.where(count == 0, EMPTY, torch.where(count == size, FULL, PARTIAL)).to(torch.int8)
    idx = torch.arange(n_kv, device=mask.device).expand(batch, heads, n_q, n_kv)
    idx, kind = _compact(idx, kind)
    return TileLayout(block, block, idx, kind, None, tiles.transpose(3, 4))


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _causal_layout(s_q: int, s_kv: int, device: torch.device, block: int = BLOCK) -> TileLayout:
    n_q, n_kv = math.ceil(s_q / block), math.ceil(s_kv / block)
    rows = torch.arange(n_q, device=device).view(-1, 1)
    cols = torch.arange(n_kv, device=device).view(1, -1)
    below = (cols + 1) * block - 1 <= rows * block  # every key of the tile precedes every query
    kind = torch.where(below, FULL, torch.where(cols * block <= (rows + 1) * block - 1, PARTIAL, EMPTY))
    idx, kind = _compact(cols.expand(n_q, n_kv)[None, None], kind.to(torch.int8)[None, None])
    return TileLayout(block, block, idx, kind, _causal_mod)


# A model passes the same dense mask to every layer (as fresh views of it): summarize it once. Keyed by
# its memory and version; the entry holds a weak reference to the owning tensor, so a freed mask whose
# memory is reused never matches.
_DENSE_LAYOUTS: dict = {}


def _per_mask(kind: str, mask: torch.Tensor, compute: Callable):
    """``compute()`` once per mask (and per ``kind`` of summary), while the mask lives and is unchanged."""
    owner = mask if mask._base is None else mask._base
    key = (kind, mask.data_ptr(), tuple(mask.shape), mask.stride(), mask._version)
    cached = _DENSE_LAYOUTS.get(key)
    if cached is not None and cached[0]() is owner:
        return cached[1]
    value = compute()
    while len(_DENSE_LAYOUTS) >= 8:
        _DENSE_LAYOUTS.pop(next(iter(_DENSE_LAYOUTS)))
    _DENSE_LAYOUTS[key] = (weakref.ref(owner), value)
    return value


def layout_for(mask, is_causal: bool, s_q: int, s_kv: int, device: torch.device) -> TileLayout:
    """The tile layout of a call's mask (a BlockMask, a bool tensor, causal, or none: every tile full)."""
    if isinstance(mask, BlockMask):
        return layout_of_block_mask(mask)
    if isinstance(mask, torch.Tensor):
        return _per_mask("tiles", mask, lambda: layout_of_dense(mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))))
    if is_causal:
        return _causal_layout(s_q, s_kv, device)
    n_q, n_kv = math.ceil(s_q / BLOCK), math.ceil(s_kv / BLOCK)
    idx = torch.arange(n_kv, device=device).expand(1, 1, n_q, n_kv).contiguous()
    return TileLayout(BLOCK, BLOCK, idx, torch.full_like(idx, FULL, dtype=torch.int8), None)


def _tile_mask(layout: TileLayout, idx, kind, b, n_q, s_q, s_kv, device) -> torch.Tensor:
    """Bool ``[b, H, n_q, q_block, M * kv_block]``: which gathered keys each query row may attend
    (``H`` 1 for a mask shared by the heads). Full tiles need no mask, partial ones read it, empty
    slots and positions past the sequences are never attended."""
    qb, kb = layout.q_block, layout.kv_block
    tile_kind = kind.repeat_interleave(kb, dim=-1).unsqueeze(3)  # [b, H, n_q, 1, M * kb]
    if layout.tiles is not None:  # a dense mask, already cut into tiles: gather the kept ones
        tiles = layout.tiles.expand(b, -1, -1, -1, -1, -1)  # [b, H, n_q, n_kv_blocks, qb, kb]
        picked = tiles.gather(3, idx[..., None, None].expand(-1, tiles.shape[1], -1, -1, qb, kb))
        return picked.transpose(3, 4).flatten(4, 5) & (tile_kind != EMPTY)
    kv_pos = (idx.unsqueeze(-1) * kb + torch.arange(kb, device=device)).flatten(3, 4).unsqueeze(3)
    q_pos = (torch.arange(n_q, device=device).view(-1, 1) * qb + torch.arange(qb, device=device)).view(1, 1, n_q, qb, 1)
    inside = (kv_pos < s_kv) & (q_pos < s_q)
    allowed = (tile_kind == FULL) & inside
    partial = tile_kind == PARTIAL
    if layout.mask_mod is not None and bool(partial.any()):
        heads = idx.shape[1]
        h = torch.arange(heads, device=device).view(1, -1, 1, 1, 1)  # 0 for a mask shared by the heads
        b_idx = torch.arange(b, device=device).view(-1, 1, 1, 1, 1)
        mod = layout.mask_mod(b_idx, h, q_pos.clamp(max=s_q - 1), kv_pos.clamp(max=s_kv - 1))
        allowed = allowed | (partial & inside & mod)
    return allowed


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` ``[..., s, d]`` zero-padded to ``length`` positions (no copy when it already has them)."""
    return x if x.shape[-2] == length else F.pad(x, (0, 0, 0, length - x.shape[-2]))


def block_sparse_attention(q, k, v, layout: TileLayout, scale: float, softcap=None, sinks=None, dropout_p=0.0):
    """Attention over the kept tiles of ``layout`` only; ``q`` ``[b, n_h, s_q, h_d]``, ``k``/``v``
    ``[b, n_kv, s_kv, h_d(v)]``. A query that sees no key gives 0."""
    b, n_h, s_q, h_d = q.shape
    n_kv, s_kv, h_dv = k.shape[1], k.shape[2], v.shape[-1]
    group = n_h // n_kv
    qb, kb = layout.q_block, layout.kv_block
    n_q, n_kv_blocks = math.ceil(s_q / qb), math.ceil(s_kv / kb)
    if layout.idx.shape[2] != n_q:
        raise ValueError(f"the mask has {layout.idx.shape[2]} query blocks of {qb}; {s_q} queries need {n_q}")
    device = q.device
    qp = _pad_to(q, n_q * qb)
    kp = _pad_to(k, n_kv_blocks * kb).view(b, n_kv, n_kv_blocks, kb, h_d)
    vp = _pad_to(v, n_kv_blocks * kb).view(b, n_kv, n_kv_blocks, kb, h_dv)
    if layout.idx.shape[1] > 1:  # a mask per query head: each head gathers its own kv head's blocks
        heads, per_kv = n_h, 1
        kv_head = torch.arange(n_h, device=device) // group
    else:  # one mask for all heads: a group's query heads share each gathered block
        heads, per_kv = n_kv, group
        kv_head = torch.arange(n_kv, device=device)
    q6 = qp.view(b, heads, per_kv, n_q, qb, h_d).transpose(2, 3)  # [b, heads, n_q, per_kv, qb, h_d]
    width = layout.idx.shape[-1]
    idx = layout.idx.to(device).expand(b, -1, n_q, width)
    kind = layout.kind.to(device).expand(b, -1, n_q, width)
    gather = (torch.arange(b, device=device).view(-1, 1, 1, 1), kv_head.view(1, -1, 1, 1), idx)
    k_tiles = kp[gather].flatten(3, 4)  # [b, heads, n_q, M * kb, h_d]
    v_tiles = vp[gather].flatten(3, 4)
    allowed = _tile_mask(layout, idx, kind, b, n_q, s_q, s_kv, device)  # [b, 1 or heads, n_q, qb, M * kb]
    allowed = allowed.expand(b, heads, n_q, qb, allowed.shape[-1])
    if softcap is None and sinks is None:
        out = _tiles_sdpa(q6, k_tiles, v_tiles, allowed, scale, dropout_p)
    else:
        out = _tiles_math(q6, k_tiles, v_tiles, allowed, scale, softcap, sinks, kv_head, dropout_p)
    # [b, heads, n_q, per_kv, qb, h_dv] -> [b, n_h, s_q, h_dv]
    return out.transpose(2, 3).reshape(b, n_h, n_q * qb, h_dv)[:, :, :s_q]


def _tiles_sdpa(q6, k_tiles, v_tiles, allowed, scale, dropout_p):
    """Each query block against its gathered keys, as one batch of SDPA calls: a fused softmax, and a
    backward that recomputes it instead of keeping the weights. The group's query heads are SDPA's heads
    over one shared key block (``enable_gqa``), so the mask is given once per group."""
    b, heads, n_q, per_kv, qb, h_d = q6.shape
    width = k_tiles.shape[3]
    dead = ~allowed.any(-1, keepdim=True)  # [b, heads, n_q, qb, 1]
    any_dead = bool(dead.any())
    if any_dead:  # a row that sees nothing: let it see one key, then give it 0 (finite gradients)
        allowed = allowed.clone()
        allowed[..., :1] |= dead
    out = F.scaled_dot_product_attention(
        q6.reshape(-1, per_kv, qb, h_d),
        k_tiles.reshape(-1, 1, width, h_d),
        v_tiles.reshape(-1, 1, width, v_tiles.shape[-1]),
        attn_mask=allowed.reshape(-1, 1, qb, width),
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=per_kv > 1,
    ).view(b, heads, n_q, per_kv, qb, -1)
    return out.masked_fill(dead.unsqueeze(3), 0.0) if any_dead else out


def _tiles_math(q6, k_tiles, v_tiles, allowed, scale, softcap, sinks, kv_head, dropout_p):
    """The same with soft-capping or sinks, which SDPA lacks: the weights are formed explicitly."""
    b, heads, n_q, per_kv, qb, _ = q6.shape
    scores = torch.matmul(q6 * scale, k_tiles.unsqueeze(3).transpose(-1, -2))  # [b, heads, n_q, per_kv, qb, W]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = allowed.unsqueeze(3)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        # query head of (heads, per_kv): kv head h's group is h * per_kv .. (h + 1) * per_kv - 1
        head = torch.arange(heads, device=q6.device).view(-1, 1) * per_kv + torch.arange(per_kv, device=q6.device)
        sink = sinks.to(scores.dtype)[head].view(1, heads, 1, per_kv, 1, 1).expand(b, heads, n_q, per_kv, qb, 1)
        weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        dead = ~allowed.any(-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v_tiles.unsqueeze(3))  # [b, heads, n_q, per_kv, qb, h_dv]


def sparse_enough(mask: torch.Tensor) -> bool:
    """Whether a dense bool mask keeps few enough tiles for this backend to beat a dense kernel."""
    if mask.dim() < 2 or mask.shape[-2] < 2 * BLOCK or mask.shape[-1] < 2 * BLOCK:
        return False
    layout = layout_for(mask, False, mask.shape[-2], mask.shape[-1], mask.device)
    n_tiles = math.ceil(mask.shape[-2] / BLOCK) * math.ceil(mask.shape[-1] / BLOCK)
    kept = int((layout.kind != EMPTY).sum()) / (layout.kind.shape[0] * layout.kind.shape[1])
    return kept <= SPARSE_ENOUGH * n_tiles


# ---------------------------------------------------------------- packed documents


def documents_of_dense(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """``[b, s]`` document ids when a bool mask ``[b or 1, 1, s, s]`` is exactly a block-causal document mask
    (what torchtune's packed collate builds on CPU), else None. One pass over the mask, cached per mask."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != mask.shape[-2] or mask.shape[-1] < 2:
        return None
    return _per_mask("documents", mask, lambda: _documents_of_dense(mask))


def _documents_of_dense(mask: torch.Tensor) -> Optional[torch.Tensor]:
    rows = mask[:, 0]
    s = rows.shape[-1]
    starts = torch.ones(rows.shape[0], s, dtype=torch.bool, device=mask.device)
    starts[:, 1:] = ~rows.diagonal(offset=-1, dim1=-2, dim2=-1)  # position i starts a document: it cannot see i - 1
    ids = starts.long().cumsum(-1) - 1
    causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
    same = ids[:, :, None] == ids[:, None, :]
    return ids if torch.equal(rows, causal & same) else None


def _buckets(lengths: torch.Tensor, most: int = 6):
    """Documents grouped by length, longest first, so that padding a group to its longest wastes at most a
    third of it (the last of at most ``most`` groups takes the rest): ``[(document indices, padded length)]``."""
    order = torch.argsort(lengths, descending=True, stable=True)
    groups, current, top = [], [], None
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        if current and n * 3 < top * 2 and len(groups) < most - 1:
            groups.append((current, top))
            current = []
        if not current:
            top = max(n, 1)
        current.append(i)
    if current:
        groups.append((current, top))
    return groups


def document_attention(q, k, v, ids: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention within each document of packed rows (``ids`` ``[b, s]``, contiguous documents), as
    one causal SDPA call per group of similar lengths: the work is about the documents' own, ``sum(len ** 2)``.
    Q, K and V are gathered into the groups' padded layout once each, and the output gathered back once."""
    b, n_h, s, h_d = q.shape
    device = q.device
    ids = ids.to(device)
    new = torch.ones(b, s, dtype=torch.bool, device=device)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    row_of, start = new.nonzero(as_tuple=True)  # one entry per document, in (row, position) order
    last = torch.cat([row_of[1:] != row_of[:-1], row_of.new_ones(1, dtype=torch.bool)])
    ends = torch.where(last, s, torch.cat([start[1:], start.new_full((1,), s)]))
    lengths = ends - start
    doc_of = new.flatten().long().cumsum(0).view(b, s) - 1  # document of each packed position
    offset = torch.arange(s, device=device).view(1, s) - start[doc_of]
    groups, rows, positions = [], [], []
    where = torch.empty(len(lengths), dtype=torch.long, device=device)
    base = 0
    for docs, top in _buckets(lengths.cpu()):
        docs = torch.tensor(docs, device=device)
        j = torch.arange(top, device=device)
        positions.append((start[docs, None] + torch.minimum(j, lengths[docs, None] - 1)).flatten())  # clamped
        rows.append(row_of[docs, None].expand(-1, top).flatten())
        where[docs] = base + torch.arange(len(docs), device=device) * top
        groups.append((len(docs), top))
        base += len(docs) * top
    flat_index = torch.cat(rows) * s + torch.cat(positions)
    # [b, heads, s, h_d] -> [b * s, heads, h_d] (a view when, as in torchtune's attention, the heads were
    # transposed out of [b, s, heads, h_d]), then one row gather per tensor.
    gathered = [x.transpose(1, 2).reshape(b * s, x.shape[1], x.shape[3]).index_select(0, flat_index) for x in (q, k, v)]
    outs, at = [], 0
    for n, top in groups:
        part = [g[at : at + n * top].view(n, top, g.shape[1], g.shape[2]).transpose(1, 2) for g in gathered]
        # Causal within the padded group is exact: a real query j < length sees keys <= j, all real; the padded
        # rows past a document's end are never gathered back, so they get no gradient and give none.
        out = F.scaled_dot_product_attention(
            *part, is_causal=True, dropout_p=dropout_p, scale=scale, enable_gqa=n_h != k.shape[1]
        )
        outs.append(out.transpose(1, 2).reshape(n * top, n_h, -1))
        at += n * top
    flat = torch.cat(outs) if len(outs) > 1 else outs[0]
    return flat.index_select(0, (where[doc_of] + offset).flatten()).view(b, s, n_h, -1).transpose(1, 2)


# ---------------------------------------------------------------- the backend row


def _packed_documents(q, k, mask, is_causal, sinks, document_ids) -> Optional[torch.Tensor]:
    """``[b, s]`` document ids of packed self-attention on CPU: given with the call (our packed collate's
    BlockMask), or read off a dense mask that is exactly block-causal by document (torchtune's CPU collate)."""
    if is_causal or mask is None or sinks is not None or q.device.type != "cpu" or q.shape[2] != k.shape[2]:
        return None
    if isinstance(mask, BlockMask):
        ok = document_ids is not None and tuple(document_ids.shape) == (q.shape[0], q.shape[2])
        return document_ids if ok else None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, q.shape[0]) or q.shape[2] < 256:
        return None
    ids = documents_of_dense(mask)
    return None if ids is None else ids.expand(q.shape[0], -1)


def blocks_backend(q, k, v, *, mask, scale, is_causal, dropout_p, softcap=None, sinks=None, document_ids=None):
    """Attention over the tiles ``mask`` keeps; packed documents (``document_ids`` ``[b, s]``, or a dense
    block-causal mask) as one causal SDPA call per group of similar lengths."""
    documents = _packed_documents(q, k, mask, is_causal, sinks, document_ids)
    if documents is not None:
        return document_attention(q, k, v, documents, scale, dropout_p)
    layout = layout_for(mask, is_causal, q.shape[2], k.shape[2], q.device)
    return block_sparse_attention(q, k, v, layout, scale, sinks=sinks, dropout_p=dropout_p)


def blocks_limits(call) -> Optional[str]:
    """Why ``"blocks"`` cannot serve ``call``, or ``None``."""
    if call.need_weights:
        return "it cannot return attention weights (use backend='math')"
    if call.softcap is not None:
        return "it has no logit soft-capping (softcap)"
    if call.mask_kind == "block":
        lengths = tuple(call.mask.seq_lengths)
        if call.lengths is not None and lengths != call.lengths:
            return f"the BlockMask is for (s_q, s_kv) = {lengths}, the call is {call.lengths}"
        return None
    if call.mask_kind == "bool" and call.device.type == "cpu":
        mask = call.mask
        square = mask.dim() == 4 and mask.shape[-1] >= 256 and not call.sinks
        if (square and documents_of_dense(mask) is not None) or sparse_enough(mask):
            return None
    return "it takes a BlockMask, or on CPU a bool mask that hides most of its tiles or keeps packed documents apart"
