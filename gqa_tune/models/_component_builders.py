"""Component builders: every knob exposed."""

from typing import Optional

import torch
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import (
    FeedForward,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

from gqa_tune import _checks as checks
from gqa_tune.modules.attention import MultiHeadAttention


def _check_shape(**sizes: int) -> None:
    """Every size a positive int, and the heads dividing as attention needs (before any module is built)."""
    for name, value in sizes.items():
        checks.positive_int(name, value)
    if "num_kv_heads" in sizes and sizes["num_heads"] % sizes["num_kv_heads"]:
        raise ValueError(
            f"num_heads ({sizes['num_heads']}) must be divisible by num_kv_heads ({sizes['num_kv_heads']})"
        )
    if "embed_dim" in sizes and sizes["embed_dim"] % sizes["num_heads"]:
        raise ValueError(f"embed_dim ({sizes['embed_dim']}) must be divisible by num_heads ({sizes['num_heads']})")


def _rope(
    head_dim: int,
    max_seq_len: int,
    base: float,
    scale_factor: Optional[float],
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: int = 8192,
) -> nn.Module:
    """Plain RoPE, or torchtune's ``Llama3ScaledRoPE`` (``rope_type: llama3``) when ``scale_factor`` is set."""
    checks.positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of features: head_dim must be even, got {head_dim}")
    checks.positive_int("max_seq_len", max_seq_len)
    checks.positive_number("rope_base", base)
    if scale_factor is not None:
        checks.positive_number("rope_scale_factor", scale_factor)
        checks.positive_number("rope_low_freq_factor", low_freq_factor)
        checks.positive_number("rope_high_freq_factor", high_freq_factor)
        checks.positive_int("rope_old_context_len", old_context_len)
    if scale_factor is None:
        return RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=base)
    return Llama3ScaledRoPE(
        dim=head_dim, max_seq_len=max_seq_len, base=base, scale_factor=scale_factor,
        low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor, old_context_len=old_context_len,
    )  # fmt: skip


def gqa_attention(
    *,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: Optional[int] = None,
    max_seq_len: int = 4096,
    rope_base: float = 10_000,
    rope_scale_factor: Optional[float] = None,
    rope_low_freq_factor: float = 1.0,
    rope_high_freq_factor: float = 4.0,
    rope_old_context_len: int = 8192,
    pos_embeddings: Optional[nn.Module] = None,
    use_rope: bool = True,
    qk_norm: bool = False,
    norm_eps: float = 1e-5,
    bias: bool = False,
    is_causal: bool = True,
    attn_dropout: float = 0.0,
    sliding_window_size: Optional[int] = None,
    softcapping: Optional[float] = None,
    query_pre_attn_scalar: Optional[float] = None,
    backend: str = "auto",
) -> MultiHeadAttention:
    """A grouped-query self-attention block with RoPE and optional q/k RMSNorm.

    Args:
        embed_dim (int): model width ``d``.
        num_heads (int): query heads.
        num_kv_heads (int): key/value heads (divides ``num_heads``).
        head_dim (Optional[int]): per-head width; default ``embed_dim // num_heads``.
        max_seq_len (int): RoPE table length.
        rope_base (float): RoPE base.
        rope_scale_factor (Optional[float]): Llama 3.x RoPE scaling; ``None`` = plain RoPE.
        rope_low_freq_factor (float): Llama 3.x RoPE scaling's ``low_freq_factor``.
        rope_high_freq_factor (float): Llama 3.x RoPE scaling's ``high_freq_factor``.
        rope_old_context_len (int): Llama 3.x RoPE scaling's ``original_max_position_embeddings``.
        pos_embeddings (Optional[nn.Module]): a RoPE module to share (overrides the above).
        use_rope (bool): ``False`` builds the block without positional embeddings.
        qk_norm (bool): RMSNorm over ``head_dim`` on queries and keys.
        norm_eps (float): RMSNorm epsilon.
        bias (bool): biases on the q/k/v projections.
        is_causal (bool): causal when no mask is given.
        attn_dropout (float): attention dropout while training.
        sliding_window_size (Optional[int]): local attention over the last ``sliding_window_size`` positions.
        softcapping (Optional[float]): logit soft-capping ``c * tanh(s / c)`` (Gemma 2).
        query_pre_attn_scalar (Optional[float]): scores scaled by ``query_pre_attn_scalar ** -0.5``.
        backend (str): attention backend.
    """
    _check_shape(embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, max_seq_len=max_seq_len)
    head_dim = checks.positive_int("head_dim", head_dim if head_dim is not None else embed_dim // num_heads)
    for name, value in (("use_rope", use_rope), ("qk_norm", qk_norm), ("bias", bias), ("is_causal", is_causal)):
        checks.flag(name, value)
    checks.positive_number("norm_eps", norm_eps)
    checks.module("pos_embeddings", pos_embeddings, optional=True)
    if use_rope and pos_embeddings is None:
        pos_embeddings = _rope(
            head_dim, max_seq_len, rope_base, rope_scale_factor,
            rope_low_freq_factor, rope_high_freq_factor, rope_old_context_len,
        )  # fmt: skip
    return MultiHeadAttention(
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=bias),
        k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias),
        v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias),
        output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
        pos_embeddings=pos_embeddings if use_rope else None,
        q_norm=RMSNorm(dim=head_dim, eps=norm_eps) if qk_norm else None,
        k_norm=RMSNorm(dim=head_dim, eps=norm_eps) if qk_norm else None,
        max_seq_len=max_seq_len,
        is_causal=is_causal,
        attn_dropout=attn_dropout,
        sliding_window_size=sliding_window_size,
        softcapping=softcapping,
        query_pre_attn_scalar=query_pre_attn_scalar,
        backend=backend,
    )


