"""Weight quantization for generation with torchao, and the bytes a quantized model's weights take.

The generate recipe's ``quantizer:`` is a torchao quantization config (an ``AOBaseConfig``), e.g.
``torchao.quantization.Int8WeightOnlyConfig``, ``Int8DynamicActivationInt8WeightConfig`` or
``Int4WeightOnlyConfig`` with ``layout: {_component_: torchao.dtypes.Int4CPULayout}`` and ``version: 1`` (the
int4 kernel that runs on a CPU). :func:`build_quantizer` instantiates it (nested components too, which
torchtune's ``config.instantiate`` leaves as dicts); :func:`quantize_model` applies it with torchao's
``quantize_`` to the model's ``nn.Linear`` layers (a tied output projection reads the embedding and stays as
it is) after the weights are loaded.

Whether a config can run here has one owner, the pair :func:`quantizer_limits` (what is known before
anything is built: a missing package, a device without the kernel) and :func:`quantize_model` (which then
quantizes and runs the model once on two tokens, so that a kernel missing for this device and dtype fails at
setup, not in the middle of generating). Both raise through :func:`quantizer_error`: a
:class:`~gqa_tune.config_check.ConfigError` naming ``quantizer``, the config and why.

Measured with torchao 0.15 on this project's CPU (torch 2.13): int8 weight-only, int8 dynamic activation +
int8 weight, int4 with ``Int4CPULayout`` (fp32 or bf16 activations) and float8 weight-only run; the default
``Int4WeightOnlyConfig`` (version 2, ``int4_packing_format="plain"``) needs fbgemm-gpu-genai, and float8
activations need a CUDA GPU of compute capability 8.9 or newer (or an MI300).
"""

import copy
import importlib.util
import warnings
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import quantize_
from torchtune import config as tt_config
from torchtune.modules.peft import LoRALinear

from gqa_tune._checks import ConfigError

# torchao 0.15 calls version 1 of its int8 and int4 configs deprecated, at every quantization and at every
# int4 CPU tensor it builds. Version 1 is the int8 configs' default and the only int4 config with a CPU
# kernel (Int4CPULayout), and torchao is pinned below 0.16 (pyproject.toml), so the notice only repeats
# itself: it is silenced for those two messages from torchao's own modules.
warnings.filterwarnings(
    "ignore",
    message=r"(Config Deprecation: version 1 of|Models quantized with version 1 of)",
    category=UserWarning,
    module=r"torchao\.",
)

#: The float8 configs whose activations are float8 (the weight-only one dequantizes, and runs on a CPU).
_FLOAT8_ACTIVATION_CONFIGS = (
    "Float8DynamicActivationFloat8WeightConfig",
    "Float8StaticActivationFloat8WeightConfig",
    "Float8DynamicActivationFloat8SemiSparseWeightConfig",
    "Float8DynamicActivationInt4WeightConfig",
)
#: ``Int4WeightOnlyConfig`` (version 2) packing formats that run on fbgemm-gpu-genai's kernels.
_FBGEMM_INT4_FORMATS = ("plain", "preshuffled")
_CPU_INT4_HINT = (
    "on a CPU use its CPU layout: quantizer.layout={_component_: torchao.dtypes.Int4CPULayout} with "
    "quantizer.version=1 (bf16 activations are the fast ones: dtype=bf16)"
)


def describe(config: Any) -> str:
    """``config``'s class and, for int4, its layout / packing format and version: how messages name it."""
    name = type(config).__name__
    if name == "Int4WeightOnlyConfig":
        if getattr(config, "version", 2) == 1:
            return f"{name}(layout={type(config.layout).__name__}, version=1)"
        packing = getattr(config.int4_packing_format, "value", config.int4_packing_format)
        return f"{name}(int4_packing_format={packing!r}, version={config.version})"
    return name


def quantizer_error(config: Any, device: torch.device, dtype: torch.dtype, reason: str) -> ConfigError:
    """The error every refusal of a quantizer raises: it names the key, the config, the device and dtype, and why."""
    where = f"{device} with dtype {str(dtype).replace('torch.', '')}"
    return ConfigError(f"quantizer: {describe(config)} cannot run on {where}: {reason}", what="quantizer")


def build_quantizer(node: Any) -> AOBaseConfig:
    """Instantiate the ``quantizer:`` node, its nested ``_component_`` mappings first (``layout``, ``granularity``).

    Raises:
        ConfigError: naming ``quantizer``, when it is not a torchao quantization config or cannot be built.
    """
    try:
        config = _instantiate(node if OmegaConf.is_config(node) else OmegaConf.create(node))
    except Exception as err:  # the component's own error, e.g. a bad value of one of its arguments
        raise ConfigError(f"quantizer: cannot build {_component_name(node)}: {err}", what="quantizer") from err
    if not isinstance(config, AOBaseConfig):
        raise ConfigError(
            f"quantizer: {_component_name(node)} built a {type(config).__name__}, not a torchao quantization "
            "config (torchao.core.config.AOBaseConfig), e.g. torchao.quantization.Int8WeightOnlyConfig",
            what="quantizer",
        )
    return config


