"""The int8 KV cache against the fp32 one: bytes per token, task accuracy, decode step time, on CPU.

1. ``bytes``: one layer's ``KVCache`` for the decode benchmark's attention shape (8 kv heads, head_dim 64):
   ``KVCache.nbytes`` (K and V, with their scales) per position, for fp32, bf16, int8 and float8_e4m3fn
   caches, and the ratio to fp32's. int8: 64 one-byte values + one float32 scale per token and kv head,
   against 64 x 4 bytes.
2. ``accuracy``: ``gqa_tiny`` trained by the full recipe (``configs/gqa_tiny/full.yaml`` through ``tune
   run``, its 8 epochs by default, evaluation off, into ``--work-dir``: about 3 minutes on a quiet 2-core
   CPU; skipped when ``--checkpoint`` is given, e.g. the quickstart's ``outputs/gqa_tiny_full``, or the work
   dir already holds a run), loaded by the generate recipe's own setup,
   then ``gqa_tune.training.evaluate.task_accuracy`` on the first ``--examples`` rows of
   ``data/tasks/val.jsonl`` with fp32, int8 and float8_e4m3fn caches (``kv_cache_dtype``), and the fraction
   of greedy answers (token ids) identical to the fp32 cache's.
3. ``speed``: one KV-cached decode step of the attention module alone, as ``bench_decode.py`` runs it
   (embed 2048, 32 query / 8 kv heads, head_dim 64, RoPE, fp32, batch 1; ``attn(x, x, mask=mask,
   input_pos=pos)`` with torchtune's decoding mask), the cache holding ``fill`` random positions and
   rewound after each timed step; fp32 cache against int8 cache (same weights, same K/V before
   quantization), median ms per step, interleaved. On this CPU the int8 step dequantizes the filled
   prefix before SDPA reads it: it trades time for memory; on a GPU the Triton decode kernel reads the
   int8 cache itself (``bench_triton.py``'s ``decode int8`` rows).

Usage: python benchmarks/bench_kv_cache_int8.py [--checkpoint DIR] [--work-dir DIR] [--epochs 8]
       [--steps-per-epoch N] [--examples 500] [--fills 1024 4096] [--repeats 30] [--threads N]
       [--skip accuracy|speed ...] [--json PATH]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from _timing import environment, markdown_table, median_ms, print_environment, time_interleaved, write_json
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gqa_tune.recipes.generate import GenerateRecipe  # noqa: E402

from gqa_tune.data import resolve_data_file  # noqa: E402
from gqa_tune.models import gqa_attention  # noqa: E402
from gqa_tune.modules import KVCache  # noqa: E402
from gqa_tune.training.checkpoint import latest_checkpoint  # noqa: E402
from gqa_tune.training.evaluate import task_accuracy  # noqa: E402
from gqa_tune.training.generation import generate  # noqa: E402

EMBED_DIM, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 2048, 32, 8, 64
VAL = "data/tasks/val.jsonl"
#: The caches scored for accuracy: name -> kv_cache_dtype.
CACHES = {"fp32": None, "int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}


def bytes_per_token() -> List[Dict[str, Any]]:
    rows = []
    fp32 = None
    for name, dtype, kv_dtype in [
        ("fp32", torch.float32, None),
        ("bf16", torch.bfloat16, None),
        ("int8", torch.float32, torch.int8),
        ("float8_e4m3fn", torch.float32, torch.float8_e4m3fn),
    ]:
        cache = KVCache(1, 128, NUM_KV_HEADS, HEAD_DIM, dtype, kv_cache_dtype=kv_dtype)
        per_token = cache.nbytes / 128
        fp32 = per_token if fp32 is None else fp32
        rows.append({"cache": name, "bytes_per_token": per_token, "ratio_to_fp32": per_token / fp32})
    return rows


def train(work_dir: Path, epochs: int, steps: Optional[int]) -> Path:
    """A tiny checkpoint from the full recipe (through ``tune run``, as users make one)."""
    cmd = [
        str(Path(sys.executable).with_name("tune")), "run", "gqa_tune/recipes/full_finetune_single_device.py",
        "--config", "configs/gqa_tiny/full.yaml", f"output_dir={work_dir}", f"epochs={epochs}",
        f"max_steps_per_epoch={'null' if steps is None else steps}", "eval=null",
    ]  # fmt: skip
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return latest_checkpoint(work_dir)


def accuracy(checkpoint: Path, examples: int) -> Dict[str, Any]:
    cfg = OmegaConf.load(REPO / "configs/gqa_tiny/generate.yaml")
    OmegaConf.update(cfg, "checkpoint_dir", str(checkpoint))
    recipe = GenerateRecipe(cfg)
    recipe.setup(cfg)
    model, tokenizer = recipe.model, recipe.tokenizer
    scores = {name: task_accuracy(model, tokenizer, VAL, max_examples=examples, kv_cache_dtype=kv_dtype)
              for name, kv_dtype in CACHES.items()}  # fmt: skip
    rows = [json.loads(line) for line in resolve_data_file(VAL).read_text().splitlines() if line.strip()][:examples]
    prompts = [tokenizer.encode(r["prompt"], add_bos=True, add_eos=False) for r in rows]
    longest = max(len(tokenizer.encode(r["answer"], add_bos=False, add_eos=False)) for r in rows)
    kwargs = dict(max_new_tokens=longest + 1, pad_id=tokenizer.pad_id, stop_tokens=tokenizer.stop_tokens)
    answers = {name: [ids for i in range(0, len(prompts), 64)  # batches of 64, as task_accuracy runs them
                      for ids in generate(model, prompts[i : i + 64], kv_cache_dtype=kv_dtype, **kwargs).tokens]
               for name, kv_dtype in CACHES.items()}  # fmt: skip
    same = {name: sum(a == b for a, b in zip(ids, answers["fp32"])) / len(ids) for name, ids in answers.items()}
    return {"checkpoint": str(checkpoint), "examples": len(rows), "scores": scores, "same": same}


def speed(fills: List[int], repeats: int, warmup: int) -> List[Dict[str, Any]]:
    max_len = max(fills) + 1
    torch.manual_seed(0)
    attn = {
        name: gqa_attention(embed_dim=EMBED_DIM, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, max_seq_len=max_len)
        for name in ("fp32", "int8")
    }
    attn["int8"].load_state_dict(attn["fp32"].state_dict())
    attn["fp32"].setup_cache(1, torch.float32, max_len)
    attn["int8"].setup_cache(1, torch.float32, max_len, kv_cache_dtype=torch.int8)
    x = torch.randn(1, 1, EMBED_DIM)
    results = []
    with torch.no_grad():
        for module in attn.values():
            module.eval()
        for fill in fills:
            k, v = torch.randn(1, NUM_KV_HEADS, fill, HEAD_DIM), torch.randn(1, NUM_KV_HEADS, fill, HEAD_DIM)
            for module in attn.values():
                module.kv_cache.reset()
                module.kv_cache.update(k, v)
            mask = (torch.arange(max_len) <= fill).view(1, 1, max_len)
            pos = torch.tensor([[fill]])

            def step(module, mask=mask, pos=pos):
                return module(x, x, mask=mask, input_pos=pos)

            def rewind(module, fill=fill):
                module.kv_cache.truncate(fill)

            out = {}
            for name, module in attn.items():
                out[name] = step(module)
                rewind(module)
            diff = (out["int8"] - out["fp32"]).abs().max().item()
            times = time_interleaved(
                {name: ((lambda m=m: step(m)), (lambda m=m: rewind(m))) for name, m in attn.items()},
                repeats=repeats,
                warmup=warmup,
            )
            fp32_ms, int8_ms = median_ms(times["fp32"]), median_ms(times["int8"])
            mib = {f"{name}_kv_mib": module.kv_cache.nbytes / 2**20 for name, module in attn.items()}
            results.append({"fill": fill, "fp32_ms": fp32_ms, "int8_ms": int8_ms, "int8_over_fp32": int8_ms / fp32_ms,
                            **mib, "max_abs_diff": diff})  # fmt: skip
            print(f"fill {fill:5d}: fp32 {fp32_ms:.3f} ms  int8 {int8_ms:.3f} ms  (max |diff| {diff:.1e})", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint (or run output_dir) to use instead of training")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "bench_kv_cache_int8")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (the config's 8 by default)")
    parser.add_argument("--steps-per-epoch", type=int, help="training steps per epoch (default: the whole epoch)")
    parser.add_argument("--examples", type=int, default=500, help="rows of data/tasks/val.jsonl scored")
    parser.add_argument("--fills", type=int, nargs="+", default=[1024, 4096], help="cache fills timed")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "speed"])
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)
    data: Dict[str, Any] = {"environment": env, "bytes": bytes_per_token()}
    print()
    print(markdown_table(["cache", "bytes per token per layer", "x fp32"],
                         [[r["cache"], f"{r['bytes_per_token']:.0f}", f"{r['ratio_to_fp32']:.3f}"]
                          for r in data["bytes"]]))  # fmt: skip
    if "accuracy" not in args.skip:
        if args.checkpoint is not None:
            checkpoint = latest_checkpoint(args.checkpoint) or args.checkpoint
        else:
            checkpoint = latest_checkpoint(args.work_dir) or train(args.work_dir, args.epochs, args.steps_per_epoch)
        data["accuracy"] = acc = accuracy(checkpoint, args.examples)
        tasks = sorted(acc["scores"]["fp32"])
        print()
        print(f"task accuracy, {acc['examples']} rows of {VAL}, checkpoint {checkpoint}")
        table = [[name, *(f"{100 * acc['scores'][name][t]:.1f}%" for t in tasks), f"{100 * acc['same'][name]:.1f}%"]
                 for name in CACHES]  # fmt: skip
        print(markdown_table(["cache", *tasks, "same answers as fp32"], table))
    if "speed" not in args.skip:
        print()
        data["speed"] = rows = speed(args.fills, args.repeats, args.warmup)
        print()
        print(f"decode step, attention module, E={EMBED_DIM}, {NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, "
              f"fp32, batch 1, {args.threads} threads, median of {args.repeats}")  # fmt: skip
        print(markdown_table(["fill", "fp32 ms", "int8 ms", "int8 / fp32", "fp32 cache MiB", "int8 cache MiB"],
                             [[r["fill"], f"{r['fp32_ms']:.3f}", f"{r['int8_ms']:.3f}", f"{r['int8_over_fp32']:.2f}x",
                               f"{r['fp32_kv_mib']:.1f}", f"{r['int8_kv_mib']:.1f}"] for r in rows]))  # fmt: skip
    write_json(args.json, data)


if __name__ == "__main__":
    main()
