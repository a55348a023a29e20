"""A KV cache sized by key/value heads, compatible with torchtune's ``KVCache``."""

from typing import Optional, Tuple

import torch
from torch import nn


class KVCache(nn.Module):
    """Key/value buffers ``[b, n_kv, max_seq_len, h_d]`` filled left to right.

    Same constructor, buffer names (``k_cache``, ``v_cache``, ``cache_pos``)
    and methods (``update``, ``reset``, ``size``) as torchtune's ``KVCache``,
    with two differences: bad writes raise ``ValueError`` and leave the cache
    untouched, and a batch smaller than ``batch_size`` uses the first rows.

    ``cache_pos`` (a device tensor, ``arange(max_seq_len) + size``) is what a
    compiled step reads, so ``torch.compile`` sees fixed shapes and does not
    recompile between decode steps. Eager code reads the host-side ``size``,
    so the eager hot path never waits on the device. Drive one cache either
    eagerly or with a compiled step between two ``reset()`` calls: compiled
    writes advance ``cache_pos`` only (:meth:`sync_size` re-reads it).

    Args:
        batch_size (int): largest batch the cache will hold.
        max_seq_len (int): positions per row.
        num_kv_heads (int): key/value heads (not query heads).
        head_dim (int): per-head dimension.
        dtype (torch.dtype): buffer dtype.
        device (Optional[torch.device]): buffer device (default: torch's default).
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("max_seq_len", max_seq_len),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("cache_pos", torch.arange(max_seq_len, device=device), persistent=False)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self._size = 0

    @property
    def size(self) -> int:
        """Positions filled so far (host-side count)."""
        return self._size

    def sync_size(self) -> int:
        """Re-read the fill level from ``cache_pos`` (after compiled writes)."""
        self._size = int(self.cache_pos[0])
        return self._size

    def reset(self) -> None:
        """Empty the cache: zero the buffers and rewind the position."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        torch.arange(self.max_seq_len, out=self.cache_pos)
        self._size = 0

    def check_update(self, batch: int, seq_len: int, heads: int = None, head_dim: int = None) -> None:
        """Raise ``ValueError`` if writing ``[batch, heads, seq_len, head_dim]`` would not fit."""
        if batch > self.batch_size:
            raise ValueError(f"batch size {batch} is larger than the cache's batch_size {self.batch_size}")
        if heads is not None and heads != self.num_kv_heads:
            raise ValueError(f"got {heads} key/value heads, the cache holds {self.num_kv_heads}")
        if head_dim is not None and head_dim != self.head_dim:
            raise ValueError(f"got head_dim {head_dim}, the cache holds {self.head_dim}")
        if not torch.compiler.is_compiling() and self._size + seq_len > self.max_seq_len:
            raise ValueError(
                f"cannot write {seq_len} positions: {self._size} of max_seq_len "
                f"{self.max_seq_len} are filled ({self.max_seq_len - self._size} free)"
            )

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append ``k_val``/``v_val`` ``[b, n_kv, s, h_d]`` after the filled positions.

        Returns:
            The key and value buffers ``[b, n_kv, max_seq_len, h_d]`` (the first
            ``b`` rows); positions ``< size`` hold everything written so far.

        Raises:
            ValueError: different k/v shapes, wrong head count or head_dim, a
                batch larger than the cache, or more positions than are free.
                The cache is unchanged.
        """
        if k_val.dim() != 4 or k_val.shape != v_val.shape:
            raise ValueError(
                f"k_val and v_val must be [b, n_kv, s, h_d] of one shape, got {tuple(k_val.shape)} "
                f"and {tuple(v_val.shape)}"
            )
        b, heads, seq_len, head_dim = k_val.shape
        self.check_update(b, seq_len, heads, head_dim)
        k_out, v_out = self.k_cache[:b], self.v_cache[:b]
        if torch.compiler.is_compiling():
            # Fixed-shape write by index: no host-side length, no recompiles.
            positions = self.cache_pos[:seq_len]
            k_out.index_copy_(2, positions, k_val.to(k_out.dtype))
            v_out.index_copy_(2, positions, v_val.to(v_out.dtype))
        else:
            start = self._size
            k_out[:, :, start : start + seq_len].copy_(k_val)
            v_out[:, :, start : start + seq_len].copy_(v_val)
            self._size = start + seq_len
        self.cache_pos.add_(seq_len)
        return k_out, v_out
