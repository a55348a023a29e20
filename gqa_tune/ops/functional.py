"""``scaled_dot_product_gqa``: torch's SDPA contract with grouped K/V."""

import math
import numbers
from typing import Any, Optional, Tuple, Union

import torch
from torch.nn.attention.flex_attention import BlockMask

from gqa_tune import _checks as checks
from gqa_tune.ops.dispatch import AttentionSpec, attend
from gqa_tune.ops.masks import MaskType, documents_of


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


#: The largest score multiplier: past it, ordinary queries and keys give float32 scores that overflow to inf.
MAX_SCALE = 1e6


def check_scale(scale: Any) -> None:
    """Raise ``ValueError`` unless ``scale`` is ``None`` or a finite positive number up to :data:`MAX_SCALE`.

    A zero, negative, NaN or infinite scale has no attention meaning (softmax over
    ``-inf * 0`` or reversed scores) and gives NaN on some backends, so it is refused; so is
    one so large that the scores overflow float32 (``inf - inf`` in the softmax is NaN).
    """
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be None or a finite positive number, got {scale!r}")
    if scale > MAX_SCALE:
        raise ValueError(
            f"scale must be at most {MAX_SCALE:g}, got {scale!r}: scores that large overflow float32 (the softmax "
            "of such scores is a hard maximum; scale the inputs instead)"
        )


#: The largest soft-cap: every backend computes the cap in float32 (``softcap * tanh(s / softcap)``).
MAX_SOFTCAP = torch.finfo(torch.float32).max


def check_softcap(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or a positive number a float32 computation holds.

    A soft-cap past float32's range (``1e39``) would become ``inf`` inside every backend, and
    ``inf * tanh(s / inf)`` is NaN; a cap that large caps nothing, so leave it out (``None``) instead.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be None or a finite positive number, got {value!r}")
    if value > MAX_SOFTCAP:
        raise ValueError(
            f"{name} must be at most {MAX_SOFTCAP:.4g} (float32's largest value, in which the cap is computed), "
            f"got {value!r}; None means no capping"
        )


def check_features(query: torch.Tensor, sliding_window: Any, softcap: Any, sinks: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless the window, soft-cap and sinks are usable with ``query`` ``[b, n_h, s_q, h_d]``."""
    checks.optional_positive_int("sliding_window", sliding_window)
    check_softcap("softcap", softcap)
    if sinks is None:
        return
    n_h = query.shape[1]
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (n_h,):
        got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks must be a floating-point tensor of shape [n_h] = [{n_h}], got {got}")
    if sinks.device != query.device:
        raise ValueError(f"sinks are on {sinks.device}, query on {query.device}")


def check_gqa_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[MaskType] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> None:
    """Raise ``ValueError`` (naming the shapes) unless the inputs fit together."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (b, h, s, d), got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    shapes = f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"
    b, n_h, s_q, h_d = query.shape
    if h_d == 0 or value.shape[-1] == 0:
        raise ValueError(f"head_dim must be positive: {shapes}")
    if not (key.shape[0] == value.shape[0] == b):
        raise ValueError(f"batch sizes differ: {shapes}")
    if key.shape[-1] != h_d:
        raise ValueError(f"query and key head_dim differ: {shapes}")
    if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise ValueError(f"key and value must have the same heads and length: {shapes}")
    n_kv = key.shape[1]
    if n_kv == 0 or n_kv > n_h or n_h % n_kv != 0:
        raise ValueError(f"query heads ({n_h}) must be a multiple of key/value heads ({n_kv}): {shapes}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"dtypes differ: query {query.dtype}, key {key.dtype}, value {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"devices differ: query {query.device}, key {key.device}, value {value.device}")
    checks.flag("is_causal", is_causal)
    checks.probability("dropout_p", dropout_p)
    if attn_mask is None:
        return
    if is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both")
    s_kv = key.shape[2]
    if isinstance(attn_mask, BlockMask):
        mask_b, mask_h = attn_mask.shape[0], attn_mask.shape[1]
        lens = tuple(attn_mask.seq_lengths)
        if attn_mask.kv_num_blocks.device != query.device:
            raise ValueError(f"BlockMask is on {attn_mask.kv_num_blocks.device}, query on {query.device}")
        if lens != (s_q, s_kv) or mask_b not in (1, b) or mask_h not in (1, n_h):
            raise ValueError(
                f"BlockMask of shape {tuple(attn_mask.shape)} and lengths {lens} does not fit "
                f"(b={b}, n_h={n_h}, s_q={s_q}, s_kv={s_kv})"
            )
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise ValueError(f"attn_mask must be a tensor or BlockMask, got {type(attn_mask).__name__}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, query on {query.device}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}")
    if attn_mask.is_floating_point() and attn_mask.dtype != query.dtype:
        raise ValueError(f"a float attn_mask must have the query's dtype {query.dtype}, got {attn_mask.dtype}")
    target = (b, n_h, s_q, s_kv)
    fits = attn_mask.dim() <= 4 and all(m in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target)))
    if not fits:
        raise ValueError(f"attn_mask of shape {_shape(attn_mask)} does not broadcast to (b, n_h, s_q, s_kv) = {target}")


def scaled_dot_product_gqa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[MaskType] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    need_weights: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Scaled dot-product attention with grouped key/value heads.

    A drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`
    where ``key``/``value`` may have fewer heads than ``query``. Query head
    ``i`` uses kv head ``i // (n_h // n_kv)`` (torch's ``enable_gqa``, Llama's
    ``repeat_kv``, torchtune's expand). K/V are never copied to ``n_h`` heads
    on the ``sdpa`` and ``flex`` paths.

    Args:
        query (torch.Tensor): ``[b, n_h, s_q, h_d]``.
        key (torch.Tensor): ``[b, n_kv, s_kv, h_d]``, ``n_h % n_kv == 0``.
        value (torch.Tensor): ``[b, n_kv, s_kv, h_dv]``.
        attn_mask: bool (True = attend) or additive float tensor broadcastable
            to ``[b, n_h, s_q, s_kv]``, or a flex ``BlockMask``.
        dropout_p (float): dropout probability on the attention weights,
            applied whenever it is positive (as in torch).
        is_causal (bool): causal mask aligned top-left, as in torch
            (``ones(s_q, s_kv).tril()``: with ``s_q=1`` the query sees key 0).
        scale (Optional[float]): multiplier of the scores; default ``h_d ** -0.5``.
        sliding_window (Optional[int]): query ``i`` sees key ``j`` only when ``|i - j| < sliding_window``
            (positions aligned as ``is_causal`` aligns them, top-left; with ``is_causal`` that is
            ``i - w < j <= i``). Combines with ``is_causal`` and ``attn_mask``.
        softcap (Optional[float]): the scaled scores ``s`` become ``softcap * tanh(s / softcap)`` before
            masking (Gemma 2).
        sinks (Optional[torch.Tensor]): ``[n_h]`` per-head logits; each joins its rows' softmax as an extra
            key with a zero value (gpt-oss), with gradients.
        need_weights (bool): also return the weights ``[b, n_h, s_q, s_kv]``
            (computed by the ``math`` backend).
        backend (str): ``"auto"``, ``"sdpa"``, ``"flex"``, ``"math"`` or ``"triton"``.

    Returns:
        ``out`` ``[b, n_h, s_q, h_dv]``, or ``(out, weights)`` with ``need_weights``.

    Raises:
        ValueError: shapes that do not fit (the message names them), a bad
            mask, or a backend that cannot serve the call.

    Notation: ``b`` batch, ``n_h`` query heads, ``n_kv`` kv heads, ``s_q``/``s_kv``
    query/key lengths, ``h_d`` head dim.
    """
    check_gqa_inputs(query, key, value, attn_mask, dropout_p, is_causal)
    check_scale(scale)
    checks.flag("need_weights", need_weights)
    check_features(query, sliding_window, softcap, sinks)
    spec = AttentionSpec(
        mask=attn_mask,
        causal=is_causal,
        window=sliding_window,
        softcap=softcap,
        sinks=sinks,
        scale=scale,
        dropout_p=dropout_p,
        need_weights=need_weights,
        document_ids=documents_of(attn_mask),
    )
    # With need_weights only the math backend serves the call; another explicit one is refused, naming itself.
    return attend(query, key, value, spec, backend)
