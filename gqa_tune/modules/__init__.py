"""torchtune-compatible attention parts."""

from gqa_tune.modules.attention import MultiHeadAttention, setup_caches
from gqa_tune.modules.kv_cache import KVCache

__all__ = ["KVCache", "MultiHeadAttention", "setup_caches"]
