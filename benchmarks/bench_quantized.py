"""What do int8/fp8 KV caches, torchao-quantized weights and QLoRA's NF4 base cost in accuracy, and save?

On ``gqa_tiny`` trained by the full recipe unless ``--checkpoint`` (e.g. ``outputs/gqa_tiny_full``) or ``--work-dir``
holds one; accuracy: greedy answers on ``data/tasks/val.jsonl`` and the fraction equal to the unquantized model's.
``--case kv-cache``: cache bytes per token, accuracy per cache dtype, and an attention-module decode step with an fp32
and an int8 cache, taking turns. ``--case weights``: the generate recipe with each torchao ``quantizer`` (or its
refusal): linear bytes, decode ms/token, accuracy. ``--case qlora``: base and parameter bytes of LoRA and QLoRA models
(gqa_tiny; Llama-3.2-1B on the meta device), then ``configs/gqa_tiny/lora.yaml`` and ``qlora.yaml`` on one base:
held-out loss, accuracy, training tokens/s.

Commands::

    .venv/bin/python benchmarks/bench_quantized.py --checkpoint outputs/gqa_tiny_full [--skip accuracy]
    .venv/bin/python benchmarks/bench_quantized.py --case weights --threads 1 --repeats 7
    .venv/bin/python benchmarks/bench_quantized.py --case qlora --threads 1
    .venv/bin/python benchmarks/bench_quantized.py --case CASE --smoke   # a few training steps, under a minute
"""

import json
import re
import statistics
import tempfile
from pathlib import Path

import _harness as H
import torch
from omegaconf import OmegaConf
from torchtune import training
from torchtune.modules.common_utils import local_kv_cache

import gqa_tune
from gqa_tune.models import lora_gqa_llama3_2_1b, lora_gqa_tiny, qlora_gqa_llama3_2_1b, qlora_gqa_tiny

DEFAULTS = {
    "kv-cache": dict(epochs=8, steps_per_epoch=None, examples=500, repeats=30),
    "weights": dict(epochs=4, steps_per_epoch=300, examples=200, repeats=5),
    "qlora": dict(epochs=1, steps_per_epoch=300, examples=200, repeats=0, threads=1),
}
SMOKE = dict(epochs=1, steps_per_epoch=4, examples=8, repeats=2, fills=[64], new_tokens=4, steps=4)
VAL = "data/tasks/val.jsonl"


def ao(name: str, **kwargs) -> dict:
    return {"_component_": f"torchao.quantization.{name}", **kwargs}


INT4_CPU = ao("Int4WeightOnlyConfig", group_size=32, version=1, layout={"_component_": "torchao.dtypes.Int4CPULayout"})
QUANTIZERS = [  # (name, dtype, quantizer config)
    ("fp32", "fp32", None), ("bf16", "bf16", None),
    ("int8 weight-only", "fp32", ao("Int8WeightOnlyConfig")), ("int8 weight-only", "bf16", ao("Int8WeightOnlyConfig")),
    ("int8 dynamic", "fp32", ao("Int8DynamicActivationInt8WeightConfig")),
    ("int8 dynamic", "bf16", ao("Int8DynamicActivationInt8WeightConfig")),
    ("int4 CPU layout, group 32", "fp32", INT4_CPU), ("int4 CPU layout, group 32", "bf16", INT4_CPU),
    ("int4 default", "bf16", ao("Int4WeightOnlyConfig")),
    ("float8 dynamic", "bf16", ao("Float8DynamicActivationFloat8WeightConfig")),
]  # fmt: skip


def checkpoint(args, out: Path, overrides=()):
    """(``--checkpoint``, else the run in ``out``, else gqa_tiny trained there by the full recipe; the training's
    output, if it ran)."""
    if args.checkpoint is not None:
        return H.latest_checkpoint(args.checkpoint) or args.checkpoint, ""
    steps, output = "null" if args.steps_per_epoch is None else args.steps_per_epoch, ""
    if H.latest_checkpoint(out) is None:
        output = H.tune_run(H.FULL, "configs/gqa_tiny/full.yaml", [
            f"output_dir={out}", f"epochs={args.epochs}", f"max_steps_per_epoch={steps}", *overrides,
        ], args.threads or torch.get_num_threads())  # fmt: skip
    return H.latest_checkpoint(out), output


