"""Flash attention forward and backward with grouped K/V, in Triton.

Head mapping: query head ``h`` uses kv head ``h // G`` with ``G = n_h // n_kv``.
A forward (and dQ) program owns one kv head and ``BLOCK_MQ`` query positions of
all ``G`` query heads of its group, packed into the rows of one tile, so each
K/V block is read once for the whole group. The dK/dV program owns a block of
keys of one kv head and loops over the group's query heads inside the program
(deterministic, no atomics).

Causal masking: key ``j`` is visible to query ``i`` when ``j <= i + causal_offset``.
``causal_offset = 0`` is torch's top-left alignment; ``s_kv - s_q`` places the
queries at the end of the keys (a KV-cache chunk). Rows that see no key give
output 0 and zero gradients (their log-sum-exp is stored as +inf).

The log-sum-exp is kept in base 2 (``log2(sum(exp2(s * scale * log2(e))))``).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from gqa_tune.kernels.triton._common import INTERPRET, head_block, next_pow2, strides4

LOG2E = 1.4426950408889634


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """``tl.dot`` with float32 accumulation.

    PRECISION 0: the inputs' own type (tensor cores for fp16/bf16); 1: IEEE
    float32 (no TF32) for float32 inputs; 2: operands cast to float32 first,
    for Triton's CPU interpreter, whose bf16 ``tl.dot`` is wrong (the
    products of bf16 values are exact in float32, so results match).
    """
    if PRECISION == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISION == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def softmax_block(s, allowed, v, m_i, l_i, acc, PREC: tl.constexpr):
    """Fold one block of scores ``s`` (log2 units) and values ``v`` into the streaming softmax.

    Returns the new row maxima, row sums and unnormalized output. A row with no
    allowed key so far keeps ``m_i = -inf`` and ``l_i = 0`` (never NaN).
    """
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PREC)
    return m_new, l_i, acc


@triton.jit
def load_tile(ptr, row_off, col_off, row_ok, col_ok):
    """The 2-D tile ``ptr[row_off[:, None] + col_off[None, :]]``, zero outside ``row_ok x col_ok``."""
    return tl.load(ptr + row_off[:, None] + col_off[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)


@triton.jit
def capped_scores(raw, qk_scale, sm_scale, softcap, SOFTCAP: tl.constexpr):
    """Scores in log2 units from ``raw = q . k``, and (for the backward) ``t = tanh(raw * scale / softcap)``.

    With ``SOFTCAP`` the scaled score ``x`` becomes ``softcap * tanh(x / softcap)`` (Gemma 2).
    """
    if SOFTCAP:
        # tanh(x) = 2 sigmoid(2x) - 1 rounds to 0 for |x| << 1 (a large softcap): there the odd Taylor series,
        # tanh(x) = x r(x), and the capped score is x * r(x) * softcap = s * r(x), never softcap * (tiny)
        # (which a denormal x would flush to 0). Past |x| = 1/8 the series' error is below 3e-8.
        s = raw * sm_scale
        x = s / softcap
        x2 = x * x
        small = tl.abs(x) < 0.125
        r = 1.0 - x2 * (0.3333333333333333 - x2 * 0.13333333333333333)
        t_big = 2.0 * tl.sigmoid(2.0 * x) - 1.0
        capped = tl.where(small, s * r, softcap * t_big)
        t = tl.where(small, x * r, t_big)
        return capped * 1.4426950408889634, t
    else:
        return raw * qk_scale, raw


@triton.jit
def in_window(q_pos, k_pos, window):
    """Sliding window: ``|q_pos - k_pos| < window``."""
    gap = q_pos - k_pos
    return (gap < window) & (gap > -window)


def dot_precision(dtype: torch.dtype) -> int:
    if INTERPRET and dtype != torch.float32:
        return 2
    return 1 if dtype == torch.float32 else 0


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, MASK, SINKS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    slb, slh, slm,
    smb, smh, smm, smn,
    n_kv, s_q, s_kv, head_dim, causal_offset, qk_scale, sm_scale, window, softcap,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_MQ: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv
    kvh = pid_bh % n_kv
    BLOCK_M: tl.constexpr = GROUP_PAD * BLOCK_MQ
    rows = tl.arange(0, BLOCK_M)
    g = rows // BLOCK_MQ
    m = pid_m * BLOCK_MQ + rows % BLOCK_MQ
    h = kvh * GROUP + g
    row_ok = (g < GROUP) & (m < s_q)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim

    q = load_tile(Q + b * sqb, h * sqh + m * sqm, d * sqd, row_ok, d_ok)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi = 0, s_kv
    if CAUSAL:
        hi = tl.minimum(s_kv, (pid_m + 1) * BLOCK_MQ + causal_offset)
    if WINDOW:  # only the blocks the window reaches are read
        lo = tl.maximum(0, pid_m * BLOCK_MQ + causal_offset - window + 1) // BLOCK_N * BLOCK_N
        if not CAUSAL:
            hi = tl.minimum(hi, (pid_m + 1) * BLOCK_MQ + causal_offset + window - 1)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_ok = n < s_kv
        kt = load_tile(K + b * skb + kvh * skh, d * skd, n * skn, d_ok, n_ok)  # [BLOCK_D, BLOCK_N]
        s, _ = capped_scores(mma(q, kt, PREC), qk_scale, sm_scale, softcap, SOFTCAP)
        allowed = row_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            allowed = allowed & (n[None, :] <= m[:, None] + causal_offset)
        if WINDOW:
            allowed = allowed & in_window(m[:, None] + causal_offset, n[None, :], window)
        if HAS_MASK:
            keep = load_tile(MASK + b * smb, h * smh + m * smm, n * smn, row_ok, n_ok)
            allowed = allowed & (keep != 0)
        v = load_tile(V + b * svb + kvh * svh, n * svn, d * svd, n_ok, d_ok)
        m_i, l_i, acc = softmax_block(s, allowed, v, m_i, l_i, acc, PREC)

    if HAS_SINKS:  # one more logit per head, with a zero value: it only grows the normalizer
        sink = tl.load(SINKS + h, mask=row_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.math.exp2(sink - m_safe)
        acc = acc * alpha[:, None]
        m_i = m_new
    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    tl.store(
        OUT + b * sob + h[:, None] * soh + m[:, None] * som + d[None, :] * sod,
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    lse = tl.where(dead, float("inf"), m_i + tl.math.log2(tl.where(dead, 1.0, l_i)))
    tl.store(LSE + b * slb + h * slh + m * slm, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, MASK,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    slb, slh, slm,
    smb, smh, smm, smn,
    n_kv, s_q, s_kv, head_dim, causal_offset, qk_scale, sm_scale, window, softcap,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_MQ: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """dQ for the packed rows of one group (Q, dO and dQ share Q's strides)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv
    kvh = pid_bh % n_kv
    BLOCK_M: tl.constexpr = GROUP_PAD * BLOCK_MQ
    rows = tl.arange(0, BLOCK_M)
    g = rows // BLOCK_MQ
    m = pid_m * BLOCK_MQ + rows % BLOCK_MQ
    h = kvh * GROUP + g
    row_ok = (g < GROUP) & (m < s_q)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_off = b * sqb + h[:, None] * sqh + m[:, None] * sqm + d[None, :] * sqd
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=qd_mask, other=0.0)
    do = tl.load(DO + q_off, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + m * slm, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + b * slb + h * slh + m * slm, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi = 0, s_kv
    if CAUSAL:
        hi = tl.minimum(s_kv, (pid_m + 1) * BLOCK_MQ + causal_offset)
    if WINDOW:
        lo = tl.maximum(0, pid_m * BLOCK_MQ + causal_offset - window + 1) // BLOCK_N * BLOCK_N
        if not CAUSAL:
            hi = tl.minimum(hi, (pid_m + 1) * BLOCK_MQ + causal_offset + window - 1)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_ok = n < s_kv
        kt = load_tile(K + b * skb + kvh * skh, d * skd, n * skn, d_ok, n_ok)  # [BLOCK_D, BLOCK_N]
        vt = load_tile(V + b * svb + kvh * svh, d * svd, n * svn, d_ok, n_ok)
        s, t = capped_scores(mma(q, kt, PREC), qk_scale, sm_scale, softcap, SOFTCAP)
        dp = mma(do, vt, PREC)
        allowed = row_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            allowed = allowed & (n[None, :] <= m[:, None] + causal_offset)
        if WINDOW:
            allowed = allowed & in_window(m[:, None] + causal_offset, n[None, :], window)
        if HAS_MASK:
            keep = load_tile(MASK + b * smb, h * smh + m * smm, n * smn, row_ok, n_ok)
            allowed = allowed & (keep != 0)
        p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)  # d cap(x) / dx
        dq += mma(ds.to(kt.dtype), tl.trans(kt), PREC)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, MASK,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    slb, slh, slm,
    smb, smh, smm, smn,
    n_kv, s_q, s_kv, head_dim, causal_offset, qk_scale, sm_scale, window, softcap,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """dK, dV for one block of keys of one kv head, summed over its query heads in-program.

    dK/dV share K's/V's strides; Q and dO share Q's.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv
    kvh = pid_bh % n_kv
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < s_kv
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    k_off = b * skb + kvh * skh + n[:, None] * skn + d[None, :] * skd
    v_off = b * svb + kvh * svh + n[:, None] * svn + d[None, :] * svd
    nd_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + k_off, mask=nd_mask, other=0.0)
    v = tl.load(V + v_off, mask=nd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, pid_n * BLOCK_N - causal_offset)
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = kvh * GROUP + g
        for start_m in range(lo, s_q, BLOCK_M):
            m = start_m + tl.arange(0, BLOCK_M)
            m_ok = m < s_q
            q_off = b * sqb + h * sqh + m[:, None] * sqm + d[None, :] * sqd
            md_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + q_off, mask=md_mask, other=0.0)
            do = tl.load(DO + q_off, mask=md_mask, other=0.0)
            lse = tl.load(LSE + b * slb + h * slh + m * slm, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + b * slb + h * slh + m * slm, mask=m_ok, other=0.0)
            st, tt = capped_scores(mma(k, tl.trans(q), PREC), qk_scale, sm_scale, softcap, SOFTCAP)
            dpt = mma(v, tl.trans(do), PREC)
            allowed = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                allowed = allowed & (n[:, None] <= m[None, :] + causal_offset)
            if WINDOW:
                allowed = allowed & in_window(m[None, :] + causal_offset, n[:, None], window)
            if HAS_MASK:
                keep = load_tile(MASK + b * smb + h * smh, n * smn, m * smm, n_ok, m_ok)
                allowed = allowed & (keep != 0)
            pt = tl.where(allowed, tl.math.exp2(st - lse[None, :]), 0.0)
            dst = pt * (dpt - delta[None, :])
            if SOFTCAP:
                dst = dst * (1.0 - tt * tt)
            dv += mma(pt.to(do.dtype), do, PREC)
            dk += mma(dst.to(q.dtype), q, PREC)
    tl.store(DK + k_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + v_off, dv.to(DV.dtype.element_ty), mask=nd_mask)


def _blocks(q: torch.Tensor, group: int) -> Tuple[int, int, int]:
    """(GROUP_PAD, BLOCK_MQ, BLOCK_N) for the packed forward/dQ tiles."""
    group_pad = next_pow2(group)
    rows = 16 if INTERPRET else (64 if q.shape[-1] > 128 else 128)
    rows = max(rows, group_pad)
    block_n = 16 if INTERPRET else (32 if q.shape[-1] > 128 else 64)
    return group_pad, rows // group_pad, block_n


def launch_options(rows: int, block_d: int) -> dict:
    """num_warps / num_stages for a tile of ``rows x block_d`` float32 accumulators (ignored by the interpreter)."""
    return dict(num_warps=8 if rows * block_d >= 128 * 128 else 4, num_stages=2 if block_d > 128 else 3)


def _mask_arg(mask: Optional[torch.Tensor], q: torch.Tensor, s_kv: int):
    if mask is None:
        return q, (0, 0, 0, 0)  # any pointer; never read
    full = mask.expand(q.shape[0], q.shape[1], q.shape[2], s_kv)
    return full.view(torch.uint8), strides4(full)


def flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    causal_offset: int,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. Returns ``(out, lse)``; ``lse`` ``[b, n_h, s_q]`` float32, base 2 (sinks included).

    ``window`` > 0: sliding window; ``softcap`` > 0: logit soft-capping; ``sinks`` ``[n_h]``: sink logits.
    """
    b, n_h, s_q, head_dim = q.shape
    n_kv, s_kv = k.shape[1], k.shape[2]
    group = n_h // n_kv
    out = torch.empty_like(q)
    lse = torch.empty((b, n_h, s_q), device=q.device, dtype=torch.float32)
    group_pad, block_mq, block_n = _blocks(q, group)
    mask_ptr, mask_strides = _mask_arg(mask, q, s_kv)
    grid = (triton.cdiv(s_q, block_mq), b * n_kv)
    _fwd_kernel[grid](
        q, k, v, out, lse, mask_ptr, sinks if sinks is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *mask_strides,
        n_kv, s_q, s_kv, head_dim, causal_offset, scale * LOG2E, scale, window, softcap,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_MQ=block_mq, BLOCK_N=block_n,
        BLOCK_D=head_block(head_dim), CAUSAL=causal, HAS_MASK=mask is not None,
        PREC=dot_precision(q.dtype), WINDOW=window > 0, SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None,
        **launch_options(group_pad * block_mq, head_block(head_dim)),
    )  # fmt: skip
    return out, lse


