"""gqa_tune: grouped-query attention for torchtune users."""

from gqa_tune import _quiet  # noqa: F401  (first: it quiets torchao's import notice)
from gqa_tune.generation import GenerationStats, generate
from gqa_tune.hf import attention as _transformers_door
from gqa_tune.hf import gguf as _gguf
from gqa_tune.modules import KVCache, MultiHeadAttention
from gqa_tune.modules.swap import swap_attention
from gqa_tune.ops import attention_ref, flash_decode_gqa, scaled_dot_product_gqa
from gqa_tune.training.weights import from_pretrained

__version__ = "0.1.0"

_transformers_door.install()  # attn_implementation="gqa_tune" in transformers, once it is imported
_gguf.register_resolver()  # ${gqa_tune.smollm2:} in configs

__all__ = [
    "GenerationStats",
    "KVCache",
    "MultiHeadAttention",
    "attention_ref",
    "flash_decode_gqa",
    "from_pretrained",
    "generate",
    "scaled_dot_product_gqa",
    "swap_attention",
    "__version__",
]
