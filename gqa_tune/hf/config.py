"""``config.json``: the one reader, and the mapping between a Hugging Face config and gqa_tune's builders,
both ways.

- :func:`read_config` reads a model directory's ``config.json`` (one error text for every caller).
- :func:`builder_from_hf_config`: config -> the gqa_tune builder (``_component_`` + arguments) that computes
  the model as ``transformers`` does, for ``model_type`` llama, mistral, qwen2, gemma and gemma2.
- :func:`hf_config`: a gqa_tune (or torchtune Llama-style) model -> the ``config.json`` from which
  ``transformers`` rebuilds it.
- :func:`hf_shape`, :func:`model_shape`, :func:`rope_config`, :func:`tokenizer_token_ids`: the pieces both use.
"""

import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchtune.models.gemma.gemma_norm_embedding import GemmaNormEmbeddings
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import RotaryPositionalEmbeddings, TiedLinear

from gqa_tune import _checks as checks
from gqa_tune.models._component_builders import SoftCappedTiedLinear

CONFIG, GENERATION_CONFIG = "config.json", "generation_config.json"
#: The Hugging Face config keys of the special token ids.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


#: The Hugging Face architectures gqa_tune builds (gqa_tune.training.weights) and saves, by ``model_type``.
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}

#: ``tie_word_embeddings`` where a ``config.json`` leaves it out (transformers' defaults per model type).
TIED_BY_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gemma": True, "gemma2": True}


def model_shape(model: torch.nn.Module) -> Dict[str, int]:
    """Head counts and widths of a torchtune ``TransformerDecoder`` (ours or torchtune's)."""
    attn = model.layers[0].attn
    return {
        "num_heads": attn.num_heads,
        "num_kv_heads": attn.num_kv_heads,
        "dim": attn.embed_dim,
        "head_dim": attn.head_dim,
    }


def rope_config(rope: torch.nn.Module, head_dim: int) -> Dict[str, Any]:
    """Hugging Face ``rope_parameters`` describing torchtune's RoPE module ``rope``.

    ``RotaryPositionalEmbeddings`` is ``rope_type`` ``"default"``; ``Llama3ScaledRoPE`` is ``"llama3"`` with its
    ``scale_factor``, ``low_freq_factor``, ``high_freq_factor`` and ``old_context_len`` (read off the module).

    Raises:
        ValueError: another position embedding, or one that rotates fewer than ``head_dim`` features.
    """
    if isinstance(rope, Llama3ScaledRoPE):
        params = {
            "rope_type": "llama3",
            "rope_theta": float(rope.base),
            "factor": float(rope.scale_factor),
            "low_freq_factor": float(rope.low_freq_factor),
            "high_freq_factor": float(rope.high_freq_factor),
            "original_max_position_embeddings": int(rope.old_context_len),
        }
    elif isinstance(rope, RotaryPositionalEmbeddings):
        params = {"rope_type": "default", "rope_theta": float(rope.base)}
    else:
        raise ValueError(
            f"cannot describe position embeddings {type(rope).__name__} in a Hugging Face config "
            "(expected torchtune's RotaryPositionalEmbeddings or Llama3ScaledRoPE)"
        )
    if rope.dim != head_dim:
        raise ValueError(
            f"RoPE rotates {rope.dim} of head_dim {head_dim} features; a Hugging Face config cannot say so"
        )
    return params


