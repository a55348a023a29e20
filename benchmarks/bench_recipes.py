"""Recipes end to end, gqa_tune vs torchtune 0.6.1, on CPU, float32.

(a) ``train``: training throughput of gqa_tune's full fine-tune recipe against torchtune's
built-in ``full_finetune_single_device``, both started with ``tune run`` as a user would
(configs in ``benchmarks/configs/``): the same tiny GQA shape (vocab 260, 2 layers, 8 query /
2 kv heads, width 128, MLP 384, ``max_seq_len`` 128; ``gqa_tune.models.gqa_tiny`` against
``torchtune.models.llama3_2.llama3_2`` with plain RoPE), the same random-init weights (one
``.pt`` file read by torchtune's ``FullModelTorchTuneCheckpointer`` in both), the same data
(``gqa_tune.data.task_dataset`` + ``byte_tokenizer``, same sampler seed, so the same batches),
batch, optimizer, schedule, clipping and number of steps.

Timing: both recipes log every step through the same metric-logger component
(:class:`StepTimeLogger`, which stamps each ``log_dict`` call with ``time.perf_counter()``).
Throughput = non-padding input tokens of steps ``warmup+1 .. steps`` / the wall-clock time
between the stamps of step ``warmup`` and step ``steps``: everything a training step costs
in each recipe (data loading, forward, backward, clipping, optimizer, scheduler, logging). The
token counts come from the same dataloader rebuilt here. The recipes' own logged figures are
shown too but measure different things: torchtune's ``tokens_per_second_per_gpu`` counts
supervised (label) tokens over the loop iteration, gqa_tune's ``tokens_per_second`` counts
non-padding input tokens over ``train_step`` alone (no data loading).

(b) ``decode``: decoding throughput at a long context: a random prompt of ``--context`` tokens,
batch 1, greedy, ``--new-tokens`` decode steps after the prefill, model ``max_seq_len``
``--cache`` (RoPE table). torchtune's model (``llama3_2``, torchtune attention) runs
``torchtune.generation.generate`` with KV caches of ``--cache`` positions set up beforehand
(``setup_caches``); a copy with gqa_tune's attention (``gqa_tune.swap_attention``, same
weights) runs (1) the same ``torchtune.generation.generate`` with the same caches and (2)
gqa_tune's ``generate``, which sizes its caches to the request (prompt + new tokens). Decode
time: from the start of the first one-token step to the end of the call (prefill excluded).

(c) ``packed``: packed training (issue 11), the same shape, configs and init weights as (a), with model and
tokenizer ``max_seq_len`` ``--seq`` (2048), nothing shuffled (``shuffle=false``) in any run:

1. gqa_tune's recipe with ``dataset.packed=true``: torchtune's ``PackedDataset`` rows of ``--seq`` tokens
   (about 162 examples each at 2048), ``--batch`` rows per step, collated by
   ``gqa_tune.data.packing.packed_collate`` (a BlockMask from the document lengths; on a CPU the attention
   runs document by document);
2. gqa_tune's recipe unpacked on the same examples: packs hold consecutive examples in file order, so with
   no shuffling an unpacked batch of (the packed run's examples / steps, rounded) covers the same examples
   over the run to within steps / 2 of them (step boundaries differ by a few examples), each batch padded to
   its longest example (``padded_collate_sft``);
3. torchtune's ``full_finetune_single_device`` with ``dataset.packed=true``: the same rows in the same order,
   its ``padded_collate_packed`` (a dense ``[b, s, s]`` block-causal mask on a CPU), torchtune's attention,
   its loss as ``--tt-loss`` (default: its configs' chunked cross-entropy).

tokens/s as in (a); in a packed row the non-padding tokens are those up to its last EOS. Losses: torchtune
shifts labels across a document boundary (a document's last token gets the next document's first label)
where gqa_tune's ``packed_labels`` ignores that position, but the label there is the next prompt's BOS, which
is never supervised (``train_on_input`` false), so runs 1 and 3 compute the same loss over the same tokens;
they would differ on data whose documents start with a supervised token.

Usage (from the repository root):
    python benchmarks/bench_recipes.py [--mode train|decode|packed|all] [--steps N] [--warmup-steps N]
        [--rounds 2] [--batch N] [--seq N] [--tt-loss chunked|ce|both] [--context 2048] [--cache 4096]
        [--new-tokens 64] [--repeats 3] [--threads N] [--workdir DIR] [--json PATH]

``--steps``, ``--warmup-steps``, ``--batch``, ``--seq`` and ``--tt-loss`` default per mode: train 100, 10,
64 examples, 64, both; packed 8, 2, 4 rows, 2048, chunked.
"""

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

