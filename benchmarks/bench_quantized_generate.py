"""Generation with torchao-quantized weights: decode tokens/s and task accuracy of the tiny model, per quantizer.

Trains nothing itself beyond one short run that makes the checkpoint: unless ``--checkpoint`` is given (or
``--work-dir`` already holds a run with a ``LATEST``), ``gqa_tiny`` is trained with the full recipe
(``configs/gqa_tiny/full.yaml``, ``--epochs`` x ``--steps-per-epoch`` steps, evaluation off) into
``--work-dir``. Then each case loads that checkpoint through the generate recipe's own setup
(``GenerateRecipe`` with ``dtype`` and ``quantizer`` set, so the weights are quantized by
``gqa_tune.quantization.quantize_model`` after loading) and reports:

- ``linear MiB``: bytes of the linear layers' weights as stored (``gqa_tune.quantization.weight_bytes``;
  the tied output reads the embedding, which no case quantizes);
- ``decode tok/s``: greedy decoding of ``--new-tokens`` tokens for one prompt (no stop token, so every case
  decodes the same number of steps), eager; the cases take turns (``_timing.time_interleaved``, so drifts of a
  shared machine hit all alike), and the median over ``--repeats`` rounds after a warm-up round is reported;
- ``accuracy``: exact-match greedy answers on the first ``--examples`` rows of ``data/tasks/val.jsonl``
  (``gqa_tune.training.evaluate.task_accuracy``), per task and overall;
- ``same as fp32``: the fraction of those answers equal to the fp32 model's.

A case that cannot run here (the default int4 config without fbgemm-gpu-genai, float8 activations on a CPU)
is listed with the recipe's error message instead of figures.

Usage: python benchmarks/bench_quantized_generate.py [--checkpoint DIR] [--work-dir DIR] [--epochs 4]
       [--steps-per-epoch 300] [--examples 200] [--new-tokens 32] [--repeats 5] [--threads N] [--json PATH]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from _timing import environment, markdown_table, print_environment, time_interleaved, write_json
from gqa_tune.recipes.generate import GenerateRecipe
from omegaconf import OmegaConf

from gqa_tune.config_check import ConfigError
from gqa_tune.data import resolve_data_file
from gqa_tune.quantization import weight_bytes
from gqa_tune.training.checkpoint import latest_checkpoint
from gqa_tune.training.evaluate import task_accuracy
from gqa_tune.training.generation import generate

REPO = Path(__file__).resolve().parents[1]
INT4_CPU = {
    "_component_": "torchao.quantization.Int4WeightOnlyConfig",
    "group_size": 32,
    "version": 1,
    "layout": {"_component_": "torchao.dtypes.Int4CPULayout"},
}
#: (name, dtype, quantizer config node)
CASES = [
    ("fp32", "fp32", None),
    ("bf16", "bf16", None),
    ("int8 weight-only", "fp32", {"_component_": "torchao.quantization.Int8WeightOnlyConfig"}),
    ("int8 weight-only", "bf16", {"_component_": "torchao.quantization.Int8WeightOnlyConfig"}),
    ("int8 dynamic", "fp32", {"_component_": "torchao.quantization.Int8DynamicActivationInt8WeightConfig"}),
    ("int8 dynamic", "bf16", {"_component_": "torchao.quantization.Int8DynamicActivationInt8WeightConfig"}),
    ("int4 CPU layout, group 32", "fp32", INT4_CPU),
    ("int4 CPU layout, group 32", "bf16", INT4_CPU),
    ("int4 default", "bf16", {"_component_": "torchao.quantization.Int4WeightOnlyConfig"}),
    ("float8 dynamic", "bf16", {"_component_": "torchao.quantization.Float8DynamicActivationFloat8WeightConfig"}),
]
TIMED_PROMPT = "a=12 b=7 c=33 ?b="


def train(work_dir: Path, epochs: int, steps: int) -> Path:
    """A tiny checkpoint from the full recipe (through ``tune run``, as users make one)."""
    cmd = [
        str(Path(sys.executable).with_name("tune")), "run", "gqa_tune/recipes/full_finetune_single_device.py",
        "--config", "configs/gqa_tiny/full.yaml", f"output_dir={work_dir}", f"epochs={epochs}",
        f"max_steps_per_epoch={steps}", "eval=null",
    ]  # fmt: skip
    print("training:", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return latest_checkpoint(work_dir)


def answers(model, tokenizer, rows: List[Dict[str, str]]) -> List[str]:
    """Greedy answers to ``rows``' prompts, one batch (as ``task_accuracy`` generates them)."""
    prompts = [tokenizer.encode(r["prompt"], add_bos=True, add_eos=False) for r in rows]
    longest = max(len(tokenizer.encode(r["answer"], add_bos=False, add_eos=False)) for r in rows)
    result = generate(model, prompts, max_new_tokens=longest + 1, pad_id=tokenizer.pad_id,
                      stop_tokens=tokenizer.stop_tokens)  # fmt: skip
    return [tokenizer.decode(ids) for ids in result.tokens]