def tokenizer_token_ids(tokenizer: Any) -> Dict[str, Optional[int]]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of a torchtune tokenizer (``None`` where it has none)."""
    return {key: getattr(tokenizer, key.replace("_token", ""), None) for key in TOKEN_ID_KEYS}


def _out_features(linear: Any) -> int:
    return getattr(linear, "out_features", None) or linear.out_dim  # nn.Linear or LoRALinear


def _gemma_family(model: torch.nn.Module) -> Optional[str]:
    """``"gemma2"`` / ``"gemma"`` for torchtune's Gemma structure (scaled embeddings; Gemma 2: norms after
    attention and MLP too), ``None`` for a Llama-style decoder."""
    if not isinstance(model.tok_embeddings, GemmaNormEmbeddings):
        return None
    return "gemma2" if not isinstance(model.layers[0].sa_scale, torch.nn.Identity) else "gemma"


def _model_problems(model: torch.nn.Module, model_type: str) -> List[str]:
    """Why ``model`` is not a ``model_type`` model ``transformers`` would rebuild (``[]``: it is)."""
    family = _gemma_family(model)
    attn = model.layers[0].attn
    bias = getattr(attn.q_proj, "bias", None) is not None
    windows = [getattr(layer.attn, "sliding_window_size", None) for layer in model.layers]
    problems = []
    if model_type in ("gemma", "gemma2"):
        if family != model_type:
            problems.append(f"it is not {model_type}-shaped (it is {family or 'Llama'}-shaped)")
        if not isinstance(model.output, TiedLinear):
            problems.append("its output projection is not tied to the embedding")
        if model_type == "gemma" and any(windows):
            problems.append("it has sliding windows")
        capping = getattr(model.norm, "logit_capping", None)
        if model_type == "gemma2" and capping is not None and not isinstance(capping, torch.nn.Identity):
            problems.append(
                "it soft-caps the final norm's output (torchtune's gemma2), where Gemma 2 caps the logits "
                "(build it with gqa_gemma2_decoder(cap_logits=True))"
            )
        return problems
    if family is not None:
        problems.append(f"it is {family}-shaped")
    if getattr(attn, "q_norm", None) is not None:
        problems.append("it has q/k norms")
    if not isinstance(getattr(model.layers[0].mlp, "activation", torch.nn.SiLU()), torch.nn.SiLU):
        problems.append("its MLP activation is not SiLU")
    if bias and model_type != "qwen2":
        problems.append("it has q/k/v biases")
    if not bias and model_type == "qwen2":
        problems.append("it has no q/k/v biases")
    if any(windows) and model_type != "mistral":
        problems.append("it has sliding windows")
    if len(set(windows)) > 1:
        problems.append(f"its layers have different windows {windows}")
    return problems


def _infer_model_type(model: torch.nn.Module) -> str:
    family = _gemma_family(model)
    if family is not None:
        return family
    if getattr(model.layers[0].attn.q_proj, "bias", None) is not None:
        return "qwen2"
    if getattr(model.layers[0].attn, "sliding_window_size", None):
        return "mistral"
    return "llama"


def hf_config(
    model: torch.nn.Module,
    builder: Optional[Dict[str, Any]] = None,
    token_ids: Optional[Dict[str, Any]] = None,
    source: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A Hugging Face ``config.json`` from which ``transformers`` rebuilds the function of ``model``.

    The architecture (:data:`HF_ARCHITECTURES`) is the ``source`` config's ``model_type`` where ``model`` is
    such a model (then the source's other keys are carried over, the ones describing the model rewritten);
    otherwise the one ``model`` needs: Gemma / Gemma 2 for their structure, Qwen2 with q/k/v biases,
    Mistral with sliding windows, else Llama. RoPE goes in ``rope_parameters`` (transformers 5) and, as
    before, in ``rope_theta`` / ``rope_scaling`` (transformers 4, and other readers of Llama 3.x configs).

    Args:
        model: a torchtune ``TransformerDecoder`` (gqa_tune's, or torchtune's Llama-style ones).
        builder: the config of the model builder, stored under ``gqa_tune.model``.
        token_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``; missing ones are written as ``null``
            (transformers' defaults would be wrong for most tokenizers).
        source: the ``config.json`` the weights came from (``{}`` / ``None``: none).

    Raises:
        ValueError: a model no supported architecture describes (naming what is in the way), e.g. q/k norms,
            other position embeddings, biases together with sliding windows.
    """
    source = dict(source or {})
    model_type = source.get("model_type")
    if model_type not in HF_ARCHITECTURES or _model_problems(model, model_type):
        if model_type in HF_ARCHITECTURES:
            warnings.warn(
                f"the model is not a {model_type} model ({'; '.join(_model_problems(model, model_type))}): "
                f"describing it as a {_infer_model_type(model)} model instead",
                stacklevel=2,
            )
        model_type, source = _infer_model_type(model), {}
    problems = _model_problems(model, model_type)
    if problems:
        raise ValueError(
            f"the model cannot be described in a Hugging Face {model_type} config.json: {'; '.join(problems)}"
        )
    shape = model_shape(model)
    attn = model.layers[0].attn
    if not isinstance(model.output, TiedLinear) and not hasattr(model.output, "weight"):
        raise ValueError(f"cannot describe the output projection {type(model.output).__name__} in a config.json")
    rope = rope_config(attn.pos_embeddings, shape["head_dim"])
    gemma = model_type in ("gemma", "gemma2")
    if gemma and rope["rope_type"] != "default":
        raise ValueError(f"a {model_type} config.json cannot describe {rope['rope_type']!r} RoPE scaling")
    norm = model.norm.rms_norm if model_type == "gemma2" else model.norm
    described = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": model.tok_embeddings.num_embeddings,
        "hidden_size": shape["dim"],
        "intermediate_size": _out_features(model.layers[0].mlp.w1),
        "num_hidden_layers": len(model.layers),
        "num_attention_heads": shape["num_heads"],
        "num_key_value_heads": shape["num_kv_heads"],
        "head_dim": shape["head_dim"],
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": float(norm.eps),
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "tie_word_embeddings": isinstance(model.output, TiedLinear),
        **{key: (token_ids or {}).get(key) for key in TOKEN_ID_KEYS},
        "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "gqa_tune": {"model": builder or {}},
    }
    window = getattr(attn, "sliding_window_size", None)
    if model_type == "llama":
        described.update(hidden_act="silu", attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        described.update(hidden_act="silu", sliding_window=window)
    elif model_type == "qwen2":
        described.update(hidden_act="silu", use_sliding_window=False, sliding_window=None)
        described["layer_types"] = ["full_attention"] * len(model.layers)
    elif model_type == "gemma":
        described.update(hidden_act="gelu_pytorch_tanh", attention_bias=False)
    else:
        described.update(_gemma2_entries(model))
    if "dtype" in source:  # transformers 5's name for torch_dtype
        described["dtype"] = described["torch_dtype"]
    config = {key: value for key, value in source.items() if key not in ("rope_scaling", "gqa_tune")}
    config.update(described)
    if rope["rope_type"] != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def _gemma2_entries(model: torch.nn.Module) -> Dict[str, Any]:
    """The Gemma 2 keys: soft-capping, ``query_pre_attn_scalar``, the window and which layers have it."""
    attn = model.layers[0].attn
    windows = [layer.attn.sliding_window_size for layer in model.layers]
    window = windows[0]
    expected = [window if i % 2 == 0 else None for i in range(len(windows))]
    if window is None or windows != expected:
        raise ValueError(
            f"a gemma2 config.json describes windows on the even layers only, the model has windows {windows}"
        )
    scale = attn.scale if attn.scale is not None else attn.head_dim**-0.5
    scalar = scale**-2.0
    scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 * scalar else scalar
    final = model.output.capping_value if isinstance(model.output, SoftCappedTiedLinear) else None
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attn_logit_softcapping": attn.softcapping,
        "final_logit_softcapping": final,
        "query_pre_attn_scalar": scalar,
        "sliding_window": window,
        "layer_types": ["sliding_attention" if w else "full_attention" for w in windows],
    }


