"""Hugging Face T5 -> grouped-query attention (Ainslie et al., 2023, the paper's own T5 setting).

:func:`convert_t5_to_gqa` turns chosen ``T5Attention`` modules of a Hugging Face
T5 model into :class:`T5GQAAttention`: every query head, the output projection
and the relative position bias are kept as they are, while the key and value
projections are pooled (:func:`~gqa_tune.convert.pooling.pool_heads`, the
paper's mean by default) from ``num_heads`` to ``kv_heads`` heads. Query head
``i`` then uses kv head ``i // (num_heads // kv_heads)``.

Keys and values are computed, cached and attended to at ``kv_heads`` heads:
the ``EncoderDecoderCache``/``DynamicCache`` of ``generate()`` holds
``[batch, kv_heads, length, d_kv]`` tensors for converted layers, which is
the memory saving GQA is for. No copy per query head is kept: the eager path
folds each group's query heads into the query length (one matmul per kv
head); the ``sdpa`` and ``flex_attention`` paths go through transformers'
own GQA handling (``num_key_value_groups``), which on some backends expands
K/V transiently inside the attention call, never in the cache.

The attention math is T5's: no ``1/sqrt(d)`` scaling (T5 folds it into the
initialization), the relative position bias (per query head, computed by the
first layer of each stack and shared by the others) and the masks added to
the scores, dropout on the weights in training. With ``kv_heads ==
num_heads`` the converted model reproduces the original's outputs exactly.

The paper converts decoder self- and cross-attention and leaves the encoder
(where K/V are not cached) as multi-head; that is the default here too.

Requires transformers 5.x (the ``T5Attention.forward(hidden_states, mask,
key_value_states, position_bias, past_key_values, **kwargs)`` interface with
``EncoderDecoderCache``); install with ``pip install 'gqa_tune[t5]'``.
A converted model's ``state_dict`` has smaller ``k``/``v`` weights, so
``from_pretrained`` cannot reload it into a plain T5: build the T5, convert
it with the same arguments, then ``load_state_dict``.
"""

import copy
import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from gqa_tune.convert.pooling import METHODS, pooled_linear

# T5GQAAttention is served by the module-level __getattr__ below (built when first asked for)
__all__ = ["T5GQAAttention", "convert_t5_to_gqa", "eager_gqa_attention_forward"]  # noqa: F822

_INSTALL_HINT = "T5 conversion needs Hugging Face transformers: pip install 'gqa_tune[t5]'"


def _import_t5():
    try:
        from transformers.models.t5 import modeling_t5
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    return modeling_t5


def _check_transformers_api(modeling_t5) -> None:
    params = inspect.signature(modeling_t5.T5Attention.forward).parameters
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        sdpa_takes_bias = "position_bias" in inspect.signature(sdpa_attention_forward).parameters
    except ImportError:
        sdpa_takes_bias = False
    if (
        "past_key_values" not in params
        or not sdpa_takes_bias  # older sdpa functions would silently drop T5's relative position bias
        or not hasattr(modeling_t5, "eager_attention_forward")
        or not hasattr(modeling_t5, "EncoderDecoderCache")
    ):
        import transformers

        raise ImportError(
            f"T5 GQA conversion needs transformers 5.x's T5Attention interface (forward(..., past_key_values=...)); "
            f"found transformers {transformers.__version__}. Upgrade with: pip install -U 'gqa_tune[t5]'"
        )