def generate_recipe(path: Path, **updates):
    """The generate recipe set up on ``path`` with ``updates`` to ``configs/gqa_tiny/generate.yaml``, or the last
    line of the message with which its setup refuses them."""
    cfg = OmegaConf.load(H.REPO / "configs/gqa_tiny/generate.yaml")
    for key, value in {"checkpoint_dir": str(path), **updates}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    try:
        recipe = H.GenerateRecipe(cfg)
        recipe.setup(cfg)
    except H.ConfigError as err:
        return str(err).strip().splitlines()[-1].strip()
    return recipe


def greedy_answers(model, tokenizer, rows, kv_cache_dtype=None, batch: int = 64):
    """Greedy answer ids (cut at the stop token) to ``rows``' prompts, in batches as ``task_accuracy`` runs them,
    through ``gqa_tune.generate`` with caches of ``kv_cache_dtype`` (``None``: the model's dtype)."""
    answers, stops = [], list(tokenizer.stop_tokens)
    longest = max(len(tokenizer.encode(r["answer"], add_bos=False, add_eos=False)) for r in rows) + 1
    for i in range(0, len(rows), batch):
        prompts = [tokenizer.encode(r["prompt"], add_bos=True, add_eos=False) for r in rows[i : i + batch]]
        width = max(map(len, prompts))
        tokens = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in prompts])
        with local_kv_cache(model, batch_size=len(prompts), device=tokens.device, decoder_max_seq_len=width + longest,
                            dtype=kv_cache_dtype or next(model.parameters()).dtype):  # fmt: skip
            out, _ = gqa_tune.generate(model, tokens, longest, pad_id=tokenizer.pad_id, stop_tokens=stops)
        for row in out[:, width:].tolist():
            answers.append(row[: next((j for j, t in enumerate(row) if t in stops), len(row))])
    return answers


def scored(model, tokenizer, rows, **kv) -> dict:
    accuracy = H.task_accuracy(model, tokenizer, VAL, max_examples=len(rows), **kv)
    return {"accuracy": accuracy, "answers": greedy_answers(model, tokenizer, rows, **kv)}


def kv_cache(args) -> dict:
    s, data = H.ATTENTION, {}
    caches = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, torch.int8),
              "float8_e4m3fn": (torch.float32, torch.float8_e4m3fn)}  # fmt: skip
    per_token = {n: gqa_tune.KVCache(1, 128, s["num_kv_heads"], s["head_dim"], d, kv_cache_dtype=q).nbytes / 128
                 for n, (d, q) in caches.items()}  # fmt: skip
    H.table(["cache", "bytes per token per layer", "x fp32"],
            [[n, f"{b:.0f}", f"{b / per_token['fp32']:.3f}"] for n, b in per_token.items()])  # fmt: skip
    data["bytes_per_token"] = per_token
    if "accuracy" not in args.skip:
        path, _ = checkpoint(args, args.work_dir, ["eval=null"])
        recipe, rows = generate_recipe(path), val_rows(args.examples)
        found = {n: scored(recipe.model, recipe.tokenizer, rows, kv_cache_dtype=caches[n][1])
                 for n in ("fp32", "int8", "float8_e4m3fn")}  # fmt: skip
        tasks = sorted(found["fp32"]["accuracy"])
        H.table(["cache", *tasks, "same answers as fp32"],
                [[n, *(f"{100 * f['accuracy'][t]:.1f}%" for t in tasks), f"{100 * same(f, found['fp32']):.1f}%"]
                 for n, f in found.items()],
                f"task accuracy, {len(rows)} rows of {VAL}, checkpoint {path}")  # fmt: skip
        data["accuracy"] = {n: {"accuracy": f["accuracy"], "same": same(f, found["fp32"])} for n, f in found.items()}
    if "speed" not in args.skip:
        cache, rows = max(args.fills) + 1, []
        tt, fp32 = H.attention_pair(s, cache, seed=args.seed)
        int8 = H.from_torchtune_attention(tt)  # the same weights
        fp32.setup_cache(1, torch.float32, cache)
        int8.setup_cache(1, torch.float32, cache, kv_cache_dtype=torch.int8)
        for fill in args.fills:
            outs, t, _ = H.decode_steps({"fp32": fp32, "int8": int8}, fill, cache, args.repeats, 5, seed=args.seed)
            rows.append([fill, H.fmt(t["fp32"]), H.fmt(t["int8"]), f"{t['int8'].median / t['fp32'].median:.2f}x",
                         f"{fp32.kv_cache.nbytes / 2**20:.1f} / {int8.kv_cache.nbytes / 2**20:.1f}",
                         f"{(outs['int8'] - outs['fp32']).abs().max().item():.1e}"])  # fmt: skip
        data["speed"] = H.table(["fill", "fp32 cache ms (IQR)", "int8 cache ms (IQR)", "int8 / fp32",
                                 "cache MiB fp32 / int8", "max abs diff"], rows,
                                f"Decode step, attention module, {s}, fp32, batch 1, {torch.get_num_threads()} "
                                f"threads, median of {args.repeats}, interleaved")  # fmt: skip
    return data


