"""Hugging Face T5 -> grouped-query attention (Ainslie et al., 2023, the paper's own T5 setting).

:func:`convert_t5_to_gqa` pools the key and value projections of chosen
``T5Attention`` modules (:func:`~gqa_tune.convert.pooling.pooled_linear`, the
paper's mean by default) from ``num_heads`` to ``kv_heads`` heads, in place:
``k`` and ``v`` become ``nn.Linear(d_model, kv_heads * d_kv)``. Every query
head, the output projection and the relative position bias are kept as they
are. Query head ``i`` then uses kv head ``i // (num_heads // kv_heads)``.

Nothing of transformers' is subclassed or copied. Two public extension points do the work:

- ``T5Attention.forward`` reshapes keys/values to ``-1`` heads of ``d_kv``, so
  the narrower projections give ``kv_heads`` heads by themselves, and the
  ``EncoderDecoderCache``/``DynamicCache`` of ``generate()`` holds
  ``[batch, kv_heads, length, d_kv]`` for converted layers (GQA's memory saving).
- It hands ``(query, key, value, mask, position_bias=...)`` to the function
  registered under ``config._attn_implementation`` in transformers'
  ``AttentionInterface``. :func:`register_t5_gqa_attention` registers two that
  accept grouped keys/values and never repeat them, and the converted model is
  switched to the one matching its implementation (:data:`IMPLEMENTATIONS`):
  ``"gqa_tune_sdpa"`` (:func:`sdpa_gqa_attention`, through
  :func:`gqa_tune.scaled_dot_product_gqa` and torch's ``enable_gqa``) and
  ``"gqa_tune_eager"`` (:func:`eager_gqa_attention`, which also returns the
  weights for ``output_attentions``); :func:`set_attn_implementation` switches
  between them. Both get their masks from ``AttentionMaskInterface`` as T5's
  eager path does: an additive float mask added to the relative position bias.

The attention math is T5's: no ``1/sqrt(d)`` scaling (T5 folds it into the
initialization), the relative position bias (per query head, computed by the
first layer of each stack and shared by the others) and the mask added to the
scores, dropout on the weights in training. With ``kv_heads == num_heads`` the
converted model reproduces the original's outputs exactly.

The paper converts decoder self- and cross-attention and leaves the encoder
(where K/V are not cached) as multi-head; that is the default here too.

Supported transformers versions: ``gqa_tune._versions.SUPPORTED["transformers"]``
(also declared in ``pyproject.toml``'s ``t5`` extra: ``pip install 'gqa_tune[t5]'``).
A converted model's ``state_dict`` has smaller ``k``/``v`` weights, so
``from_pretrained`` cannot reload it into a plain T5: build the T5, convert
it with the same arguments, then ``load_state_dict``. A pickled converted model
loaded in a new process needs :func:`register_t5_gqa_attention` called first.
"""

import copy
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from gqa_tune import _checks as checks
from gqa_tune._versions import require
from gqa_tune.convert.pooling import METHODS, pooled_linear
from gqa_tune.ops.functional import scaled_dot_product_gqa

__all__ = [
    "IMPLEMENTATIONS",
    "convert_t5_to_gqa",
    "eager_gqa_attention",
    "kv_heads_of",
    "register_t5_gqa_attention",
    "sdpa_gqa_attention",
    "set_attn_implementation",
]

#: transformers' attention implementation -> the grouped one a converted model is switched to.
IMPLEMENTATIONS: Dict[str, str] = {"sdpa": "gqa_tune_sdpa", "eager": "gqa_tune_eager"}

_INSTALL_HINT = "T5 conversion needs Hugging Face transformers: pip install 'gqa_tune[t5]'"


def _import_t5():
    """transformers' T5 module, after checking that the installed transformers is a supported one."""
    try:
        import transformers
        from transformers.models.t5 import modeling_t5
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    require("transformers", transformers.__version__, feature="convert_t5_to_gqa")
    return modeling_t5


def _additive(attention_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The mask as an additive float tensor: the registered ``eager_mask`` already gives one; a 4-D bool mask
    (True = attend) passed by the caller, which transformers hands over as it is, becomes 0 / dtype's minimum."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~attention_mask, torch.finfo(dtype).min
    )


