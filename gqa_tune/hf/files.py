"""Weight files of a Hugging Face model directory: which files hold the weights, reading and writing them.

Read: one ``model.safetensors``, safetensors shards with or without an index, or ``pytorch_model.bin``
(sharded too). Written: one ``model.safetensors``.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


#: Index files of sharded weights, and the single files, that :func:`weight_files` looks for, in order.
SAFETENSORS_INDEX = "model.safetensors.index.json"

TORCH_WEIGHTS, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

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


def write_weights(directory: Path, weights: Dict[str, torch.Tensor]) -> Path:
    """Write ``weights`` (Hugging Face names) to ``directory / model.safetensors``; returns the file's path."""
    path = Path(directory) / WEIGHTS
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(path), metadata={"format": "pt"})
    return path
