"""Checkpoint and module conversion."""

from gqa_tune.convert.swap import from_torchtune_attention, swap_attention

__all__ = ["from_torchtune_attention", "swap_attention"]
