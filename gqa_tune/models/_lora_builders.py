"""LoRA builders, in torchtune's two tiers: ``lora_gqa_decoder`` (every knob) and ``lora_gqa_tiny`` (fixed shape).

The models are built by the plain builders (:func:`gqa_decoder`, :func:`gqa_tiny`), then the chosen
projections are replaced by torchtune's :class:`~torchtune.modules.peft.LoRALinear`, which takes over
the projection's own weight (and bias) parameters. So the base parameter names, shapes and even the
initial base values (for the same seed) equal the plain model's, and a LoRA model's merged state dict
(:func:`torchtune.modules.peft.get_merged_lora_ckpt`) loads into the plain model.

QLoRA (``quantize_base=True``, or the ``qlora_*`` builders) is LoRA on a frozen base held in torchao's NF4,
as torchtune's ``qlora_llama3_2_1b`` builds it: the adapted projections are torchtune's
``LoRALinear(quantize_base=True)``, every other linear layer of the transformer layers (the attention
projections LoRA leaves alone, the MLP) a :class:`~torchtune.modules.low_precision.FrozenNF4Linear`. The
token embedding, the norms and an untied output projection stay in the base dtype (as in torchtune). The
model's ``state_dict()`` gives the base weights dequantized to the base dtype (torchtune's
``reparametrize_as_dtype_state_dict_post_hook``), so checkpoints hold no NF4, and a plain state dict loads
into it (``load_state_dict`` quantizes each weight into its NF4 parameter).
"""

from functools import partial
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torchao.dtypes.nf4tensor import to_nf4
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.common_utils import reparametrize_as_dtype_state_dict_post_hook
from torchtune.modules.low_precision import FrozenNF4Linear
from torchtune.modules.peft import LoRALinear

from gqa_tune import _checks as checks
from gqa_tune.models._component_builders import gqa_decoder, gqa_gemma2_decoder, gqa_gemma_decoder
from gqa_tune.models._model_builders import BYTE_VOCAB_SIZE, gqa_llama3_2_1b, gqa_tiny

#: Attention projections LoRA can adapt (torchtune's ``LORA_ATTN_MODULES``).
LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
#: SwiGLU projections adapted by ``apply_lora_to_mlp``.
LORA_MLP_MODULES = ("w1", "w2", "w3")


#: torchao NF4's block: 64 consecutive weights share one scale (``to_nf4``'s default).
NF4_BLOCK_SIZE = 64
#: torchao's default group of block scales that are quantized together (to int8, with one float factor).
NF4_SCALER_BLOCK_SIZE = 256


def nf4_kwargs(weight: torch.Tensor, name: str) -> Dict[str, int]:
    """``to_nf4``'s ``block_size`` and ``scaler_block_size`` for ``weight``: blocks of 64, and scale groups of
    256 blocks (torchao's defaults) or, where the number of blocks is not a multiple of 256 (a narrow GQA
    k/v projection: 32 x 128 is 64 blocks), its largest divisor below 256.

    Raises:
        ValueError: naming ``name`` and its shape, when the weight's size is not a multiple of 64.
    """
    numel = weight.numel()
    if weight.dim() != 2 or numel % NF4_BLOCK_SIZE:
        raise ValueError(
            f"cannot quantize {name} to NF4: its weight of shape {tuple(weight.shape)} has {numel} entries, "
            f"not a multiple of the NF4 block size {NF4_BLOCK_SIZE}"
        )
    blocks = numel // NF4_BLOCK_SIZE
    scaler = max(d for d in range(1, min(blocks, NF4_SCALER_BLOCK_SIZE) + 1) if blocks % d == 0)
    return {"block_size": NF4_BLOCK_SIZE, "scaler_block_size": scaler}


def _nf4_parameter(weight: torch.Tensor, kwargs: Dict[str, int]) -> nn.Parameter:
    """``weight`` quantized to a frozen torchao ``NF4Tensor`` parameter (in ``weight``'s dtype)."""
    return nn.Parameter(to_nf4(weight.detach(), **kwargs), requires_grad=False)