from _timing import environment, markdown_table, print_environment, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TUNE = str(Path(sys.executable).with_name("tune"))
STEPS_FILE = "steps.jsonl"


class StepTimeLogger:
    """torchtune metric logger: every ``log_dict`` call recorded with a ``time.perf_counter()`` stamp.

    Written to ``<log_dir>/steps.jsonl`` (one JSON object per logged step) on ``close``.
    Used by both recipes in this benchmark, so both are timed by the same code.
    """

    def __init__(self, log_dir: str, **kwargs) -> None:
        self.path = Path(log_dir) / STEPS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: List[dict] = []

    def log_config(self, config) -> None:
        pass

    def log(self, name: str, data, step: int) -> None:
        self.log_dict({name: data}, step)

    def log_dict(self, payload: dict, step: int) -> None:
        row = {"step": int(step), "time": time.perf_counter()}
        for key, value in payload.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                row[key] = str(value)
        self.rows.append(row)

    def close(self) -> None:
        with open(self.path, "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- (a) training


def tiny_llama3_2(max_seq_len: int):
    """gqa_tiny's shape with torchtune's attention; plain RoPE (base 10000, no Llama 3 scaling) as gqa_tiny."""
    from torchtune.models.llama3_2 import llama3_2

    return llama3_2(
        vocab_size=260,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        embed_dim=128,
        intermediate_dim=384,
        max_seq_len=max_seq_len,
        rope_base=10_000,
        scale_factor=1,
        norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def write_init_checkpoint(directory: Path, seed: int) -> float:
    """Random-init weights (gqa_tune's from-scratch init) as ``directory/model.pt``; returns the
    largest logit difference between torchtune's and gqa_tune's model with these weights."""
    import torch

    from gqa_tune.models import gqa_tiny, init_from_scratch

    torch.manual_seed(seed)
    tt = init_from_scratch(tiny_llama3_2(128))
    ours = gqa_tiny(max_seq_len=128)
    ours.load_state_dict(tt.state_dict())  # strict: same keys and shapes
    x = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        diff = (tt(x) - ours(x)).abs().max().item()
    torch.testing.assert_close(ours(x), tt(x), rtol=1e-4, atol=1e-4)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(tt.state_dict(), directory / "model.pt")
    return diff


def token_counts(
    steps: int, batch: int, seq: int, data_file: str, *, packed: bool = False, shuffle: bool = True
) -> Dict[str, List[int]]:
    """Per step: non-padding input tokens, supervised tokens, padded size and examples of the batches the
    recipes draw (sampler seed 0, epoch 0, ``drop_last``; ``padded_collate_sft``, or packed rows of ``seq``
    tokens). A packed row's documents are whole examples, each ending with EOS, then padding
    (``PackedDataset`` pads with token 0, not the tokenizer's ``pad_id``): its non-padding tokens are those
    up to its last EOS, its examples the number of EOS."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    from torchtune.data import padded_collate_sft

    from gqa_tune.data import EOS_ID, ByteTokenizer, task_dataset

    tok = ByteTokenizer(max_seq_len=seq)
    dataset = task_dataset(tok, data_file=data_file, packed=packed)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=0)
    sampler.set_epoch(0)
    collate = list if packed else partial(padded_collate_sft, padding_idx=tok.pad_id, ignore_idx=-100)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, collate_fn=collate)
    counts: Dict[str, List[int]] = {"input": [], "labels": [], "padded": [], "examples": []}
    for index, b in enumerate(loader):
        if index == steps:
            break
        if packed:
            ends = [int(torch.nonzero(row["tokens"] == EOS_ID).max()) + 1 for row in b]
            if any(bool((row["tokens"][end:] != 0).any()) for row, end in zip(b, ends)):
                raise ValueError("a packed row holds tokens other than padding after its last EOS")
            counts["input"].append(sum(ends))
            counts["labels"].append(sum(int((row["labels"] != -100).sum()) for row in b))
            counts["padded"].append(len(b) * seq)
            counts["examples"].append(sum(int((row["tokens"] == EOS_ID).sum()) for row in b))
        else:
            counts["input"].append(int((b["tokens"] != tok.pad_id).sum()))
            counts["labels"].append(int((b["labels"] != -100).sum()))
            counts["padded"].append(b["tokens"].numel())
            counts["examples"].append(b["tokens"].shape[0])
    if len(counts["input"]) < steps:
        rows = "packed rows" if packed else "examples"
        raise ValueError(
            f"the dataset gives only {len(counts['input'])} batches of {batch} {rows}, fewer than {steps} steps"
        )
    return counts


class Case(NamedTuple):
    """One recipe run: ``which`` recipe, its ``loss`` (torchtune: chunked or ce), ``batch`` size and the
    config overrides beyond the common ones; ``name`` labels its output directory and rows."""

    name: str
    which: str
    loss: str
    batch: int
    overrides: Tuple[str, ...] = ()


def recipe_command(case: Case, args: argparse.Namespace, out: Path) -> List[str]:
    common = [
        f"output_dir={out}",
        f"checkpointer.checkpoint_dir={args.workdir / 'init'}",
        f"max_steps_per_epoch={args.steps}",
        f"batch_size={case.batch}",
        f"tokenizer.max_seq_len={args.seq}",
        *case.overrides,
    ]
    if case.which == "gqa_tune":
        recipe, config = "gqa_tune/recipes/full_finetune_single_device.py", "gqa_tune_full_single_device.yaml"
    else:
        recipe, config = "full_finetune_single_device", "torchtune_full_single_device.yaml"
        if case.loss == "ce":
            common.append("loss=torch.nn.CrossEntropyLoss")
    return [TUNE, "run", recipe, "--config", f"benchmarks/configs/{config}", *common]


def run_training(case: Case, args: argparse.Namespace, round_idx: int, env: dict) -> dict:
    out = args.workdir / f"{case.name}_r{round_idx}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = recipe_command(case, args, out)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "logs" / STEPS_FILE).read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    if [r["step"] for r in rows] != list(range(1, args.steps + 1)):
        raise RuntimeError(
            f"{case.name}: expected steps 1..{args.steps} logged, got {[r['step'] for r in rows][:10]}..."
        )
    return {"case": case, "round": round_idx, "command": cmd, "process_s": total, "rows": rows}


def summarize_training(run: dict, counts: Dict[str, List[int]], warmup: int) -> dict:
    rows = run["rows"]
    window = rows[warmup:]  # steps warmup+1 .. steps
    seconds = rows[-1]["time"] - rows[warmup - 1]["time"]
    step_times = [b["time"] - a["time"] for a, b in zip(rows[warmup - 1 :], window)]
    tokens = sum(counts["input"][warmup:])
    case = run["case"]
    own_key = "tokens_per_second" if case.which == "gqa_tune" else "tokens_per_second_per_gpu"
    return {
        "name": case.name,
        "which": case.which,
        "loss_fn": case.loss,
        "batch": case.batch,
        "round": run["round"],
        "timed_steps": len(window),
        "seconds": seconds,
        "ms_per_step_median": statistics.median(step_times) * 1e3,
        "tokens_per_s": tokens / seconds,
        "padded_tokens_per_s": sum(counts["padded"][warmup:]) / seconds,
        "examples_per_step": statistics.mean(counts["examples"][warmup:]),
        "own_metric": own_key,
        "own_metric_median": statistics.median(r[own_key] for r in window),
        "losses": [r["loss"] for r in rows],
        "process_s": run["process_s"],
        "command": " ".join(run["command"]),
    }


def recipe_env(args: argparse.Namespace) -> dict:
    """The recipes' environment: ``benchmarks/`` importable (for :class:`StepTimeLogger`), ``--threads``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONUNBUFFERED": "1",
    }


def prepare_runs(args: argparse.Namespace) -> float:
    """Check the step counts and write the init checkpoint; returns its torchtune vs gqa_tune logit diff."""
    if args.steps <= args.warmup_steps:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps})")
    diff = write_init_checkpoint(args.workdir / "init", args.seed)
    print(f"init checkpoint {args.workdir / 'init' / 'model.pt'}; torchtune vs gqa_tune logits max |diff| {diff:.1e}")
    return diff


