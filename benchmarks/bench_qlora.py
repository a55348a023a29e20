"""QLoRA against LoRA: the memory of the frozen base weights, and the held-out loss after the same steps.

1. Memory (nothing trained): the base linear weights and all parameters of ``lora_gqa_tiny`` /
   ``qlora_gqa_tiny`` and of the Llama-3.2-1B shape (``lora_gqa_llama3_2_1b`` / ``qlora_gqa_llama3_2_1b``, built
   on the meta device, so the bytes are counted without being allocated), in fp32 and bf16; NF4 weights are
   counted as torchao stores them (4-bit codes, int8 block scales, float scale factors:
   ``gqa_tune.quantization.weight_bytes``).
2. Training: a base ``gqa_tiny`` from the full recipe (``--base-steps`` steps, so the adapters have something
   left to learn; its own evaluation is the first row), then the LoRA recipe twice on it,
   ``configs/gqa_tiny/lora.yaml`` and ``configs/gqa_tiny/qlora.yaml`` (identical but for the NF4 base),
   ``--steps`` steps each, same seed, data and schedule, all through ``tune run``. Reported: the held-out loss
   and task accuracy on ``data/tasks/val.jsonl`` that the recipe prints at the end (its ``eval:``), and the
   median training tokens/s its logs record.

Usage: python benchmarks/bench_qlora.py [--work-dir DIR] [--base DIR] [--base-steps 300] [--steps 300]
       [--threads 1] [--json PATH]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
from _timing import environment, markdown_table, print_environment, write_json
from torchtune import training

from gqa_tune.models import lora_gqa_llama3_2_1b, lora_gqa_tiny, qlora_gqa_llama3_2_1b, qlora_gqa_tiny
from gqa_tune.quantization import weight_bytes
from gqa_tune.training.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).with_name("tune"))
EVAL_LINE = re.compile(r"eval after (\d+) steps: (.*)")


def memory_rows() -> List[List[str]]:
    rows = []
    for shape, plain, quantized, device in (
        ("gqa_tiny", lora_gqa_tiny, qlora_gqa_tiny, "cpu"),
        ("Llama-3.2-1B", lora_gqa_llama3_2_1b, qlora_gqa_llama3_2_1b, "meta"),
    ):
        for dtype in (torch.float32, torch.bfloat16):
            sizes = {}
            for name, builder in (("LoRA", plain), ("QLoRA", quantized)):
                with training.set_default_dtype(dtype), torch.device(device):
                    model = builder()
                sizes[name] = (weight_bytes(model, linear_only=True), weight_bytes(model))
                del model
            (lin, total), (qlin, qtotal) = sizes["LoRA"], sizes["QLoRA"]
            unit, scale = ("MiB", 2**20) if shape == "gqa_tiny" else ("GiB", 2**30)
            rows.append([
                shape, str(dtype).replace("torch.", ""), f"{lin / scale:.3f} {unit}", f"{qlin / scale:.3f} {unit}",
                f"{lin / qlin:.2f}x", f"{total / scale:.3f} {unit}", f"{qtotal / scale:.3f} {unit}",
            ])  # fmt: skip
    return rows


def tune_run(recipe: str, config: str, overrides: List[str], threads: int) -> str:
    cmd = [TUNE, "run", f"gqa_tune/recipes/{recipe}.py", "--config", config, *overrides]
    print(" ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"tune run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def logged(log_dir: Path, name: str) -> List[float]:
    values = []
    for path in sorted(log_dir.glob("log_*.txt")):
        for line in path.read_text().splitlines():
            match = re.search(rf"\b{name}:(\S+)", line)
            if match:
                values.append(float(match.group(1)))
    return values


def evaluation(output: str, what: str) -> Dict[str, float]:
    """The figures of the recipe's ``eval after N steps: heldout_loss X, accuracy_copy Y, ...`` line."""
    match = EVAL_LINE.search(output)
    if match is None:
        raise SystemExit(f"no evaluation line in the {what} run's output:\n{output[-2000:]}")
    return {k: float(v) for k, v in (item.split() for item in match.group(2).split(", "))}


def finetune(kind: str, base: Path, out: Path, steps: int, threads: int) -> Dict[str, float]:
    output = tune_run(
        "lora_finetune_single_device", f"configs/gqa_tiny/{kind}.yaml",
        [f"output_dir={out}", f"base_checkpoint_dir={base}", "epochs=1", f"max_steps_per_epoch={steps}"], threads,
    )  # fmt: skip
    results = evaluation(output, kind)
    results["tokens_per_second"] = statistics.median(logged(out / "logs", "tokens_per_second"))
    results["final_train_loss"] = logged(out / "logs", "loss")[-1]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "bench_qlora")
    parser.add_argument("--base", type=Path, help="a base checkpoint (or run output_dir) instead of training one")
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)

    headers = ["model", "dtype", "LoRA base linears", "QLoRA base linears", "ratio", "LoRA params", "QLoRA params"]
    memory = memory_rows()
    print(markdown_table(headers, memory), flush=True)

    base, base_eval = args.base, None
    if base is None:
        base = args.work_dir / "base"
        if latest_checkpoint(base) is None:
            output = tune_run(
                "full_finetune_single_device", "configs/gqa_tiny/full.yaml",
                [f"output_dir={base}", "epochs=1", f"max_steps_per_epoch={args.base_steps}"], args.threads,
            )  # fmt: skip
            base_eval = evaluation(output, "base")
    runs = {kind: finetune(kind, base, args.work_dir / kind, args.steps, args.threads) for kind in ("lora", "qlora")}
    rows = []
    if base_eval is not None:
        rows.append([
            "base (no adapters)", str(args.base_steps), "", f"{base_eval['heldout_loss']:.4f}",
            f"{base_eval.get('accuracy_copy', 0):.3f}", f"{base_eval.get('accuracy_add', 0):.3f}",
            f"{base_eval['accuracy_all']:.3f}", "",
        ])  # fmt: skip
    for kind, r in runs.items():
        rows.append([
            kind, str(args.steps), f"{r['final_train_loss']:.4f}", f"{r['heldout_loss']:.4f}",
            f"{r.get('accuracy_copy', 0):.3f}", f"{r.get('accuracy_add', 0):.3f}", f"{r['accuracy_all']:.3f}",
            f"{r['tokens_per_second']:.0f}",
        ])  # fmt: skip
    gap = runs["qlora"]["heldout_loss"] / runs["lora"]["heldout_loss"] - 1
    print(f"base: {base}")
    print(markdown_table(["run", "steps", "last train loss", "held-out loss", "copy", "add", "all", "tok/s"], rows))
    print(f"QLoRA's held-out loss is {gap:+.2%} of LoRA's")
    write_json(
        args.json, {"environment": env, "memory": memory, "runs": runs, "base": str(base), "base_eval": base_eval}
    )


if __name__ == "__main__":
    main()
