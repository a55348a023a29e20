"""Quantized keys and values: one scale per token and kv head.

A quantized KV cache stores K/V ``[b, n_kv, s, h_d]`` as ``int8`` (absmax, symmetric: ``round(x / scale)``
with ``scale = max|x| / 127`` over the head dim) or ``float8_e4m3fn`` (``x / scale`` rounded to fp8, with
``scale = max|x| / 448``), and the scales ``[b, n_kv, s]`` in float32. A value reads back as
``values * scale[..., None]``: int8 within ``scale / 2`` of what was written, fp8 within ``|x| / 16``
(``scale * 2**-10`` near zero). With ``h_d = 64``, a token of one kv head takes 64 + 4 bytes instead of
256 in float32 (0.266x).

Attention over such a cache goes through the dispatcher as usual (:class:`gqa_tune.ops.dispatch.AttentionSpec`'s
``kv_scales``): the Triton decode kernel reads int8 natively; for every other backend the filled prefix,
and only that, is dequantized when the call runs (:func:`dequantize_filled`).
"""

import functools
from typing import Optional, Tuple, Union

import torch

#: The storage dtypes of a quantized cache, and their largest magnitudes.
QUANTIZED_KV_DTYPES = (torch.int8, torch.float8_e4m3fn)
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
#: Names accepted in configs (``kv_cache_dtype: int8``).
KV_CACHE_DTYPE_NAMES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}


def resolve_kv_cache_dtype(value: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``None`` (K/V stored in the model's dtype), or the quantized storage dtype named by ``value``.

    Raises:
        ValueError: ``value`` is neither ``None``, ``"int8"``, ``"float8_e4m3fn"``, ``torch.int8`` nor
            ``torch.float8_e4m3fn``.
    """
    if value is None:
        return None
    if isinstance(value, str) and value in KV_CACHE_DTYPE_NAMES:
        return KV_CACHE_DTYPE_NAMES[value]
    if isinstance(value, torch.dtype) and value in QUANTIZED_KV_DTYPES:
        return value
    raise ValueError(
        f"kv_cache_dtype must be None (the model's dtype), 'int8' or 'float8_e4m3fn' (or the torch dtypes), "
        f"got {value!r}"
    )


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as raw bytes where it is fp8 (CPU has no ``index_copy_`` for fp8), else ``t`` itself: for writes."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values, scale)``: ``x`` ``[..., h_d]`` as ``dtype`` values ``[..., h_d]`` and float32 scales ``[...]``.

    A row of zeros gets scale 0 (and reads back as zeros); a row holding a NaN or an infinity gets a
    non-finite scale, so it reads back as NaN.
    """
    amax = x.detach().abs().amax(dim=-1).to(torch.float32)  # [...]
    scale = amax / _QMAX[dtype]
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = x.detach().to(torch.float32) / divisor[..., None]
    if dtype == torch.int8:
        values = scaled.round().clamp(-127.0, 127.0).to(torch.int8)
    else:
        values = scaled.clamp(-448.0, 448.0).to(dtype)
    return values, scale


def dequantize_kv(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values * scale[..., None]`` in ``dtype`` (computed in float32, float64 for a float64 ``dtype``)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    # In place on the converted copy: on this CPU an out-of-place broadcast multiply (or int8 * float
    # promotion) of a [1, 8, 4096, 64] cache took 17 ms, the in-place one 0.2 ms; the products are the same.
    return values.to(work).mul_(scale.to(work)[..., None]).to(dtype)


@torch.library.custom_op("gqa_tune::kv_dequantize_filled", mutates_args=())
def _dequantize_filled_op(
    values: torch.Tensor, scale: torch.Tensor, seqlens: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The compiled step's dequantization: the fill is read on the host (one small device sync), only
    positions below the longest row's fill are dequantized, the rest of the buffer-sized output is 0."""
    return dequantize_filled(values, scale, dtype, int(seqlens.max()) if seqlens.numel() else 0)


@_dequantize_filled_op.register_fake
def _(values, scale, seqlens, dtype):
    return values.new_empty(values.shape, dtype=dtype)


def dequantize_filled(
    values: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    filled: Union[None, int, torch.Tensor] = None,
) -> torch.Tensor:
    """Quantized K or V ``[b, n_kv, s, h_d]`` as ``dtype``, for a backend that does not read them natively.

    Args:
        values, scale: ``[b, n_kv, s, h_d]`` and ``[b, n_kv, s]``.
        dtype (torch.dtype): the result's.
        filled: ``None``: every position is filled (the caller sliced the buffers to the fill, as the
            eager decode step does). An int (a host-side fill) or ``[b]`` lengths on the device (a
            compiled step): the output keeps the buffer's shape, and positions at or past the fill
            (the longest row's) are zeros, never dequantized.
    """
    if filled is None:
        return dequantize_kv(values, scale, dtype)
    if isinstance(filled, torch.Tensor):
        return _dequantize_filled_op(values, scale, filled, dtype)
    filled = min(int(filled), values.shape[2])
    out = torch.zeros(values.shape, dtype=dtype, device=values.device)
    out[:, :, :filled] = dequantize_kv(values[:, :, :filled], scale[:, :, :filled], dtype)
    return out


@functools.cache
def _probe(dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Run what a quantized cache needs (quantize, write by index, read back) on a tiny tensor."""
    try:
        x = torch.linspace(-1.0, 1.0, 8, device=device).view(1, 1, 2, 4)
        values, scale = quantize_kv(x, dtype)
        buffer = torch.zeros(1, 1, 3, 4, dtype=dtype, device=device)
        storage_view(buffer).index_copy_(2, torch.tensor([2, 0], device=device), storage_view(values))
        back = dequantize_kv(buffer[:, :, [2, 0]], scale, torch.float32).cpu()
    except (RuntimeError, NotImplementedError, TypeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if not torch.allclose(back, x.cpu(), atol=0.07):
        return "a quantize / dequantize round trip gave wrong values"
    return None


def kv_cache_dtype_problem(dtype: torch.dtype, device: Union[str, torch.device]) -> Optional[str]:
    """Why a cache quantized to ``dtype`` cannot run on ``device``, or ``None``.

    Decided by running the ops it needs there once (cached per dtype and device).
    """
    if dtype not in QUANTIZED_KV_DTYPES:
        return f"{dtype} is not a quantized KV-cache dtype (torch.int8 or torch.float8_e4m3fn)"
    device = torch.device(device)
    if device.type == "meta":
        return None  # nothing runs on meta tensors
    return _probe(dtype, device)


def check_kv_cache_dtype(dtype: torch.dtype, device: Union[str, torch.device]) -> None:
    """``ValueError`` naming ``dtype`` and ``device`` where a cache quantized to ``dtype`` cannot run there."""
    problem = kv_cache_dtype_problem(dtype, device)
    if problem is not None:
        raise ValueError(f"kv_cache_dtype {dtype} is not supported on device {torch.device(device)}: {problem}")