def gqa_mlp(embed_dim: int, intermediate_dim: int) -> FeedForward:
    """SwiGLU feed-forward block (Llama's), parameter names as torchtune's."""
    return FeedForward(
        gate_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
        down_proj=nn.Linear(intermediate_dim, embed_dim, bias=False),
        up_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
    )


def init_from_scratch(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Initialize a decoder for training from scratch (GPT-2 style), in place.

    Linear and embedding weights get ``N(0, std)``, biases zero; norms keep
    their ones. torchtune's builders leave ``nn.Embedding`` at ``N(0, 1)``,
    which is meant to be overwritten by a checkpoint and gives huge initial
    logits when the output projection is tied to it. A QLoRA model's frozen
    NF4 linears (``FrozenNF4Linear``) get the same draws, quantized: the same
    seed gives the NF4 of the unquantized model's weights.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if isinstance(module.weight, NF4Tensor):  # NF4 has no normal_: draw in its dtype, quantize
                    weight = module.weight
                    weight.copy_(torch.empty(weight.shape, dtype=weight.dtype, device=weight.device).normal_(0.0, std))
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
    return model


def gqa_decoder(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: Optional[int] = None,
    attn_dropout: float = 0.0,
    rope_base: float = 500_000,
    rope_scale_factor: Optional[float] = None,
    rope_low_freq_factor: float = 1.0,
    rope_high_freq_factor: float = 4.0,
    rope_old_context_len: int = 8192,
    norm_eps: float = 1e-5,
    qk_norm: bool = False,
    attn_bias: bool = False,
    tie_word_embeddings: bool = True,
    sliding_window_size: Optional[int] = None,
    backend: str = "auto",
) -> TransformerDecoder:
    """A Llama-style decoder-only LM with grouped-query attention.

    Returns torchtune's ``TransformerDecoder`` (so ``setup_caches``, torchtune's
    generation utilities, checkpointers and recipes work), with gqa_tune's
    attention in every layer. Parameter names match ``torchtune.models.llama3_2``.

    Args:
        vocab_size (int): tokens in the vocabulary.
        num_layers (int): transformer layers.
        num_heads (int): query heads per layer.
        num_kv_heads (int): key/value heads per layer (divides ``num_heads``).
        embed_dim (int): model width.
        intermediate_dim (int): MLP hidden width.
        max_seq_len (int): longest sequence (RoPE table, default cache length).
        head_dim (Optional[int]): per-head width; default ``embed_dim // num_heads``.
        attn_dropout (float): attention dropout while training.
        rope_base (float): RoPE base.
        rope_scale_factor (Optional[float]): Llama 3.x RoPE scaling (``None``: plain RoPE): torchtune's
            ``Llama3ScaledRoPE`` with this ``scale_factor`` and the three factors below.
        rope_low_freq_factor (float): its ``low_freq_factor`` (Hugging Face ``rope_scaling.low_freq_factor``).
        rope_high_freq_factor (float): its ``high_freq_factor``.
        rope_old_context_len (int): its ``old_context_len`` (``original_max_position_embeddings``).
        norm_eps (float): RMSNorm epsilon.
        qk_norm (bool): RMSNorm on queries and keys.
        attn_bias (bool): biases on the q/k/v projections (Qwen2's; the output projection has none).
        tie_word_embeddings (bool): output projection shares the embedding.
        sliding_window_size (Optional[int]): every layer attends to the last ``sliding_window_size``
            positions only (Mistral's local attention); ``None``: global attention.
        backend (str): attention backend for every layer.
    """
    _check_shape(
        vocab_size=vocab_size, num_layers=num_layers, intermediate_dim=intermediate_dim, embed_dim=embed_dim,
        num_heads=num_heads, num_kv_heads=num_kv_heads, max_seq_len=max_seq_len,
    )  # fmt: skip
    head_dim = checks.positive_int("head_dim", head_dim if head_dim is not None else embed_dim // num_heads)
    for name, value in (("qk_norm", qk_norm), ("attn_bias", attn_bias), ("tie_word_embeddings", tie_word_embeddings)):
        checks.flag(name, value)
    checks.positive_number("norm_eps", norm_eps)
    rope = _rope(
        head_dim, max_seq_len, rope_base, rope_scale_factor,
        rope_low_freq_factor, rope_high_freq_factor, rope_old_context_len,
    )  # fmt: skip
    layers = nn.ModuleList(
        TransformerSelfAttentionLayer(
            attn=gqa_attention(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                max_seq_len=max_seq_len,
                pos_embeddings=rope,
                qk_norm=qk_norm,
                norm_eps=norm_eps,
                bias=attn_bias,
                attn_dropout=attn_dropout,
                sliding_window_size=sliding_window_size,
                backend=backend,
            ),
            mlp=gqa_mlp(embed_dim, intermediate_dim),
            sa_norm=RMSNorm(dim=embed_dim, eps=norm_eps),
            mlp_norm=RMSNorm(dim=embed_dim, eps=norm_eps),
        )
        for _ in range(num_layers)
    )
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(embed_dim, eps=norm_eps),
        output=output,
    )


class SoftCappedTiedLinear(TiedLinear):
    """A tied output projection whose logits are soft-capped: ``c * tanh(logits / c)`` (Gemma 2's final capping).

    Args:
        tied_module (nn.Module): the token embedding whose weight projects to the vocabulary.
        capping_value (float): ``c``.
    """

    def __init__(self, tied_module: nn.Module, capping_value: float) -> None:
        super().__init__(tied_module)
        self.capping_value = float(capping_value)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().__call__(x)
        return torch.tanh(logits / self.capping_value) * self.capping_value


def gqa_gemma_decoder(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: float = 10_000,
    backend: str = "auto",
) -> TransformerDecoder:
    """A Gemma-shaped decoder: torchtune's own ``gemma`` component builder (GeGLU MLP with tanh GELU, Gemma's
    ``(1 + w)`` RMSNorm, embeddings scaled by ``sqrt(embed_dim)``, output tied to them) with gqa_tune's
    attention in every layer (:func:`gqa_tune.swap_attention`). Arguments and parameter names are torchtune's.
    """
    from torchtune.models.gemma import gemma

    from gqa_tune.modules.swap import swap_attention

    model = gemma(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
    )
    swap_attention(model, backend=backend)
    return model


def gqa_gemma2_decoder(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: float = 10_000,
    hidden_capping_value: Optional[float] = 50.0,
    final_capping_value: Optional[float] = 30.0,
    sliding_window_size: int = 4096,
    query_pre_attn_scalar: Optional[int] = None,
    cap_logits: bool = False,
    backend: str = "auto",
) -> TransformerDecoder:
    """A Gemma 2-shaped decoder: local (sliding-window) and global layers alternating, soft-capped logits.

    torchtune's own ``gemma2`` component builder (GeGLU MLP, Gemma's RMSNorm, the extra post-attention
    and post-MLP norms, scaled embeddings, final logit soft-capping, even layers local), with gqa_tune's
    attention in every layer (:func:`gqa_tune.swap_attention`). Arguments and parameter names are
    torchtune's, so its checkpoints load. Unlike torchtune's, cached decoding stays right past the window
    and the caches hold ``num_kv_heads`` heads.

    Where the final capping goes: torchtune's ``gemma2`` caps the final norm's output (before the output
    projection); Gemma 2 as published and ``transformers`` cap the output logits. ``cap_logits=True``
    does the latter (what a Hugging Face Gemma 2 checkpoint needs; the state dict is the same either way).
    ``hidden_capping_value`` / ``final_capping_value`` ``None``: no attention / final capping.
    """
    from torchtune.models.gemma2 import gemma2

    from gqa_tune.modules.swap import swap_attention

    model = gemma2(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        hidden_capping_value=hidden_capping_value,
        final_capping_value=30.0 if final_capping_value is None else final_capping_value,
        sliding_window_size=sliding_window_size,
        query_pre_attn_scalar=query_pre_attn_scalar,
    )
    if cap_logits or final_capping_value is None:
        model.norm.logit_capping = nn.Identity()  # the final norm's scale keeps its name: norm.rms_norm.scale
    if cap_logits and final_capping_value is not None:
        model.output = SoftCappedTiedLinear(model.tok_embeddings, final_capping_value)
    swap_attention(model, backend=backend)
    return model
