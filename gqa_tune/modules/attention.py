"""Grouped-query ``MultiHeadAttention`` with torchtune 0.6.1's constructor."""

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gqa_tune.modules.kv_cache import KVCache
from gqa_tune.ops.backends.triton import kernel_problem
from gqa_tune.ops.decode import decode_attention
from gqa_tune.ops.dispatch import AUTO_DISABLED, call_guarded, check_backend_name, run_attention
from gqa_tune.ops.masks import MaskType, bottom_right_causal

logger = logging.getLogger(__name__)


def _out_features(module: nn.Module) -> Optional[int]:
    """Output width of a linear-like projection, when it says (nn.Linear, LoRALinear)."""
    for attr in ("out_features", "out_dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


class MultiHeadAttention(nn.Module):
    """Multi-head attention for MHA, GQA and MQA, chosen by ``num_kv_heads``.

    A drop-in for ``torchtune.modules.MultiHeadAttention`` (same keyword-only
    constructor, ``forward``, cache methods and parameter names, so torchtune
    state dicts load unchanged), with three differences:

    * K/V are never copied to ``num_heads`` heads: the attention backend reads
      the grouped tensors (query head ``i`` uses kv head ``i // (n_h // n_kv)``).
    * With a KV cache, attention covers only the filled positions, so a decode
      step costs in proportion to the tokens seen so far, not ``max_seq_len``.
      Without a mask, new tokens attend causally to the cache and to each
      other (queries are placed at the end of the keys), and RoPE positions
      default to the cache position, so decoding needs neither mask nor
      ``input_pos``. Under ``torch.compile`` the step uses the fixed-size
      buffer and a mask built on the device instead (no recompiles).
    * ``backend`` picks the attention implementation (see
      :mod:`gqa_tune.ops.dispatch`); bad configurations and bad calls raise
      ``ValueError`` naming the offending values, and a rejected call leaves
      the cache as it was.

    Args:
        embed_dim (int): model width ``d``.
        num_heads (int): query heads ``n_h``.
        num_kv_heads (int): key/value heads ``n_kv``; ``n_h % n_kv == 0``.
        head_dim (int): per-head width ``h_d`` (need not be ``d // n_h``).
        q_proj, k_proj, v_proj, output_proj (nn.Module): projections
            ``d -> n_h*h_d``, ``d -> n_kv*h_d`` (twice), ``n_h*h_d -> d``.
        pos_embeddings (Optional[nn.Module]): e.g. RoPE, applied to q and k
            before the heads are moved forward.
        q_norm, k_norm (Optional[nn.Module]): per-head norms, set together.
        kv_cache (Optional[KVCache]): a cache to use once ``cache_enabled``.
        max_seq_len (int): longest sequence the model runs with.
        is_causal (bool): causal attention when no mask is given.
        attn_dropout (float): dropout on attention weights while training.
        backend (str): ``"auto"``, ``"sdpa"``, ``"flex"``, ``"math"`` or ``"triton"``.

    Notation: ``b`` batch, ``s_x``/``s_y`` query/key lengths, ``n_h`` query heads,
    ``n_kv`` kv heads, ``h_d`` head dim, ``d`` embed dim.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        output_proj: nn.Module,
        pos_embeddings: Optional[nn.Module] = None,
        q_norm: Optional[nn.Module] = None,
        k_norm: Optional[nn.Module] = None,
        kv_cache: Optional[KVCache] = None,
        max_seq_len: int = 4096,
        is_causal: bool = True,
        attn_dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("max_seq_len", max_seq_len),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= attn_dropout <= 1.0:
            raise ValueError(f"attn_dropout ({attn_dropout}) must be between 0.0 and 1.0")
        if (q_norm is None) != (k_norm is None):
            raise ValueError(
                f"q_norm and k_norm must be set together, got q_norm={type(q_norm).__name__}, "
                f"k_norm={type(k_norm).__name__}"
            )
        for name, proj, width in (
            ("q_proj", q_proj, num_heads * head_dim),
            ("k_proj", k_proj, num_kv_heads * head_dim),
            ("v_proj", v_proj, num_kv_heads * head_dim),
        ):
            got = _out_features(proj)
            if got is not None and got != width:
                raise ValueError(f"{name} outputs {got} features, expected {width} (heads x head_dim {head_dim})")
        check_backend_name(backend)

        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.embed_dim = embed_dim
        self.attn_dropout = attn_dropout
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.is_causal = is_causal
        self.backend = backend

        self.kv_cache = kv_cache
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.output_proj = output_proj
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.pos_embeddings = pos_embeddings

        # As in torchtune: only setup_cache() turns the cache on.
        self.cache_enabled = False

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        """Create a ``KVCache`` with ``num_kv_heads`` heads on the weights' device.

        Skipped, with a warning, if a cache already exists (as in torchtune).
        """
        if self.kv_cache is not None:
            logger.warning("Key value caches are already setup. You cannot call ``setup_caches()`` twice. Skipping.")
            return
        param = next(self.parameters(), None)
        self.kv_cache = KVCache(
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype,
            device=param.device if param is not None else None,
        )
        self.cache_enabled = True

    def reset_cache(self) -> None:
        """Empty the KV cache."""
        if self.kv_cache is None:
            raise RuntimeError("Key value caches are not setup. Call ``setup_caches()`` first.")
        self.kv_cache.reset()

    def _check_mask(self, mask: MaskType, b: int, s_x: int, kv_lens: tuple) -> None:
        if not isinstance(mask, torch.Tensor):
            return  # a BlockMask is checked by the functional layer's rules
        if mask.dim() != 3 or mask.shape[0] not in (1, b) or mask.shape[1] != s_x or mask.shape[2] not in kv_lens:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit: expected [b={b}, s_x={s_x}, s_kv] "
                f"with s_kv in {sorted(set(kv_lens))}"
            )

    def _decode_with_kernel(self, q: torch.Tensor, mask: Optional[MaskType], dropout_p: float) -> bool:
        """Whether the cached step runs the split-K decode kernel (inference with the Triton backend)."""
        if self.backend == "auto":
            if q.device.type != "cuda" or "triton" in AUTO_DISABLED:
                return False
        elif self.backend != "triton":
            return False
        if dropout_p > 0.0 or (torch.is_grad_enabled() and q.requires_grad):
            return False
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
            return False
        return kernel_problem(q.device, q.dtype, q.shape[-1]) is None

    def _kernel_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, mask, new_tokens: bool
    ) -> torch.Tensor:
        """Split-K Triton decode over the fixed-size buffers ``[b, n_kv, max_seq_len, h_d]``.

        The filled length comes from ``cache_pos[0]`` on the device: no host
        sync, and the cost follows the filled length.
        """
        if mask is not None and mask.shape[-1] != cache.max_seq_len:
            mask = F.pad(mask, (0, cache.max_seq_len - mask.shape[-1]), value=False)
        seqlens = cache.cache_pos[:1].expand(q.shape[0])
        causal = mask is None and new_tokens and self.is_causal
        # Eager: the host-side fill sizes the splits; compiled: the whole buffer (no recompiles).
        bound = None if torch.compiler.is_compiling() else cache.size
        return decode_attention(q, k, v, seqlens, None, causal, mask, bound)

    def _cache_mask_on_device(self, cache: KVCache, s_x: int, new_tokens: bool) -> torch.Tensor:
        """Bool ``[s_x, max_seq_len]`` from ``cache_pos`` (compiled path, after the update)."""
        keys = torch.arange(cache.max_seq_len, device=cache.cache_pos.device)
        if new_tokens and self.is_causal:
            query_pos = cache.cache_pos[:s_x] - s_x
            return keys[None, :] <= query_pos[:, None]
        return (keys < cache.cache_pos[0]).expand(s_x, -1)

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        mask: Optional[MaskType] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): queries' input ``[b, s_x, d]``.
            y (Optional[torch.Tensor]): keys'/values' input ``[b, s_y, d]``
                (``y=x`` for self-attention); ``None`` only with an enabled
                cache, to attend to what it holds.
            mask: bool ``[b, s_x, s_y]``, or with a cache ``[b, s_x, max_seq_len]``
                (torchtune's decoding masks) or ``[b, s_x, filled]``; True =
                attend. Or a flex ``BlockMask``. ``None``: causal if
                ``is_causal`` (aligned to the end of the cache when decoding).
            input_pos (Optional[torch.Tensor]): positions ``[b, s_x]`` for RoPE
                (packed sequences restart them). Default: ``0..s_x-1``, or the
                cache positions of the new tokens when decoding.

        Returns:
            torch.Tensor: ``[b, s_x, d]``.

        Raises:
            ValueError: no ``y`` without an enabled cache, mismatched batch,
                a mask of the wrong shape, a batch larger than the cache or a
                write past its end. The cache is left unchanged.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be [b, s_x, d], got shape {tuple(x.shape)}")
        b, s_x, _ = x.shape
        cache = self.kv_cache if self.cache_enabled and self.kv_cache is not None else None
        compiling = torch.compiler.is_compiling()

        # Validate everything before any state changes.
        if y is None:
            if cache is None:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            if b > cache.batch_size:
                raise ValueError(f"batch size {b} is larger than the cache's batch_size {cache.batch_size}")
            kv_lens = (cache.max_seq_len, cache.size)
        else:
            if y.dim() != 3 or y.shape[0] != b:
                raise ValueError(f"y must be [b={b}, s_y, d], got shape {tuple(y.shape)}")
            if cache is not None:
                cache.check_update(b, y.shape[1])
                kv_lens = (cache.max_seq_len, cache.size + y.shape[1])
            else:
                kv_lens = (y.shape[1],)
        if mask is not None:
            self._check_mask(mask, b, s_x, kv_lens)
        start = cache.size if cache is not None else 0
        if input_pos is None and cache is not None and y is not None and self.pos_embeddings is not None:
            input_pos = cache.cache_pos[:s_x].clone()  # positions of the new tokens

        q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
        q = q.transpose(1, 2)  # [b, n_h, s_x, h_d]
        if self.q_norm is not None:
            q = self.q_norm(q)

        if y is None:
            k, v = cache.k_cache[:b], cache.v_cache[:b]  # [b, n_kv, max_seq_len, h_d]
        else:
            s_y = y.shape[1]
            k = self.k_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
            v = self.v_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
            if self.pos_embeddings is not None:
                k = self.pos_embeddings(k, input_pos=input_pos)
            k = k.transpose(1, 2)  # [b, n_kv, s_y, h_d]
            v = v.transpose(1, 2)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if cache is not None:
                k, v = cache.update(k, v)  # [b, n_kv, max_seq_len, h_d]

        dropout_p = self.attn_dropout if self.training else 0.0
        if cache is not None and self._decode_with_kernel(q, mask, dropout_p):
            out = call_guarded(
                "triton", self.backend, lambda: self._kernel_decode(q, k, v, cache, mask, y is not None), lambda: None
            )
            if out is not None:  # None: the kernel failed to build under "auto"; take the path below
                return self.output_proj(out.transpose(1, 2).reshape(b, s_x, -1))

        attn_mask = mask[:, None] if isinstance(mask, torch.Tensor) else mask
        is_causal = False
        if cache is None:
            is_causal = mask is None and self.is_causal
        elif compiling:
            if mask is None:
                attn_mask = self._cache_mask_on_device(cache, s_x, y is not None)
        else:
            filled = cache.size
            k, v = k[:, :, :filled], v[:, :, :filled]  # [b, n_kv, filled, h_d]
            if attn_mask is not None:
                attn_mask = attn_mask[..., :filled]
            elif y is not None and self.is_causal and s_x > 1:
                if start == 0 and s_x == filled:
                    is_causal = True
                else:
                    attn_mask = bottom_right_causal(s_x, filled, x.device)

        out = run_attention(
            q,
            k,
            v,
            mask=attn_mask,
            is_causal=is_causal,
            dropout_p=dropout_p,
            backend=self.backend,
        )
        out = out.transpose(1, 2).reshape(b, s_x, -1)  # [b, s_x, n_h * h_d]
        return self.output_proj(out)
