"""MHA -> GQA conversion of a Hugging Face Llama-family checkpoint directory.

Pooling works on the Hugging Face layout directly: torchtune's ``hf_to_tune`` /
``tune_to_hf`` only permute the q/k rows *within* each head (half-split vs
interleaved RoPE), so pooling whole heads commutes with that permutation and
the result equals converting to torchtune's format, pooling and converting back.

The source directory holds ``config.json`` and either ``model.safetensors``, or
shards named by ``model.safetensors.index.json`` (any ``*.safetensors.index.json``),
or, without an index, every ``*.safetensors`` file. The destination keeps the
shard layout (same file names; the index is rewritten with the new total size),
gets ``config.json`` with ``num_key_value_heads`` (and ``gqa_tune.model.num_kv_heads``
when present) rewritten, and copies of the other top-level files that are not
weights (tokenizer, ``generation_config.json`` ...). Optimizer state (``recipe_state.pt``),
other weight formats and subdirectories (e.g. LoRA ``adapter/``) are not copied:
their k/v shapes would no longer fit. Shards are converted one at a time.

The destination is written with gqa_tune's atomic checkpoint protocol
(:mod:`gqa_tune.training.checkpoint`): ``dst_dir`` is at every instant absent, the old directory or
the complete new one, and leftovers of killed conversions into it are removed first.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gqa_tune import _checks as checks
from gqa_tune.convert.pooling import check_conversion, convert_state_dict
from gqa_tune.hf import CONFIG, hf_shape, read_config, weight_files
from gqa_tune.training.checkpoint import cleanup_stale, write_atomically

#: Top-level files not copied to the converted directory (weights, optimizer state, run pointers).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_SKIP_NAMES = (CONFIG, "LATEST")
_KV = (".self_attn.k_proj.", ".self_attn.v_proj.")


def _check_weights(src: Path, files: List[str], config: Dict[str, Any], rows: int) -> None:
    """Check, from the headers alone, that every layer's k/v weights exist once with ``rows`` rows."""
    seen: Dict[str, str] = {}
    for name in files:
        try:
            with safe_open(str(src / name), framework="pt") as f:
                shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        except Exception as err:  # a corrupt or truncated file
            raise ValueError(f"cannot read {str(src / name)!r}: {err}") from err
        for key, shape in shapes.items():
            if key in seen:
                raise ValueError(f"{key!r} is in both {seen[key]!r} and {name!r} in {str(src)!r}")
            seen[key] = name
            marker = next((m for m in _KV if m in key), None)
            if marker is None:
                continue
            if key.rsplit(marker, 1)[1] not in ("weight", "bias"):
                raise ValueError(
                    f"cannot pool {key!r} in {str(src / name)!r}: only plain key/value projection weights and "
                    "biases can be pooled (merge LoRA adapters or dequantize first)"
                )
            if not shape or shape[0] != rows:
                raise ValueError(
                    f"{key!r} in {str(src / name)!r} has shape {tuple(shape)}; expected {rows} rows "
                    "(num_key_value_heads x head_dim from config.json)"
                )
    layers = config.get("num_hidden_layers")
    expected = range(layers) if isinstance(layers, int) else range(0)
    missing = [
        key
        for i in expected
        for key in (f"model.layers.{i}.self_attn.k_proj.weight", f"model.layers.{i}.self_attn.v_proj.weight")
        if key not in seen
    ]
    if missing:
        shown = ", ".join(missing[:4]) + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else "")
        raise ValueError(f"checkpoint {str(src)!r} lacks key/value projection weights: {shown}")
    if not any(any(m in key for m in _KV) for key in seen):
        raise ValueError(f"checkpoint {str(src)!r} has no key/value projection weights ('*.self_attn.k_proj.weight')")


class DestinationExists(ValueError):
    """``dst_dir`` exists and is not empty, and replacing it was not asked for (``overwrite``)."""


