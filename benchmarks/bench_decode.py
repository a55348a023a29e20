"""One KV-cached decode step of the attention module: torchtune vs gqa_tune, on CPU.

Both modules share the same weights and RoPE (``from_torchtune_attention``) and
get torchtune's decoding call ``attn(x, x, mask=mask, input_pos=pos)``: ``x``
``[1, 1, E]``, a bool mask ``[1, 1, max_seq_len]`` True for positions ``<= fill``,
``input_pos = [[fill]]``. Both caches hold the same random K/V in positions
``0..fill-1``; each timed step writes position ``fill`` and is rewound
afterwards (untimed), so every repetition sees the same fill.

bound_ms = (bytes of the four projection weights + bytes of the filled K/V)
/ copy bandwidth, the best of 20 copies of a 256 MiB tensor (read + write
bytes) taken before and after the decode runs.

Usage: python benchmarks/bench_decode.py [--fills 128 1024 4000] [--repeats 50] [--threads N]
       [--order interleaved|blocked] [--json PATH]
"""

import argparse
import statistics

import torch
from _timing import (
    DTYPE,
    EMBED_DIM,
    HEAD_DIM,
    MAX_SEQ_LEN,
    NUM_HEADS,
    NUM_KV_HEADS,
    build_pair,
    copy_bandwidth,
    environment,
    markdown_table,
    median_ms,
    print_environment,
    time_interleaved,
    write_json,
)
from torch import nn

from gqa_tune.modules.kv_cache import KVCache as GQAKVCache