def run_rounds(cases: List[Case], counts: Dict[str, Dict[str, List[int]]], args: argparse.Namespace) -> List[dict]:
    """``--rounds`` runs of every case, the order alternating from round to round; one summary per run
    (``counts``: each case's :func:`token_counts`, by name)."""
    env = recipe_env(args)
    runs = []
    for r in range(args.rounds):
        order = cases if r % 2 == 0 else cases[::-1]  # alternate who goes first
        for case in order:
            run = run_training(case, args, r, env)
            summary = summarize_training(run, counts[case.name], args.warmup_steps)
            runs.append(summary)
            print(
                f"round {r} {case.name:18s}: {summary['tokens_per_s']:8.0f} tokens/s, "
                f"{summary['ms_per_step_median']:7.1f} ms/step (median), loss step 1 {summary['losses'][0]:.5f}, "
                f"step {args.steps} {summary['losses'][-1]:.5f}, process {summary['process_s']:.1f} s"
            )
    return runs


def case_results(cases: List[Case], runs: List[dict]) -> List[dict]:
    """Per case: medians over its rounds, and the losses of its first round."""
    results = []
    for case in cases:
        mine = [s for s in runs if s["name"] == case.name]
        results.append(
            {
                "name": case.name,
                "which": case.which,
                "loss_fn": case.loss,
                "batch": case.batch,
                "examples_per_step": mine[0]["examples_per_step"],
                "tokens_per_s_median": statistics.median(s["tokens_per_s"] for s in mine),
                "tokens_per_s_all": [s["tokens_per_s"] for s in mine],
                "ms_per_step_median": statistics.median(s["ms_per_step_median"] for s in mine),
                "own_metric": mine[0]["own_metric"],
                "own_metric_median": statistics.median(s["own_metric_median"] for s in mine),
                "loss_first": mine[0]["losses"][0],
                "loss_last": mine[0]["losses"][-1],
                "losses": mine[0]["losses"],
                "command": mine[0]["command"],
            }
        )
    return results