def _component_name(node: Any) -> str:
    return repr(node.get("_component_")) if hasattr(node, "get") else repr(node)


def _instantiate(node: DictConfig) -> Any:
    nested = {
        key: _instantiate(value) for key, value in node.items() if OmegaConf.is_dict(value) and "_component_" in value
    }
    rest = OmegaConf.create({k: v for k, v in node.items() if k not in nested})
    return tt_config.instantiate(rest, **nested)


def quantizer_limits(config: AOBaseConfig, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``config`` cannot run on ``device`` with ``dtype``, as far as is known before quantizing (None: no
    known reason; :func:`quantize_model` then tries it)."""
    name = type(config).__name__
    device = torch.device(device)
    if name == "Int4WeightOnlyConfig":
        version = getattr(config, "version", 2)
        packing = getattr(config.int4_packing_format, "value", config.int4_packing_format)
        if version >= 2 and packing in _FBGEMM_INT4_FORMATS and importlib.util.find_spec("fbgemm_gpu") is None:
            return (
                f"int4_packing_format={packing!r} (the default) runs on fbgemm-gpu-genai's CUDA kernels, and "
                f"fbgemm-gpu-genai (>= 1.2.0) is not installed; {_CPU_INT4_HINT}"
            )
        layout = type(getattr(config, "layout", None)).__name__
        if version == 1 and layout == "Int4CPULayout" and device.type != "cpu":
            return f"Int4CPULayout is the CPU's int4 kernel; on {device.type} use that device's layout"
        if version == 1 and layout == "TensorCoreTiledLayout" and device.type != "cuda":
            return f"TensorCoreTiledLayout needs a CUDA GPU's tensor cores; {_CPU_INT4_HINT}"
    if name in _FLOAT8_ACTIVATION_CONFIGS:
        if device.type != "cuda":
            return (
                "float8 activations need a CUDA GPU of compute capability 8.9 or newer (or an MI300); "
                "on a CPU use Float8WeightOnlyConfig or an int8 config"
            )
        major, minor = torch.cuda.get_device_capability(device)
        if torch.version.hip is None and (major, minor) < (8, 9):
            return f"float8 activations need compute capability 8.9 or newer; {device} has {major}.{minor}"
    return None


def quantize_model(model: nn.Module, config: AOBaseConfig) -> int:
    """Quantize ``model``'s ``nn.Linear`` layers in place with ``config`` (torchao's ``quantize_``), then run
    it once on two tokens to check that this device and dtype have the kernels; returns how many weights
    were quantized.

    Raises:
        ConfigError: from :func:`quantizer_error`: a known limit (:func:`quantizer_limits`), or torchao's
            error while quantizing or running, or non-finite logits.
    """
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    reason = quantizer_limits(config, device, dtype)
    if reason is not None:
        raise quantizer_error(config, device, dtype, reason)
    before = {name: type(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    try:
        quantize_(model, copy.deepcopy(config))  # quantize_ may keep state on the config
        with torch.inference_mode():
            logits = model(torch.zeros(1, 2, dtype=torch.long, device=device))
    except Exception as err:  # torchao's reason, from wherever it was found
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise quantizer_error(config, device, dtype, f"torchao: {type(err).__name__}: {first}") from err
    if not torch.isfinite(logits).all():
        raise quantizer_error(config, device, dtype, "the quantized model gives non-finite logits")
    modules = dict(model.named_modules())
    return sum(1 for name, kind in before.items() if type(modules[name].weight) is not kind)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` holds: a plain tensor's ``nbytes``, a tensor subclass's (torchao's NF4 or affine
    quantized tensors) the sum over its inner tensors (``__tensor_flatten__``), recursively."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return tensor.nbytes
    names, _ = tensor.__tensor_flatten__()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def weight_bytes(model: nn.Module, *, linear_only: bool = False) -> int:
    """Bytes of ``model``'s parameters (each shared one once), quantized ones as stored; ``linear_only``: of the
    weights of its linear layers only (``nn.Linear`` and its subclasses, LoRA's base weights, not the adapters)."""
    if not linear_only:
        return sum(tensor_bytes(p) for p in model.parameters())
    seen, total = set(), 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        is_adapter = name.rpartition(".")[2] in ("lora_a", "lora_b")
        if weight is None or not isinstance(module, (nn.Linear, LoRALinear)) or is_adapter or id(weight) in seen:
            continue
        seen.add(id(weight))
        total += tensor_bytes(weight)
    return total


__all__ = [
    "build_quantizer",
    "describe",
    "quantize_model",
    "quantizer_error",
    "quantizer_limits",
    "tensor_bytes",
    "weight_bytes",
]