def eager_gqa_attention_forward(
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
    """T5's eager attention with ``key``/``value`` at fewer heads than ``query``, without expanding them.

    ``query`` is ``[b, h, s_q, d]``, ``key``/``value`` ``[b, h_kv, s_k, d]`` with
    ``h_kv`` dividing ``h``. The ``r = h // h_kv`` query heads of a group are
    folded into the query length, so each kv head is read by one matmul.
    Returns ``(output [b, s_q, h, d], weights [b, h, s_q, s_k])``; with ``h_kv
    == h`` the operations are exactly those of transformers' T5 eager path.
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
        folded = query.reshape(batch, num_kv_heads, groups * q_len, head_dim)
        scores = torch.matmul(folded, key.transpose(2, 3))  # [b, h_kv, r * s_q, s_k]
        attn_weights = scores.view(batch, num_heads, q_len, k_len) * scaling
    if position_bias is not None:
        attn_weights = attn_weights + position_bias
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    if groups == 1:
        attn_output = torch.matmul(attn_weights, value)
    else:
        probs = attn_weights.reshape(attn_weights.shape[0], num_kv_heads, groups * q_len, k_len)
        attn_output = torch.matmul(probs, value).view(-1, num_heads, q_len, value.shape[-1])
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _gqa_forward(
    self,
    hidden_states: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    key_value_states: Optional[torch.Tensor] = None,
    position_bias: Optional[torch.Tensor] = None,
    past_key_values=None,
    **kwargs: Any,
):
    """``T5Attention.forward`` (transformers 5.x) with keys/values at ``num_key_value_heads`` heads."""
    from transformers.cache_utils import EncoderDecoderCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, self.n_heads, self.key_value_proj_dim)
    past_seen_tokens = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
    # cloned for StaticCache: read before the update, used after it (same reference)
    past_seen_tokens = past_seen_tokens.clone() if isinstance(past_seen_tokens, torch.Tensor) else past_seen_tokens
    is_cross_attention = key_value_states is not None

    query_states = self.q(hidden_states).view(hidden_shape).transpose(1, 2)

    is_updated = False
    if isinstance(past_key_values, EncoderDecoderCache):
        is_updated = past_key_values.is_updated.get(self.layer_idx)
        if is_cross_attention:
            curr_past_key_values = past_key_values.cross_attention_cache
        else:
            curr_past_key_values = past_key_values.self_attention_cache
    else:
        curr_past_key_values = past_key_values

    current_states = key_value_states if is_cross_attention else hidden_states
    if is_cross_attention and past_key_values is not None and is_updated:
        # cross-attention k/v were cached (at num_key_value_heads heads) on the first step
        key_states = curr_past_key_values.layers[self.layer_idx].keys
        value_states = curr_past_key_values.layers[self.layer_idx].values
    else:
        kv_shape = (*current_states.shape[:-1], self.num_key_value_heads, self.key_value_proj_dim)
        key_states = self.k(current_states).view(kv_shape).transpose(1, 2)
        value_states = self.v(current_states).view(kv_shape).transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = curr_past_key_values.update(key_states, value_states, self.layer_idx)
            if is_cross_attention and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[self.layer_idx] = True

    if position_bias is None:
        key_length = key_states.shape[-2]
        if not self.has_relative_attention_bias:
            position_bias = torch.zeros(
                (1, self.n_heads, input_shape[1], key_length), device=query_states.device, dtype=query_states.dtype
            )
            if self.gradient_checkpointing and self.training:
                position_bias.requires_grad = True
        else:
            position_bias = self.compute_bias(
                input_shape[1], key_length, device=query_states.device, past_seen_tokens=past_seen_tokens
            )

    implementation = self.config._attn_implementation
    if implementation in (None, "eager"):
        attention_interface: Callable = eager_gqa_attention_forward
    else:
        # transformers' sdpa / flex functions handle fewer kv heads through `module.num_key_value_groups`
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_gqa_attention_forward)

    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        mask,
        dropout=0.0 if not self.training else self.dropout,
        scaling=self.scaling,
        position_bias=position_bias,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o(attn_output)
    return attn_output, position_bias, attn_weights


_CLASS_CACHE: Dict[str, type] = {}


def _gqa_class() -> type:
    """``T5GQAAttention``, built on first use so that importing this module does not import transformers."""
    if "T5GQAAttention" not in _CLASS_CACHE:
        modeling_t5 = _import_t5()
        _check_transformers_api(modeling_t5)

        def extra_repr(self) -> str:
            heads = f"n_heads={self.n_heads}, num_key_value_heads={self.num_key_value_heads}"
            return f"{heads}, d_kv={self.key_value_proj_dim}"

        cls = type(
            "T5GQAAttention",
            (modeling_t5.T5Attention,),
            {
                "__doc__": (
                    "A ``T5Attention`` whose keys/values have ``num_key_value_heads`` heads shared by groups of "
                    "``num_key_value_groups`` query heads; made by :func:`convert_t5_to_gqa`."
                ),
                "__module__": __name__,
                "forward": _gqa_forward,
                "extra_repr": extra_repr,
            },
        )
        cls.__qualname__ = "T5GQAAttention"
        _CLASS_CACHE["T5GQAAttention"] = cls
    return _CLASS_CACHE["T5GQAAttention"]


def __getattr__(name: str):
    # `gqa_tune.convert.t5.T5GQAAttention` (and pickling of converted models) without importing transformers eagerly
    if name == "T5GQAAttention":
        return _gqa_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    Each chosen ``T5Attention`` becomes a :class:`T5GQAAttention` (same
    object, same ``q``/``o``/``relative_attention_bias`` parameters) whose
    ``k``/``v`` are ``nn.Linear(d_model, kv_heads * d_kv)`` pooled from the
    current heads: kv head ``j`` is made from heads ``j * r .. (j + 1) * r - 1``
    with ``r = num_heads // kv_heads``, and query head ``i`` uses kv head
    ``i // r``. The cache holds ``kv_heads`` heads for converted layers.
    An already converted module is pooled further from its current kv heads.

    Args:
        model: a transformers T5 model (``T5ForConditionalGeneration``,
            ``T5Model``, ``T5EncoderModel``, ...).
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
        ImportError: transformers is missing or too old for the 5.x T5 interface.
        ValueError: ``model`` is not a T5 model, ``kv_heads`` does not divide
            ``num_heads`` or exceeds it, ``method`` is unknown, or no module is
            selected (e.g. a ``T5EncoderModel`` without ``encoder=True``).
    """
    modeling_t5 = _import_t5()
    _check_transformers_api(modeling_t5)
    if method not in METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1:
        raise ValueError(f"kv_heads must be a positive int, got {kv_heads!r}")
    targets = _targets(model, modeling_t5, decoder_self, decoder_cross, encoder)
    if not targets:
        raise ValueError(
            f"no attention modules selected in {type(model).__name__} (decoder_self={decoder_self}, "
            f"decoder_cross={decoder_cross}, encoder={encoder}); an encoder-only model needs encoder=True"
        )
    for attn in targets:
        current = getattr(attn, "num_key_value_heads", attn.n_heads)
        if kv_heads > attn.n_heads:
            raise ValueError(f"kv_heads ({kv_heads}) cannot exceed num_heads ({attn.n_heads})")
        if attn.n_heads % kv_heads != 0:
            raise ValueError(f"kv_heads ({kv_heads}) must divide num_heads ({attn.n_heads})")
        if current % kv_heads != 0 or kv_heads > current:
            raise ValueError(
                f"kv_heads ({kv_heads}) must divide the {current} kv heads of an already converted attention module"
            )
    if not inplace:
        model = copy.deepcopy(model)
        targets = _targets(model, modeling_t5, decoder_self, decoder_cross, encoder)
    cls = _gqa_class()
    for index, attn in enumerate(targets):
        generator = torch.Generator().manual_seed(seed + index)
        current = getattr(attn, "num_key_value_heads", attn.n_heads)
        head_dim = attn.key_value_proj_dim
        attn.k = pooled_linear(attn.k, current, kv_heads, head_dim, method, generator)
        attn.v = pooled_linear(attn.v, current, kv_heads, head_dim, method, generator)
        attn.num_key_value_heads = kv_heads
        attn.num_key_value_groups = attn.n_heads // kv_heads
        attn.kv_inner_dim = kv_heads * head_dim
        attn.__class__ = cls
    return model
