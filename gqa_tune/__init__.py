"""gqa_tune: grouped-query attention for torchtune users."""

from gqa_tune.convert.swap import swap_attention
from gqa_tune.generation import GenerationStats, generate
from gqa_tune.modules import KVCache, MultiHeadAttention
from gqa_tune.ops import attention_ref, flash_decode_gqa, scaled_dot_product_gqa

__version__ = "0.1.0"

__all__ = [
    "GenerationStats",
    "KVCache",
    "MultiHeadAttention",
    "attention_ref",
    "flash_decode_gqa",
    "generate",
    "scaled_dot_product_gqa",
    "swap_attention",
    "__version__",
]