def same(found: dict, reference: dict) -> float:
    return sum(a == b for a, b in zip(found["answers"], reference["answers"])) / len(reference["answers"])


def val_rows(examples: int):
    lines = H.resolve_data_file(VAL).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()][:examples]


def weights(args) -> dict:
    (path, _), rows, results, recipes = checkpoint(args, args.work_dir, ["eval=null"]), val_rows(args.examples), [], {}
    for i, (name, dtype, quantizer) in enumerate(QUANTIZERS):
        recipe = generate_recipe(path, dtype=dtype, quantizer=quantizer)
        result = {"case": name, "dtype": dtype}
        if isinstance(recipe, str):
            result["error"] = recipe
        else:
            recipes[i] = recipe
            result.update(scored(recipe.model, recipe.tokenizer, rows))
            result["linear_bytes"] = H.weight_bytes(recipe.model, linear_only=True)
            result["same_as_fp32"] = same(result, results[0] if results else result)
        results.append(result)
        print(name, dtype, result.get("error") or result["accuracy"], flush=True)

    def decode(recipe) -> float:
        prompt = torch.tensor(recipe.tokenizer.encode("a=12 b=7 c=33 ?b=", add_bos=True, add_eos=False))
        stats = gqa_tune.GenerationStats()
        gqa_tune.generate(recipe.model, prompt, args.new_tokens, pad_id=recipe.tokenizer.pad_id, stats=stats)
        return stats.decode_seconds / stats.decode_tokens  # seconds per token

    times = H.time_cases({i: (lambda r=r: decode(r)) for i, r in recipes.items()}, args.repeats, warmup=1)
    table = []
    for i, r in enumerate(results):
        if "error" in r:
            table.append([r["case"], r["dtype"], "refused at setup (below)", "", "", "", "", "", ""])
            continue
        acc, ratio = r["accuracy"], r["linear_bytes"] / results[0]["linear_bytes"]
        r["decode_tokens_per_s"] = 1 / times[i].median
        table.append([r["case"], r["dtype"], f"{r['linear_bytes'] / 2**20:.3f} ({ratio:.2f}x)",
                      H.fmt(times[i], digits=2), f"{1 / times[i].median:.0f}",
                      *(f"{acc.get(t, 0):.3f}" for t in ("copy", "add", "all")),
                      f"{r['same_as_fp32']:.3f}"])  # fmt: skip
    H.table(["case", "dtype", "linear MiB", "decode ms/token (IQR)", "decode tok/s", "copy", "add", "all",
             "same as fp32"], table,
            f"checkpoint {path}; decode: {args.new_tokens} tokens, eager, median of {args.repeats} rounds")  # fmt: skip
    print("".join(f"- {r['case']}, {r['dtype']}: {r['error']}\n" for r in results if "error" in r))
    for r in results:
        r.pop("answers", None)
    return {"checkpoint": str(path), "results": results}