def timed_decode(recipes: Dict[str, GenerateRecipe], new_tokens: int, repeats: int) -> Dict[str, float]:
    """Median decode tokens/s per case, the cases taking turns (``time_interleaved``), after a warm-up round."""
    rates: Dict[str, List[float]] = {key: [] for key in recipes}

    def decode(key: str) -> None:
        recipe = recipes[key]
        prompt = [recipe.tokenizer.encode(TIMED_PROMPT, add_bos=True, add_eos=False)]
        result = generate(recipe.model, prompt, max_new_tokens=new_tokens, pad_id=recipe.tokenizer.pad_id,
                          stop_tokens=())  # fmt: skip
        rates[key].append(result.decode_tokens_per_s)

    time_interleaved({key: (partial(decode, key), None) for key in recipes}, repeats=repeats, warmup=1)
    return {key: statistics.median(values[1:]) for key, values in rates.items()}


def setup_case(checkpoint: Path, dtype: str, quantizer: Optional[Dict[str, Any]]) -> Any:
    """The generate recipe set up with ``dtype`` and ``quantizer``, or its error message."""
    cfg = OmegaConf.load(REPO / "configs/gqa_tiny/generate.yaml")
    OmegaConf.update(cfg, "checkpoint_dir", str(checkpoint))
    OmegaConf.update(cfg, "dtype", dtype)
    OmegaConf.update(cfg, "quantizer", quantizer, force_add=True)
    try:
        recipe = GenerateRecipe(cfg)
        recipe.setup(cfg)
    except ConfigError as err:
        return str(err).splitlines()[-1].strip()
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint (or run output_dir) to use instead of training")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "bench_quantized_generate")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=300)
    parser.add_argument("--data-file", default="data/tasks/val.jsonl")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)

    if args.checkpoint is not None:
        checkpoint = latest_checkpoint(args.checkpoint) or args.checkpoint
    else:
        checkpoint = latest_checkpoint(args.work_dir) or train(args.work_dir, args.epochs, args.steps_per_epoch)
    print(f"checkpoint: {checkpoint}", flush=True)
    lines = resolve_data_file(args.data_file).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()][: args.examples]

    results, recipes = [], {}
    reference: Optional[List[str]] = None
    for index, (name, dtype, quantizer) in enumerate(CASES):
        result: Dict[str, Any] = {"case": name, "dtype": dtype, "quantizer": quantizer}
        recipe = setup_case(checkpoint, dtype, quantizer)
        if isinstance(recipe, str):
            result["error"] = recipe
        else:
            recipes[index] = recipe
            model, tokenizer = recipe.model, recipe.tokenizer
            result["linear_bytes"] = weight_bytes(model, linear_only=True)
            result["accuracy"] = task_accuracy(model, tokenizer, str(args.data_file), max_examples=args.examples)
            result["answers"] = answers(model, tokenizer, rows)
            reference = result["answers"] if reference is None else reference
            result["same_as_fp32"] = sum(a == b for a, b in zip(result["answers"], reference)) / len(reference)
        results.append(result)
        print(name, dtype, {k: v for k, v in result.items() if k not in ("answers", "quantizer")}, flush=True)
    for index, rate in timed_decode(recipes, args.new_tokens, args.repeats).items():
        results[index]["decode_tokens_per_s"] = rate

    table = []
    fp32_bytes = results[0]["linear_bytes"]
    for r in results:
        if "error" in r:
            table.append([r["case"], r["dtype"], "refused at setup (below)", "", "", "", "", ""])
            continue
        acc = r["accuracy"]
        table.append([
            r["case"], r["dtype"], f"{r['linear_bytes'] / 2**20:.3f} ({r['linear_bytes'] / fp32_bytes:.2f}x)",
            f"{r['decode_tokens_per_s']:.0f}", f"{acc.get('copy', 0):.3f}", f"{acc.get('add', 0):.3f}",
            f"{acc['all']:.3f}", f"{r['same_as_fp32']:.3f}",
        ])  # fmt: skip
    headers = ["case", "dtype", "linear MiB", "decode tok/s", "copy", "add", "all", "same as fp32"]
    print(markdown_table(headers, table))
    for r in results:
        if "error" in r:
            print(f"- {r['case']}, {r['dtype']}: {r['error']}")
    write_json(args.json, {"environment": env, "checkpoint": str(checkpoint), "results": results})


if __name__ == "__main__":
    main()