def set_fill(cache: nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
    """Make ``cache`` (torchtune's or ours) hold ``k``/``v`` ``[1, n_kv, fill, h_d]`` in positions ``0..fill-1``."""
    fill = k.shape[2]
    cache.reset()
    if isinstance(cache, GQAKVCache):
        if fill:
            cache.update(k, v)
        return
    cache.k_cache[:, :, :fill].copy_(k)
    cache.v_cache[:, :, :fill].copy_(v)
    cache.cache_pos.add_(fill)  # cache_pos = arange(max_seq_len) + fill


def rewind(cache: nn.Module, steps: int = 1) -> None:
    """Undo the position advance of the last ``steps`` written tokens.

    The written K/V stay in the buffer past the fill, where the next step
    overwrites them (with the same values here: same ``x``, same position).
    """
    if isinstance(cache, GQAKVCache):
        cache.truncate(cache.size - steps)
    else:
        cache.cache_pos.sub_(steps)


def fill_of(cache: nn.Module) -> int:
    return int(cache.cache_pos[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fills", type=int, nargs="+", default=[128, 1024, 4000], help="cache fill levels")
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per module and fill")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per module and fill first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--backend", default="auto", help="gqa_tune attention backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--order",
        choices=["interleaved", "blocked"],
        default="interleaved",
        help="interleaved: the two modules take turns (each step finds caches as the other left them); "
        "blocked: all torchtune steps, then all gqa_tune steps (each in its own steady state)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args()
    if any(not 0 <= f < MAX_SEQ_LEN for f in args.fills):
        parser.error(f"fills must be in [0, {MAX_SEQ_LEN - 1}] (one free position for the step)")

    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)

    tt, ours = build_pair(
        embed_dim=EMBED_DIM,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_seq_len=MAX_SEQ_LEN,
        backend=args.backend,
        seed=args.seed,
    )
    for attn in (tt, ours):
        attn.setup_cache(batch_size=1, dtype=DTYPE, max_seq_len=MAX_SEQ_LEN)
        attn.eval()
    weight_bytes = sum(
        p.numel() * p.element_size()
        for proj in (tt.q_proj, tt.k_proj, tt.v_proj, tt.output_proj)
        for p in proj.parameters()
    )

    bandwidths = copy_bandwidth()  # again after the decode runs; the bound uses the best copy of all
    print(f"projection weights: {weight_bytes / 2**20:.1f} MiB")

    x = torch.randn(1, 1, EMBED_DIM, dtype=DTYPE)
    positions = torch.arange(MAX_SEQ_LEN)
    results = []
    with torch.no_grad():
        for fill in args.fills:
            kv_shape = (1, NUM_KV_HEADS, fill, HEAD_DIM)
            k, v = torch.randn(kv_shape, dtype=DTYPE), torch.randn(kv_shape, dtype=DTYPE)
            for attn in (tt, ours):
                set_fill(attn.kv_cache, k, v)
            mask = (positions <= fill).view(1, 1, MAX_SEQ_LEN)
            input_pos = torch.tensor([[fill]])

            def step(attn, mask=mask, input_pos=input_pos):
                return attn(x, x, mask=mask, input_pos=input_pos)

            out_tt = step(tt)
            out_ours = step(ours)
            max_diff = (out_tt - out_ours).abs().max().item()
            torch.testing.assert_close(out_ours, out_tt, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.kv_cache.k_cache[:, :, : fill + 1], tt.kv_cache.k_cache[:, :, : fill + 1])
            for attn in (tt, ours):
                rewind(attn.kv_cache)

            times = time_interleaved(
                {
                    "torchtune": (lambda: step(tt), lambda: rewind(tt.kv_cache)),
                    "gqa_tune": (lambda: step(ours), lambda: rewind(ours.kv_cache)),
                },
                repeats=args.repeats,
                warmup=args.warmup,
                order=args.order,
            )
            assert fill_of(tt.kv_cache) == fill_of(ours.kv_cache) == ours.kv_cache.size == fill
            for attn, ref in ((tt, out_tt), (ours, out_ours)):  # the repetitions left the cache as it was
                torch.testing.assert_close(step(attn), ref, rtol=0, atol=0)
                rewind(attn.kv_cache)

            tt_ms, ours_ms = median_ms(times["torchtune"]), median_ms(times["gqa_tune"])
            results.append(
                {
                    "fill": fill,
                    "torchtune_ms": tt_ms,
                    "gqa_tune_ms": ours_ms,
                    "speedup": tt_ms / ours_ms,
                    "kv_bytes": 2 * k.numel() * k.element_size(),  # K and V, all kv heads, positions 0..fill-1
                    "max_abs_diff": max_diff,
                    "torchtune_times_ms": [t * 1e3 for t in times["torchtune"]],
                    "gqa_tune_times_ms": [t * 1e3 for t in times["gqa_tune"]],
                }
            )
            print(
                f"fill {fill:5d}: torchtune {tt_ms:8.3f} ms  gqa_tune {ours_ms:8.3f} ms  "
                f"speedup {tt_ms / ours_ms:5.2f}x  (max |diff| {max_diff:.1e})"
            )

    bandwidths += copy_bandwidth()
    bandwidth = max(bandwidths)
    print(
        f"copy bandwidth (read+write, 256 MiB tensor, {len(bandwidths)} copies): best {bandwidth / 1e9:.2f} GB/s, "
        f"median {statistics.median(bandwidths) / 1e9:.2f} GB/s"
    )
    for r in results:
        r["bound_ms"] = (weight_bytes + r["kv_bytes"]) / bandwidth * 1e3
        r["ours_over_bound"] = r["gqa_tune_ms"] / r["bound_ms"]
        print(f"fill {r['fill']:5d}: bound_ms {r['bound_ms']:.3f}  ours/bound {r['ours_over_bound']:.2f}")

    print()
    print(
        f"Decode step, CPU float32, E={EMBED_DIM}, {NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, "
        f"max_seq_len {MAX_SEQ_LEN}, batch 1, {args.threads} threads, median of {args.repeats}, {args.order}, "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print()
    print(
        markdown_table(
            ["fill", "torchtune ms", "gqa_tune ms", "speedup", "bound_ms", "ours/bound"],
            [
                [
                    r["fill"],
                    f"{r['torchtune_ms']:.3f}",
                    f"{r['gqa_tune_ms']:.3f}",
                    f"{r['speedup']:.2f}x",
                    f"{r['bound_ms']:.3f}",
                    f"{r['ours_over_bound']:.2f}",
                ]
                for r in results
            ],
        )
    )
    write_json(
        args.json,
        {
            "benchmark": "decode",
            "env": env,
            "config": {
                "embed_dim": EMBED_DIM,
                "num_heads": NUM_HEADS,
                "num_kv_heads": NUM_KV_HEADS,
                "head_dim": HEAD_DIM,
                "max_seq_len": MAX_SEQ_LEN,
                "batch": 1,
                "dtype": str(DTYPE),
                "backend": args.backend,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "seed": args.seed,
                "order": args.order,
            },
            "copy_bandwidth_bytes_per_s": bandwidth,
            "copy_bandwidth_samples": bandwidths,
            "weight_bytes": weight_bytes,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