def qlora(args) -> dict:
    memory = []
    builders = (("gqa_tiny", lora_gqa_tiny, qlora_gqa_tiny, "cpu"),
                ("Llama-3.2-1B", lora_gqa_llama3_2_1b, qlora_gqa_llama3_2_1b, "meta"))  # counted, not allocated
    for shape, plain, quantized, device in builders:
        unit, scale = ("MiB", 2**20) if shape == "gqa_tiny" else ("GiB", 2**30)
        for dtype in (torch.float32, torch.bfloat16):
            sizes = []
            for builder in (plain, quantized):
                with training.set_default_dtype(dtype), torch.device(device):
                    model = builder()
                sizes += [H.weight_bytes(model, linear_only=True), H.weight_bytes(model)]
            memory.append([shape, str(dtype)[6:], *(f"{b / scale:.3f} {unit}" for b in sizes[::2]),
                           f"{sizes[0] / sizes[2]:.2f}x", *(f"{b / scale:.3f} {unit}" for b in sizes[1::2])])
    H.table(["model", "dtype", "LoRA base linears", "QLoRA base linears", "ratio", "LoRA params", "QLoRA params"],
            memory)
    small = [f"eval.max_examples={args.examples}", *["log_every_n_steps=1"] * args.smoke]

    def evaluation(output: str) -> dict:
        match = re.search(r"eval after (\d+) steps: (.*)", output)
        if match is None:
            raise SystemExit(f"no evaluation line in the run's output:\n{output[-2000:]}")
        return {k: float(v) for k, v in (item.split() for item in match.group(2).split(", "))}

    def logged(out: Path, name: str):
        lines = [line for path in sorted((out / "logs").glob("log_*.txt")) for line in path.read_text().splitlines()]
        return [float(m.group(1)) for m in (re.search(rf"\b{name}:(\S+)", line) for line in lines) if m]

    base, output = checkpoint(args, args.work_dir / "base", small)
    runs = {"base (no adapters)": evaluation(output)} if output else {}
    for kind in ("lora", "qlora"):
        out = args.work_dir / kind
        runs[kind] = evaluation(H.tune_run(H.LORA, f"configs/gqa_tiny/{kind}.yaml", [
            f"output_dir={out}", f"base_checkpoint_dir={base}", "epochs=1", f"max_steps_per_epoch={args.steps}", *small,
        ], args.threads))  # fmt: skip
        runs[kind].update(tokens_per_second=statistics.median(logged(out, "tokens_per_second")),
                          final_train_loss=logged(out, "loss")[-1])  # fmt: skip
    H.table(["run", "last train loss", "held-out loss", "copy", "add", "all", "train tokens/s (median)"],
            [[name, f"{r['final_train_loss']:.4f}" if "final_train_loss" in r else "", f"{r['heldout_loss']:.4f}",
              *(f"{r.get(f'accuracy_{t}', 0):.3f}" for t in ("copy", "add", "all")),
              f"{r['tokens_per_second']:.0f}" if "tokens_per_second" in r else ""]
             for name, r in runs.items()], f"base {base}; {args.steps} steps of LoRA and QLoRA")  # fmt: skip
    print(f"QLoRA's held-out loss is {runs['qlora']['heldout_loss'] / runs['lora']['heldout_loss'] - 1:+.2%} of LoRA's")
    return {"memory": memory, "runs": runs, "base": str(base)}


def main() -> None:
    p = H.parser(__doc__, cases=list(DEFAULTS))
    p.add_argument("--checkpoint", type=Path, help="a checkpoint (or run output_dir) to use instead of training one")
    p.add_argument("--work-dir", type=Path, help="where the training runs go (default outputs/bench_quantized_<case>)")
    p.add_argument("--epochs", type=int, help="training epochs (kv-cache 8, weights 4)")
    p.add_argument("--steps-per-epoch", type=int, help="training steps per epoch (kv-cache: all, weights/qlora 300)")
    p.add_argument("--examples", type=int, help="rows of data/tasks/val.jsonl scored (kv-cache 500, weights 200)")
    p.add_argument("--repeats", type=int, help="timed steps (kv-cache 30) or decode rounds (weights 5)")
    p.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "speed"], help="kv-cache: parts left out")
    p.add_argument("--fills", type=int, nargs="+", default=[1024, 4096], help="kv-cache: cache fills timed")
    p.add_argument("--new-tokens", type=int, default=32, help="weights: tokens decoded per timed generation")
    p.add_argument("--steps", type=int, default=300, help="qlora: steps of each adapter run")
    args = H.parse(p, DEFAULTS, SMOKE)
    if args.work_dir is None:
        args.work_dir = Path(tempfile.mkdtemp()) if args.smoke else H.REPO / f"outputs/bench_quantized_{args.case}"
    H.run(args, {"kv-cache": kv_cache, "weights": weights, "qlora": qlora})


if __name__ == "__main__":
    main()