def tt_losses(args: argparse.Namespace) -> List[str]:
    return {"chunked": ["chunked"], "ce": ["ce"], "both": ["chunked", "ce"]}[args.tt_loss]


def bench_training(args: argparse.Namespace) -> dict:
    import torch

    diff = prepare_runs(args)
    counts = token_counts(args.steps, args.batch, args.seq, "data/tasks/train.jsonl")
    cases = [Case("gqa_tune_ce", "gqa_tune", "ce", args.batch)]
    cases += [Case(f"torchtune_{loss}", "torchtune", loss, args.batch) for loss in tt_losses(args)]
    runs = run_rounds(cases, {case.name: counts for case in cases}, args)
    results = case_results(cases, runs)
    ours = results[0]
    for r in results:
        r["gqa_tune_speedup"] = ours["tokens_per_s_median"] / r["tokens_per_s_median"]
        r["max_loss_diff_vs_gqa_tune"] = max(abs(a - b) for a, b in zip(r["losses"], ours["losses"]))
    return {
        "results": results,
        "runs": runs,
        "tokens": counts,
        "init_logit_max_diff": diff,
        "threads": args.threads,
        "torch_threads_parent": torch.get_num_threads(),
    }


def print_training(train: dict, args: argparse.Namespace) -> None:
    res = train["results"]
    ours = res[0]
    print()
    print(
        f"Training, CPU fp32, gqa_tiny shape, batch {args.batch}, tokenizer max_seq_len {args.seq}, {args.steps} steps "
        f"(timed: steps {args.warmup_steps + 1}-{args.steps}), {args.threads} threads, median of {args.rounds} "
        f"round(s); tokens/s = non-padding input tokens / wall-clock time between logged steps"
    )
    print()
    rows = []
    for r in res:
        name = f"{r['which']} full_finetune_single_device"
        loss = {"ce": "cross-entropy", "chunked": "CEWithChunkedOutputLoss"}[r["loss_fn"]]
        rows.append(
            [
                name,
                loss,
                f"{r['tokens_per_s_median']:.0f}",
                f"{r['ms_per_step_median']:.1f}",
                f"{ours['tokens_per_s_median'] / r['tokens_per_s_median']:.2f}x",
                f"{r['loss_first']:.4f} / {r['loss_last']:.4f}",
                f"{r['max_loss_diff_vs_gqa_tune']:.1e}",
                f"{r['own_metric']} {r['own_metric_median']:.0f}",
            ]
        )
    print(
        markdown_table(
            [
                "recipe",
                "loss",
                "tokens/s",
                "ms/step (median)",
                "gqa_tune speedup",
                "loss step 1 / last",
                "max loss diff vs gqa_tune",
                "recipe's own metric (median)",
            ],
            rows,
        )
    )
    print()
    for r in res[1:]:
        ok = "met" if r["gqa_tune_speedup"] >= 1.1 else "NOT met"
        print(f"goal: training >= 1.1x torchtune ({r['loss_fn']} loss): {r['gqa_tune_speedup']:.2f}x, {ok}")
    print("commands (paths as run):")
    for r in res:
        print(f"  {r['command']}")


