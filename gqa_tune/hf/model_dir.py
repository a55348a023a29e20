"""A Hugging Face model directory read whole: ``config.json`` and its weights, checked against each other, in
gqa_tune's names."""

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from gqa_tune.hf.config import _model_type, hf_shape, read_config
from gqa_tune.hf.files import read_weights
from gqa_tune.hf.names import hf_to_tune_weights


def _check_tensors(where: str, config: Dict[str, Any], hf_sd: Dict[str, torch.Tensor]) -> None:
    """Floating-point weights only, and an embedding of the shape ``config.json`` describes."""
    integer = [f"{key} ({value.dtype})" for key, value in hf_sd.items() if not value.is_floating_point()]
    if integer:
        raise ValueError(
            f"{where}: {', '.join(integer[:3])} hold integer values; gqa_tune loads floating-point weights only "
            "(integer or quantized checkpoints would be cast, which changes the model)"
        )
    vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weight = hf_sd.get(key)
        if weight is not None and isinstance(vocab, int) and isinstance(hidden, int):
            if tuple(weight.shape) != (vocab, hidden):
                raise ValueError(
                    f"{where}: config.json says vocab_size={vocab}, hidden_size={hidden}, but {key} has shape "
                    f"{tuple(weight.shape)}; the config does not match the weights"
                )


def _head_counts(path: Path, config: Dict[str, Any], hf_sd: Dict[str, torch.Tensor]) -> Tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) from ``config.json``, checked against the q/k/v weights' rows."""
    shape = hf_shape(config, f"checkpoint {str(path)!r}: config.json")
    heads, kv_heads, head_dim = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    for key, weight in hf_sd.items():
        proj = next((p for p in ("q_proj", "k_proj", "v_proj") if key.endswith(f".self_attn.{p}.weight")), None)
        if proj is None:
            continue
        name, count = ("num_attention_heads", heads) if proj == "q_proj" else ("num_key_value_heads", kv_heads)
        rows = weight.shape[0]
        if rows != count * head_dim:
            raise ValueError(
                f"checkpoint {str(path)!r}: config.json says {name}={count}, but {key} has {rows} rows, i.e. "
                f"{rows / head_dim:g} heads of head_dim {head_dim}; the config does not match the weights"
            )
    return heads, kv_heads, head_dim


def load_model_dir(
    path: Path, where: Optional[str] = None, config: Optional[Dict[str, Any]] = None
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(weights in gqa_tune's names, config.json)`` of a Hugging Face model directory of an architecture
    gqa_tune builds (or a gqa_tune checkpoint, which is one).

    ``where`` names the directory in messages (default ``checkpoint '<path>'``; e.g. ``hf_model_dir '<path>'``);
    ``config``: its ``config.json`` when the caller has read it already (:func:`gqa_tune.hf.read_config`).

    Raises:
        ValueError: a missing directory or file, a file that cannot be read, an unsupported ``model_type``,
            integer weights, or a ``config.json`` whose head counts or vocabulary disagree with the weights
            (checked before any tensor is reshaped).
    """
    path = Path(path)
    where = where or f"checkpoint {str(path)!r}"
    config = read_config(path, where) if config is None else config
    _model_type(config, where)
    hf_sd = read_weights(path)
    _check_tensors(where, config, hf_sd)
    _head_counts(path, config, hf_sd)
    return hf_to_tune_weights(hf_sd, config, where), config
