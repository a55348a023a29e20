"""``swap_attention`` under its earlier import path: it lives in :mod:`gqa_tune.modules.swap` (the builders use it,
and imports only go down)."""

from gqa_tune.modules.swap import SwapReport, from_torchtune_attention, swap_attention

__all__ = ["SwapReport", "from_torchtune_attention", "swap_attention"]
