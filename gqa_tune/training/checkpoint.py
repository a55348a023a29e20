"""Checkpoints: Hugging Face layout (``model.safetensors`` + ``config.json``), written atomically.

A checkpoint is a directory::

    <output_dir>/<name>/
        model.safetensors       weights in Hugging Face layout (loadable by gqa_tune, by
                                ``transformers.AutoModelForCausalLM.from_pretrained`` and, for Llama-style
                                models, by torchtune's FullModelHFCheckpointer with model_type LLAMA3_2)
        config.json             Hugging Face config of the source's architecture (Llama, Mistral, Qwen2,
                                Gemma, Gemma 2; :func:`hf_config`): RoPE type and parameters, norm eps, tied
                                embeddings, windows, soft-capping, bos/eos/pad ids, plus a "gqa_tune" entry
                                with the model builder
        generation_config.json  copied from the source checkpoint, when it has one
        recipe_state.pt         optimizer, scheduler, counters and RNG states (for exact resume)
        adapter/...             LoRA runs: the adapter alone

``<output_dir>/LATEST`` names the newest complete one.

:func:`load_checkpoint` reads these and any Hugging Face model directory of those architectures (one
``model.safetensors``, shards with or without an index, or ``pytorch_model.bin``): the weights are converted
by torchtune's ``hf_to_tune`` / ``tune_to_hf`` plus what they leave out (:func:`hf_to_tune_weights`).

Atomic writes. Invariant: at every instant, (a) ``LATEST``, if it exists, names a complete
directory (it loads), and (b) ``<name>``, if it exists, is complete and holds the old or the new
checkpoint. A save never moves a live checkpoint aside while anything points at it:

1. Everything is written into a fresh ``.<name>.tmp-<pid>-<uuid>``; its files, its directories and
   the parent are fsynced.
2. If ``<name>`` does not exist, the temporary directory is renamed to it.
   If it does, the two are swapped in one step with ``renameat2(RENAME_EXCHANGE)`` (Linux); the old
   checkpoint is then in the temporary directory, which nothing names. Where the exchange is not
   available (other systems, some file systems), ``LATEST`` is first pointed at the temporary
   directory (complete), the old ``<name>`` renamed to ``.<name>.old-<pid>-<uuid>``, ``LATEST``
   pointed at that (still complete), the new directory renamed to ``<name>``. ``LATEST`` is only
   redirected when it named ``<name>``; ``<name>`` is missing (never partial) between the two renames.
3. ``LATEST`` is replaced atomically (temporary file, fsync, ``os.replace``) to name ``<name>``;
   then the old copy is removed.

Leftovers of killed saves (``.<name>.tmp-*``, ``.<name>.old-*``, ``.LATEST.tmp-*``) are removed by
:func:`cleanup_stale` at the start and end of every save: those whose process is dead, or which are
this process's own but no save of it is writing them; never the one ``LATEST`` names, never one of a
live process (a process id reused by an unrelated live process only delays the cleanup; on a file
system shared between machines a live writer on another host is not detected). If ``LATEST`` names a
missing directory (a state older versions could leave), :func:`latest_checkpoint` falls back to the
newest complete checkpoint, with a warning.
"""

import ctypes
import errno
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import hf_to_tune, tune_to_hf
from torchtune.models.gemma.gemma_norm_embedding import GemmaNormEmbeddings
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import RotaryPositionalEmbeddings, TiedLinear

from gqa_tune.models._component_builders import SoftCappedTiedLinear

WEIGHTS, CONFIG, STATE, LATEST = "model.safetensors", "config.json", "recipe_state.pt", "LATEST"
GENERATION_CONFIG = "generation_config.json"
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


def _source_config(source_dir: Optional[Path]) -> Dict[str, Any]:
    """The source checkpoint's ``config.json`` (``{}`` without one, or when it cannot be read)."""
    if source_dir is None or not (Path(source_dir) / CONFIG).is_file():
        return {}
    try:
        config = json.loads((Path(source_dir) / CONFIG).read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"cannot read {str(Path(source_dir) / CONFIG)!r} for its token ids: {err}", stacklevel=3)
        return {}
    return config if isinstance(config, dict) else {}


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