# ---------------------------------------------------------------- (c) packed training

#: Steps of the packed mode's loss comparison (the first ones, before the runs can drift apart).
FIRST_STEPS = 5


def packed_cases(args: argparse.Namespace, unpacked_batch: int) -> List[Case]:
    """The packed mode's runs: gqa_tune packed, gqa_tune unpacked (``unpacked_batch`` examples per step),
    torchtune packed with each ``--tt-loss``; none shuffled, model ``max_seq_len`` ``--seq``."""
    model_len = f"model.max_seq_len={args.seq}"
    packed = ("dataset.packed=true", "shuffle=false", model_len)
    cases = [
        Case("gqa_tune_packed", "gqa_tune", "ce", args.batch, packed),
        Case("gqa_tune_unpacked", "gqa_tune", "ce", unpacked_batch, ("shuffle=false", model_len)),
    ]
    return cases + [Case(f"torchtune_packed_{loss}", "torchtune", loss, args.batch, packed) for loss in tt_losses(args)]


def bench_packed_training(args: argparse.Namespace) -> dict:
    """gqa_tune packed, gqa_tune unpacked on the same examples, torchtune packed: see the module docstring."""
    data = "data/tasks/train.jsonl"
    diff = prepare_runs(args)
    packed_counts = token_counts(args.steps, args.batch, args.seq, data, packed=True, shuffle=False)
    # The same examples in the same order: packs hold consecutive examples and nothing is shuffled, so
    # `steps` unpacked steps of this batch cover the packed run's examples to within steps / 2 examples.
    unpacked_batch = round(sum(packed_counts["examples"]) / args.steps)
    unpacked_counts = token_counts(args.steps, unpacked_batch, args.seq, data, shuffle=False)
    cases = packed_cases(args, unpacked_batch)
    counts = {case.name: unpacked_counts if case.name == "gqa_tune_unpacked" else packed_counts for case in cases}
    runs = run_rounds(cases, counts, args)
    results = case_results(cases, runs)
    ours, unpacked = results[0], results[1]
    first = min(FIRST_STEPS, args.steps)
    for r in results:
        r["tokens_in_timed_steps"] = sum(counts[r["name"]]["input"][args.warmup_steps :])
        r["examples_in_run"] = sum(counts[r["name"]]["examples"])
        r["speedup_of_gqa_tune_packed"] = ours["tokens_per_s_median"] / r["tokens_per_s_median"]
        diffs = [abs(a - b) for a, b in zip(r["losses"], ours["losses"])]
        r["loss_diff_first_steps_vs_gqa_tune_packed"] = max(diffs[:first])
        r["max_loss_diff_vs_gqa_tune_packed"] = max(diffs)
    return {
        "results": results,
        "runs": runs,
        "tokens": counts,
        "unpacked_batch": unpacked_batch,
        "packed_vs_unpacked": ours["tokens_per_s_median"] / unpacked["tokens_per_s_median"],
        "init_logit_max_diff": diff,
        "threads": args.threads,
    }


