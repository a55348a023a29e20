"""``flash_decode_gqa``: attention of a few new queries over a KV cache."""

from typing import Optional

import torch
import torch.nn.functional as F

from gqa_tune import _checks as checks
from gqa_tune.ops.backends.triton import kernel_problem
from gqa_tune.ops.functional import check_scale
from gqa_tune.ops.kv_quant import QUANTIZED_KV_DTYPES, dequantize_kv
from gqa_tune.ops.nan_rule import hide_masked_nans


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


def decode_visibility(
    cache_seqlens: torch.Tensor, s_q: int, max_len: int, causal: bool, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Bool ``[b, 1, s_q, max_len]``: which cache slots each new query sees."""
    slots = torch.arange(max_len, device=cache_seqlens.device)
    lens = cache_seqlens.to(slots.dtype).view(-1, 1, 1)
    if causal:
        visible = slots.view(1, 1, -1) <= lens - s_q + torch.arange(s_q, device=slots.device).view(1, -1, 1)
    else:
        visible = (slots.view(1, 1, -1) < lens).expand(-1, s_q, -1)
    if mask is not None:
        visible = visible & mask
    return visible[:, None]


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

    On CUDA (or under ``TRITON_INTERPRET=1`` on CPU) this runs the split-K
    Triton kernel; elsewhere an equivalent PyTorch computation.

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
    return decode_attention(query, k_cache, v_cache, cache_seqlens, scale, causal, mask, max_seqlen, k_scale, v_scale)


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: Optional[float],
    causal: bool,
    mask: Optional[torch.Tensor],
    max_seqlen: Optional[int],
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`flash_decode_gqa` without its checks, for callers that guarantee them."""
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    native = k_scale is None or k_cache.dtype == torch.int8
    if native and kernel_problem(query.device, query.dtype, query.shape[-1]) is None:
        from gqa_tune.kernels.triton.ops import flash_decode

        if mask is not None:
            mask = mask.expand(query.shape[0], -1, -1)
        bound = -1 if max_seqlen is None else int(max_seqlen)
        scales = {} if k_scale is None else dict(k_scale=k_scale.float(), v_scale=v_scale.float())
        return flash_decode(
            query, k_cache, v_cache, cache_seqlens.to(torch.int32), mask, scale, causal, bound, **scales
        )
    if k_scale is not None:  # dequantize the filled prefix only
        filled = int(cache_seqlens.max()) if max_seqlen is None else int(max_seqlen)
        k_cache = dequantize_kv(k_cache[:, :, :filled], k_scale[:, :, :filled], query.dtype)
        v_cache = dequantize_kv(v_cache[:, :, :filled], v_scale[:, :, :filled], query.dtype)
        mask = None if mask is None else mask[..., :filled]
    b, n_h, s_q, head_dim = query.shape
    n_kv = k_cache.shape[1]
    visible = decode_visibility(cache_seqlens, s_q, k_cache.shape[2], causal, mask)
    # Pack the group's query heads into rows: [b, n_kv, G * s_q, h_d]; one read of each kv head.
    packed = query.reshape(b, n_kv, (n_h // n_kv) * s_q, head_dim)
    visible = visible.repeat(1, 1, n_h // n_kv, 1)
    # Slots past a row's length may hold anything (torch.empty caches): the NaN rule keeps them out.
    k_cache, v_cache, restore = hide_masked_nans(packed, k_cache, v_cache, visible, False)
    out = restore(F.scaled_dot_product_attention(packed, k_cache, v_cache, attn_mask=visible, scale=scale))
    return out.reshape(b, n_h, s_q, head_dim)