def hf_shape(config: Dict[str, Any], where: str = "config.json") -> Dict[str, int]:
    """``num_heads`` / ``num_kv_heads`` / ``dim`` / ``head_dim`` of a Hugging Face config (``head_dim``
    defaults to ``hidden_size // num_attention_heads``; ``num_key_value_heads`` to ``num_attention_heads``).

    Raises:
        ValueError: naming ``where`` and the key, for a missing or non-positive entry.
    """
    for key in ("num_attention_heads", "hidden_size"):
        if key not in config:
            raise ValueError(f"{where} lacks {key!r}")
    heads, dim = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else kv_heads
    head_dim = config.get("head_dim")
    if head_dim is None:
        head_dim = dim // heads if _positive_int(dim) and _positive_int(heads) else None
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                       ("hidden_size", dim), ("head_dim", head_dim)):  # fmt: skip
        checks.positive_int(f"{where}: {key}", value)
    if heads % kv_heads:
        raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return {"num_heads": heads, "num_kv_heads": kv_heads, "dim": dim, "head_dim": head_dim}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _model_type(config: Dict[str, Any], where: str) -> str:
    """The config's ``model_type`` (checkpoints of older gqa_tune versions are Llama's without saying so)."""
    model_type = config.get("model_type", "llama")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported; gqa_tune builds {', '.join(HF_ARCHITECTURES)}"
        )
    return model_type


#: The builder per Hugging Face ``model_type`` (the LoRA one is ``lora_`` + its name, same module).
BUILDERS = {
    "llama": "gqa_tune.models.gqa_decoder",
    "mistral": "gqa_tune.models.gqa_decoder",
    "qwen2": "gqa_tune.models.gqa_decoder",
    "gemma": "gqa_tune.models.gqa_gemma_decoder",
    "gemma2": "gqa_tune.models.gqa_gemma2_decoder",
}