def print_packed_training(res: dict, args: argparse.Namespace) -> None:
    results = res["results"]
    ours = results[0]
    print()
    print(
        f"Packed training, CPU fp32, gqa_tiny shape with model max_seq_len {args.seq}, {args.steps} steps (timed: "
        f"steps {args.warmup_steps + 1}-{args.steps}), {args.threads} threads, median of {args.rounds} round(s), "
        f"no shuffling; packed: {args.batch} rows of {args.seq} tokens per step; unpacked: {res['unpacked_batch']} "
        f"examples per step, padded to the longest; tokens/s = non-padding input tokens / wall-clock time "
        f"between logged steps"
    )
    print()
    rows = []
    for r in results:
        loss = {"ce": "cross-entropy", "chunked": "CEWithChunkedOutputLoss"}[r["loss_fn"]]
        rows.append(
            [
                r["name"],
                loss,
                r["batch"],
                f"{r['examples_per_step']:.1f}",
                f"{r['tokens_per_s_median']:.0f}",
                f"{r['ms_per_step_median']:.1f}",
                f"{r['speedup_of_gqa_tune_packed']:.2f}x",
                f"{r['loss_first']:.4f} / {r['loss_last']:.4f}",
                f"{r['loss_diff_first_steps_vs_gqa_tune_packed']:.1e}",
                f"{r['own_metric']} {r['own_metric_median']:.0f}",
            ]
        )
    print(
        markdown_table(
            [
                "run",
                "loss",
                "batch",
                "examples/step",
                "tokens/s",
                "ms/step (median)",
                "gqa_tune packed speedup",
                "loss step 1 / last",
                f"loss diff vs gqa_tune packed, steps 1-{min(FIRST_STEPS, args.steps)}",
                "recipe's own metric (median)",
            ],
            rows,
        )
    )
    print()
    examples = f"{ours['examples_in_run']} packed, {results[1]['examples_in_run']} unpacked"
    print(f"gqa_tune packed vs unpacked: {res['packed_vs_unpacked']:.2f}x tokens/s (examples in the run: {examples})")
    for r in results[2:]:
        ok = "met" if r["speedup_of_gqa_tune_packed"] >= 3 else "NOT met"
        print(
            f"goal: gqa_tune packed >= 3x torchtune packed ({r['loss_fn']} loss): "
            f"{r['speedup_of_gqa_tune_packed']:.2f}x, {ok}; losses differ by at most "
            f"{r['max_loss_diff_vs_gqa_tune_packed']:.1e} over the {args.steps} steps"
        )
    print("commands (paths as run):")
    for r in results:
        print(f"  {r['command']}")


# ---------------------------------------------------------------- (b) decoding


def bench_decode(args: argparse.Namespace) -> dict:
    import torch
    from torchtune.generation import generate as tt_generate
    from torchtune.generation import generate_next_token

    from gqa_tune import swap_attention
    from gqa_tune.data import PAD_ID
    from gqa_tune.training.generation import generate as gqa_generate
    from gqa_tune.training.generation import kv_cache_bytes

    if args.context + args.new_tokens + 1 > args.cache:
        raise SystemExit(f"--context + --new-tokens + 1 must fit in --cache ({args.cache})")
    torch.manual_seed(args.seed)
    tt = tiny_llama3_2(args.cache).eval()
    with torch.no_grad():  # N(0, 0.3) matrices: clear margins between the top logits, so greedy tokens compare
        for p in tt.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    ours = copy.deepcopy(tt)
    swapped = swap_attention(ours, backend=args.backend)
    ours_tt_harness = copy.deepcopy(ours)
    dtype = torch.float32
    for model in (tt, ours_tt_harness):
        model.setup_caches(batch_size=1, dtype=dtype, decoder_max_seq_len=args.cache)
    prompt = torch.randint(0, 256, (1, args.context), generator=torch.Generator().manual_seed(args.seed))
    n_generated = args.new_tokens + 1  # one from the prefill, then --new-tokens one-token steps

    def run_torchtune(model) -> dict:
        model.reset_caches()
        stamps: List[float] = []

        def next_token(m, **kwargs):  # torchtune calls this for the one-token steps only
            if not stamps:
                stamps.append(time.perf_counter())
            return generate_next_token(m, **kwargs)

        start = time.perf_counter()
        tokens, _ = tt_generate(
            model,
            prompt,
            max_generated_tokens=n_generated,
            pad_id=PAD_ID,
            temperature=0.0,
            top_k=None,
            stop_tokens=None,
            custom_generate_next_token=next_token,
        )
        end = time.perf_counter()
        return {
            "prefill_s": stamps[0] - start,
            "decode_s": end - stamps[0],
            "tokens": tokens[0, args.context :].tolist(),
            "kv_cache_bytes": kv_cache_bytes(model),
        }

    def run_gqa() -> dict:
        # pad_id -1: the prompt has no padding, and a random model may emit PAD_ID, which would cut the output.
        result = gqa_generate(ours, [prompt[0].tolist()], max_new_tokens=n_generated, pad_id=-1, stop_tokens=())
        assert result.decode_tokens == args.new_tokens
        return {
            "prefill_s": result.prefill_seconds,
            "decode_s": result.decode_seconds,
            "tokens": result.tokens[0],
            "kv_cache_bytes": result.kv_cache_bytes,
        }

    cases = {
        "torchtune": ("torchtune llama3_2", "torchtune.generation.generate", args.cache, lambda: run_torchtune(tt)),
        "gqa_tune_tt_harness": (
            "gqa_tune attention",
            "torchtune.generation.generate",
            args.cache,
            lambda: run_torchtune(ours_tt_harness),
        ),
        "gqa_tune": ("gqa_tune attention", "gqa_tune generate", args.context + n_generated, run_gqa),
    }
    times: Dict[str, List[dict]] = {name: [] for name in cases}
    for round_idx in range(args.decode_warmup + args.repeats):
        for name, (*_, fn) in cases.items():
            out = fn()
            if round_idx >= args.decode_warmup:
                times[name].append(out)
    results = []
    reference = times["torchtune"][0]["tokens"]
    for name, (model_name, harness, cache_len, _) in cases.items():
        runs = times[name]
        decode_s = statistics.median(r["decode_s"] for r in runs)
        prefill_s = statistics.median(r["prefill_s"] for r in runs)
        same = sum(a == b for a, b in zip(runs[0]["tokens"], reference))
        results.append(
            {
                "name": name,
                "model": model_name,
                "harness": harness,
                "cache_positions": cache_len,
                "kv_cache_bytes": runs[0]["kv_cache_bytes"],
                "prefill_tokens_per_s": args.context / prefill_s,
                "decode_tokens_per_s": args.new_tokens / decode_s,
                "decode_ms_per_token": decode_s / args.new_tokens * 1e3,
                "decode_s_all": [r["decode_s"] for r in runs],
                "tokens_equal_to_torchtune": f"{same}/{len(reference)}",
            }
        )
    base = results[0]["decode_tokens_per_s"]
    for r in results:
        r["decode_speedup"] = r["decode_tokens_per_s"] / base
    forward = forward_times(tt, ours_tt_harness, sorted({16, args.context}), args)
    return {"results": results, "forward": forward, "swapped_modules": swapped}