def _lora_from_linear(
    linear: nn.Module, rank: int, alpha: float, dropout: float, quantize_base: bool = False, name: str = "linear"
) -> LoRALinear:
    """A ``LoRALinear`` that reuses ``linear``'s weight and bias (no second base weight is allocated); with
    ``quantize_base``, the weight is quantized to NF4 (``LoRALinear(quantize_base=True)``)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"LoRA can only adapt nn.Linear projections, got {type(linear).__name__}")
    weight = linear.weight
    quantization = nf4_kwargs(weight, name) if quantize_base else {}
    with torch.device("meta"):  # skip allocating and initializing a base weight that is replaced below
        lora = LoRALinear(
            linear.in_features, linear.out_features, rank=rank, alpha=alpha, dropout=dropout,
            use_bias=linear.bias is not None, quantize_base=quantize_base, **quantization,
        )  # fmt: skip
    lora.to_empty(device=weight.device)  # LoRALinear.to_empty materializes only lora_a and lora_b
    lora.lora_a.to(dtype=weight.dtype)
    lora.lora_b.to(dtype=weight.dtype)
    lora.initialize_parameters()  # lora_a: kaiming uniform, lora_b: zeros
    lora.weight = _nf4_parameter(weight, quantization) if quantize_base else linear.weight
    lora.bias = linear.bias
    return lora


def _frozen_nf4_from_linear(linear: nn.Linear, name: str) -> FrozenNF4Linear:
    """torchtune's ``FrozenNF4Linear`` holding ``linear``'s weight in NF4 and its bias (frozen)."""
    quantization = nf4_kwargs(linear.weight, name)
    with torch.device("meta"):  # its own weight is replaced below
        frozen = FrozenNF4Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype,
            **quantization,
        )  # fmt: skip
    frozen.weight = _nf4_parameter(linear.weight, quantization)
    if linear.bias is not None:
        frozen.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return frozen


def quantize_frozen_base(model: TransformerDecoder) -> TransformerDecoder:
    """NF4 for every plain ``nn.Linear`` of ``model.layers`` (``FrozenNF4Linear``; the adapters' ``lora_a`` /
    ``lora_b`` stay), and a state-dict hook that dequantizes every NF4 weight to the base dtype; in place.

    The ``LoRALinear`` projections are quantized where they are built (:func:`add_lora`).
    """
    dtype = model.tok_embeddings.weight.dtype  # the base dtype (the model is built in one dtype)
    for index, layer in enumerate(model.layers):
        for parent_name, parent in list(layer.named_modules()):
            if isinstance(parent, LoRALinear):  # its lora_a / lora_b are the trainable adapters
                continue
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    name = ".".join(filter(None, (f"layers.{index}", parent_name, child_name)))
                    setattr(parent, child_name, _frozen_nf4_from_linear(child, name))
    # state_dict() (checkpoints, merging) sees the base dtype; offload_to_cpu=False keeps the model's device.
    model.register_state_dict_post_hook(
        partial(reparametrize_as_dtype_state_dict_post_hook, dtype=dtype, offload_to_cpu=False)
    )
    return model


def _check_lora_args(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout):
    if isinstance(lora_attn_modules, str):
        raise ValueError(f"lora_attn_modules must be a list of names, got the string {lora_attn_modules!r}")
    if not isinstance(lora_attn_modules, (list, tuple)):
        raise ValueError(f"lora_attn_modules must be a list of names, got {lora_attn_modules!r}")
    checks.flag("apply_lora_to_mlp", apply_lora_to_mlp)
    checks.flag("apply_lora_to_output", apply_lora_to_output)
    modules = list(dict.fromkeys(lora_attn_modules))  # drop repeats, keep order
    for name in modules:
        if name not in LORA_ATTN_MODULES:
            raise ValueError(
                f"unknown LoRA attention module {name!r} in lora_attn_modules; choose from {LORA_ATTN_MODULES}"
            )
    if not modules and not apply_lora_to_mlp and not apply_lora_to_output:
        raise ValueError("LoRA adapts nothing: lora_attn_modules is empty and apply_lora_to_mlp/output are False")
    checks.positive_int("lora_rank", lora_rank)
    checks.positive_number("lora_alpha", lora_alpha)
    checks.probability("lora_dropout", lora_dropout, below_one=True)
    return modules


def add_lora(
    model: TransformerDecoder,
    *,
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Replace the chosen projections of a gqa_tune decoder by ``LoRALinear``, in place; returns ``model``.

    Each ``LoRALinear`` keeps the replaced ``nn.Linear``'s weight and bias parameters, so base
    values and parameter names are unchanged; ``lora_a`` is initialized as in torchtune and
    ``lora_b`` to zeros (the adapted model computes what the plain one did).

    With ``quantize_base`` (QLoRA), the base weights of the LoRA projections and of every other linear
    layer of ``model.layers`` are quantized to NF4 and frozen (:func:`quantize_frozen_base`); the adapters
    stay in the base dtype.

    Raises:
        ValueError: an unknown name in ``lora_attn_modules``, nothing to adapt, a bad rank, alpha or
            dropout, ``apply_lora_to_output`` on a model whose output is tied to the embedding, or (with
            ``quantize_base``) a weight whose size is not a multiple of the NF4 block (64), named.
    """
    checks.flag("quantize_base", quantize_base)
    modules = _check_lora_args(
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout
    )
    if apply_lora_to_output and isinstance(model.output, TiedLinear):
        raise ValueError(
            "apply_lora_to_output needs an untied output projection (tie_word_embeddings=False): "
            "this model's output shares the token embedding"
        )

    def adapt(parent: nn.Module, name: str, where: str) -> None:
        lora = _lora_from_linear(getattr(parent, name), lora_rank, lora_alpha, lora_dropout, quantize_base, where)
        setattr(parent, name, lora)

    for index, layer in enumerate(model.layers):
        for name in modules:
            adapt(layer.attn, name, f"layers.{index}.attn.{name}")
        if apply_lora_to_mlp:
            for name in LORA_MLP_MODULES:
                adapt(layer.mlp, name, f"layers.{index}.mlp.{name}")
    if apply_lora_to_output:
        adapt(model, "output", "output")
    return quantize_frozen_base(model) if quantize_base else model


