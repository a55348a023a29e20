"""Decode time and KV-cache size vs number of kv heads, for one model shape (the paper's Fig. 6 / Table 1 trend).

    .venv/bin/python benchmarks/repro_speed.py                 # CPU, float32
    .venv/bin/python benchmarks/repro_speed.py --device cuda --dtype bf16 --batch 32   # the same on a GPU

Model: ``gqa_decoder`` with embed 512, 16 query heads (head_dim 32), 4 layers, MLP 1536, vocab 260, KV
caches of 4096 positions, batch 8; the same seed for every kv-head count (1, 2, 4, 8, 16; 16 = MHA).
Each layer's cache is filled with random K/V up to ``--context`` (2048) positions (no prefill: it
would dominate the run time on a CPU and is not what GQA speeds up), then ``--steps`` decode steps are
run one token per sequence at a time, as generation does (``model(tokens [b, 1], mask, input_pos)``,
the cache growing by one position each step), after ``--warmup`` untimed steps. The median step time
is reported as ms per decode step (the whole batch), ms per token per sequence (step / batch) and
tokens/s. KV bytes/token = 2 (K and V) x layers x kv heads x head_dim x bytes per element, for one
sequence; ``cache MiB`` is the allocated cache (batch x 4096 positions).

Writes ``docs/repro/speed.json`` and ``docs/repro/speed.png`` (two panels) and prints a markdown table.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gqa_tune.models import gqa_decoder
from gqa_tune.modules.kv_cache import KVCache as GQAKVCache
from gqa_tune.training.generation import kv_cache_bytes

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fill_caches(model: torch.nn.Module, fill: int, generator: torch.Generator) -> None:
    """Every layer's cache holds random K/V in positions ``0..fill-1``."""
    for layer in model.layers:
        cache = layer.attn.kv_cache
        cache.reset()
        b, h, _, d = cache.k_cache.shape
        k = torch.randn(b, h, fill, d, generator=generator).to(cache.k_cache)
        v = torch.randn(b, h, fill, d, generator=generator).to(cache.v_cache)
        if isinstance(cache, GQAKVCache):
            cache.update(k, v)
        else:
            cache.k_cache[:, :, :fill].copy_(k)
            cache.v_cache[:, :, :fill].copy_(v)
            cache.cache_pos.add_(fill)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args, num_kv_heads: int, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(args.seed)
    with device:
        model = gqa_decoder(
            vocab_size=260, num_layers=args.layers, num_heads=args.heads, num_kv_heads=num_kv_heads,
            embed_dim=args.embed_dim, intermediate_dim=3 * args.embed_dim, max_seq_len=args.cache_len,
            rope_base=10000, backend=args.backend,
        )  # fmt: skip
    model = model.to(device=device, dtype=dtype).eval()
    with device:
        model.setup_caches(batch_size=args.batch, dtype=dtype, decoder_max_seq_len=args.cache_len)
    generator = torch.Generator().manual_seed(args.seed)
    fill_caches(model, args.context, generator)
    positions = torch.arange(args.cache_len, device=device)
    tokens = torch.randint(3, 260, (args.batch, 1), device=device)
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            pos = args.context + i
            mask = (positions <= pos).view(1, 1, -1).expand(args.batch, 1, -1)
            input_pos = torch.full((args.batch, 1), pos, device=device)
            sync(device)
            start = time.perf_counter()
            logits = model(tokens, mask=mask, input_pos=input_pos)
            tokens = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    assert torch.isfinite(logits).all()
    head_dim = args.embed_dim // args.heads
    step_ms = statistics.median(times) * 1e3
    element = torch.empty((), dtype=dtype).element_size()
    result = {
        "num_kv_heads": num_kv_heads,
        "step_ms": step_ms,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "ms_per_token_per_sequence": step_ms / args.batch,
        "tokens_per_s": args.batch / (step_ms / 1e3),
        "kv_bytes_per_token": 2 * args.layers * num_kv_heads * head_dim * element,
        "kv_cache_bytes": kv_cache_bytes(model),
        "kv_bytes_read_per_step": 2 * args.layers * num_kv_heads * head_dim * element * args.batch * args.context,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    del model
    return result


def plot(results, args, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kv = [r["num_kv_heads"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.errorbar(
        kv, [r["ms_per_token_per_sequence"] for r in results],
        yerr=[[(r["step_ms"] - r["step_ms_min"]) / args.batch for r in results],
              [(r["step_ms_max"] - r["step_ms"]) / args.batch for r in results]],
        marker="o", capsize=3,
    )  # fmt: skip
    a.set_ylabel(f"decode ms per token per sequence (batch {args.batch})")
    a.set_ylim(bottom=0)
    b.plot(kv, [r["kv_bytes_per_token"] / 1024 for r in results], marker="s", color="C1")
    b.set_ylabel("KV cache KiB per token (one sequence)")
    b.set_ylim(bottom=0)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(kv)
        ax.set_xticklabels([str(k) for k in kv])
        ax.set_xlabel(f"kv heads ({args.heads} = MHA, 1 = MQA)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048, help="cache fill when decoding starts")
    parser.add_argument("--cache-len", type=int, default=4096, help="cache positions (model max_seq_len)")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per kv-head count")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--backend", default="auto", help="gqa_tune attention backend")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs/repro")
    args = parser.parse_args()
    if args.context + args.warmup + args.steps > args.cache_len:
        parser.error("context + warmup + steps must fit in cache-len")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    env = {
        "command": command,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
    }
    print(f"$ {command}\n{env}", flush=True)
    results = []
    for kv in sorted(args.kv_heads):
        r = measure(args, kv, device, dtype)
        results.append(r)
        print(
            f"kv {kv:2d}: step {r['step_ms']:.1f} ms (min {r['step_ms_min']:.1f}, max {r['step_ms_max']:.1f}), "
            f"{r['kv_bytes_per_token']} KV bytes/token",
            flush=True,
        )
    env["load_average_end"] = os.getloadavg()
    mha = results[-1]
    lines = [
        f"| kv heads | decode step ms (batch {args.batch}) | ms/token/sequence | tokens/s "
        f"| speedup vs {mha['num_kv_heads']} | KV bytes/token | KV read per step MiB | cache MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['num_kv_heads']} | {r['step_ms']:.1f} | {r['ms_per_token_per_sequence']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {mha['step_ms'] / r['step_ms']:.2f}x | {r['kv_bytes_per_token']} | "
            f"{r['kv_bytes_read_per_step'] / 2**20:.0f} | {r['kv_cache_bytes'] / 2**20:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    shape = (
        f"gqa_decoder: {args.layers} layers, embed {args.embed_dim}, {args.heads} heads (head_dim "
        f"{args.embed_dim // args.heads}), batch {args.batch}, context {args.context} (cache {args.cache_len}), "
        f"{args.dtype}, {env['device']}, {env['threads']} thread(s)"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = "speed" if device.type == "cpu" else f"speed_{device.type}"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out_dir / f"{name}.json").write_text(
        json.dumps({"env": env, "config": config, "shape": shape, "results": results, "table": table}, indent=2)
    )
    plot(results, args, args.out_dir / f"{name}.png", shape)
    print(f"wrote {args.out_dir}/{name}.json and {name}.png")


if __name__ == "__main__":
    main()