def sdpa_gqa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    position_bias: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """T5 attention with grouped keys/values, through :func:`gqa_tune.scaled_dot_product_gqa` (``"gqa_tune_sdpa"``).

    The op's dispatcher picks the backend (torch's SDPA with ``enable_gqa`` on
    the CPU). T5's relative position bias makes the mask an arbitrary float
    tensor; on CUDA torch's SDPA may then run its math kernel, which expands K/V
    inside the call (transiently: the cache stays at ``n_kv`` heads).

    Args:
        module: the calling ``T5Attention`` (unused: the grouping comes from the shapes).
        query: ``[b, n_h, s_q, h_d]``.
        key, value: ``[b, n_kv, s_k, h_d]`` with ``n_kv`` dividing ``n_h``.
        attention_mask: additive float ``[b, 1, s_q, s_k]`` (bool, True = attend, is accepted too) or ``None``.
        scaling: multiplier of the scores (T5: 1.0).
        dropout: dropout on the weights (T5 passes 0.0 in eval).
        position_bias: T5's relative position bias, ``[1 or b, n_h, s_q, s_k]``.

    Returns:
        ``(out [b, s_q, n_h, h_d], None)``: SDPA does not return weights (use
        ``"gqa_tune_eager"`` for ``output_attentions``).
    """
    if kwargs.get("output_attentions"):
        warnings.warn(
            "gqa_tune_sdpa cannot return attention weights; set the attention implementation to "
            "'gqa_tune_eager' for output_attentions",
            stacklevel=2,
        )
    mask = _additive(attention_mask, query.dtype)
    if position_bias is not None:
        mask = position_bias if mask is None else position_bias + mask  # [b, n_h, s_q, s_k]
    out = scaled_dot_product_gqa(query, key, value, mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def eager_gqa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    position_bias: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """T5 attention with grouped keys/values, in plain matmuls, returning the weights (``"gqa_tune_eager"``).

    Arguments as :func:`sdpa_gqa_attention` (``module.training`` switches the
    dropout). The ``r = n_h // n_kv`` query heads of a group are folded into
    the query length, so each kv head is read by one matmul and never copied.
    With ``n_kv == n_h`` the operations are exactly those of T5's eager path.

    Returns:
        ``(out [b, s_q, n_h, h_d], weights [b, n_h, s_q, s_k])``.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_kv_heads} key/value heads do not divide {num_heads} query heads")
    groups = num_heads // num_kv_heads
    if groups == 1:
        attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    else:
        folded = query.reshape(batch, num_kv_heads, groups * q_len, head_dim)  # [b, n_kv, r * s_q, h_d]
        scores = torch.matmul(folded, key.transpose(2, 3))  # [b, n_kv, r * s_q, s_k]
        attn_weights = scores.view(batch, num_heads, q_len, k_len) * scaling
    if position_bias is not None:
        attn_weights = attn_weights + position_bias
    attention_mask = _additive(attention_mask, attn_weights.dtype)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    if groups == 1:
        attn_output = torch.matmul(attn_weights, value)
    else:
        probs = attn_weights.reshape(batch, num_kv_heads, groups * q_len, k_len)
        attn_output = torch.matmul(probs, value).view(batch, num_heads, q_len, value.shape[-1])
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def register_t5_gqa_attention() -> None:
    """Register ``"gqa_tune_sdpa"`` and ``"gqa_tune_eager"`` with transformers (idempotent).

    Each goes into ``AttentionInterface`` (the attention function) and
    ``AttentionMaskInterface`` (transformers' ``eager_mask``: the additive float
    mask our functions add to the position bias). Without the mask entry
    transformers would build no mask at all for a custom implementation.
    """
    _import_t5()
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    functions = {"gqa_tune_sdpa": sdpa_gqa_attention, "gqa_tune_eager": eager_gqa_attention}
    for name, function in functions.items():
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, eager_mask)


def set_attn_implementation(model: nn.Module, implementation: str) -> None:
    """Switch a T5 model and each of its encoder/decoder stacks to ``implementation`` (e.g. ``"gqa_tune_eager"``).

    The stacks hold copies of the config, and before transformers 5.20
    ``model.set_attn_implementation`` skips sub-models whose config has the
    top-level config's class; setting each stack through the same public method
    works across the supported range.
    """
    modeling_t5 = _import_t5()
    for module in (model, *(m for m in model.modules() if isinstance(m, modeling_t5.T5Stack))):
        module.set_attn_implementation(implementation)


def _grouped_implementation(model: nn.Module) -> str:
    current = model.config._attn_implementation
    if current in IMPLEMENTATIONS.values():
        return current
    if current not in IMPLEMENTATIONS:
        raise ValueError(
            f"convert_t5_to_gqa supports models whose attention implementation is one of "
            f"{', '.join(repr(k) for k in IMPLEMENTATIONS)}, got {current!r}; "
            f"call model.set_attn_implementation('sdpa') first"
        )
    return IMPLEMENTATIONS[current]


def _targets(model: nn.Module, modeling_t5, decoder_self: bool, decoder_cross: bool, encoder: bool) -> List[nn.Module]:
    stacks = [m for m in model.modules() if isinstance(m, modeling_t5.T5Stack)]
    if not isinstance(model, modeling_t5.T5PreTrainedModel) or not stacks:
        raise ValueError(
            f"convert_t5_to_gqa needs a Hugging Face T5 model (T5ForConditionalGeneration, T5Model, "
            f"T5EncoderModel, ...), got {type(model).__name__}"
        )
    targets = []
    for stack in stacks:
        for block in stack.block:
            if stack.is_decoder:
                if decoder_self:
                    targets.append(block.layer[0].SelfAttention)
                if decoder_cross:
                    targets.append(block.layer[1].EncDecAttention)
            elif encoder:
                targets.append(block.layer[0].SelfAttention)
    return targets


def kv_heads_of(attn: nn.Module) -> int:
    """The key/value heads of a ``T5Attention``: its ``k`` projection's width over ``d_kv`` (as T5's forward infers)."""
    return attn.k.out_features // attn.key_value_proj_dim


def convert_t5_to_gqa(
    model: nn.Module,
    kv_heads: int,
    *,
    decoder_self: bool = True,
    decoder_cross: bool = True,
    encoder: bool = False,
    method: str = "mean",
    seed: int = 0,
    inplace: bool = True,
) -> nn.Module:
    """Convert a Hugging Face T5 model's attention to grouped-query attention with ``kv_heads`` kv heads.

    Each chosen ``T5Attention`` keeps its class and its ``q``/``o``/
    ``relative_attention_bias`` parameters; its ``k``/``v`` become
    ``nn.Linear(d_model, kv_heads * d_kv)`` pooled from the current heads: kv
    head ``j`` is made from heads ``j * r .. (j + 1) * r - 1`` with ``r =
    num_heads // kv_heads``, and query head ``i`` uses kv head ``i // r``. The
    model's attention implementation becomes the grouped one matching it
    (``"sdpa"`` -> ``"gqa_tune_sdpa"``, ``"eager"`` -> ``"gqa_tune_eager"``), for
    every stack (it serves unconverted layers exactly as before). The cache
    holds ``kv_heads`` heads for converted layers. An already converted module
    is pooled further from its current kv heads.

    Args:
        model: a transformers T5 model (``T5ForConditionalGeneration``,
            ``T5Model``, ``T5EncoderModel``, ...) using ``"sdpa"`` or ``"eager"`` attention.
        kv_heads: key/value heads; must divide ``num_heads`` (and the current
            kv heads of an already converted module).
        decoder_self / decoder_cross: convert the decoder's self-/cross-attention
            (the paper converts both).
        encoder: also convert the encoder's self-attention (off, as in the paper).
        method: ``"mean"`` (the paper), ``"first"`` or ``"random"``.
        seed: seeds ``"random"``; module ``n`` (in model order) uses ``seed + n``.
        inplace: modify ``model`` itself (default) or convert a deep copy.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Raises:
        ImportError: transformers is missing.
        gqa_tune._versions.UnsupportedVersionError: the installed transformers is
            outside the supported range (the message names both).
        ValueError: ``model`` is not a T5 model or uses another attention
            implementation, ``kv_heads`` does not divide ``num_heads`` or exceeds
            it, ``method`` is unknown, or no module is selected (e.g. a
            ``T5EncoderModel`` without ``encoder=True``).
    """
    modeling_t5 = _import_t5()
    if method not in METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose one of {', '.join(METHODS)}")
    checks.positive_int("kv_heads", kv_heads)
    targets = _targets(model, modeling_t5, decoder_self, decoder_cross, encoder)
    if not targets:
        raise ValueError(
            f"no attention modules selected in {type(model).__name__} (decoder_self={decoder_self}, "
            f"decoder_cross={decoder_cross}, encoder={encoder}); an encoder-only model needs encoder=True"
        )
    implementation = _grouped_implementation(model)
    for attn in targets:
        current = kv_heads_of(attn)
        if kv_heads > attn.n_heads:
            raise ValueError(f"kv_heads ({kv_heads}) cannot exceed num_heads ({attn.n_heads})")
        if attn.n_heads % kv_heads != 0:
            raise ValueError(f"kv_heads ({kv_heads}) must divide num_heads ({attn.n_heads})")
        if current % kv_heads != 0 or kv_heads > current:
            raise ValueError(
                f"kv_heads ({kv_heads}) must divide the {current} kv heads of an already converted attention module"
            )
    register_t5_gqa_attention()
    if not inplace:
        model = copy.deepcopy(model)
        targets = _targets(model, modeling_t5, decoder_self, decoder_cross, encoder)
    for index, attn in enumerate(targets):
        generator = torch.Generator().manual_seed(seed + index)
        current = kv_heads_of(attn)
        head_dim = attn.key_value_proj_dim
        attn.k = pooled_linear(attn.k, current, kv_heads, head_dim, method, generator)
        attn.v = pooled_linear(attn.v, current, kv_heads, head_dim, method, generator)
    set_attn_implementation(model, implementation)
    return model
