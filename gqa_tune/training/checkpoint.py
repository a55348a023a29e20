"""Checkpoints: Hugging Face layout (``model.safetensors`` + ``config.json``), written atomically.

A checkpoint is a directory::

    <output_dir>/<name>/
        model.safetensors   weights in Hugging Face Llama layout (loadable by torchtune's
                            FullModelHFCheckpointer with model_type LLAMA3_2, and by gqa_tune)
        config.json         Hugging Face config, plus a "gqa_tune" entry with the model builder
        recipe_state.pt     optimizer, scheduler, counters and RNG states (for exact resume)
        adapter/...         LoRA runs: the adapter alone

It is written to a hidden temporary directory first and renamed into place;
``<output_dir>/LATEST`` (replaced atomically) names the newest complete one. A
run killed mid-write leaves the previous checkpoint and ``LATEST`` intact.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import hf_to_tune, tune_to_hf

WEIGHTS, CONFIG, STATE, LATEST = "model.safetensors", "config.json", "recipe_state.pt", "LATEST"


def model_shape(model: torch.nn.Module) -> Dict[str, int]:
    """Head counts and widths of a torchtune ``TransformerDecoder`` (ours or torchtune's)."""
    attn = model.layers[0].attn
    return {
        "num_heads": attn.num_heads,
        "num_kv_heads": attn.num_kv_heads,
        "dim": attn.embed_dim,
        "head_dim": attn.head_dim,
    }


def hf_config(model: torch.nn.Module, builder: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A Hugging Face Llama ``config.json`` describing ``model``."""
    shape = model_shape(model)
    mlp = model.layers[0].mlp
    rope = model.layers[0].attn.pos_embeddings
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.tok_embeddings.num_embeddings,
        "hidden_size": shape["dim"],
        "intermediate_size": getattr(mlp.w1, "out_features", None) or mlp.w1.out_dim,  # nn.Linear or LoRALinear
        "num_hidden_layers": len(model.layers),
        "num_attention_heads": shape["num_heads"],
        "num_key_value_heads": shape["num_kv_heads"],
        "head_dim": shape["head_dim"],
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm.eps,
        "rope_theta": float(getattr(rope, "base", 10_000)),
        "tie_word_embeddings": not hasattr(model.output, "weight"),
        "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "gqa_tune": {"model": builder or {}},
    }


def _write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)``, then move ``tmp_dir`` to ``final`` (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: Path,
    name: str,
    model: torch.nn.Module,
    state_dict: Dict[str, torch.Tensor],
    *,
    builder: Optional[Dict[str, Any]] = None,
    recipe_state: Optional[Dict[str, Any]] = None,
    extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write checkpoint ``output_dir/name`` atomically and point ``LATEST`` at it.

    Args:
        model: the model (for its shape; ``state_dict`` is what is saved).
        state_dict: torchtune-format weights (``layers.0.attn.q_proj.weight`` ...).
        builder: the config of the model builder, stored in ``config.json``.
        recipe_state: training state for resuming, saved as ``recipe_state.pt``.
        extra: called with the temporary directory to add more files.
    """
    shape = model_shape(model)
    hf_sd = tune_to_hf(
        {k: v.detach().cpu() for k, v in state_dict.items()},
        num_heads=shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        dim=shape["dim"],
        head_dim=shape["head_dim"],
    )
    hf_sd = {k: v.contiguous() for k, v in hf_sd.items()}
    config = hf_config(model, builder)

    def write(tmp: Path) -> None:
        save_file(hf_sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if recipe_state is not None:
            torch.save(recipe_state, tmp / STATE)
        if extra is not None:
            extra(tmp)

    final = Path(output_dir) / name
    _write_atomically(final, write)
    write_text_atomically(Path(output_dir) / LATEST, name + "\n")
    return final


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The checkpoint ``LATEST`` names in ``output_dir``, or ``None``."""
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None
    return Path(output_dir) / pointer.read_text().strip()


def resolve_checkpoint_dir(value: str, key: str, hint: str) -> Path:
    """A checkpoint directory, or the one an ``output_dir``'s ``LATEST`` names.

    Raises:
        ValueError: naming ``key`` and the path, plus ``hint`` (how to make one), if it does not exist.
    """
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"{key} {str(path)!r} does not exist (relative paths are taken from {Path.cwd()}); {hint}")
    return latest_checkpoint(path) if (path / LATEST).is_file() else path


def stored_builder(config: Dict[str, Any], model_cfg: Optional[Any], path: Path) -> DictConfig:
    """The model builder for a checkpoint: ``model_cfg`` if it names a ``_component_``, else the builder
    recorded in ``config.json`` with ``model_cfg``'s arguments merged over it.

    Raises:
        ValueError: if neither says how to build the model.
    """
    if model_cfg is not None and "_component_" in model_cfg:
        return OmegaConf.create(model_cfg) if not isinstance(model_cfg, DictConfig) else model_cfg
    stored = config.get("gqa_tune", {}).get("model") or {}
    if not stored:
        raise ValueError(
            f"checkpoint {str(path)!r} does not say how to build its model (no gqa_tune.model in "
            "config.json): give `model:` with a _component_ in the config"
        )
    return OmegaConf.merge(OmegaConf.create(stored), model_cfg or {})


def load_checkpoint(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Optional[Dict[str, Any]]]:
    """Read a checkpoint directory written by :func:`save_checkpoint`.

    Returns:
        (torchtune-format state dict, config.json contents, recipe state or ``None``).

    Raises:
        ValueError: a missing directory or file, or a file that cannot be read.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist")
    for needed in (WEIGHTS, CONFIG):
        if not (path / needed).is_file():
            raise ValueError(f"checkpoint {str(path)!r} has no {needed}")
    try:
        config = json.loads((path / CONFIG).read_text())
        hf_sd = load_file(str(path / WEIGHTS))
    except Exception as err:  # corrupt JSON or safetensors
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    try:
        tune_sd = hf_to_tune(
            hf_sd,
            num_heads=config["num_attention_heads"],
            num_kv_heads=config["num_key_value_heads"],
            dim=config["hidden_size"],
            head_dim=config.get("head_dim"),
        )
    except KeyError as err:
        raise ValueError(f"checkpoint {str(path)!r}: config.json lacks {err}") from err
    state = None
    if (path / STATE).is_file():
        try:
            state = torch.load(path / STATE, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"cannot read {str(path / STATE)!r}: {err}") from err
    return tune_sd, config, state
