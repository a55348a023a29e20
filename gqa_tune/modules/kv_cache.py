"""A KV cache sized by key/value heads, compatible with torchtune's ``KVCache``, optionally quantized."""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from gqa_tune import _checks as checks
from gqa_tune.ops.kv_quant import (
    QUANTIZED_KV_DTYPES,
    check_kv_cache_dtype,
    quantize_kv,
    resolve_kv_cache_dtype,
    storage_view,
)
from gqa_tune.ops.tracing import compiling


def _append_problem(filled: int, rows: int, max_seq_len: int, batch: int, seq_len: int) -> Optional[str]:
    """Why ``[batch, ., seq_len, .]`` cannot be written after ``filled`` positions of ``rows`` rows, or ``None``."""
    if batch == 0:
        return "cannot write a batch of 0 rows"
    if rows and batch != rows:
        return (
            f"the cache holds {rows} row(s) written since reset(), got a batch of {batch}; "
            "call reset() before changing the batch"
        )
    if filled + seq_len > max_seq_len:
        return (
            f"cannot write {seq_len} positions: {filled} of max_seq_len {max_seq_len} are filled "
            f"({max_seq_len - filled} free)"
        )
    return None


def _write_all(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], slot_pos: torch.Tensor, start: int) -> None:
    """Write positions ``start .. start + s - 1`` (dim 2) of each ``(buffer, values)`` pair: in order, or
    (a ring: ``slot_pos`` non-empty) at slot ``position % slots``, keeping the last ``slots`` of them and
    recording their positions in ``slot_pos``."""
    batch, _, seq_len = pairs[0][1].shape[:3]
    if slot_pos.numel() == 0:
        for buffer, values in pairs:
            buffer[:batch, :, start : start + seq_len].copy_(values)
        return
    keep = min(seq_len, pairs[0][0].shape[2])
    positions = torch.arange(start + seq_len - keep, start + seq_len, device=slot_pos.device)
    slots = positions % pairs[0][0].shape[2]
    for buffer, values in pairs:
        buffer[:batch].index_copy_(2, slots, values[:, :, seq_len - keep :])
    slot_pos.index_copy_(0, slots, positions)


def _write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    start: int,
    k_val: torch.Tensor,
    v_val: torch.Tensor,
) -> None:
    """Write ``k_val``/``v_val`` at positions ``start ..`` (see :func:`_write_all`)."""
    _write_all(((k_cache, k_val), (v_cache, v_val)), slot_pos, start)


def _write_quantized(
    buffers: Sequence[torch.Tensor], slot_pos: torch.Tensor, start: int, values: Sequence[torch.Tensor]
) -> None:
    """Write quantized K/V and their scales (``k_cache, v_cache, k_scale, v_scale`` and the same four values)."""
    _write_all([(storage_view(b), storage_view(v)) for b, v in zip(buffers, values)], slot_pos, start)


