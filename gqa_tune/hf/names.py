"""Weight names and layouts: Hugging Face <-> gqa_tune (torchtune's names), both ways.

torchtune's ``hf_to_tune`` / ``tune_to_hf`` convert the Llama-named weights (q/k rows permuted between the
half-split RoPE of Hugging Face checkpoints and torchtune's interleaved one); what they leave out is done
here: Qwen2's q/k/v biases (the same permutation), Gemma 2's four norms per layer, tied output weights.
"""

import re
from typing import Any, Dict

import torch
from torchtune.models.convert_weights import hf_to_tune, tune_to_hf

from gqa_tune.hf.config import TIED_BY_DEFAULT, _model_type, hf_shape

#: q/k/v projection biases (Qwen2's), which torchtune's ``hf_to_tune`` / ``tune_to_hf`` do not map.
_HF_BIAS = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias$")

_TUNE_BIAS = re.compile(r"^layers\.(\d+)\.attn\.([qkv])_proj\.bias$")

#: Gemma 2's four norms per layer and its final norm (HF name -> torchtune name). torchtune 0.6.1's own
#: ``gemma2_hf_to_tune`` puts ``pre_feedforward_layernorm`` after the MLP and ``post_feedforward_layernorm``
#: before it (``mlp_scale`` / ``mlp_norm`` swapped), which changes the function; this is the order
#: ``transformers`` computes.
_GEMMA2_NORMS = {
    "input_layernorm": "sa_norm",
    "post_attention_layernorm": "sa_scale",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "mlp_scale",
}

_HF_GEMMA2_NORM = re.compile(rf"^model\.layers\.(\d+)\.({'|'.join(_GEMMA2_NORMS)})\.weight$")

_TUNE_GEMMA2_NORM = re.compile(rf"^layers\.(\d+)\.({'|'.join(_GEMMA2_NORMS.values())})\.scale$")


def _permute_bias(bias: torch.Tensor, heads: int, head_dim: int, to_tune: bool) -> torch.Tensor:
    """``hf_to_tune``'s q/k row permutation (half-split RoPE -> interleaved), applied to a bias vector."""
    if to_tune:
        return bias.view(heads, 2, head_dim // 2).transpose(1, 2).reshape(heads * head_dim)
    return bias.view(heads, head_dim // 2, 2).transpose(1, 2).reshape(heads * head_dim)


def hf_to_tune_weights(
    hf_sd: Dict[str, torch.Tensor], config: Dict[str, Any], where: str = "checkpoint"
) -> Dict[str, torch.Tensor]:
    """Hugging Face weights of a :data:`HF_ARCHITECTURES` model -> gqa_tune's (torchtune's key names).

    torchtune's ``hf_to_tune`` converts the Llama-named weights (the q/k rows permuted for interleaved RoPE);
    q/k/v biases (Qwen2) get the same permutation here, Gemma 2's norms the mapping above. A tied model's
    ``lm_head.weight`` (if stored) is dropped: the output reads the embedding.

    Raises:
        ValueError: an unsupported ``model_type``, or a weight these architectures do not have (named).
    """
    model_type = _model_type(config, where)
    shape = hf_shape(config, f"{where}: config.json")
    tied = config.get("tie_word_embeddings", TIED_BY_DEFAULT[model_type])
    extra, rest = {}, {}
    for key, value in hf_sd.items():
        if "rotary_emb.inv_freq" in key or (tied and key == "lm_head.weight"):
            continue
        bias = _HF_BIAS.match(key)
        norm = _HF_GEMMA2_NORM.match(key) if model_type == "gemma2" else None
        if bias:
            layer, proj = bias.groups()
            if proj in "qk":
                heads = shape["num_heads"] if proj == "q" else shape["num_kv_heads"]
                value = _permute_bias(value, heads, shape["head_dim"], to_tune=True)
            extra[f"layers.{layer}.attn.{proj}_proj.bias"] = value
        elif norm:
            extra[f"layers.{norm.group(1)}.{_GEMMA2_NORMS[norm.group(2)]}.scale"] = value
        elif model_type == "gemma2" and key == "model.norm.weight":
            extra["norm.rms_norm.scale"] = value
        else:
            rest[key] = value
    try:
        out = hf_to_tune(rest, **shape)
    except Exception as err:  # torchtune raises a bare Exception for a key it does not know
        raise ValueError(f"{where}: cannot convert its {model_type} weights: {err}") from err
    out.update(extra)
    return out


def tune_to_hf_weights(state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_tune_weights`, for the architecture of ``config`` (a :func:`hf_config`)."""
    model_type = _model_type(config, "config")
    shape = hf_shape(config)
    extra, rest = {}, {}
    for key, value in state_dict.items():
        bias = _TUNE_BIAS.match(key)
        norm = _TUNE_GEMMA2_NORM.match(key) if model_type == "gemma2" else None
        if bias:
            layer, proj = bias.groups()
            if proj in "qk":
                heads = shape["num_heads"] if proj == "q" else shape["num_kv_heads"]
                value = _permute_bias(value, heads, shape["head_dim"], to_tune=False)
            extra[f"model.layers.{layer}.self_attn.{proj}_proj.bias"] = value
        elif norm:
            hf_name = next(hf for hf, tune in _GEMMA2_NORMS.items() if tune == norm.group(2))
            extra[f"model.layers.{norm.group(1)}.{hf_name}.weight"] = value
        elif model_type == "gemma2" and key == "norm.rms_norm.scale":
            extra["model.norm.weight"] = value
        else:
            rest[key] = value
    out = tune_to_hf(rest, **shape)
    out.update(extra)
    return out
