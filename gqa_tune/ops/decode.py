"""``flash_decode_gqa``: attention of a few new queries over a KV cache."""

from typing import Optional

import torch

from gqa_tune import _checks as checks
from gqa_tune.ops.dispatch import AttentionSpec, execute, plan_attention
from gqa_tune.ops.functional import check_scale
from gqa_tune.ops.kv_quant import QUANTIZED_KV_DTYPES


def _check(query, k_cache, v_cache, cache_seqlens, mask, scale, causal, max_seqlen, k_scale=None, v_scale=None):
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    b, n_h, s_q, head_dim = query.shape
    if not query.is_floating_point():
        raise ValueError(f"query must be a floating-point tensor, got {query.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    cb, n_kv, max_len, cd = k_cache.shape
    if cb != b or cd != head_dim:
        raise ValueError(
            f"query {tuple(query.shape)} and caches {tuple(k_cache.shape)} must agree on batch and head_dim"
        )
    if head_dim == 0:
        raise ValueError(f"head_dim must be positive, got query {tuple(query.shape)}")
    if n_kv == 0 or n_kv > n_h or n_h % n_kv:
        raise ValueError(f"query heads ({n_h}) must be a multiple of cache heads ({n_kv})")
    if s_q > max_len:
        raise ValueError(f"{s_q} query positions do not fit a cache of length {max_len}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale must be given together (a quantized cache) or not at all")
    if k_scale is not None:
        if k_cache.dtype not in QUANTIZED_KV_DTYPES or v_cache.dtype != k_cache.dtype:
            raise ValueError(
                f"with scales, k_cache and v_cache must both be int8 or float8_e4m3fn, got {k_cache.dtype} and "
                f"{v_cache.dtype}"
            )
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not isinstance(t, torch.Tensor) or t.shape != k_cache.shape[:3] or not t.is_floating_point():
                raise ValueError(
                    f"{name} must be a floating tensor [b, n_kv, max_len] = {list(k_cache.shape[:3])}, "
                    f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                )
            if t.device != query.device:
                raise ValueError(f"{name} is on {t.device}, query on {query.device}")
    elif not (query.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"dtypes differ: query {query.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if not (isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.shape == (b,)) or (
        cache_seqlens.is_floating_point() or cache_seqlens.is_complex() or cache_seqlens.dtype == torch.bool
    ):
        raise ValueError(f"cache_seqlens must be an integer tensor of shape ({b},), got {cache_seqlens!r}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens), ("mask", mask)):
        if t is not None and t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, query on {query.device}")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[1:] != (s_q, max_len)
                             or mask.shape[0] not in (1, b)):  # fmt: skip
        raise ValueError(
            f"mask must be bool [b, s_q, max_len] = [{b}, {s_q}, {max_len}], got {mask.dtype} {tuple(mask.shape)}"
        )
    check_scale(scale)
    checks.flag("causal", causal)
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be None or a non-negative int, got {max_seqlen!r}")
    if b == 0:
        return
    # One host read: the kernel indexes the cache with these lengths, so they must lie in it.
    low, high = int(cache_seqlens.min()), int(cache_seqlens.max())
    if low < 0 or high > max_len:
        raise ValueError(f"cache_seqlens must lie in [0, max_len={max_len}], got {cache_seqlens.tolist()}")
    if max_seqlen is not None and max_seqlen < high:
        raise ValueError(f"max_seqlen ({max_seqlen}) is below the longest cache_seqlens entry ({high})")


def flash_decode_gqa(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    mask: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of ``s_q`` new queries over a grouped KV cache (flash-decoding).

    Batch row ``b`` attends to cache positions ``< cache_seqlens[b]`` (rows may
    differ). With ``causal`` (default) the new positions are the last ``s_q``
    of those, and position ``i`` sees keys up to ``cache_seqlens[b] - s_q + i``;
    for ``s_q = 1`` that is the whole filled prefix. Query head ``i`` uses kv
    head ``i // (n_h // n_kv)``.

    Planned by :func:`gqa_tune.ops.dispatch.plan_attention` as a call with the cache's filled lengths: the
    ``"triton"`` row's split-K decode kernel where it can serve it (CUDA, or ``TRITON_INTERPRET=1`` on CPU),
    else whatever ``backend="auto"`` picks, over the lengths lowered into a mask.

    A quantized cache (``k_scale``/``v_scale`` given) holds int8 or float8_e4m3fn values: key ``j`` is
    ``k_cache[..., j, :] * k_scale[..., j]`` (:mod:`gqa_tune.ops.kv_quant`). The kernel reads int8
    natively; otherwise only the filled prefix (up to the longest row) is dequantized.

    Args:
        query (torch.Tensor): ``[b, n_h, s_q, h_d]``.
        k_cache, v_cache (torch.Tensor): ``[b, n_kv, max_len, h_d]``.
        cache_seqlens (torch.Tensor): ``[b]`` integers, filled length per row
            (including the ``s_q`` new positions).
        scale (Optional[float]): score multiplier, default ``h_d ** -0.5``.
        causal (bool): place the queries at the end of each row's keys.
        mask (Optional[torch.Tensor]): bool ``[b, s_q, max_len]``, True = attend
            (torchtune's decoding mask), applied on top.
        max_seqlen (Optional[int]): a host-side bound on ``cache_seqlens``
            (e.g. the cache's fill), so the kernel splits only the filled part;
            default: the buffer length (no host sync needed, compile-friendly).
            A bound below a row's length raises ``ValueError`` (read on the host when given).
        k_scale, v_scale (Optional[torch.Tensor]): ``[b, n_kv, max_len]`` scales of a quantized cache.

    Returns:
        torch.Tensor: ``[b, n_h, s_q, h_d]``; a row that sees no key gives 0.
    """
    _check(query, k_cache, v_cache, cache_seqlens, mask, scale, causal, max_seqlen, k_scale, v_scale)
    if query.numel() == 0:
        return query.new_zeros(query.shape)
    spec = AttentionSpec(
        mask=None if mask is None else mask[:, None],  # [b, 1, s_q, max_len]
        causal=causal,
        seqlens=cache_seqlens,
        max_seqlen=max_seqlen,
        scale=scale,
        kv_scales=None if k_scale is None else (k_scale.float(), v_scale.float()),
    )
    try:
        plan = plan_attention(query, k_cache, v_cache, spec, "triton")
    except ValueError:  # the kernel cannot serve it here: the backend "auto" picks
        plan = plan_attention(query, k_cache, v_cache, spec, "auto")
    return execute(plan, query)
