"""Checkpoint and module conversion: MHA -> GQA pooling, and swapping attention into torchtune models."""

from gqa_tune.convert.hf import convert_hf_checkpoint
from gqa_tune.convert.pooling import (
    METHODS,
    check_conversion,
    convert_attention_,
    convert_model_,
    convert_state_dict,
    pool_heads,
)
from gqa_tune.convert.swap import from_torchtune_attention, swap_attention
from gqa_tune.convert.t5 import convert_t5_to_gqa

__all__ = [
    "METHODS",
    "check_conversion",
    "convert_attention_",
    "convert_hf_checkpoint",
    "convert_model_",
    "convert_state_dict",
    "convert_t5_to_gqa",
    "from_torchtune_attention",
    "pool_heads",
    "swap_attention",
]
