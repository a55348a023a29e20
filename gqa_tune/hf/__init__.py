"""The Hugging Face format, in one room, both ways.

- :mod:`gqa_tune.hf.config`: ``config.json``, its one reader, and config <-> gqa_tune builder;
- :mod:`gqa_tune.hf.names`: weight names and layouts, Hugging Face <-> gqa_tune (torchtune's names);
- :mod:`gqa_tune.hf.files`: the weight files of a model directory (safetensors, shards, ``.bin``), read
  and written;
- :mod:`gqa_tune.hf.model_dir`: a model directory read whole, weights checked against its config.

Where checkpoints go on disk and how they are written safely is :mod:`gqa_tune.training.checkpoint`'s.
"""

from gqa_tune.hf.config import (
    CONFIG,
    GENERATION_CONFIG,
    HF_ARCHITECTURES,
    TIED_BY_DEFAULT,
    TOKEN_ID_KEYS,
    builder_from_hf_config,
    hf_config,
    hf_shape,
    model_shape,
    read_config,
    read_hf_config,
    rope_config,
    tokenizer_token_ids,
)
from gqa_tune.hf.files import WEIGHTS, read_weights, weight_files, write_weights
from gqa_tune.hf.model_dir import load_model_dir
from gqa_tune.hf.names import hf_to_tune_weights, tune_to_hf_weights

__all__ = [
    "CONFIG",
    "GENERATION_CONFIG",
    "HF_ARCHITECTURES",
    "TIED_BY_DEFAULT",
    "TOKEN_ID_KEYS",
    "WEIGHTS",
    "builder_from_hf_config",
    "hf_config",
    "hf_shape",
    "hf_to_tune_weights",
    "load_model_dir",
    "model_shape",
    "read_config",
    "read_hf_config",
    "read_weights",
    "rope_config",
    "tokenizer_token_ids",
    "tune_to_hf_weights",
    "weight_files",
    "write_weights",
]
