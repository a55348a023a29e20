"""The transformers door: ``attn_implementation="gqa_tune"`` runs any transformers decoder on gqa_tune's op.

``import gqa_tune`` registers :func:`gqa_tune_attention` under the name ``"gqa_tune"`` in transformers'
``AttentionInterface`` (and, for its masks, transformers' own SDPA mask function in ``AttentionMaskInterface``),
so that::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="gqa_tune")

computes every attention layer with :func:`gqa_tune.scaled_dot_product_gqa`: keys and values stay at the model's
``num_key_value_heads`` (never repeated per query head), in prefill, in ``generate`` and with its
``DynamicCache`` or ``StaticCache``. Transformers is imported only by whoever uses it: the registration waits
for ``transformers.modeling_utils`` to be imported (or happens at once when it already is).

What the layers pass is read: the mask (bool, True = attend, padding and sliding windows included), causality,
``scaling``, ``dropout``, ``softcap`` (Gemma 2's logit soft-capping, which transformers' ``sdpa`` refuses) and
``s_aux`` (GPT-OSS's attention sinks); ``sliding_window`` where no mask carries it. ``config.gqa_tune_backend``
(default ``"auto"``) picks the backend. T5's relative position bias has its own door
(:mod:`gqa_tune.convert.t5`).
"""

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Optional, Tuple

import torch

from gqa_tune.ops.functional import scaled_dot_product_gqa

NAME = "gqa_tune"


def gqa_tune_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """A transformers attention function (``AttentionInterface``'s signature).

    Args:
        module (torch.nn.Module): the calling attention layer (``is_causal``, ``config`` are read).
        query (torch.Tensor): ``[b, n_h, s_q, h_d]``.
        key, value (torch.Tensor): ``[b, n_kv, s_kv, h_d]``, as many kv heads as the layer has.
        attention_mask (Optional[torch.Tensor]): ``[b, 1, s_q, >= s_kv]`` bool (True = attend) or additive float;
            ``None``: causal (for ``s_q > 1``) or every key.
        dropout (float): dropout on the weights.
        scaling (Optional[float]): score multiplier (``None``: ``h_d ** -0.5``).
        is_causal (Optional[bool]): overrides ``module.is_causal``.
        sliding_window (Optional[int]): the layer's window, used where no mask carries it (a prefill without
            a mask); transformers' masks already hold it otherwise.
        softcap (Optional[float]): logit soft-cap.
        s_aux (Optional[torch.Tensor]): ``[n_h]`` attention sinks.

    Returns:
        ``(out [b, s_q, n_h, h_d], None)``.
    """
    if kwargs.get("position_bias") is not None:
        raise ValueError("attn_implementation='gqa_tune' takes no position_bias; for T5 use gqa_tune.convert.t5")
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-1] > kv_len:
        mask = mask[..., :kv_len]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and mask is None and causal)
    if causal and kv_len > q_len:  # an empty static cache at prefill: the keys past the queries are never seen
        key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
    window = sliding_window if causal and q_len == kv_len and sliding_window and sliding_window < kv_len else None
    out = scaled_dot_product_gqa(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling,
        sliding_window=window, softcap=softcap, sinks=s_aux,
        backend=getattr(getattr(module, "config", None), "gqa_tune_backend", "auto"),
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"gqa_tune"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_tune_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Registers the door right after ``transformers.modeling_utils`` is first imported (nothing imports
    transformers on gqa_tune's behalf)."""

    TARGET = "transformers.modeling_utils"

    def find_spec(self, name, path, target=None):
        if name != self.TARGET:
            return None
        sys.meta_path.remove(self)  # one shot: find the real spec, then wrap its loader
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real = spec.loader.exec_module

        def exec_module(module):
            real(module)
            try:
                register()
            except Exception as err:  # noqa: BLE001  never break transformers' own import
                message = f"gqa_tune: attn_implementation='gqa_tune' is not available with this transformers: {err}"
                warnings.warn(message, stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if transformers' modeling code is loaded, else as soon as it is."""
    if _RegisterWhenImported.TARGET in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None and not any(
        isinstance(finder, _RegisterWhenImported) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterWhenImported())