_ROPE_TYPES = ("default", "llama3")

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def _get(config: Dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key not in config or config[key] is None:
        if default is ...:
            raise ValueError(f"{where} lacks {key!r}, which gqa_tune needs to build the model")
        return default
    return config[key]


def _int(config: Dict[str, Any], key: str, where: str, default: Any = ...) -> int:
    return checks.positive_int(f"{where}: {key}", _get(config, key, where, default))


def _number(config: Dict[str, Any], key: str, where: str, default: Any = ..., allow_none: bool = False) -> Any:
    value = config.get(key, default) if allow_none else _get(config, key, where, default)
    if value is ...:
        raise ValueError(f"{where} lacks {key!r}, which gqa_tune needs to build the model")
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _unsupported(where: str, key: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"{where}: {key}={value!r} is not supported by gqa_tune's builders ({supported})")


def _rope(config: Dict[str, Any], model_type: str, max_seq_len: int, where: str) -> Dict[str, Any]:
    """The builder's RoPE arguments, read the way transformers 5 reads them: ``rope_scaling`` (transformers 4)
    or ``rope_parameters``, with ``rope_theta`` inside or beside them (default 10000)."""
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(key) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: {key} must be a mapping, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES or (rope_type != "default" and model_type in ("gemma", "gemma2")):
        supported = "'default'" + (" and 'llama3'" if model_type not in ("gemma", "gemma2") else "")
        raise _unsupported(where, f"{key}.rope_type", rope_type, f"{model_type}: {supported}")
    for partial_key, holder in (("partial_rotary_factor", params), ("partial_rotary_factor", config)):
        if holder.get(partial_key) not in (None, 1, 1.0):
            raise _unsupported(where, partial_key, holder[partial_key], "RoPE on the whole head only")
    theta = params.get("rope_theta", config.get("rope_theta", 10_000.0))
    theta = _number({"rope_theta": theta}, "rope_theta", where)
    args: Dict[str, Any] = {"rope_base": theta}
    if rope_type == "llama3":
        args["rope_scale_factor"] = _number(params, "factor", f"{where}: {key}")
        args["rope_low_freq_factor"] = _number(params, "low_freq_factor", f"{where}: {key}")
        args["rope_high_freq_factor"] = _number(params, "high_freq_factor", f"{where}: {key}")
        args["rope_old_context_len"] = _int(params, "original_max_position_embeddings", f"{where}: {key}", max_seq_len)
    return args


def builder_from_hf_config(config: Dict[str, Any], where: str = "config.json") -> Dict[str, Any]:
    """The gqa_tune builder config (``_component_`` + arguments) that builds the model a Hugging Face
    ``config.json`` describes, for ``model_type`` llama (Llama 2, 3, 3.x with ``rope_type: llama3``),
    mistral, qwen2 (q/k/v biases), gemma and gemma2.

    Mapped: widths, layers, heads, kv heads, ``head_dim``, vocabulary, ``max_position_embeddings``
    (``max_seq_len``), ``rms_norm_eps``, RoPE theta and Llama 3 scaling, tied embeddings, attention dropout,
    Mistral's window, Gemma 2's windows, soft-capping and ``query_pre_attn_scalar``. Keys a config leaves out
    take transformers' defaults for its ``model_type``. Token ids are not the builder's: checkpoints take them
    from the tokenizer, then from this ``config.json``.

    Raises:
        ValueError: naming the key and its value, for anything these builders would not compute as
            transformers does: an unknown ``model_type`` or ``architectures``, another ``rope_type``,
            ``hidden_act``, attention or MLP biases on Llama, sliding windows on Qwen2, untied Gemma
            embeddings, quantized weights, a missing or malformed size.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{where} is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise _unsupported(where, "model_type", model_type, f"supported: {', '.join(HF_ARCHITECTURES)}")
    expected = HF_ARCHITECTURES[model_type]
    if config.get("architectures") not in (None, [expected]):
        raise _unsupported(where, "architectures", config["architectures"], f"{model_type}: [{expected!r}]")
    if config.get("quantization_config"):
        raise _unsupported(where, "quantization_config", config["quantization_config"], "unquantized weights only")
    gemma = model_type in ("gemma", "gemma2")
    heads = _int(config, "num_attention_heads", where)
    hidden = _int(config, "hidden_size", where)
    head_dim = _int(config, "head_dim", where, 256 if gemma else hidden // heads)
    max_seq_len = _int(config, "max_position_embeddings", where)
    args: Dict[str, Any] = {
        "vocab_size": _int(config, "vocab_size", where),
        "num_layers": _int(config, "num_hidden_layers", where),
        "num_heads": heads,
        "num_kv_heads": _int(config, "num_key_value_heads", where, heads),
        "embed_dim": hidden,
        "intermediate_dim": _int(config, "intermediate_size", where),
        "max_seq_len": max_seq_len,
        "head_dim": head_dim,
        "norm_eps": _number(config, "rms_norm_eps", where, 1e-6),
        "attn_dropout": float(config.get("attention_dropout") or 0.0),
        **_rope(config, model_type, max_seq_len, where),
    }
    activation_key = "hidden_activation" if model_type == "gemma2" else "hidden_act"
    activation = config.get(activation_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    activations = {"gemma": ("gelu_pytorch_tanh", "gelu"), "gemma2": ("gelu_pytorch_tanh",)}.get(model_type, ("silu",))
    if activation not in activations:
        raise _unsupported(where, activation_key, activation, f"{model_type}: {', '.join(activations)}")
    tied = config.get("tie_word_embeddings", TIED_BY_DEFAULT[model_type])
    if gemma and tied is not True:
        raise _unsupported(where, "tie_word_embeddings", tied, f"{model_type}: true (the output reads the embedding)")
    if model_type != "qwen2" and config.get("attention_bias"):
        raise _unsupported(where, "attention_bias", config["attention_bias"], f"{model_type}: false")
    if config.get("mlp_bias"):
        raise _unsupported(where, "mlp_bias", config["mlp_bias"], "false")
    if gemma and config.get("use_bidirectional_attention"):
        raise _unsupported(where, "use_bidirectional_attention", True, "causal attention only")
    if not gemma:
        args.update(tie_word_embeddings=bool(tied), attn_bias=model_type == "qwen2")
    if model_type == "mistral":
        window = config.get("sliding_window", 4096)
        args["sliding_window_size"] = (
            None if window is None else _int({"sliding_window": window}, "sliding_window", where)
        )
    if model_type == "qwen2":
        if config.get("use_sliding_window"):
            raise _unsupported(where, "use_sliding_window", True, "qwen2: global attention in every layer")
        layer_types = config.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise _unsupported(where, "layer_types", layer_types, "qwen2: full_attention in every layer")
    if model_type == "gemma2":
        args["sliding_window_size"] = _int(config, "sliding_window", where, 4096)
        alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args["num_layers"])]
        layer_types = config.get("layer_types") or alternating
        if layer_types != alternating:
            raise _unsupported(where, "layer_types", layer_types, "gemma2: sliding_attention on even layers only")
        args["hidden_capping_value"] = _number(config, "attn_logit_softcapping", where, 50.0, allow_none=True)
        args["final_capping_value"] = _number(config, "final_logit_softcapping", where, 30.0, allow_none=True)
        if "query_pre_attn_scalar" in config and config["query_pre_attn_scalar"] is None:
            # transformers' Gemma 2 computes query_pre_attn_scalar ** -0.5 and fails on null too
            raise _unsupported(where, "query_pre_attn_scalar", None, "gemma2: a positive number (default 256)")
        scalar = _number(config, "query_pre_attn_scalar", where, 256)
        args["query_pre_attn_scalar"] = int(scalar) if scalar == int(scalar) else scalar
        args["cap_logits"] = True  # transformers caps the logits (torchtune's gemma2 the final norm's output)
    return {"_component_": BUILDERS[model_type], **args}


def read_config(directory: Path, where: Optional[str] = None) -> Dict[str, Any]:
    """``directory``'s ``config.json``: the one reader, for every caller.

    Args:
        directory: a model directory.
        where: how messages name it (default ``checkpoint '<directory>'``; e.g. ``hf_model_dir '<directory>'``).

    Raises:
        ValueError: naming ``where``, when the directory or the file is missing, unreadable, or not a JSON object.
    """
    where = where or f"checkpoint {str(directory)!r}"
    path = Path(directory) / CONFIG
    if not Path(directory).is_dir():
        raise ValueError(f"{where} does not exist (relative paths are taken from {Path.cwd()})")
    if not path.is_file():
        raise ValueError(f"{where} has no {CONFIG}: it is not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot read {CONFIG}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{where}: {CONFIG} is not a JSON object")
    return config


def read_hf_config(directory: Path, key: str = "hf_model_dir") -> Dict[str, Any]:
    """:func:`read_config`, its messages naming the config ``key`` that gave ``directory``."""
    return read_config(directory, f"{key} {str(directory)!r}")
