"""LoRA on gqa_tune models: the adapted modules, merged weights, and adapters in Hugging Face PEFT layout.

torchtune's PEFT helpers do the work where they exist (``torchtune.modules.peft``: ``get_adapter_params``,
``get_adapter_state_dict``, ``get_merged_lora_ckpt``, ``set_trainable_params``,
``validate_missing_and_unexpected_for_lora``; ``torchtune.models.convert_weights``: the PEFT key and
config conversion). What this module adds: the plain builder of a LoRA builder, reading a model's LoRA
settings back off its modules, the inverse of torchtune's PEFT conversion (to read adapters back), and
checks that raise ``ValueError`` naming what does not fit instead of torchtune's ``AssertionError``.

An adapter directory (``<checkpoint>/adapter/``) holds ``adapter_model.safetensors`` (PEFT key names, q/k
``lora_B`` rows in Hugging Face's rotary order) and ``adapter_config.json`` (PEFT's keys plus gqa_tune's
settings under ``"gqa_tune"``), so ``peft.PeftModel`` loads it on the Hugging Face base model.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import tune_to_peft_adapter_config, tune_to_peft_adapter_weights
from torchtune.modules.peft import (
    LoRALinear,
    get_adapter_state_dict,
    get_merged_lora_ckpt,
    validate_missing_and_unexpected_for_lora,
)

ADAPTER_DIR, ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter", "adapter_model.safetensors", "adapter_config.json"

#: Builder arguments that only LoRA builders take (dropped to derive the plain builder).
LORA_BUILDER_KEYS = (
    "lora_attn_modules",
    "apply_lora_to_mlp",
    "apply_lora_to_output",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "quantize_base",
)
#: Name prefixes of LoRA builders: ``lora_gqa_tiny`` and QLoRA's ``qlora_gqa_tiny`` (``lora_gqa_tiny`` with
#: ``quantize_base=True``) both derive the plain ``gqa_tiny``.
LORA_PREFIXES = ("qlora_", "lora_")
#: The settings an adapter is checked against when it is loaded back.
_CHECKED_SETTINGS = ("lora_rank", "lora_alpha", "target_modules")


def lora_prefix(component: Any) -> Optional[str]:
    """``"lora_"`` or ``"qlora_"`` where ``component`` (a builder path) names a LoRA or QLoRA builder, else None."""
    name = str(component or "").rpartition(".")[2]
    return next((prefix for prefix in LORA_PREFIXES if name.startswith(prefix)), None)


def base_builder_config(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The plain builder's config for a LoRA builder's: ``..lora_gqa_tiny`` (or QLoRA's ``..qlora_gqa_tiny``)
    -> ``gqa_tune.models.gqa_tiny``, without the LoRA arguments (:data:`LORA_BUILDER_KEYS`).

    Raises:
        ValueError: a builder whose name does not start with ``lora_`` or ``qlora_``.
    """
    module, _, name = str(model_cfg.get("_component_", "")).rpartition(".")
    prefix = lora_prefix(name)
    if prefix is None:
        raise ValueError(
            f"cannot derive the plain model builder from {model_cfg.get('_component_')!r} (expected a name "
            "starting with 'lora_' or 'qlora_'): set base_model to the builder config of the merged model"
        )
    if module.endswith("._lora_builders"):
        module = module.rpartition(".")[0]
    base = {k: v for k, v in model_cfg.items() if k not in LORA_BUILDER_KEYS}
    base["_component_"] = f"{module}.{name[len(prefix) :]}"
    return base