def _in_range(values: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``values`` cast to the cache's ``dtype``; ``ValueError`` (eagerly) if a finite value does not fit in it
    (a float32 ``1e6`` written to a float16 cache would be stored as ``inf``)."""
    cast = values.to(dtype)
    narrower = values.dtype != dtype and torch.finfo(dtype).max < torch.finfo(values.dtype).max
    if narrower and not compiling():
        overflow = torch.isinf(cast) & torch.isfinite(values)
        if bool(overflow.any()):
            worst = float(values[overflow].abs().max())
            raise ValueError(
                f"{name} holds {worst:.4g}, beyond the largest {dtype} value {torch.finfo(dtype).max:.4g} the cache "
                "stores: set the cache up in a wider dtype"
            )
    return cast


@torch.library.custom_op(
    "gqa_tune::kv_cache_append", mutates_args=("k_cache", "v_cache", "cache_pos", "rows", "slot_pos")
)
def _kv_cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_pos: torch.Tensor,
    rows: torch.Tensor,
    slot_pos: torch.Tensor,
    k_val: torch.Tensor,
    v_val: torch.Tensor,
) -> None:
    """The compiled write: checks against the fill kept on the device, then writes by index.

    An opaque op, so a compiled step raises the same ``ValueError`` as an eager one
    (and leaves the cache as it was) instead of indexing past the buffer inside the graph.
    It reads the fill on the host: one small device sync per write.
    """
    batch, _, seq_len, _ = k_val.shape
    filled = int(cache_pos[0])
    problem = _append_problem(filled, int(rows[0]), cache_pos.shape[0], batch, seq_len)
    if problem is not None:
        raise ValueError(problem)
    _write(k_cache, v_cache, slot_pos, filled, k_val, v_val)
    cache_pos.add_(seq_len)
    rows.fill_(batch)


@_kv_cache_append.register_fake
def _(k_cache, v_cache, cache_pos, rows, slot_pos, k_val, v_val) -> None:
    return None


@torch.library.custom_op(
    "gqa_tune::kv_cache_append_quantized",
    mutates_args=("k_cache", "v_cache", "k_scale", "v_scale", "cache_pos", "rows", "slot_pos"),
)
def _kv_cache_append_quantized(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    cache_pos: torch.Tensor,
    rows: torch.Tensor,
    slot_pos: torch.Tensor,
    k_val: torch.Tensor,
    v_val: torch.Tensor,
    k_val_scale: torch.Tensor,
    v_val_scale: torch.Tensor,
) -> None:
    """:func:`_kv_cache_append` for a quantized cache: the values and their scales, after the same checks."""
    batch, _, seq_len, _ = k_val.shape
    filled = int(cache_pos[0])
    problem = _append_problem(filled, int(rows[0]), cache_pos.shape[0], batch, seq_len)
    if problem is not None:
        raise ValueError(problem)
    _write_quantized((k_cache, v_cache, k_scale, v_scale), slot_pos, filled, (k_val, v_val, k_val_scale, v_val_scale))
    cache_pos.add_(seq_len)
    rows.fill_(batch)


@_kv_cache_append_quantized.register_fake
def _(k_cache, v_cache, k_scale, v_scale, cache_pos, rows, slot_pos, k_val, v_val, k_val_scale, v_val_scale):
    return None


@torch.library.custom_op("gqa_tune::kv_cache_positions", mutates_args=())
def _kv_cache_positions(cache_pos: torch.Tensor, rows: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """The positions the next ``seq_len`` writes will take, after the same checks as the write (compiled path)."""
    problem = _append_problem(int(cache_pos[0]), int(rows[0]), cache_pos.shape[0], batch, seq_len)
    if problem is not None:
        raise ValueError(problem)
    return cache_pos[:seq_len].clone()


@_kv_cache_positions.register_fake
def _(cache_pos, rows, batch, seq_len):
    return cache_pos.new_empty(seq_len)


class KVCache(nn.Module):
    """Key/value buffers ``[b, n_kv, max_seq_len, h_d]`` filled left to right.

    Same constructor, buffer names (``k_cache``, ``v_cache``, ``cache_pos``)
    and methods (``update``, ``reset``, ``size``) as torchtune's ``KVCache``,
    with two differences: bad writes raise ``ValueError`` and leave the cache
    untouched, and a batch smaller than ``batch_size`` uses the first rows.

    The filled length lives on the device (``cache_pos``, ``arange(max_seq_len) + size``),
    which is what a compiled step reads and advances, so ``torch.compile`` sees
    fixed shapes and does not recompile between decode steps. Eager code keeps a
    host-side copy, so the eager hot path never waits on the device; after
    compiled writes the next eager read of :attr:`size` re-reads the device
    count by itself, so eager and compiled steps can be mixed freely.

    Every write is checked first, eagerly or compiled: a batch of 0, a batch other
    than the one written since :meth:`reset` (its rows would attend over zeros),
    or more positions than are free raise ``ValueError`` and leave the cache as it was.

    Quantized (``kv_cache_dtype=torch.int8`` or ``torch.float8_e4m3fn``): ``k_cache``/``v_cache`` hold
    the values in that dtype and ``k_scale``/``v_scale`` ``[b, n_kv, max_seq_len]`` one float32 scale per
    token and kv head, written with them (:mod:`gqa_tune.ops.kv_quant`: absmax, symmetric). K/V are
    given and read back in ``dtype``; attention reads the values with their scales
    (:meth:`scales`), never a dequantized copy of the whole buffer. A quantized cache is for inference:
    what is written to it carries no gradient. For a float cache ``k_scale``/``v_scale`` are ``None``.

    Args:
        batch_size (int): largest batch the cache will hold.
        max_seq_len (int): positions per row.
        num_kv_heads (int): key/value heads (not query heads).
        head_dim (int): per-head dimension.
        dtype (torch.dtype): buffer dtype; for a quantized cache, the floating dtype K/V come in and are
            read back in (the model's).
        device (Optional[torch.device]): buffer device (default: torch's default).
        window (Optional[int]): for a sliding-window layer: keep only the last ``window`` positions,
            in a ring buffer of ``min(window, max_seq_len)`` slots (``slot_pos`` records the position
            each slot holds, -1 if none); positions still run up to ``max_seq_len``. Attention over it
            goes through :meth:`window_keys`, which sees the ring before the new positions overwrite it.
        kv_cache_dtype (Optional[torch.dtype]): ``None``: K/V stored in ``dtype``; ``torch.int8`` or
            ``torch.float8_e4m3fn`` (or their names): stored quantized. ``ValueError`` naming the dtype and
            the device where the ops it needs do not run there (probed once per dtype and device).
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: Optional[torch.device] = None,
        window: Optional[int] = None,
        *,
        kv_cache_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("max_seq_len", max_seq_len),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            checks.positive_int(name, value)
        checks.optional_positive_int("window", window)
        device = checks.device("device", device)
        kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
        if kv_cache_dtype is None:
            checks.floating_dtype("dtype", dtype, allowed=QUANTIZED_KV_DTYPES)
        if kv_cache_dtype is None and dtype in QUANTIZED_KV_DTYPES:
            raise ValueError(
                f"dtype {dtype} is a storage dtype: pass dtype=<the model's floating dtype>, kv_cache_dtype={dtype}"
            )
        if kv_cache_dtype is not None:
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype in QUANTIZED_KV_DTYPES:
                raise ValueError(f"dtype must be the floating dtype K/V are read back in, got {dtype!r}")
            check_kv_cache_dtype(kv_cache_dtype, torch.empty(0, device=device).device)  # before allocating
        self.window = window
        self.kv_cache_dtype = kv_cache_dtype
        self._dtype = dtype
        slots = max_seq_len if window is None else min(window, max_seq_len)
        shape = (batch_size, num_kv_heads, slots, head_dim)
        storage = dtype if kv_cache_dtype is None else kv_cache_dtype
        self.register_buffer("k_cache", torch.zeros(shape, dtype=storage, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=storage, device=device), persistent=False)
        scales = shape[:3] if kv_cache_dtype is not None else None
        for name in ("k_scale", "v_scale"):  # one float32 scale per token and kv head; None: a float cache
            buffer = torch.zeros(scales, dtype=torch.float32, device=device) if scales is not None else None
            self.register_buffer(name, buffer, persistent=False)
        self.register_buffer("cache_pos", torch.arange(max_seq_len, device=device), persistent=False)
        # Rows written since reset() (0: none yet), on the device for compiled writes.
        self.register_buffer("rows", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        ring = torch.full((slots,), -1, dtype=torch.long, device=device) if window is not None else None
        self.register_buffer("slot_pos", ring if ring is not None else torch.empty(0, dtype=torch.long, device=device),
                             persistent=False)  # fmt: skip
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self._size = 0
        self._rows = 0
        self._device_ahead = False  # set by compiled writes: the host copies are stale

    @property
    def quantized(self) -> bool:
        """Whether K/V are stored quantized (``kv_cache_dtype`` set), with scales."""
        return self.kv_cache_dtype is not None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype K/V are written in and read back in (a float cache's buffer dtype)."""
        return self._dtype if self.quantized else self.k_cache.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys and values, with their scales."""
        return sum(t.nbytes for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale) if t is not None)

    def scales(self, batch: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(k_scale, v_scale)`` ``[batch, n_kv, max_seq_len]`` of a quantized cache, or ``None``: key ``j`` of
        kv head ``h`` is ``k_cache[b, h, j] * k_scale[b, h, j]``."""
        if not self.quantized:
            return None
        return self.k_scale[:batch], self.v_scale[:batch]

    def _sync_from_device(self) -> None:
        if self._device_ahead:
            self._size = int(self.cache_pos[0])
            self._rows = int(self.rows[0])
            self._device_ahead = False

    @property
    def size(self) -> int:
        """Positions filled so far (eager: the host-side count, refreshed after compiled writes)."""
        self._sync_from_device()
        return self._size

    @property
    def filled_rows(self) -> int:
        """Batch rows written since :meth:`reset` (0 before the first write)."""
        self._sync_from_device()
        return self._rows

    def truncate(self, length: int) -> None:
        """Forget the positions from ``length`` on (e.g. tokens a speculative step rejected).

        A ring cache (``window``) holds only the last ``window`` positions it was given: it can rewind only
        as far as the next token still finds the ``window - 1`` keys before it there.

        Raises:
            ValueError: ``length`` outside ``[0, size]``, or for a ring cache a ``length`` whose next token
                would need a position the ring has overwritten (naming both). The cache is unchanged.
        """
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.size:
            raise ValueError(f"length must be an int in [0, size={self.size}], got {length!r}")
        if self.window is not None and length > 0:
            oldest = max(0, self.size - self.k_cache.shape[2])  # the ring's earliest position still held
            needed = max(0, length - self.window + 1)  # the earliest key the token at ``length`` sees
            if needed < oldest:
                raise ValueError(
                    f"cannot truncate this ring cache (window {self.window}) to {length}: the next token, at "
                    f"position {length}, sees position {needed}, which the ring overwrote (it holds positions "
                    f"{oldest}..{self.size - 1}); truncate to {oldest + self.window - 1} or later, or reset()"
                )
        torch.arange(length, length + self.max_seq_len, out=self.cache_pos)
        self.slot_pos.masked_fill_(self.slot_pos >= length, -1)
        self._size = length
        if length == 0:
            self.rows.zero_()
            self._rows = 0

    def reset(self) -> None:
        """Empty the cache: zero the buffers and rewind the position."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        if self.quantized:
            self.k_scale.zero_()
            self.v_scale.zero_()
        torch.arange(self.max_seq_len, out=self.cache_pos)
        self.rows.zero_()
        self.slot_pos.fill_(-1)
        self._size = 0
        self._rows = 0
        self._device_ahead = False

    def check_update(self, batch: int, seq_len: int, heads: int = None, head_dim: int = None) -> None:
        """Raise ``ValueError`` if writing ``[batch, heads, seq_len, head_dim]`` would not fit.

        Under ``torch.compile`` the fill is on the device, so the write itself checks it.
        """
        if batch > self.batch_size:
            raise ValueError(f"batch size {batch} is larger than the cache's batch_size {self.batch_size}")
        if heads is not None and heads != self.num_kv_heads:
            raise ValueError(f"got {heads} key/value heads, the cache holds {self.num_kv_heads}")
        if head_dim is not None and head_dim != self.head_dim:
            raise ValueError(f"got head_dim {head_dim}, the cache holds {self.head_dim}")
        if not compiling():
            problem = _append_problem(self.size, self._rows, self.max_seq_len, batch, seq_len)
            if problem is not None:
                raise ValueError(problem)

    def next_positions(self, batch: int, seq_len: int) -> torch.Tensor:
        """Positions ``[seq_len]`` that writing ``batch`` rows of ``seq_len`` would fill.

        Raises ``ValueError`` (eagerly and compiled alike) if that write would not fit,
        so a caller can check before it computes anything from the positions.
        """
        self.check_update(batch, seq_len)
        if compiling():
            return _kv_cache_positions(self.cache_pos, self.rows, batch, seq_len)
        return self.cache_pos[:seq_len].clone()

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append ``k_val``/``v_val`` ``[b, n_kv, s, h_d]`` after the filled positions.

        Returns:
            The key and value buffers ``[b, n_kv, max_seq_len, h_d]`` (the first
            ``b`` rows); positions ``< size`` hold everything written so far.
            For a quantized cache these hold the quantized values (their scales: :meth:`scales`).

        Raises:
            ValueError: different k/v shapes, values that are not floating-point or (eagerly) do
                not fit in the cache's dtype, wrong head count or head_dim, a batch of 0, larger
                than the cache or other than the rows already written, or more positions than are
                free. The cache is unchanged.
        """
        if not isinstance(k_val, torch.Tensor) or not isinstance(v_val, torch.Tensor):
            raise ValueError(f"k_val and v_val must be tensors, got {type(k_val).__name__}, {type(v_val).__name__}")
        if k_val.dim() != 4 or k_val.shape != v_val.shape:
            raise ValueError(
                f"k_val and v_val must be [b, n_kv, s, h_d] of one shape, got {tuple(k_val.shape)} "
                f"and {tuple(v_val.shape)}"
            )
        if not k_val.is_floating_point() or not v_val.is_floating_point():
            raise ValueError(f"k_val and v_val must be floating-point, got {k_val.dtype} and {v_val.dtype}")
        if k_val.device != self.k_cache.device or v_val.device != self.k_cache.device:
            where = self.k_cache.device
            raise ValueError(f"k_val is on {k_val.device} and v_val on {v_val.device}, the cache on {where}")
        b, heads, seq_len, head_dim = k_val.shape
        self.check_update(b, seq_len, heads, head_dim)
        if self.quantized:
            self._update_quantized(k_val, v_val)
            return self.k_cache[:b], self.v_cache[:b]
        k_val, v_val = _in_range(k_val, self.k_cache.dtype, "k_val"), _in_range(v_val, self.v_cache.dtype, "v_val")
        if compiling():
            _kv_cache_append(self.k_cache, self.v_cache, self.cache_pos, self.rows, self.slot_pos, k_val, v_val)
            self._device_ahead = True  # a Python side effect, replayed after the graph: no guard, no recompile
        else:
            start = self._size
            _write(self.k_cache, self.v_cache, self.slot_pos, start, k_val, v_val)
            self.cache_pos.add_(seq_len)
            if self._rows != b:
                self.rows.fill_(b)
            self._size = start + seq_len
            self._rows = b
        return self.k_cache[:b], self.v_cache[:b]

    def _update_quantized(self, k_val: torch.Tensor, v_val: torch.Tensor) -> None:
        """Quantize (nothing written yet), then write values and scales as :meth:`update` writes a float cache."""
        b, _, seq_len, _ = k_val.shape
        (k_q, k_s), (v_q, v_s) = quantize_kv(k_val, self.kv_cache_dtype), quantize_kv(v_val, self.kv_cache_dtype)
        buffers = (self.k_cache, self.v_cache, self.k_scale, self.v_scale)
        if compiling():
            _kv_cache_append_quantized(*buffers, self.cache_pos, self.rows, self.slot_pos, k_q, v_q, k_s, v_s)
            self._device_ahead = True
            return
        start = self._size
        _write_quantized(buffers, self.slot_pos, start, (k_q, v_q, k_s, v_s))
        self.cache_pos.add_(seq_len)
        if self._rows != b:
            self.rows.fill_(b)
        self._size = start + seq_len
        self._rows = b

    def window_keys(
        self,
        batch: int,
        k_val: Optional[torch.Tensor] = None,
        v_val: Optional[torch.Tensor] = None,
        *,
        with_scales: bool = False,
    ) -> Tuple[torch.Tensor, ...]:
        """A ring cache's keys for attention over ``k_val``/``v_val`` ``[batch, n_kv, s, h_d]`` and what it holds.

        One new position (a decode step) overwrites only the position ``window`` before it, which its
        query no longer sees: then the keys are the ring itself, as it will be once :meth:`update` has
        written the step (call it before attending). Longer chunks would overwrite keys their first
        queries still see: then the keys are the ring as it is, followed by the chunk (a copy).

        Returns:
            ``(k, v, key_pos)``: keys and values ``[batch, n_kv, n, h_d]`` and the position each stands
            for ``[n]`` (-1: an empty slot). Attention is over a set of keys, so their order does not
            matter; masks are built from ``key_pos``. With ``with_scales``, a fourth item: the scales
            ``(k_scale, v_scale)`` ``[batch, n_kv, n]`` of a quantized cache's keys (the chunk quantized as
            :meth:`update` will store it), or ``None`` for a float cache.
        """
        k, v, key_pos = self.k_cache[:batch], self.v_cache[:batch], self.slot_pos
        scales = self.scales(batch)
        if k_val is not None:
            seq_len = k_val.shape[2]
            if compiling():
                new_pos = self.cache_pos[:seq_len]
            else:
                new_pos = torch.arange(self.size, self.size + seq_len, device=self.slot_pos.device)
            if seq_len == 1 and self.k_cache.shape[2] >= self.window:
                key_pos = key_pos.index_put((new_pos % self.k_cache.shape[2],), new_pos)  # written in place
            else:
                if scales is None:
                    k = torch.cat([k, k_val.to(k.dtype)], dim=2)
                    v = torch.cat([v, v_val.to(v.dtype)], dim=2)
                else:  # the chunk as update() will store it
                    (k_q, k_s), (v_q, v_s) = (quantize_kv(t, self.kv_cache_dtype) for t in (k_val, v_val))
                    k = torch.cat([storage_view(k), storage_view(k_q)], dim=2).view(k.dtype)
                    v = torch.cat([storage_view(v), storage_view(v_q)], dim=2).view(v.dtype)
                    scales = (torch.cat([scales[0], k_s], dim=2), torch.cat([scales[1], v_s], dim=2))
                key_pos = torch.cat([key_pos, new_pos])
        return (k, v, key_pos, scales) if with_scales else (k, v, key_pos)