def forward_times(tt, ours, fills: List[int], args: argparse.Namespace) -> List[dict]:
    """Median ms of one model forward of one token (torchtune's decoding call: mask ``[1, 1, cache]``,
    ``input_pos``) at each cache fill, for both models with their ``--cache``-position caches: the
    part of a decode step outside the generation loop, and how much of it depends on the fill."""
    import torch

    def rewind(model) -> None:
        for layer in model.layers:
            cache = layer.attn.kv_cache
            if hasattr(cache, "truncate"):  # gqa_tune's cache
                cache.truncate(cache.size - 1)
            else:
                cache.cache_pos.sub_(1)

    rows = []
    x = torch.tensor([[5]])
    for fill in fills:
        row = {"fill": fill}
        prompt = torch.randint(0, 256, (1, fill), generator=torch.Generator().manual_seed(args.seed))
        mask = (torch.arange(args.cache) <= fill).view(1, 1, args.cache)
        pos = torch.tensor([[fill]])
        for name, model in (("torchtune", tt), ("gqa_tune", ours)):
            model.reset_caches()
            with torch.inference_mode():
                prefill_mask = torch.tril(torch.ones(fill, args.cache, dtype=torch.bool))[None]
                model(prompt, input_pos=torch.arange(fill)[None], mask=prefill_mask)
                times = []
                for i in range(args.forward_repeats + 5):
                    start = time.perf_counter()
                    model(x, input_pos=pos, mask=mask)
                    if i >= 5:
                        times.append(time.perf_counter() - start)
                    rewind(model)  # same fill every time
            row[f"{name}_ms"] = statistics.median(times) * 1e3
        rows.append(row)
    return rows