def convert_hf_checkpoint(
    src_dir,
    dst_dir,
    num_kv_heads: int,
    method: str = "mean",
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> Path:
    """Pool the key/value heads of a Hugging Face Llama-family checkpoint into ``num_kv_heads`` groups.

    Args:
        src_dir: directory with ``config.json`` (``num_attention_heads``, ``hidden_size``,
            optional ``num_key_value_heads`` (default: ``num_attention_heads``) and ``head_dim``)
            and safetensors weights (one file or shards, with or without an index).
        dst_dir: where to write the converted checkpoint (atomically: a complete
            directory or none).
        num_kv_heads: the target; must divide the current number of kv heads.
        method: ``"mean"`` (the GQA paper), ``"first"`` or ``"random"``.
        seed: for ``"random"`` (one stream over all shards, in file and key order).
        overwrite: replace an existing non-empty ``dst_dir``.

    Returns:
        ``Path(dst_dir)``.

    Raises:
        ValueError: a missing directory, config or weight file, config entries or
            k/v weights missing or of the wrong shape, a target that does not divide
            the current kv heads or exceeds them, an unknown method, ``dst_dir`` equal
            to ``src_dir``, or an existing non-empty ``dst_dir`` without ``overwrite``
            (:class:`DestinationExists`). Nothing is written then.
    """
    for name, value in (("src_dir", src_dir), ("dst_dir", dst_dir)):
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ValueError(f"{name} must be a directory path, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    checks.flag("overwrite", overwrite)
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise ValueError(f"checkpoint directory {str(src)!r} does not exist")
    config = read_config(src)
    shape = hf_shape(config, f"checkpoint {str(src)!r}: {CONFIG}")
    current, head_dim = shape["num_kv_heads"], shape["head_dim"]
    check_conversion(current, num_kv_heads, method)
    if dst.resolve() == src.resolve():
        raise ValueError(f"dst_dir {str(dst)!r} is the source checkpoint; write the conversion elsewhere")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"dst_dir {str(dst)!r} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DestinationExists(f"dst_dir {str(dst)!r} exists and is not empty; pass overwrite=True to replace it")
    files, index = weight_files(src)
    if not all(name.endswith(".safetensors") for name in files):
        raise ValueError(f"checkpoint {str(src)!r} holds {', '.join(files)}: pooling reads safetensors weights only")
    _check_weights(src, files, config, current * head_dim)

    new_config = dict(config)
    new_config["num_key_value_heads"] = num_kv_heads
    ours = config.get("gqa_tune")
    if isinstance(ours, dict) and isinstance(ours.get("model"), dict) and "num_kv_heads" in ours["model"]:
        new_config["gqa_tune"] = {**ours, "model": {**ours["model"], "num_kv_heads": num_kv_heads}}
    generator = torch.Generator().manual_seed(seed)

    def write(tmp: Path) -> None:
        total_bytes = 0
        for name in files:
            with safe_open(str(src / name), framework="pt") as f:
                metadata = f.metadata()
                shard = {key: f.get_tensor(key) for key in f.keys()}
            kv = {key: value for key, value in shard.items() if any(m in key for m in _KV)}
            if kv:
                pooled = convert_state_dict(
                    kv, num_kv_heads=current, new_num_kv_heads=num_kv_heads, head_dim=head_dim,
                    method=method, fmt="hf", generator=generator,
                )  # fmt: skip
                shard.update(pooled)
            shard = {key: value.contiguous() for key, value in shard.items()}
            total_bytes += sum(v.numel() * v.element_size() for v in shard.values())
            save_file(shard, str(tmp / name), metadata=metadata or {"format": "pt"})
            del shard, kv
        if index is not None:
            index_data = json.loads((src / index).read_text())
            index_data.setdefault("metadata", {})
            index_data["metadata"] = {**(index_data["metadata"] or {}), "total_size": total_bytes}
            (tmp / index).write_text(json.dumps(index_data, indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(new_config, indent=2) + "\n")
        for path in sorted(src.iterdir()):
            if path.is_file() and path.name not in _SKIP_NAMES and not path.name.endswith(_SKIP_SUFFIXES):
                shutil.copy2(path, tmp / path.name)

    cleanup_stale(dst.parent, name=dst.name)
    write_atomically(dst, write)
    return dst