# ------------------------------------------------------------ weights: Hugging Face <-> torchtune

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
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (dim // heads if _positive_int(dim) and _positive_int(heads) else None)
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                       ("hidden_size", dim), ("head_dim", head_dim)):  # fmt: skip
        if not _positive_int(value):
            raise ValueError(f"{where}: {key} must be a positive int, got {value!r}")
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


#: Index files of sharded weights, and the single files, that :func:`weight_files` looks for, in order.
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def weight_files(src: Path) -> Tuple[List[str], Optional[str]]:
    """The weight files of a Hugging Face model directory, and its index file's name (or ``None``).

    In order: the shards a ``*.safetensors.index.json`` names; ``model.safetensors``; every ``*.safetensors``;
    the shards ``pytorch_model.bin.index.json`` names; ``pytorch_model.bin``.

    Raises:
        ValueError: several indexes, an unreadable index, one naming missing files, or no weights at all.
    """
    src = Path(src)
    for pattern in ("*.safetensors.index.json", TORCH_INDEX):
        indexes = sorted(p.name for p in src.glob(pattern) if p.is_file())
        if len(indexes) > 1:
            raise ValueError(f"checkpoint {str(src)!r} has several weight indexes: {', '.join(indexes)}")
        if indexes:
            index = src / indexes[0]
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"cannot read the weight_map of {str(index)!r}: {err}") from err
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise ValueError(f"{str(index)!r} names missing weight files in {str(src)!r}: {', '.join(missing)}")
            if not files:
                raise ValueError(f"{str(index)!r} names no weight files")
            return files, indexes[0]
        if pattern.startswith("*"):
            if (src / WEIGHTS).is_file():
                return [WEIGHTS], None
            files = sorted(p.name for p in src.glob("*.safetensors") if p.is_file())
            if files:
                return files, None
    if (src / TORCH_WEIGHTS).is_file():
        return [TORCH_WEIGHTS], None
    raise ValueError(
        f"checkpoint {str(src)!r} has no {WEIGHTS} and no *.safetensors shards (nor {TORCH_WEIGHTS}, "
        f"or an index: {SAFETENSORS_INDEX}, {TORCH_INDEX})"
    )