def lora_gqa_decoder(
    *,
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
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
    quantize_base: bool = False,
) -> TransformerDecoder:
    """:func:`~gqa_tune.models.gqa_decoder` with torchtune ``LoRALinear`` in the chosen projections.

    Same modules and parameter names as ``gqa_decoder(**model_args)`` plus ``lora_a``/``lora_b``
    in each adapted projection, so full checkpoints load (adapters start fresh) and a merged
    LoRA state dict loads into the plain model.

    Args:
        lora_attn_modules (Sequence[str]): attention projections to adapt, any of
            ``"q_proj"``, ``"k_proj"``, ``"v_proj"``, ``"output_proj"``.
        apply_lora_to_mlp (bool): adapt the MLP's ``w1``, ``w2`` and ``w3`` too.
        apply_lora_to_output (bool): adapt the final output projection (needs
            ``tie_word_embeddings=False``).
        lora_rank (int): rank ``r`` of each low-rank update.
        lora_alpha (float): scale; the update is ``(alpha / r) * B @ A``.
        lora_dropout (float): dropout on the adapters' input while training.
        vocab_size ... backend: as :func:`~gqa_tune.models.gqa_decoder`.
        quantize_base (bool): QLoRA: the frozen base linear weights in NF4 (see the module docstring).

    Raises:
        ValueError: as ``gqa_decoder``, plus an unknown name in ``lora_attn_modules`` (named in the
            message), nothing to adapt, a bad rank/alpha/dropout, or LoRA on a tied output.
    """
    _check_lora_args(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout)
    if apply_lora_to_output and tie_word_embeddings:
        raise ValueError("apply_lora_to_output needs tie_word_embeddings=False (a tied output shares the embedding)")
    model = gqa_decoder(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        head_dim=head_dim,
        attn_dropout=attn_dropout,
        rope_base=rope_base,
        rope_scale_factor=rope_scale_factor,
        rope_low_freq_factor=rope_low_freq_factor,
        rope_high_freq_factor=rope_high_freq_factor,
        rope_old_context_len=rope_old_context_len,
        norm_eps=norm_eps,
        qk_norm=qk_norm,
        attn_bias=attn_bias,
        tie_word_embeddings=tie_word_embeddings,
        sliding_window_size=sliding_window_size,
        backend=backend,
    )
    return add_lora(
        model,
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantize_base=quantize_base,
    )


