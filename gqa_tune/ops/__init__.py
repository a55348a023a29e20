"""Functional attention op, backend dispatch and backends."""

from gqa_tune.ops.backends.math import attention_ref
from gqa_tune.ops.decode import flash_decode_gqa
from gqa_tune.ops.dispatch import BACKEND_NAMES, BACKENDS, AttentionSpec, plan_attention, select_backend
from gqa_tune.ops.functional import scaled_dot_product_gqa

__all__ = [
    "BACKENDS", "BACKEND_NAMES", "AttentionSpec", "attention_ref", "flash_decode_gqa", "plan_attention",
    "scaled_dot_product_gqa", "select_backend",
]  # fmt: skip