def read_weights(src: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of the weight files (:func:`weight_files`) of ``src``, on the CPU.

    Raises:
        ValueError: as :func:`weight_files`, a file that cannot be read, or a key in two files.
    """
    files, _ = weight_files(src)
    weights: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for name in files:
        path = Path(src) / name
        try:
            if name.endswith(".safetensors"):
                shard = load_file(str(path))
            else:
                shard = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt or truncated
            raise ValueError(f"cannot read checkpoint {str(src)!r}: {name}: {err}") from err
        for key, value in shard.items():
            if key in origin:
                raise ValueError(f"{key!r} is in both {origin[key]!r} and {name!r} in {str(src)!r}")
            origin[key] = name
            weights[key] = value
    return weights


# ------------------------------------------------------------ atomic writes

#: Hidden names of a save in progress: ``.<name>.tmp-<pid>-<uuid>`` and ``.<name>.old-<pid>-<uuid>``.
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
#: Hidden paths this process is writing right now (a dead process's pid may be ours again, e.g. in a container).
_IN_PROGRESS: Set[Path] = set()
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _hidden(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    try:
        renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        renameat2 = None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({str(a)!r}, {str(b)!r}, RENAME_EXCHANGE): {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first, ``root`` last."""
    dirs = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in reversed(dirs):
        _fsync_dir(directory)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _pointer_target(output_dir: Path) -> Optional[str]:
    pointer = Path(output_dir) / LATEST
    try:
        return pointer.read_text().strip() if pointer.is_file() else None
    except OSError:
        return None


def cleanup_stale(output_dir: Path, name: Optional[str] = None) -> List[Path]:
    """Remove what killed saves left in ``output_dir``: ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*``.

    Only entries of dead processes (or this process's own that no save of it is writing), never the
    directory ``LATEST`` names. ``name`` restricts the cleanup to one checkpoint name's leftovers.

    Returns:
        The removed paths.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    named = _pointer_target(output_dir)
    removed = []
    for path in sorted(output_dir.iterdir()):
        match = _HIDDEN.match(path.name)
        if match is None or path.name == named or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"])
        if _pid_alive(pid) and (pid != os.getpid() or path in _IN_PROGRESS):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` in one step (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    tmp = _hidden(path, "tmp")
    _IN_PROGRESS.add(tmp)
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _IN_PROGRESS.discard(tmp)
    _fsync_dir(path.parent)


def _write_atomically(final: Path, write: Callable[[Path], None], *, point_latest: bool = False) -> None:
    """Call ``write(tmp_dir)``, then put ``tmp_dir`` in the place of ``final`` keeping the module's invariant.

    ``LATEST`` in ``final``'s parent names ``final`` afterwards when ``point_latest`` is set (a checkpoint
    save); otherwise it is only kept valid (redirected for the moment when it names ``final``). An
    exception in ``write`` removes the temporary directory and leaves everything else as it was.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp, old, redirected = _hidden(final, "tmp"), None, False
    _IN_PROGRESS.add(tmp)
    try:
        try:
            tmp.mkdir()
            write(tmp)
            _fsync_tree(tmp)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pointer = parent / LATEST
        if not final.exists():
            os.rename(tmp, final)
        elif _exchange(tmp, final):
            old = tmp  # now holds the previous checkpoint; nothing names it
        else:
            redirected = _pointer_target(parent) == final.name
            if redirected:
                write_text_atomically(pointer, tmp.name + "\n")
            old = _hidden(final, "old")
            _IN_PROGRESS.add(old)
            os.rename(final, old)
            if redirected:
                write_text_atomically(pointer, old.name + "\n")
            os.rename(tmp, final)
        _fsync_dir(parent)
        if point_latest or redirected:
            write_text_atomically(pointer, final.name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        _IN_PROGRESS.discard(tmp)
        _IN_PROGRESS.discard(old)


def save_checkpoint(
    output_dir: Path,
    name: str,
    model: torch.nn.Module,
    state_dict: Dict[str, torch.Tensor],
    *,
    builder: Optional[Dict[str, Any]] = None,
    recipe_state: Optional[Dict[str, Any]] = None,
    extra: Optional[Callable[[Path], None]] = None,
    token_ids: Optional[Dict[str, Any]] = None,
    source_dir: Optional[Path] = None,
) -> Path:
    """Write checkpoint ``output_dir/name`` atomically and point ``LATEST`` at it (see the module docstring).

    Args:
        model: the model (for its shape, RoPE, norms and tying; ``state_dict`` is what is saved).
        state_dict: torchtune-format weights (``layers.0.attn.q_proj.weight`` ...).
        builder: the config of the model builder, stored in ``config.json``.
        recipe_state: training state for resuming, saved as ``recipe_state.pt``.
        extra: called with the temporary directory to add more files.
        token_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the tokenizer the run used
            (:func:`tokenizer_token_ids`); they win over ``source_dir``'s.
        source_dir: the checkpoint directory the weights came from (Hugging Face or gqa_tune): its
            ``generation_config.json`` is copied, its ``config.json``'s token ids fill those ``token_ids``
            does not give, and its architecture is kept (a Qwen2 source saves a Qwen2 config; see
            :func:`hf_config`).

    Raises:
        ValueError: a model no supported ``config.json`` describes (see :func:`hf_config`).
    """
    source = _source_config(source_dir)
    ids = {key: source.get(key) for key in TOKEN_ID_KEYS}
    ids.update({key: value for key, value in (token_ids or {}).items() if key in TOKEN_ID_KEYS and value is not None})
    config = hf_config(model, builder, ids, source=source)
    hf_sd = tune_to_hf_weights({k: v.detach().cpu() for k, v in state_dict.items()}, config)
    hf_sd = {k: v.contiguous() for k, v in hf_sd.items()}
    generation = Path(source_dir) / GENERATION_CONFIG if source_dir is not None else None

    def write(tmp: Path) -> None:
        save_file(hf_sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if generation is not None and generation.is_file():
            shutil.copyfile(generation, tmp / GENERATION_CONFIG)
        if recipe_state is not None:
            torch.save(recipe_state, tmp / STATE)
        if extra is not None:
            extra(tmp)

    output_dir = Path(output_dir)
    final = output_dir / name
    cleanup_stale(output_dir)
    _write_atomically(final, write, point_latest=True)
    cleanup_stale(output_dir)
    return final


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The checkpoint ``LATEST`` names in ``output_dir``.

    If ``LATEST`` is missing or names no complete checkpoint, the newest complete one in ``output_dir`` (by
    the time its weights were written) is returned instead, with a warning; ``None`` if there is none.
    """
    output_dir = Path(output_dir)
    named = _pointer_target(output_dir)
    if named and _is_complete(output_dir / named):
        return output_dir / named
    children = output_dir.iterdir() if output_dir.is_dir() else ()
    candidates = [p for p in children if not p.name.startswith(".") and _is_complete(p)]
    newest = max(candidates, key=lambda p: (p / WEIGHTS).stat().st_mtime_ns, default=None)
    if named is None:
        if newest is None:
            return None
        # A save killed after its directory was in place but before LATEST was first written.
        warnings.warn(
            f"{str(output_dir)!r} has no {LATEST} file; using its newest complete checkpoint, {str(newest)!r}",
            stacklevel=2,
        )
        return newest
    warnings.warn(
        f"{str(output_dir / LATEST)!r} names {named!r}, which is not a complete checkpoint; "
        + (f"using the newest complete one, {str(newest)!r}" if newest else "and there is no other checkpoint"),
        stacklevel=2,
    )
    return newest


#: The names the fine-tuning loop gives its checkpoints (:func:`prune_checkpoints` removes only these).
_LOOP_CHECKPOINT = re.compile(r"^(?:epoch|step)_\d+$")


def prune_checkpoints(output_dir: Path, keep: int) -> List[Path]:
    """Remove all but the ``keep`` newest complete ``epoch_N`` / ``step_N`` checkpoints of ``output_dir``.

    Never the one ``LATEST`` names (it counts as one of the ``keep``), and nothing at all unless ``LATEST``
    names a complete checkpoint, so a loadable checkpoint always stays. Newest is by the time its
    ``config.json`` was written. Each one removed is first renamed, in one step, to a hidden
    ``.<name>.old-<pid>-*`` that nothing names, then deleted; a prune killed midway leaves only that, for
    :func:`cleanup_stale`.

    Returns:
        The removed checkpoints' paths.

    Raises:
        ValueError: ``keep`` is not an int >= 1 (named as ``keep_last_n_checkpoints``).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep_last_n_checkpoints: expected an int >= 1 or null (keep all), got {keep!r}")
    output_dir = Path(output_dir)
    named = _pointer_target(output_dir)
    if not named or not _is_complete(output_dir / named):
        return []
    others = [
        path
        for path in output_dir.iterdir()
        if path.name != named and _LOOP_CHECKPOINT.match(path.name) and not path.is_symlink() and _is_complete(path)
    ]
    others.sort(key=lambda path: ((path / CONFIG).stat().st_mtime_ns, path.name), reverse=True)
    removed = []
    for path in others[keep - 1 :]:
        hidden = _hidden(path, "old")
        _IN_PROGRESS.add(hidden)
        try:
            os.rename(path, hidden)
            _fsync_dir(output_dir)
            shutil.rmtree(hidden, ignore_errors=True)
        finally:
            _IN_PROGRESS.discard(hidden)
        removed.append(path)
    return removed


def _torchtune_epochs(path: Path) -> List[Path]:
    """``epoch_N`` subdirectories holding a ``config.json`` and weights (what torchtune's checkpointers write
    into their ``output_dir``), by ``N``."""
    found = []
    for child in path.iterdir() if path.is_dir() else ():
        match = re.fullmatch(r"epoch_(\d+)", child.name)
        if match and child.is_dir() and (child / CONFIG).is_file():
            try:
                weight_files(child)
            except ValueError:
                continue
            found.append((int(match.group(1)), child))
    return [child for _, child in sorted(found)]


def resolve_checkpoint_dir(value: str, key: str, hint: str) -> Path:
    """A checkpoint directory, the one an ``output_dir``'s ``LATEST`` names (see :func:`latest_checkpoint`), or,
    for a torchtune checkpointer's ``output_dir`` (``epoch_N/`` subdirectories, no weights of its own), the
    highest ``epoch_N``.

    Raises:
        ValueError: naming ``key`` and the path, plus ``hint`` (how to make one), if it does not exist or
            its ``LATEST`` leads to no complete checkpoint.
    """
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"{key} {str(path)!r} does not exist (relative paths are taken from {Path.cwd()}); {hint}")
    if not (path / LATEST).is_file():
        if not (path / CONFIG).is_file():
            epochs = _torchtune_epochs(path)
            if epochs:
                return epochs[-1]
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{key} {str(path)!r}: its LATEST names no complete checkpoint and it holds none; {hint}")
    return latest


def check_fits(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Refuse, before anything is copied, weights whose shapes differ from ``model``'s or which are not
    floating-point where the model's are (``load_state_dict`` would raise deep inside, or cast silently).

    Raises:
        ConfigError: naming ``source``, the weights and both shapes (or the dtype).
    """
    from gqa_tune.config_check import ConfigError

    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    wrong = [
        f"{key} {tuple(value.shape)} where the model has {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if wrong:
        raise ConfigError(
            f"weights from {source} do not fit the model built from its config: {'; '.join(wrong[:3])}",
            what="the weights to load",
        )
    integer = [
        f"{key} ({value.dtype})"
        for key, value in state_dict.items()
        if key in own and own[key].is_floating_point() and not value.is_floating_point()
    ]
    if integer:
        raise ConfigError(
            f"weights from {source} hold integer values where the model has floating-point weights: "
            f"{', '.join(integer[:3])}; quantized or integer checkpoints are not loaded (they would be cast)",
            what="the weights to load",
        )


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


def load_checkpoint(
    path: Path, where: Optional[str] = None
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Optional[Dict[str, Any]]]:
    """Read a checkpoint directory: one :func:`save_checkpoint` wrote, or any Hugging Face model directory of a
    :data:`HF_ARCHITECTURES` architecture (``config.json`` with one ``model.safetensors``, shards with or
    without an index, or ``pytorch_model.bin``), e.g. a torchtune ``FullModelHFCheckpointer``'s output.

    Returns:
        (torchtune-format state dict, config.json contents, recipe state or ``None``).

    ``where`` names the checkpoint in messages (default ``checkpoint '<path>'``; e.g. the config key).

    Raises:
        ValueError: a missing directory or file, a file that cannot be read, an unsupported ``model_type``,
            integer weights, or a ``config.json`` whose head counts or vocabulary disagree with the weights
            (checked before any tensor is reshaped).
    """
    path = Path(path)
    where = where or f"checkpoint {str(path)!r}"
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist")
    if not (path / CONFIG).is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no {CONFIG}")
    try:
        config = json.loads((path / CONFIG).read_text())
    except Exception as err:  # corrupt JSON
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {CONFIG}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {CONFIG} is not a JSON object")
    _model_type(config, where)
    hf_sd = read_weights(path)
    _check_tensors(where, config, hf_sd)
    _head_counts(path, config, hf_sd)
    tune_sd = hf_to_tune_weights(hf_sd, config, where)
    return tune_sd, config, read_recipe_state(path)


def read_recipe_state(path: Path) -> Optional[Dict[str, Any]]:
    """A checkpoint's ``recipe_state.pt``, or ``None`` without one.

    Raises:
        ValueError: a file that cannot be read.
    """
    path = Path(path)
    if not (path / STATE).is_file():
        return None
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read {str(path / STATE)!r}: {err}") from err
