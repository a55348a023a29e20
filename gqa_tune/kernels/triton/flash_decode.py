"""Split-K decoding over a KV cache (flash-decoding), grouped-query native.

Stage 1: program ``(split, b * n_kv)`` packs the ``G`` query heads of one kv
group times the ``s_q`` new positions into the rows of one tile, reads its
slice of that kv head's cache once, and writes a partial output and its
log-sum-exp. Stage 2 merges the splits of each row by log-sum-exp.

Rows of batch ``b`` see cache positions ``< cache_seqlens[b]``; with
``causal``, new position ``i`` (of ``s_q``) sits at ``cache_seqlens[b] - s_q + i``
and sees keys up to there. An optional bool ``mask`` ``[b, s_q, max_len]``
(torchtune's decoding mask) further restricts them.

An int8 cache (``QUANT``) comes with float32 scales ``[b, n_kv, max_len]``, one per token and kv head:
each K/V tile is loaded as int8 and multiplied by its positions' scales in the kernel (then cast to the
query's dtype, as a dequantized float cache would hold it), so the cache is read at one byte per element
and never dequantized in memory.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from gqa_tune.kernels.triton._common import INTERPRET, head_block, next_pow2
from gqa_tune.kernels.triton.flash_attn import capped_scores, dot_precision, in_window, load_tile, mma, softmax_block

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, MASK, OPART, LPART, KS, VS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smm, smn,
    sksb, sksh, sksn,
    svsb, svsh, svsn,
    n_kv, s_q, head_dim, chunk, n_splits, qk_scale, sm_scale, window, softcap,
    GROUP: tl.constexpr, SQ_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv
    kvh = pid_bh % n_kv
    rows = tl.arange(0, ROWS)
    g = rows // SQ_PAD
    i = rows % SQ_PAD
    h = kvh * GROUP + g
    row_ok = (g < GROUP) & (i < s_q)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    seqlen = tl.load(SEQLENS + b)

    q = load_tile(Q + b * sqb, h * sqh + i * sqm, d * sqd, row_ok, d_ok)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    base = 0
    if WINDOW:  # the splits cover only the keys the window reaches: cost follows min(window, fill)
        base = tl.maximum(0, seqlen - s_q - window + 1)
    start = base + pid_s * chunk
    end = tl.minimum(start + chunk, seqlen)
    for start_n in range(start, end, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_ok = n < end
        kt = load_tile(K + b * skb + kvh * skh, d * skd, n * skn, d_ok, n_ok)  # [BLOCK_D, BLOCK_N]
        if QUANT:  # int8 times each position's scale, in the query's dtype
            k_sc = tl.load(KS + b * sksb + kvh * sksh + n * sksn, mask=n_ok, other=0.0)
            kt = (kt.to(tl.float32) * k_sc[None, :]).to(Q.dtype.element_ty)
        s, _ = capped_scores(mma(q, kt, PREC), qk_scale, sm_scale, softcap, SOFTCAP)
        allowed = row_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            allowed = allowed & (n[None, :] <= seqlen - s_q + i[:, None])
        if WINDOW:
            allowed = allowed & in_window(seqlen - s_q + i[:, None], n[None, :], window)
        if HAS_MASK:
            keep = load_tile(MASK + b * smb, i * smm, n * smn, row_ok, n_ok)
            allowed = allowed & (keep != 0)
        v = load_tile(V + b * svb + kvh * svh, n * svn, d * svd, n_ok, d_ok)
        if QUANT:
            v_sc = tl.load(VS + b * svsb + kvh * svsh + n * svsn, mask=n_ok, other=0.0)
            v = (v.to(tl.float32) * v_sc[:, None]).to(Q.dtype.element_ty)
        m_i, l_i, acc = softmax_block(s, allowed, v, m_i, l_i, acc, PREC)

    dead = l_i == 0.0
    part = (pid_bh * n_splits + pid_s) * ROWS + rows  # OPART [b*n_kv, n_splits, ROWS, BLOCK_D]
    tl.store(OPART + part[:, None] * BLOCK_D + d[None, :], acc / tl.where(dead, 1.0, l_i)[:, None])
    tl.store(LPART + part, tl.where(dead, float("-inf"), m_i + tl.math.log2(tl.where(dead, 1.0, l_i))))


@triton.jit
def _decode_merge_kernel(
    OPART, LPART, OUT, SINKS,
    sob, soh, som, sod,
    n_kv, s_q, head_dim, n_splits,
    GROUP: tl.constexpr, SQ_PAD: tl.constexpr, ROWS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """One program per (row, b * n_kv): log-sum-exp merge of that row's splits."""
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    g = row // SQ_PAD
    i = row % SQ_PAD
    if (g < GROUP) & (i < s_q):
        b = pid_bh // n_kv
        h = (pid_bh % n_kv) * GROUP + g
        sp = tl.arange(0, SPLITS_PAD)
        sp_ok = sp < n_splits
        d = tl.arange(0, BLOCK_D)
        part = (pid_bh * n_splits + sp) * ROWS + row
        lse = tl.load(LPART + part, mask=sp_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        sink = float("-inf")
        if HAS_SINKS:  # one more logit with a zero value: it only grows the normalizer
            sink = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
            top = tl.maximum(top, sink)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        w = tl.math.exp2(lse - top_safe)  # 0 for empty splits
        o = tl.load(OPART + part[:, None] * BLOCK_D + d[None, :], mask=sp_ok[:, None], other=0.0)
        total = tl.sum(w, 0) + tl.math.exp2(sink - top_safe)
        out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(OUT + b * sob + h * soh + i * som + d * sod, out.to(OUT.dtype.element_ty), mask=d < head_dim)


def _num_splits(batch_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    if INTERPRET:
        target = 4
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    most = triton.cdiv(max_len, block_n)
    return max(1, min(most, triton.cdiv(target, batch_heads)))


def flash_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    max_seqlen: int = -1,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Kernel launch for :func:`gqa_tune.flash_decode_gqa` (inputs already checked).

    ``max_seqlen`` (a host-side upper bound of ``cache_seqlens``, or -1 for the
    buffer length) sizes the splits to the filled part of the cache. ``k_scale``/``v_scale``
    ``[b, n_kv, max_len]`` (float32, given together): the caches are int8 with these scales.
    """
    b, n_h, s_q, head_dim = q.shape
    n_kv = k_cache.shape[1]
    max_len = k_cache.shape[2] if max_seqlen < 0 else max(1, min(max_seqlen, k_cache.shape[2]))
    if window > 0:
        max_len = min(max_len, window + s_q - 1)  # the keys any row's window reaches
    group = n_h // n_kv
    sq_pad = next_pow2(s_q)
    rows = max(16, next_pow2(group) * sq_pad)
    block_d = head_block(head_dim)
    block_n = 16 if INTERPRET else (64 if head_dim <= 128 else 32)
    n_splits = _num_splits(b * n_kv, max_len, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(max_len, n_splits), block_n) * block_n
    opart = torch.empty((b * n_kv, n_splits, rows, block_d), device=q.device, dtype=torch.float32)
    lpart = torch.empty((b * n_kv, n_splits, rows), device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    if mask is not None:
        mask_arg, mask_strides = mask.view(torch.uint8), mask.stride()
    else:
        mask_arg, mask_strides = q, (0, 0, 0)
    quant = k_scale is not None
    ks_arg, ks_strides = (k_scale, k_scale.stride()) if quant else (lpart, (0, 0, 0))
    vs_arg, vs_strides = (v_scale, v_scale.stride()) if quant else (lpart, (0, 0, 0))
    _decode_split_kernel[(n_splits, b * n_kv)](
        q, k_cache, v_cache, cache_seqlens, mask_arg, opart, lpart, ks_arg, vs_arg,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *mask_strides, *ks_strides, *vs_strides,
        n_kv, s_q, head_dim, chunk, n_splits, scale * LOG2E, scale, window, softcap,
        GROUP=group, SQ_PAD=sq_pad, ROWS=rows, BLOCK_N=block_n, BLOCK_D=block_d,
        CAUSAL=causal, HAS_MASK=mask is not None, PREC=dot_precision(q.dtype), WINDOW=window > 0,
        SOFTCAP=softcap > 0, QUANT=quant,
    )  # fmt: skip
    _decode_merge_kernel[(rows, b * n_kv)](
        opart, lpart, out, sinks if sinks is not None else lpart, *out.stride(), n_kv, s_q, head_dim, n_splits,
        GROUP=group, SQ_PAD=sq_pad, ROWS=rows, SPLITS_PAD=next_pow2(n_splits), BLOCK_D=block_d,
        HAS_SINKS=sinks is not None,
    )  # fmt: skip
    return out
