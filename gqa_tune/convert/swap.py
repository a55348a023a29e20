"""Put gqa_tune's attention into existing torchtune models."""

from torch import nn
from torchtune.modules import MultiHeadAttention as TorchtuneMHA

from gqa_tune.modules.attention import MultiHeadAttention
from gqa_tune.modules.kv_cache import KVCache


def from_torchtune_attention(tt_attn: nn.Module, backend: str = "auto") -> MultiHeadAttention:
    """Build our attention around the parts of a torchtune ``MultiHeadAttention``.

    Projections, norms and positional embeddings are shared (not copied), so
    the new module computes the same function with the same parameters. An
    existing torchtune KV cache is carried over with its contents.
    """
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
        backend=backend,
    )
    old_cache = tt_attn.kv_cache
    if old_cache is not None:
        batch, heads, length, head_dim = old_cache.k_cache.shape
        cache = KVCache(batch, length, heads, head_dim, old_cache.k_cache.dtype, device=old_cache.k_cache.device)
        cache.k_cache.copy_(old_cache.k_cache)
        cache.v_cache.copy_(old_cache.v_cache)
        cache.cache_pos.copy_(old_cache.cache_pos)
        cache.sync_size()
        attn.kv_cache = cache
    attn.cache_enabled = tt_attn.cache_enabled
    attn.train(tt_attn.training)
    return attn


def swap_attention(model: nn.Module, backend: str = "auto") -> int:
    """Replace every torchtune ``MultiHeadAttention`` in ``model``, in place.

    Weights are shared with the modules they replace, so outputs are
    unchanged (up to floating-point reordering) and the state dict keeps the
    same keys.

    Args:
        model (nn.Module): e.g. a ``torchtune.models.llama3_2`` decoder.
        backend (str): attention backend for the new modules.

    Returns:
        int: how many modules were replaced.
    """
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, TorchtuneMHA)]
    if targets and targets[0][0] == "":
        raise ValueError("model is itself a torchtune MultiHeadAttention; use from_torchtune_attention(model)")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, from_torchtune_attention(module, backend))
    return len(targets)