def flash_attn_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    causal_offset: int,
    window: int = 0,
    softcap: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernels. Returns ``(dq, dk, dv)`` in the inputs' dtypes (sinks: their ``lse``
    already counts them; their own gradient is ``-sum(exp2(sink * log2 e - lse) * delta)``, see ops.py)."""
    b, n_h, s_q, head_dim = q.shape
    n_kv, s_kv = k.shape[1], k.shape[2]
    group = n_h // n_kv
    # dQ shares Q's strides with dO, dK/dV share K's/V's: make them all contiguous.
    q, k, v, do, lse = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous(), lse.contiguous()
    delta = (do.float() * out.float()).sum(-1)  # [b, n_h, s_q], contiguous like lse
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    group_pad, block_mq, block_n = _blocks(q, group)
    mask_ptr, mask_strides = _mask_arg(mask, q, s_kv)
    common = dict(BLOCK_D=head_block(head_dim), CAUSAL=causal, HAS_MASK=mask is not None,
                  PREC=dot_precision(q.dtype), WINDOW=window > 0, SOFTCAP=softcap > 0)  # fmt: skip
    _bwd_dq_kernel[(triton.cdiv(s_q, block_mq), b * n_kv)](
        q, k, v, do, dq, lse, delta, mask_ptr,
        *q.stride(), *k.stride(), *v.stride(), *lse.stride(), *mask_strides,
        n_kv, s_q, s_kv, head_dim, causal_offset, scale * LOG2E, scale, window, softcap,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_MQ=block_mq, BLOCK_N=block_n, **common,
        **launch_options(group_pad * block_mq, head_block(head_dim)),
    )  # fmt: skip
    block_m_kv = 16 if INTERPRET else 64
    block_n_kv = 16 if INTERPRET else (64 if head_dim <= 128 else 32)
    _bwd_dkdv_kernel[(triton.cdiv(s_kv, block_n_kv), b * n_kv)](
        q, k, v, do, dk, dv, lse, delta, mask_ptr,
        *q.stride(), *k.stride(), *v.stride(), *lse.stride(), *mask_strides,
        n_kv, s_q, s_kv, head_dim, causal_offset, scale * LOG2E, scale, window, softcap,
        GROUP=group, BLOCK_M=block_m_kv, BLOCK_N=block_n_kv, **common,
        **launch_options(2 * block_n_kv, head_block(head_dim)),
    )  # fmt: skip
    return dq, dk, dv