def print_decode(dec: dict, args: argparse.Namespace) -> None:
    print()
    print(
        f"Decoding, CPU fp32, gqa_tiny shape with max_seq_len {args.cache}, batch 1, greedy, prompt {args.context} "
        f"random tokens, {args.new_tokens} one-token steps, {args.threads} threads, median of {args.repeats}"
    )
    print()
    rows = [
        [
            r["model"],
            r["harness"],
            r["cache_positions"],
            f"{r['kv_cache_bytes'] / 2**20:.2f}",
            f"{r['prefill_tokens_per_s']:.0f}",
            f"{r['decode_ms_per_token']:.2f}",
            f"{r['decode_tokens_per_s']:.0f}",
            f"{r['decode_speedup']:.2f}x",
            r["tokens_equal_to_torchtune"],
        ]
        for r in dec["results"]
    ]
    print(
        markdown_table(
            [
                "attention",
                "generation loop",
                "cache positions",
                "KV cache MiB",
                "prefill tokens/s",
                "decode ms/token",
                "decode tokens/s",
                "vs torchtune",
                "same tokens",
            ],
            rows,
        )
    )
    print()
    print(
        f"One model forward of one token (torchtune's decoding call, {args.cache}-position caches), median of "
        f"{args.forward_repeats}, without the generation loop:"
    )
    print()
    print(
        markdown_table(
            ["cache fill", "torchtune ms", "gqa_tune ms", "ratio"],
            [
                [f["fill"], f"{f['torchtune_ms']:.3f}", f"{f['gqa_tune_ms']:.3f}", f"{f['torchtune_ms'] / g:.2f}x"]
                for f, g in ((f, f["gqa_tune_ms"]) for f in dec["forward"])
            ],
        )
    )
    print()
    for r in dec["results"][1:]:
        ok = "met" if r["decode_speedup"] >= 5 else "NOT met"
        print(f"goal: decode >= 5x torchtune at {args.context} context ({r['model']}, {r['harness']}): "
              f"{r['decode_speedup']:.2f}x, {ok}")  # fmt: skip


# ---------------------------------------------------------------- main


#: Per-mode defaults of the training options left unset on the command line.
TRAIN = {"steps": 100, "warmup_steps": 10, "batch": 64, "seq": 64, "tt_loss": "both"}
PACKED = {"steps": 8, "warmup_steps": 2, "batch": 4, "seq": 2048, "tt_loss": "chunked"}
MODE_DEFAULTS = {"train": TRAIN, "packed": PACKED}


def with_defaults(args: argparse.Namespace, defaults: Dict[str, object]) -> argparse.Namespace:
    """``args`` with the training options it leaves unset (None) taken from ``defaults``."""
    resolved = argparse.Namespace(**vars(args))
    for key, value in defaults.items():
        if getattr(resolved, key) is None:
            setattr(resolved, key, value)
    return resolved


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["train", "decode", "packed", "all"], default="all")
    per_mode = {key: "; ".join(f"{mode} {values[key]}" for mode, values in MODE_DEFAULTS.items()) for key in TRAIN}
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {per_mode['steps']})")
    parser.add_argument(
        "--warmup-steps", type=int, help=f"first steps left out of the timing (default {per_mode['warmup_steps']})"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each recipe (alternating order)")
    parser.add_argument("--batch", type=int, help=f"examples (packed: rows) per step (default {per_mode['batch']})")
    parser.add_argument(
        "--seq",
        type=int,
        help=f"tokenizer max_seq_len: samples truncated to it; packed: the row length and the model's "
        f"max_seq_len (default {per_mode['seq']})",
    )
    parser.add_argument(
        "--tt-loss",
        choices=["chunked", "ce", "both"],
        help="torchtune's loss: CEWithChunkedOutputLoss (its configs' default) and/or torch.nn.CrossEntropyLoss "
        f"(default {per_mode['tt_loss']})",
    )
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens before decoding")
    parser.add_argument("--cache", type=int, default=4096, help="model max_seq_len and torchtune's cache positions")
    parser.add_argument("--new-tokens", type=int, default=64, help="one-token decode steps after the prefill")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per case")
    parser.add_argument("--decode-warmup", type=int, default=1, help="untimed generations per case first")
    parser.add_argument("--forward-repeats", type=int, default=100, help="timed one-token forwards per model and fill")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--backend", default="auto", help="gqa_tune attention backend for decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gqa_tune_bench_recipes"))
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    args.workdir = args.workdir.resolve()
    env = environment()
    print_environment(env)
    data: Dict[str, object] = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.mode in ("train", "all"):
        train_args = with_defaults(args, TRAIN)
        data["train"] = bench_training(train_args)
        print_training(data["train"], train_args)
    if args.mode in ("packed", "all"):
        packed_args = with_defaults(args, PACKED)
        data["packed"] = bench_packed_training(packed_args)
        print_packed_training(data["packed"], packed_args)
    if args.mode in ("decode", "all"):
        data["decode"] = bench_decode(args)
        print_decode(data["decode"], args)
    env["loadavg_1min_end"] = os.getloadavg()[0]
    print(f"\n1-min load average at the end {env['loadavg_1min_end']:.2f}")
    write_json(args.json, data)


if __name__ == "__main__":
    main()
