"""Grouped-query ``MultiHeadAttention`` with torchtune 0.6.1's constructor."""

import logging
import numbers
from typing import Optional

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from gqa_tune import _checks as checks
from gqa_tune.modules.kv_cache import KVCache
from gqa_tune.ops.dispatch import AttentionSpec, check_backend_name, execute, plan_attention
from gqa_tune.ops.functional import check_scale, check_softcap
from gqa_tune.ops.kv_quant import QUANTIZED_KV_DTYPES, resolve_kv_cache_dtype
from gqa_tune.ops.masks import MaskType, documents_of
from gqa_tune.ops.tracing import compiling

logger = logging.getLogger(__name__)


def _width(module: nn.Module, attrs: tuple) -> Optional[int]:
    for attr in attrs:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _out_features(module: nn.Module) -> Optional[int]:
    """Output width of a linear-like projection, when it says (nn.Linear, LoRALinear)."""
    return _width(module, ("out_features", "out_dim"))


def _in_features(module: nn.Module) -> Optional[int]:
    """Input width of a linear-like projection, when it says (nn.Linear, LoRALinear)."""
    return _width(module, ("in_features", "in_dim"))


class CacheNotSetUpError(RuntimeError, ValueError):
    """``reset_cache()`` before ``setup_cache()``: a ``RuntimeError`` as in torchtune, and a ``ValueError``."""


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
        sliding_window_size (Optional[int]): query ``i`` sees key ``j`` only when ``|i - j| <
            sliding_window_size`` (positions: the token indices without a cache, the cache positions with
            one), as torchtune's ``Gemma2Attention``. ``None``: no window.
        softcapping (Optional[float]): the scaled scores ``s`` become ``c * tanh(s / c)`` before masking
            (Gemma 2). ``None`` (the default here, unlike ``Gemma2Attention``'s 50.0): no capping.
        query_pre_attn_scalar (Optional[float]): scores are scaled by ``query_pre_attn_scalar ** -0.5``
            instead of ``head_dim ** -0.5`` (Gemma 2).
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
        sliding_window_size: Optional[int] = None,
        softcapping: Optional[float] = None,
        query_pre_attn_scalar: Optional[float] = None,
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
            checks.positive_int(name, value)
        for name, value in (("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj), ("output_proj", output_proj)):
            checks.module(name, value)
        for name, value in (("pos_embeddings", pos_embeddings), ("q_norm", q_norm), ("k_norm", k_norm)):
            checks.module(name, value, optional=True)
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise ValueError(f"kv_cache must be a gqa_tune KVCache or None, got {type(kv_cache).__name__}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if (
            isinstance(attn_dropout, bool)
            or not isinstance(attn_dropout, numbers.Real)
            or not 0.0 <= attn_dropout <= 1.0
        ):
            raise ValueError(f"attn_dropout ({attn_dropout!r}) must be between 0.0 and 1.0")
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
        got = _in_features(output_proj)
        if got is not None and got != num_heads * head_dim:
            raise ValueError(
                f"output_proj takes {got} features, expected {num_heads * head_dim} (num_heads {num_heads} x "
                f"head_dim {head_dim})"
            )
        check_backend_name(backend)
        checks.optional_positive_int("sliding_window_size", sliding_window_size)
        check_softcap("softcapping", softcapping)
        checks.optional_positive_number("query_pre_attn_scalar", query_pre_attn_scalar)
        if query_pre_attn_scalar is not None:
            check_scale(float(query_pre_attn_scalar) ** -0.5)  # the score multiplier it makes
        checks.flag("is_causal", is_causal)

        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.embed_dim = embed_dim
        self.attn_dropout = attn_dropout
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.is_causal = is_causal
        self.backend = backend
        self.sliding_window_size = sliding_window_size
        self.softcapping = softcapping
        #: Multiplier of the scores (``None``: ``head_dim ** -0.5``).
        self.scale = None if query_pre_attn_scalar is None else float(query_pre_attn_scalar) ** -0.5

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

    def setup_cache(
        self,
        batch_size: int,
        dtype: torch.dtype,
        max_seq_len: int,
        *,
        kv_cache_dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Create a ``KVCache`` with ``num_kv_heads`` heads on the weights' device.

        Skipped, with a warning, if a cache already exists (as in torchtune).

        Args:
            batch_size (int): rows the cache holds.
            dtype (torch.dtype): the cache's dtype. A quantized dtype (``torch.int8``,
                ``torch.float8_e4m3fn``) asks for a quantized cache read back in the weights' dtype, so
                torchtune's ``model.setup_caches(batch_size, torch.int8, ...)`` and ``local_kv_cache(...,
                dtype=torch.int8)`` set up int8 caches in every gqa_tune attention layer.
            max_seq_len (int): positions per row.
            kv_cache_dtype (Optional[torch.dtype]): store K/V quantized in this dtype (or its name,
                ``"int8"``, ``"float8_e4m3fn"``), read back in ``dtype``; ``None``: in ``dtype``.

        Raises:
            ValueError: a ``kv_cache_dtype`` that is not one of those, one that contradicts ``dtype``, or
                one whose ops do not run on the weights' device (naming the dtype and the device).
        """
        if self.kv_cache is not None:
            logger.warning("Key value caches are already setup. You cannot call ``setup_caches()`` twice. Skipping.")
            return
        checks.floating_dtype("dtype", dtype, allowed=QUANTIZED_KV_DTYPES)
        param = next(self.parameters(), None)
        kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
        if dtype in QUANTIZED_KV_DTYPES:  # torchtune's door: setup_caches(batch_size, torch.int8, ...)
            if kv_cache_dtype not in (None, dtype):
                raise ValueError(f"dtype {dtype} and kv_cache_dtype {kv_cache_dtype} disagree; give one of them")
            kv_cache_dtype = dtype
            floating = param is not None and param.is_floating_point()
            dtype = param.dtype if floating else torch.get_default_dtype()
        window = self.sliding_window_size
        self.kv_cache = KVCache(
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype,
            device=param.device if param is not None else None,
            window=window if window is not None and window < max_seq_len else None,  # a ring of the window
            kv_cache_dtype=kv_cache_dtype,
        )
        self.cache_enabled = True

    def reset_cache(self) -> None:
        """Empty the KV cache."""
        if self.kv_cache is None:
            raise CacheNotSetUpError("Key value caches are not setup. Call ``setup_caches()`` first.")
        self.kv_cache.reset()

    def _check_mask(self, mask: MaskType, x: torch.Tensor, b: int, s_x: int, kv_lens: tuple, cached: bool) -> None:
        if isinstance(mask, BlockMask):
            if cached:
                raise ValueError("a BlockMask cannot be used with an enabled KV cache; pass a bool mask")
            lengths = tuple(mask.seq_lengths)
            if lengths != (s_x, kv_lens[0]) or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, self.num_heads):
                raise ValueError(
                    f"BlockMask of shape {tuple(mask.shape)} and lengths {lengths} does not fit "
                    f"(b={b}, n_h={self.num_heads}, s_x={s_x}, s_y={kv_lens[0]})"
                )
            if mask.kv_num_blocks.device != x.device:
                raise ValueError(f"BlockMask is on {mask.kv_num_blocks.device}, x on {x.device}")
            return
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a bool tensor or a BlockMask, got {type(mask).__name__}")
        if mask.dtype != torch.bool and mask.dtype != x.dtype:
            raise ValueError(
                f"mask must be bool (True = attend) or additive in the input's dtype {x.dtype}, got {mask.dtype}"
            )
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device}, x on {x.device}")
        if mask.dim() != 3 or mask.shape[0] not in (1, b) or mask.shape[1] != s_x or mask.shape[2] not in kv_lens:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit: expected [b={b}, s_x={s_x}, s_kv] "
                f"with s_kv in {sorted(set(kv_lens))}"
            )

    def _position_limit(self) -> int:
        """Positions the position embedding has a table for (its ``max_seq_len``, else the module's)."""
        return getattr(self.pos_embeddings, "max_seq_len", self.max_seq_len)

    def _check_input_pos(self, input_pos: torch.Tensor, b: int, s_x: int) -> torch.Tensor:
        """``input_pos`` as ``[b or 1, s_x]``, accepting every shape torchtune's attention accepts.

        ``[b, s_x]``, ``[1, s_x]`` and ``[s_x]``; and for one new token per row (``s_x = 1``) also ``[b]``,
        what ``torchtune.generation.generate`` passes at each decode step of a padded batch
        (``input_pos[:, curr_pos]``), and a 0-d tensor, what it passes for a one-token prompt of one row
        (``input_pos[:, :1].squeeze()``).
        """
        if not isinstance(input_pos, torch.Tensor) or input_pos.is_floating_point() or input_pos.dtype == torch.bool:
            raise ValueError(f"input_pos must be an integer tensor [b, s_x], got {input_pos!r}")
        shape = tuple(input_pos.shape)
        fits = (
            (len(shape) == 2 and shape[0] in (1, b) and shape[1] == s_x)
            or (len(shape) == 1 and (shape[0] == s_x or (s_x == 1 and shape[0] == b)))
            or (len(shape) == 0 and s_x == 1)
        )
        if not fits:
            raise ValueError(
                f"input_pos of shape {shape} does not fit [b={b}, s_x={s_x}] or [s_x]"
                + (" (or [b] / a scalar for s_x=1)" if s_x == 1 else "")
            )
        input_pos = input_pos.reshape(-1, s_x)  # [b or 1, s_x]
        if input_pos.numel() and not compiling():
            low, high = torch.aminmax(input_pos)
            self._check_positions(int(low), int(high), "input_pos")
        return input_pos

    def _check_positions(self, low: int, high: int, what: str) -> None:
        """``ValueError`` if positions ``low..high`` fall outside the position embedding's table."""
        if self.pos_embeddings is None:
            return
        limit = self._position_limit()
        if low < 0 or high >= limit:
            raise ValueError(
                f"{what} must lie in [0, {limit}) (the position embedding's max_seq_len), got {low}..{high}"
            )

    def _ring_positions(self, cache: KVCache, s_x: int, s_new: int, start: int) -> torch.Tensor:
        """``[s_x]`` positions of the queries over a ring cache: the last ``s_x`` of the positions written so far
        plus the ``s_new`` new ones (on the device when compiled: the cache's positions before the write)."""
        if compiling():
            return cache.cache_pos[:s_x] + (s_new - s_x)
        return torch.arange(start + s_new - s_x, start + s_new, device=cache.cache_pos.device)

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
            torch.Tensor: ``[b, s_x, d]``. For ``b = 0`` or ``s_x = 0`` the empty output, and the
            cache is not written.

        Raises:
            ValueError: no ``y`` without an enabled cache, mismatched batch,
                a ``y`` whose width the k/v projections do not take, a mask of
                the wrong shape, positions outside the position embedding's
                table, a batch larger than the cache or a write past its end.
                The cache is left unchanged.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor [b, s_x, d], got {getattr(x, 'shape', x)!r}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x has {x.shape[-1]} features, embed_dim is {self.embed_dim}")
        weight = getattr(self.q_proj, "weight", None)
        if isinstance(weight, torch.Tensor):
            if x.device != weight.device:
                raise ValueError(f"x is on {x.device}, the attention's weights on {weight.device}")
            autocast = torch.is_autocast_enabled(x.device.type)
            if weight.is_floating_point() and x.dtype != weight.dtype and not autocast:
                raise ValueError(f"x is {x.dtype}, the attention's weights are {weight.dtype}: convert one of them")
        b, s_x, _ = x.shape
        cache = self.kv_cache if self.cache_enabled and self.kv_cache is not None else None
        traced = compiling()
        empty = b == 0 or s_x == 0  # nothing to compute: the empty output, and the cache is not written

        # Validate and plan everything before any state changes: a rejected call leaves the cache as it was.
        if y is None:
            if cache is None:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            if b > cache.batch_size:
                raise ValueError(f"batch size {b} is larger than the cache's batch_size {cache.batch_size}")
            if not traced and not empty and cache.filled_rows and b != cache.filled_rows:
                raise ValueError(f"batch size {b} differs from the {cache.filled_rows} row(s) the cache holds")
            s_new = 0
        else:
            if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[0] != b:
                raise ValueError(f"y must be [b={b}, s_y, d], got shape {tuple(getattr(y, 'shape', ()))}")
            if y.dtype != x.dtype:
                raise ValueError(f"y's dtype {y.dtype} differs from x's {x.dtype}")
            width = _in_features(self.k_proj) or self.embed_dim
            if y.shape[-1] != width:
                raise ValueError(f"y has {y.shape[-1]} features, k_proj and v_proj take {width}")
            s_new = y.shape[1]
            if cache is not None and not empty:
                cache.check_update(b, s_new)
        start = cache.size if cache is not None and not traced else 0
        filled = start + s_new
        if cache is not None and cache.dtype != x.dtype:
            held = cache.dtype if not cache.quantized else f"{cache.kv_cache_dtype} read as {cache.dtype}"
            raise ValueError(f"the KV cache holds {held}, the input is {x.dtype}: set up caches in it")
        kv_lens = (cache.max_seq_len, filled) if cache is not None else (s_new,)
        if mask is not None:
            self._check_mask(mask, x, b, s_x, kv_lens, cache is not None)
        if input_pos is not None and self.pos_embeddings is not None:
            input_pos = self._check_input_pos(input_pos, b, s_x)
        elif self.pos_embeddings is not None and not traced and s_x:
            # Default positions: 0..s_x-1, or the cache positions the new tokens (or, y=None, the queries) take.
            first = start if cache is not None and y is not None else 0
            self._check_positions(first, first + s_x - 1, "the positions (no input_pos given)")
        if empty or (y is not None and s_new == 0 and cache is None):  # no queries, or no keys: zeros
            return self.output_proj(x.new_zeros(b, s_x, self.num_heads * self.head_dim))
        if y is not None and s_new == 0:  # nothing to write: attend to what the cache holds
            y = None
        if input_pos is None and cache is not None and y is not None and self.pos_embeddings is not None:
            input_pos = cache.next_positions(b, s_x)  # the new tokens' positions (checked, compiled too)

        q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
        q = q.transpose(1, 2)  # [b, n_h, s_x, h_d]
        if self.q_norm is not None:
            q = self.q_norm(q)

        k = v = None
        if y is not None:
            k = self.k_proj(y).view(b, s_new, self.num_kv_heads, self.head_dim)
            v = self.v_proj(y).view(b, s_new, self.num_kv_heads, self.head_dim)
            if self.pos_embeddings is not None:
                k = self.pos_embeddings(k, input_pos=input_pos)
            k = k.transpose(1, 2)  # [b, n_kv, s_y, h_d]
            v = v.transpose(1, 2)
            if self.k_norm is not None:
                k = self.k_norm(k)

        # Describe the call once. The dispatcher plans it (choosing the backend, shaping the masks, or
        # refusing it) before the cache is written; it reads the cache's keys when it runs.
        attn_mask = mask[:, None] if isinstance(mask, torch.Tensor) else mask  # [b, 1, s_x, s_kv]
        features = dict(
            softcap=self.softcapping,
            scale=self.scale,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        if cache is None:
            k_seen, v_seen = k, v
            causal = mask is None and self.is_causal
            documents = None if traced else documents_of(mask)  # packed rows: the documents the mask keeps apart
            spec = AttentionSpec(
                mask=attn_mask, causal=causal, window=self.sliding_window_size, document_ids=documents, **features
            )
        elif cache.window is not None:  # a ring of the window: its keys, with the positions they stand for
            k_seen, v_seen, key_pos, kv_scales = cache.window_keys(b, k, v, with_scales=True)
            spec = AttentionSpec(
                mask=attn_mask, causal=self.is_causal, window=self.sliding_window_size, kv_scales=kv_scales,
                key_positions=key_pos, query_positions=self._ring_positions(cache, s_x, s_new, start), **features,
            )  # fmt: skip
        else:
            # The whole buffers; the queries are the last s_x of the positions filled after the write.
            k_seen, v_seen = cache.k_cache[:b], cache.v_cache[:b]
            causal = mask is None and y is not None and self.is_causal
            if traced:  # the fill lives on the device
                fill = dict(seqlens=cache.cache_pos[:1].expand(b) + s_new)
            else:
                fill = dict(max_seqlen=filled, causal_offset=filled - s_x)
            spec = AttentionSpec(
                mask=attn_mask, causal=causal, window=self.sliding_window_size, kv_scales=cache.scales(b), **fill,
                **features,
            )  # fmt: skip
        plan = plan_attention(q, k_seen, v_seen, spec, self.backend)  # raises before the cache is written

        if cache is not None and y is not None:
            cache.update(k, v)
        out = execute(plan, q)
        out = out.transpose(1, 2).reshape(b, s_x, -1)  # [b, s_x, n_h * h_d]
        return self.output_proj(out)


def setup_caches(
    model: nn.Module,
    batch_size: int,
    dtype: torch.dtype,
    *,
    encoder_max_seq_len: Optional[int] = None,
    decoder_max_seq_len: Optional[int] = None,
    kv_cache_dtype: Optional[torch.dtype] = None,
) -> None:
    """``model.setup_caches(batch_size, dtype, ...)``, optionally with every cache quantized.

    With ``kv_cache_dtype`` (``torch.int8``, ``torch.float8_e4m3fn`` or their names) every gqa_tune
    attention layer stores K/V in that dtype with a float32 scale per token and kv head, and reads them
    back in ``dtype``. This calls torchtune's ``model.setup_caches(batch_size, kv_cache_dtype, ...)``:
    :meth:`MultiHeadAttention.setup_cache` reads a quantized dtype as the storage dtype, so that call (or
    ``local_kv_cache(model, ..., dtype=torch.int8)``) does the same thing without this helper.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (or a model with the same ``setup_caches``)
            whose attention layers are gqa_tune's (after ``swap_attention``, or built by gqa_tune).
        batch_size (int): rows per cache.
        dtype (torch.dtype): the model's dtype (what K/V are read back in).
        encoder_max_seq_len, decoder_max_seq_len (Optional[int]): as in torchtune.
        kv_cache_dtype (Optional[torch.dtype]): ``None``: caches in ``dtype``.

    Raises:
        ValueError: an unknown ``kv_cache_dtype``; a quantized one with torchtune attention layers left,
            or with ``dtype`` other than the attention weights' dtype; one not supported on the device.

    Example:
        >>> setup_caches(model, 1, torch.float32, decoder_max_seq_len=4096, kv_cache_dtype=torch.int8)
    """
    from torchtune.modules import MultiHeadAttention as TorchtuneMultiHeadAttention

    kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
    lengths = {}
    if encoder_max_seq_len is not None:
        lengths["encoder_max_seq_len"] = encoder_max_seq_len
    if decoder_max_seq_len is not None:
        lengths["decoder_max_seq_len"] = decoder_max_seq_len
    if kv_cache_dtype is None:
        model.setup_caches(batch_size, dtype, **lengths)
        return
    theirs = [type(m).__name__ for m in model.modules() if isinstance(m, TorchtuneMultiHeadAttention)]
    if theirs:
        raise ValueError(
            f"kv_cache_dtype {kv_cache_dtype} needs gqa_tune attention; the model has {len(theirs)} torchtune "
            f"{theirs[0]} layer(s): convert it with gqa_tune.swap_attention(model) first"
        )
    ours = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not ours:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype} needs gqa_tune attention layers; the model has none")
    weights = {p.dtype for m in ours for p in m.parameters() if p.is_floating_point()}
    if weights and weights != {dtype}:
        raise ValueError(
            f"dtype {dtype} differs from the attention weights' {sorted(map(str, weights))}: a quantized cache "
            "is read back in the weights' dtype"
        )
    model.setup_caches(batch_size, kv_cache_dtype, **lengths)
