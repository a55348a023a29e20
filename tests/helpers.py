"""Helpers shared by the test files (importable as ``helpers``: pytest puts ``tests/`` on the path).

One copy of what the tests used to repeat: q/k/v factories, causal ``mask_mod``s and torchtune-style
decoding masks, a greedy loop without a cache, and the repository root.
"""

from pathlib import Path

import torch

#: The repository root.
REPO = Path(__file__).resolve().parents[1]


def make_qkv(b, n_h, n_kv, s_q, s_kv, h_d, h_dv=None, dtype=torch.float32, requires_grad=False):
    """Random ``q [b, n_h, s_q, h_d]``, ``k [b, n_kv, s_kv, h_d]``, ``v [b, n_kv, s_kv, h_dv]``."""
    h_dv = h_d if h_dv is None else h_dv
    q = torch.randn(b, n_h, s_q, h_d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, n_kv, s_kv, h_d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, n_kv, s_kv, h_dv, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def causal_mod(b, h, q_idx, kv_idx):
    """flex ``mask_mod``: top-left causal."""
    return q_idx >= kv_idx


def decoding_mask(s: int, length: int, start: int = 0) -> torch.Tensor:
    """torchtune's decoding mask ``[1, s, length]``: the ``s`` tokens at positions ``start..`` see every
    position up to their own."""
    return torch.ones(s, length, dtype=torch.bool).tril(start)[None]


@torch.no_grad()
def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """``prompt`` ``[b, s]`` followed by ``steps`` greedy tokens, the whole sequence through ``model`` each step."""
    tokens = prompt
    for _ in range(steps):
        nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens
