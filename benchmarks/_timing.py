"""Helpers shared by ``bench_decode.py`` and ``bench_train.py`` (not a public API).

Timing: ``time.perf_counter`` around each call, warmup calls first, the cases
interleaved (A, B, A, B, ...) so slow drifts on a shared machine hit both
alike, and the median reported.
"""

import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchtune.modules import MultiHeadAttention as TorchtuneMHA
from torchtune.modules import RotaryPositionalEmbeddings

from gqa_tune.convert.swap import from_torchtune_attention
from gqa_tune.modules.attention import MultiHeadAttention

#: The shape both benchmarks use (Llama-3.2-1B-like attention), float32 on CPU.
EMBED_DIM, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, MAX_SEQ_LEN = 2048, 32, 8, 64, 4096
DTYPE = torch.float32

Case = Tuple[Callable[[], object], Optional[Callable[[], None]]]  # (timed call, untimed cleanup after it)


def build_pair(
    *,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_seq_len: int,
    backend: str = "auto",
    seed: int = 0,
) -> Tuple[TorchtuneMHA, MultiHeadAttention]:
    """A torchtune attention (bias-free projections, RoPE) and ours sharing its weights and RoPE."""
    torch.manual_seed(seed)
    tt = TorchtuneMHA(
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
        k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
        v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
        output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
        pos_embeddings=RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len),
        max_seq_len=max_seq_len,
    )
    ours = from_torchtune_attention(tt, backend=backend)
    return tt, ours


def time_interleaved(
    cases: Dict[str, Case], repeats: int, warmup: int, order: str = "interleaved"
) -> Dict[str, List[float]]:
    """Seconds per call for each case, ``warmup`` untimed calls first.

    ``order="interleaved"``: the cases take turns (A, B, A, B, ...), so slow
    drifts on a shared machine hit both alike, and each call finds the CPU
    caches as the other case left them. ``order="blocked"``: all of A's calls,
    then all of B's, so each case runs in its own steady state.
    """
    if order not in ("interleaved", "blocked"):
        raise ValueError(f"order must be 'interleaved' or 'blocked', got {order!r}")
    times: Dict[str, List[float]] = {name: [] for name in cases}

    def run(name: str, round_idx: int) -> None:
        fn, cleanup = cases[name]
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if cleanup is not None:
            cleanup()
        if round_idx >= warmup:
            times[name].append(elapsed)

    if order == "interleaved":
        for round_idx in range(warmup + repeats):
            for name in cases:
                run(name, round_idx)
    else:
        for name in cases:
            for round_idx in range(warmup + repeats):
                run(name, round_idx)
    return times


def median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e3


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 10, warmup: int = 2) -> List[float]:
    """``dst.copy_(src)`` bandwidths in bytes/s, one per copy, counting read + write (``2 * nbytes``)."""
    src = torch.rand(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = time_interleaved({"copy": (lambda: dst.copy_(src), None)}, repeats, warmup)["copy"]
    return [2 * src.numel() * src.element_size() / t for t in times]


def saved_activation_bytes(fn: Callable[[], object], module: nn.Module) -> Tuple[int, int, object]:
    """Run ``fn`` and sum the bytes of the distinct storages autograd saves for backward.

    Storages are deduplicated by ``untyped_storage().data_ptr()`` and counted
    whole (a saved view keeps its whole storage alive). Storages of
    ``module``'s parameters (also when saved as views, e.g. ``weight.t()``)
    and buffers (e.g. the RoPE table) are left out: they are not activations.

    Returns:
        (bytes, number of distinct storages, whatever ``fn`` returned).
    """
    skip = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), len(seen), result


def command_line() -> str:
    """The exact command that started this process."""
    return shlex.join([sys.executable, *sys.argv])


def environment() -> Dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "loadavg_1min": os.getloadavg()[0],
        "command": command_line(),
    }


def print_environment(env: Dict[str, object]) -> None:
    print(
        f"torch {env['torch']}, threads {env['threads']} (cpu_count {env['cpu_count']}), python {env['python']}, "
        f"1-min load average at start {env['loadavg_1min']:.2f}"
    )
    print(f"command: {env['command']}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Optional[str], data: Dict[str, object]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {path}")
