"""Put gqa_tune's attention into existing torchtune models."""

import logging
import warnings
from typing import List

from torch import nn
from torchtune.models.gemma2._attention import Gemma2Attention
from torchtune.modules import MultiHeadAttention as TorchtuneMHA

from gqa_tune.modules.attention import MultiHeadAttention
from gqa_tune.modules.kv_cache import KVCache
from gqa_tune.ops.dispatch import check_backend_name

logger = logging.getLogger(__name__)

#: The torchtune attention classes :func:`swap_attention` replaces.
SWAPPABLE = (TorchtuneMHA, Gemma2Attention)


class SwapReport(int):
    """The number of modules :func:`swap_attention` replaced (an ``int``), with their names in ``replaced``
    and the attention-like modules it left alone in ``skipped``."""

    replaced: List[str]
    skipped: List[str]

    def __new__(cls, replaced: List[str], skipped: List[str]) -> "SwapReport":
        report = super().__new__(cls, len(replaced))
        report.replaced, report.skipped = replaced, skipped
        return report


def _carried_cache(tt_attn: nn.Module) -> KVCache:
    """A copy of ``tt_attn``'s KV cache with ``num_kv_heads`` heads.

    torchtune's ``Gemma2Attention`` caches K/V expanded to ``num_heads`` (each kv head repeated
    ``n_h // n_kv`` times, next to each other); one copy of each is kept.
    """
    old = tt_attn.kv_cache
    batch, heads, length, head_dim = old.k_cache.shape
    group = heads // tt_attn.num_kv_heads
    cache = KVCache(batch, length, tt_attn.num_kv_heads, head_dim, old.k_cache.dtype, device=old.k_cache.device)
    filled = int(old.cache_pos[0])
    if filled:
        cache.update(old.k_cache[:, ::group, :filled], old.v_cache[:, ::group, :filled])  # [b, n_kv, filled, h_d]
    return cache


def from_torchtune_attention(tt_attn: nn.Module, backend: str = "auto") -> MultiHeadAttention:
    """Build our attention around the parts of a torchtune ``MultiHeadAttention`` or ``Gemma2Attention``.

    Projections, norms and positional embeddings are shared (not copied), so
    the new module computes the same function with the same parameters. A
    ``Gemma2Attention``'s sliding window, soft-capping and score scaling are
    carried over. An existing torchtune KV cache is carried over with its
    contents, at ``num_kv_heads`` heads.
    """
    if not isinstance(tt_attn, SWAPPABLE):
        raise ValueError(
            f"from_torchtune_attention takes torchtune's MultiHeadAttention or Gemma2Attention, "
            f"got {type(tt_attn).__name__}"
        )
    gemma = isinstance(tt_attn, Gemma2Attention)
    attn = MultiHeadAttention(
        embed_dim=tt_attn.embed_dim,
        num_heads=tt_attn.num_heads,
        num_kv_heads=tt_attn.num_kv_heads,
        head_dim=tt_attn.head_dim,
        q_proj=tt_attn.q_proj,
        k_proj=tt_attn.k_proj,
        v_proj=tt_attn.v_proj,
        output_proj=tt_attn.output_proj,
        pos_embeddings=tt_attn.pos_embeddings,
        q_norm=tt_attn.q_norm,
        k_norm=tt_attn.k_norm,
        max_seq_len=tt_attn.max_seq_len,
        is_causal=tt_attn.is_causal,
        attn_dropout=tt_attn.attn_dropout,
        sliding_window_size=tt_attn.sliding_window_size if gemma else None,
        softcapping=tt_attn.softcapping if gemma else None,
        backend=backend,
    )
    if gemma:
        attn.scale = float(tt_attn.scaling)  # query_pre_attn_scalar ** -0.5, exactly as Gemma2Attention has it
    if tt_attn.kv_cache is not None:
        attn.kv_cache = _carried_cache(tt_attn)
    attn.cache_enabled = tt_attn.cache_enabled
    attn.train(tt_attn.training)
    return attn


def _attention_like(module: nn.Module) -> bool:
    """An attention module, not a layer that holds one (``TransformerSelfAttentionLayer``) nor ours."""
    name = type(module).__name__.lower()
    return "attention" in name and "layer" not in name and not isinstance(module, MultiHeadAttention)


def swap_attention(model: nn.Module, backend: str = "auto") -> SwapReport:
    """Replace every torchtune ``MultiHeadAttention`` and ``Gemma2Attention`` in ``model``, in place.

    Weights are shared with the modules they replace, so outputs are
    unchanged (up to floating-point reordering) and the state dict keeps the
    same keys. Every other module whose class name says attention is left
    alone, with a warning naming it.

    Args:
        model (nn.Module): e.g. a ``torchtune.models.llama3_2`` or ``gemma2`` decoder.
        backend (str): attention backend for the new modules.

    Returns:
        SwapReport: how many modules were replaced (an ``int``); ``.replaced`` and ``.skipped`` name them.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module (a torchtune model), got {type(model).__name__}")
    check_backend_name(backend)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, SWAPPABLE)]
    if targets and targets[0][0] == "":
        raise ValueError(f"model is itself a torchtune {type(model).__name__}; use from_torchtune_attention(model)")
    inside = tuple(name + "." for name, _ in targets)
    skipped = [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if name and _attention_like(module) and not isinstance(module, SWAPPABLE) and not name.startswith(inside)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, from_torchtune_attention(module, backend))
    replaced = [name for name, _ in targets]
    if skipped:
        warnings.warn(f"swap_attention left these attention modules as they are: {', '.join(skipped)}", stacklevel=2)
    logger.info("swap_attention replaced %d attention modules: %s", len(replaced), ", ".join(replaced))
    return SwapReport(replaced, skipped)


__all__ = ["SWAPPABLE", "SwapReport", "from_torchtune_attention", "swap_attention"]