def lora_modules(model: torch.nn.Module) -> Dict[str, LoRALinear]:
    """The model's ``LoRALinear`` modules by qualified name (without activation-checkpoint wrappers)."""
    return {
        name.replace("_checkpoint_wrapped_module.", ""): module
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def lora_settings(model: torch.nn.Module) -> Dict[str, Any]:
    """Rank, alpha, dropout and adapted projections of a LoRA model (one rank and alpha throughout).

    Raises:
        ValueError: no ``LoRALinear`` in the model, or several ranks or alphas.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRALinear: build it with a LoRA builder (e.g. lora_gqa_tiny)")
    ranks = {m.rank for m in modules.values()}
    alphas = {float(m.alpha) for m in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"adapters must share one rank and alpha to be merged, got ranks {ranks}, alphas {alphas}")
    local = list(dict.fromkeys(name.rpartition(".")[2] for name in modules))
    dropout = next(iter(modules.values())).dropout
    return {
        "lora_attn_modules": [n for n in local if n in ("q_proj", "k_proj", "v_proj", "output_proj")],
        "apply_lora_to_mlp": any(n in ("w1", "w2", "w3") for n in local),
        "apply_lora_to_output": "output" in local,
        "lora_rank": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "lora_dropout": float(getattr(dropout, "p", 0.0)),
        "target_modules": local,
    }


def _validate(settings: Dict[str, Any], what: str, source: str, **keys: List[str]) -> None:
    """torchtune's ``validate_missing_and_unexpected_for_lora``, as a ``ValueError`` naming the keys."""
    try:
        validate_missing_and_unexpected_for_lora(
            settings["lora_attn_modules"], settings["apply_lora_to_mlp"], settings["apply_lora_to_output"], **keys
        )
    except AssertionError as err:
        missing = keys.get("base_missing") or keys.get("lora_missing") or []
        unexpected = keys.get("base_unexpected") or keys.get("lora_unexpected") or []
        raise ValueError(
            f"{what} from {source} do not fit the LoRA model ({err}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        ) from None


def load_base_weights(
    model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], settings: Dict[str, Any], source: str
) -> None:
    """Load plain-model weights into a LoRA model: every base weight must fit; the adapters stay as they are.

    Raises:
        ValueError: naming ``source`` and the keys that do not fit.
    """
    from gqa_tune.training.weights import check_fits  # (weights.py reads this module's LoRA names)

    check_fits(model, state_dict, source)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    _validate(settings, "base weights", source, base_missing=missing, base_unexpected=unexpected)


def merged_state_dict(model: torch.nn.Module, settings: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The plain model's weights: every ``W`` of a LoRA projection becomes ``W + alpha/r * B @ A``
    (``get_merged_lora_ckpt``, on a CPU copy: the model's own weights stay)."""
    state_dict = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    for name in lora_modules(model):
        state_dict[f"{name}.weight"] = state_dict[f"{name}.weight"].clone()  # merged in place below
    return get_merged_lora_ckpt(state_dict, rank=settings["lora_rank"], alpha=settings["lora_alpha"])


def adapter_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter weights (``lora_a`` / ``lora_b``), on the CPU (``get_adapter_state_dict``)."""
    return get_adapter_state_dict(model.state_dict(), device="cpu")


def _permute_rows(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of torchtune's HF permutation of q/k rows (``hf_to_tune``'s ``_permute``)."""
    return t.view(n_heads, 2, head_dim // 2, t.shape[-1]).transpose(1, 2).reshape(n_heads * head_dim, t.shape[-1])


def adapter_to_peft(adapter: Dict[str, torch.Tensor], shape: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """torchtune adapter keys (``layers.0.attn.q_proj.lora_a.weight``) -> PEFT's, q/k ``lora_b`` rows permuted."""
    return tune_to_peft_adapter_weights(
        adapter, num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"], dim=shape["dim"],
        head_dim=shape["head_dim"],
    )  # fmt: skip


def adapter_from_peft(
    peft: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], shape: Dict[str, int], source: str
) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`adapter_to_peft` for the adapter keys of ``expected`` (torchtune keys -> tensors).

    Raises:
        ValueError: naming ``source``, for missing, unexpected or mis-shaped adapter weights.
    """
    names = list(expected)
    peft_names = list(adapter_to_peft(dict(expected), shape))  # same order as ``names``
    missing = [p for p in peft_names if p not in peft]
    unexpected = sorted(set(peft) - set(peft_names))
    if missing or unexpected:
        raise ValueError(f"adapter {source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = {}
    for name, peft_name in zip(names, peft_names):
        value = peft[peft_name]
        if value.shape != expected[name].shape:
            raise ValueError(f"adapter {source}: {peft_name} has shape {tuple(value.shape)}, "
                             f"the model's {name} {tuple(expected[name].shape)}")  # fmt: skip
        if name.endswith("lora_b.weight") and (".q_proj." in name or ".k_proj." in name):
            heads = shape["num_heads"] if ".q_proj." in name else shape["num_kv_heads"]
            value = _permute_rows(value, heads, shape["head_dim"])
        out[name] = value
    return out


def adapter_config(settings: Dict[str, Any], base_path: Optional[Path], extra: Dict[str, Any]) -> Dict[str, Any]:
    """``adapter_config.json``: PEFT's keys (``base_model_name_or_path``: ``base_path``), plus gqa_tune's
    ``settings`` and ``extra`` under ``"gqa_tune"``."""
    peft = tune_to_peft_adapter_config(
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": settings["lora_rank"],
            "lora_alpha": settings["lora_alpha"],
            "lora_dropout": settings["lora_dropout"],
            "target_modules": list(settings["target_modules"]),
            "bias": "none",
        },
        base_model_name_or_path=str(base_path) if base_path is not None else None,
    )
    return {**peft, "gqa_tune": {**settings, **extra}}


def save_adapter(directory: Path, model: torch.nn.Module, shape: Dict[str, int], config: Dict[str, Any]) -> Path:
    """Write ``directory/adapter/`` (weights in PEFT layout and ``config``, an :func:`adapter_config`)."""
    out = Path(directory) / ADAPTER_DIR
    out.mkdir()
    adapter = adapter_to_peft(adapter_state_dict(model), shape)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_adapter(checkpoint: Path, model: torch.nn.Module, settings: Dict[str, Any], shape: Dict[str, int]) -> None:
    """Load ``checkpoint/adapter/`` into the LoRA model, after checking its rank, alpha and targets.

    Raises:
        ValueError: no adapter, other settings than the model's, or weights that do not fit.
    """
    directory = Path(checkpoint) / ADAPTER_DIR
    weights, config = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    if not weights.is_file() or not config.is_file():
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no LoRA adapter ({ADAPTER_DIR}/{ADAPTER_WEIGHTS})")
    saved = json.loads(config.read_text()).get("gqa_tune", {})
    for key in _CHECKED_SETTINGS:
        if key in saved and saved[key] != settings[key]:
            raise ValueError(f"adapter in {str(directory)!r} has {key}={saved[key]!r}, the model {settings[key]!r}")
    expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    adapter = adapter_from_peft(load_file(str(weights)), expected, shape, repr(str(weights)))
    missing, unexpected = model.load_state_dict(adapter, strict=False)
    _validate(settings, "adapter weights", repr(str(weights)), lora_missing=missing, lora_unexpected=unexpected)


def check_merged(
    model: torch.nn.Module, settings: Dict[str, Any], merged: Dict[str, torch.Tensor], where: str, tol: float
) -> Optional[str]:
    """Why base + adapter of ``model`` differ from the ``merged`` weights a checkpoint holds (``None``: they
    agree to ``tol`` relative to each weight's largest entry)."""
    ours = merged_state_dict(model, settings)
    if ours.keys() != merged.keys():
        return f"checkpoint {where} does not fit the model: {sorted(ours.keys() ^ merged.keys())[:5]}"
    for key, value in ours.items():
        diff = (value.float() - merged[key].float()).abs().max().item()
        if diff > tol * max(1.0, merged[key].float().abs().max().item()):
            return f"base + adapter differ from the checkpoint's merged model at {key} (max |diff| {diff:.3g})"
    return None


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_DIR",
    "ADAPTER_WEIGHTS",
    "LORA_BUILDER_KEYS",
    "adapter_config",
    "adapter_from_peft",
    "adapter_state_dict",
    "adapter_to_peft",
    "LORA_PREFIXES",
    "base_builder_config",
    "check_merged",
    "load_adapter",
    "load_base_weights",
    "lora_modules",
    "lora_prefix",
    "lora_settings",
    "merged_state_dict",
    "save_adapter",
]