def _lora_of_tied(base: Callable[..., TransformerDecoder], name: str) -> Callable[..., TransformerDecoder]:
    """The LoRA builder of ``base``, a decoder whose output is tied to its embedding (so there is no
    ``apply_lora_to_output``)."""

    def build(
        *,
        lora_attn_modules: Sequence[str],
        apply_lora_to_mlp: bool = False,
        lora_rank: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        quantize_base: bool = False,
        **model_args,
    ) -> TransformerDecoder:
        _check_lora_args(lora_attn_modules, apply_lora_to_mlp, False, lora_rank, lora_alpha, lora_dropout)
        return add_lora(
            base(**model_args),
            lora_attn_modules=lora_attn_modules,
            apply_lora_to_mlp=apply_lora_to_mlp,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            quantize_base=quantize_base,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f":func:`~gqa_tune.models.{base.__name__}` (``**model_args``) with ``LoRALinear`` in the chosen projections "
        "(``quantize_base``: QLoRA, the frozen base in NF4). The output is tied to the embedding, so there is no "
        "``apply_lora_to_output``."
    )
    return build


lora_gqa_gemma_decoder = _lora_of_tied(gqa_gemma_decoder, "lora_gqa_gemma_decoder")
lora_gqa_gemma2_decoder = _lora_of_tied(gqa_gemma2_decoder, "lora_gqa_gemma2_decoder")


def lora_gqa_tiny(
    lora_attn_modules: Sequence[str] = LORA_ATTN_MODULES,
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    backend: str = "auto",
    max_seq_len: int = 512,
    vocab_size: int = BYTE_VOCAB_SIZE,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """:func:`~gqa_tune.models.gqa_tiny` with LoRA (rank 8, alpha 16, all attention projections by default;
    ``quantize_base``: QLoRA, the frozen base in NF4).

    Its output is tied to the embedding, so there is no ``apply_lora_to_output``.
    """
    _check_lora_args(lora_attn_modules, apply_lora_to_mlp, False, lora_rank, lora_alpha, lora_dropout)
    return add_lora(
        gqa_tiny(backend=backend, max_seq_len=max_seq_len, vocab_size=vocab_size),
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantize_base=quantize_base,
    )


def lora_gqa_llama3_2_1b(
    lora_attn_modules: Sequence[str] = LORA_ATTN_MODULES,
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    backend: str = "auto",
    max_seq_len: int = 131_072,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """:func:`~gqa_tune.models.gqa_llama3_2_1b` with LoRA (torchtune's ``lora_llama3_2_1b`` defaults: rank 8,
    alpha 16; ``quantize_base``: QLoRA, the frozen base in NF4).

    Its output is tied to the embedding, so there is no ``apply_lora_to_output``.
    """
    _check_lora_args(lora_attn_modules, apply_lora_to_mlp, False, lora_rank, lora_alpha, lora_dropout)
    return add_lora(
        gqa_llama3_2_1b(backend=backend, max_seq_len=max_seq_len),
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantize_base=quantize_base,
    )


# ------------------------------------------------------------ QLoRA: the LoRA builders with quantize_base=True


qlora_gqa_decoder = partial(lora_gqa_decoder, quantize_base=True)
qlora_gqa_decoder.__doc__ = """QLoRA: :func:`lora_gqa_decoder` with ``quantize_base=True`` (same arguments), the
frozen base in NF4. Raises ``ValueError`` as :func:`lora_gqa_decoder`, and for a base weight whose size is not a
multiple of 64."""

qlora_gqa_tiny = partial(lora_gqa_tiny, quantize_base=True)
qlora_gqa_tiny.__doc__ = """QLoRA: :func:`lora_gqa_tiny` with ``quantize_base=True`` (same arguments), the frozen
base in NF4."""

qlora_gqa_llama3_2_1b = partial(lora_gqa_llama3_2_1b, quantize_base=True)
qlora_gqa_llama3_2_1b.__doc__ = """QLoRA: :func:`lora_gqa_llama3_2_1b` with ``quantize_base=True`` (same
arguments), as torchtune's ``qlora_llama3_2_1b``. The plain model is built first, then quantized layer by
layer."""
