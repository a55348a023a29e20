"""What training throughput do gqa_tune's recipes reach against torchtune 0.6.1's, end to end, unpacked and packed?

Both recipes run through ``tune run`` (configs ``benchmarks/configs/``) on gqa_tiny's shape (torchtune's side: its
``llama3_2`` as that config writes it, checked to compute the same function), from the same init weights, on the
same batches (the losses agree), each run its own process, the order alternating between rounds. Both log every
step through :class:`StepTimeLogger`: tokens/s = non-padding input tokens of the timed steps / the time between
their stamps, everything a step costs; ms/step: median (IQR). ``--mode train``: batch 64, 100 steps, torchtune with
its chunked loss and/or cross-entropy (``--tt-loss``). ``--mode packed`` (issue 11): ``max_seq_len`` 2048, no
shuffling; gqa_tune packed (BlockMask collate), gqa_tune unpacked on the same examples, torchtune packed (dense
block-causal mask).

Commands::

    .venv/bin/python benchmarks/bench_recipes.py --mode train --threads 1 --rounds 3
    .venv/bin/python benchmarks/bench_recipes.py --mode packed --threads 1 --tt-loss both
    .venv/bin/python benchmarks/bench_recipes.py --smoke   # both modes, 3 steps each, about a minute
"""

import argparse
import json
import numbers
import shutil
import statistics
from functools import partial
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import _harness as H
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchtune.data import padded_collate_sft

from gqa_tune.data import EOS_ID, ByteTokenizer, task_dataset
from gqa_tune.models import gqa_tiny, init_from_scratch

STEPS_FILE = "steps.jsonl"
TRAIN = {"steps": 100, "warmup_steps": 10, "batch": 64, "seq": 64, "tt_loss": "both"}
PACKED = {"steps": 8, "warmup_steps": 2, "batch": 4, "seq": 2048, "tt_loss": "chunked"}
SMOKE = {"train": dict(TRAIN, steps=3, warmup_steps=1, batch=8, tt_loss="chunked"),
         "packed": dict(PACKED, steps=3, warmup_steps=1, batch=2, seq=256)}  # fmt: skip
FIRST_STEPS = 5  # the packed runs' losses are compared over the first steps, before they can drift apart


class StepTimeLogger:
    """torchtune metric logger: every ``log_dict`` call stamped by ``torch.utils.benchmark``'s timer, the rows
    written to ``<log_dir>/steps.jsonl`` on ``close``. Both recipes log through it, so one code times both."""

    def __init__(self, log_dir: str, **kwargs) -> None:
        self.path, self.rows = Path(log_dir) / STEPS_FILE, []

    def log_config(self, config) -> None:
        pass

    def log(self, name: str, data, step: int) -> None:
        self.log_dict({name: data}, step)

    def log_dict(self, payload: dict, step: int) -> None:
        values = {k: float(v) for k, v in payload.items() if isinstance(v, (numbers.Number, torch.Tensor))}
        self.rows.append({"step": int(step), "time": H.timer(), **values})

    def close(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))


class Case(NamedTuple):
    """One recipe run: ``which`` recipe, its ``loss`` (torchtune: chunked or ce), ``batch`` and extra overrides."""

    name: str
    which: str
    loss: str
    batch: int
    overrides: Tuple[str, ...] = ()


def recipe_command(case: Case, args: argparse.Namespace, out: Path) -> List[str]:
    """The ``tune run`` command of ``case``, writing to ``out``."""
    overrides = [f"output_dir={out}", f"checkpointer.checkpoint_dir={args.workdir / 'init'}",
                 f"max_steps_per_epoch={args.steps}", f"batch_size={case.batch}", f"tokenizer.max_seq_len={args.seq}",
                 *case.overrides]  # fmt: skip
    if case.which == "gqa_tune":
        recipe, config = H.FULL, "gqa_tune_full_single_device.yaml"
    else:
        recipe, config = "full_finetune_single_device", "torchtune_full_single_device.yaml"
        overrides += ["loss=torch.nn.CrossEntropyLoss"] if case.loss == "ce" else []
    return [H.TUNE, "run", recipe, "--config", f"benchmarks/configs/{config}", *overrides]


def tt_losses(args) -> List[str]:
    return ["chunked", "ce"] if args.tt_loss == "both" else [args.tt_loss]


def packed_cases(args: argparse.Namespace, unpacked_batch: int) -> List[Case]:
    """gqa_tune packed, gqa_tune unpacked (``unpacked_batch`` examples per step), torchtune packed per loss."""
    length, packed = f"model.max_seq_len={args.seq}", ("dataset.packed=true", "shuffle=false")
    theirs = [Case(f"torchtune_packed_{x}", "torchtune", x, args.batch, (*packed, length)) for x in tt_losses(args)]
    return [Case("gqa_tune_packed", "gqa_tune", "ce", args.batch, (*packed, length)),
            Case("gqa_tune_unpacked", "gqa_tune", "ce", unpacked_batch, ("shuffle=false", length)), *theirs]


def write_init_checkpoint(directory: Path, seed: int) -> None:
    """gqa_tune's from-scratch init in torchtune's model, as ``directory/model.pt``; checked to compute
    gqa_tiny's function."""
    torch.manual_seed(seed)
    tt, ours = init_from_scratch(H.llama("tiny", 128)), gqa_tiny(max_seq_len=128)
    ours.load_state_dict(tt.state_dict())  # strict: same keys and shapes
    x = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tt(x), rtol=1e-4, atol=1e-4)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(tt.state_dict(), directory / "model.pt")


def token_counts(steps: int, batch: int, seq: int, packed: bool = False, shuffle: bool = True) -> Dict[str, list]:
    """Per step, the input (non-padding) tokens and examples of the batches the recipes draw (sampler seed 0,
    ``drop_last``). A packed row's documents each end with EOS, then padding: its tokens are those up to its
    last EOS."""
    tok = ByteTokenizer(max_seq_len=seq)
    dataset = task_dataset(tok, data_file="data/tasks/train.jsonl", packed=packed)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=0)
    collate = list if packed else partial(padded_collate_sft, padding_idx=tok.pad_id, ignore_idx=-100)
    counts = {"input": [], "examples": []}
    for b in DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, collate_fn=collate):
        if len(counts["input"]) == steps:
            break
        if packed:
            ends = [int(torch.nonzero(row["tokens"] == EOS_ID).max()) + 1 for row in b]
            if any(bool((row["tokens"][end:] != 0).any()) for row, end in zip(b, ends)):
                raise ValueError("a packed row holds tokens other than padding after its last EOS")
            counts["input"].append(sum(ends))
            counts["examples"].append(sum(int((row["tokens"] == EOS_ID).sum()) for row in b))
        else:
            counts["input"].append(int((b["tokens"] != tok.pad_id).sum()))
            counts["examples"].append(b["tokens"].shape[0])
    if len(counts["input"]) < steps:
        raise ValueError(f"the dataset gives only {len(counts['input'])} batches of {batch}, fewer than {steps} steps")
    return counts


def run_rounds(cases: List[Case], counts: Dict[str, dict], args) -> List[dict]:
    """Per case: medians over ``--rounds`` runs (the order alternating), losses of its first run."""
    env = {"PYTHONPATH": str(H.HERE)}  # for StepTimeLogger
    runs: Dict[str, list] = {case.name: [] for case in cases}
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            out = args.workdir / f"{case.name}_r{r}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = recipe_command(case, args, out)
            H.tune_run(cmd[2], cmd[4], cmd[5:], args.threads, env)
            rows = [json.loads(line) for line in (out / "logs" / STEPS_FILE).read_text().splitlines()]
            rows = [row for row in rows if "loss" in row]
            if [row["step"] for row in rows] != list(range(1, args.steps + 1)):
                raise SystemExit(f"{case.name}: expected steps 1..{args.steps} logged, got {[r['step'] for r in rows]}")
            w = args.warmup_steps
            own = "tokens_per_second" if case.which == "gqa_tune" else "tokens_per_second_per_gpu"
            runs[case.name].append({
                "tokens_per_s": sum(counts[case.name]["input"][w:]) / (rows[-1]["time"] - rows[w - 1]["time"]),
                "step_s": [b["time"] - a["time"] for a, b in zip(rows[w - 1 :], rows[w:])],
                "own": statistics.median(row[own] for row in rows[w:]), "losses": [row["loss"] for row in rows],
            })  # fmt: skip
            print(f"round {r} {case.name}: {runs[case.name][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    return [{"case": case, "tokens_per_s": statistics.median(run["tokens_per_s"] for run in runs[case.name]),
             "rounds": [run["tokens_per_s"] for run in runs[case.name]], "losses": runs[case.name][0]["losses"],
             "step": H.measurement(case.name, [t for run in runs[case.name] for t in run["step_s"]]),
             "own": statistics.median(run["own"] for run in runs[case.name]),
             "examples_per_step": statistics.mean(counts[case.name]["examples"])} for case in cases]  # fmt: skip


def bench(args, mode: str) -> List[dict]:
    """The runs of ``mode``, their table, and the issue's goal (gqa_tune 1.1x torchtune; packed: 3x)."""
    if mode == "train":
        counts = token_counts(args.steps, args.batch, args.seq)
        cases = [Case("gqa_tune_ce", "gqa_tune", "ce", args.batch)]
        cases += [Case(f"torchtune_{loss}", "torchtune", loss, args.batch) for loss in tt_losses(args)]
        counts, first, goal, what = {c.name: counts for c in cases}, args.steps, 1.1, f"batch {args.batch}"
    else:
        packed_counts = token_counts(args.steps, args.batch, args.seq, packed=True, shuffle=False)
        unpacked = round(sum(packed_counts["examples"]) / args.steps)  # examples per step: the same examples
        cases = packed_cases(args, unpacked)
        counts = {c.name: token_counts(args.steps, unpacked, args.seq, shuffle=False) if c.name == "gqa_tune_unpacked"
                  else packed_counts for c in cases}  # fmt: skip
        first, goal = min(FIRST_STEPS, args.steps), 3
        what = f"no shuffling, packed: {args.batch} rows, unpacked: {unpacked} examples"
    results, ours, rows = run_rounds(cases, counts, args), None, []
    for r in results:
        ours, c = ours or r, r["case"]
        diff = [abs(a - b) for a, b in zip(r["losses"], ours["losses"])]
        r.update(speedup=ours["tokens_per_s"] / r["tokens_per_s"], max_loss_diff=max(diff),
                 loss_diff_first=max(diff[:first]))  # fmt: skip
        own = "tokens_per_second" if c.which == "gqa_tune" else "tokens_per_second_per_gpu"
        rounds = ", ".join(f"{t:.0f}" for t in r["rounds"])
        rows.append([c.name, {"ce": "cross-entropy", "chunked": "CEWithChunkedOutputLoss"}[c.loss], c.batch,
                     f"{r['examples_per_step']:.1f}", f"{r['tokens_per_s']:.0f} ({rounds})", H.fmt(r["step"], digits=1),
                     f"{r['speedup']:.2f}x", f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}",
                     f"{r['loss_diff_first']:.1e} / {r['max_loss_diff']:.1e}", f"{own} {r['own']:.0f}"])  # fmt: skip
    H.table(["run", "loss", "batch", "examples/step", "tokens/s (rounds)", "ms/step (IQR)",
             f"{ours['case'].name} speedup", "loss step 1 / last", f"max loss diff, steps 1-{first} / all",
             "recipe's own metric (median)"], rows,
            f"{mode} mode, CPU fp32, gqa_tiny's shape, max_seq_len {args.seq}, {what}, {args.steps} steps "
            f"({args.warmup_steps} untimed), {args.threads} threads, median of {args.rounds} round(s)")  # fmt: skip
    for r in results:
        if r["case"].which == "torchtune":
            print(f"goal: {ours['case'].name} >= {goal}x {r['case'].name}: {r['speedup']:.2f}x, "
                  f"{'met' if r['speedup'] >= goal else 'NOT met'}")  # fmt: skip
    return results


def build_parser() -> argparse.ArgumentParser:
    p = H.parser(__doc__)
    p.add_argument("--mode", choices=["train", "packed", "all"], default="all")
    p.add_argument("--steps", type=int, help="training steps per run (train 100, packed 8)")
    p.add_argument("--warmup-steps", type=int, help="first steps left out of the timing (train 10, packed 2)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each recipe (alternating order)")
    p.add_argument("--batch", type=int, help="examples (packed: rows) per step (train 64, packed 4)")
    p.add_argument("--seq", type=int, help="tokenizer max_seq_len; packed: also the rows' and the model's (64, 2048)")
    p.add_argument("--tt-loss", choices=["chunked", "ce", "both"], help="torchtune's loss (train both, packed chunked)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gqa_tune_bench_recipes"))
    return p


def with_defaults(args: argparse.Namespace, defaults: Dict[str, object]) -> argparse.Namespace:
    """``args`` with the options it leaves unset (None) taken from ``defaults``."""
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}})


def main() -> None:
    args = build_parser().parse_args()
    env = H.start(args)
    args.threads, args.workdir = env["threads"], args.workdir.resolve()
    data = {}
    for mode, defaults in (("train", TRAIN), ("packed", PACKED)):
        if args.mode in (mode, "all"):
            mode_args = with_defaults(args, SMOKE[mode] if args.smoke else defaults)
            if mode_args.steps <= mode_args.warmup_steps:
                raise SystemExit(f"--steps ({mode_args.steps}) must exceed --warmup-steps ({mode_args.warmup_steps})")
            if args.smoke:
                mode_args.rounds = 1
            write_init_checkpoint(args.workdir / "init", args.seed)
            data[mode] = bench(mode_args, mode)
    H.finish(args, env, {mode: [dict(r, case=r["case"]._asdict()) for r in results] for mode, results in data.items()})


if __name__ == "__main__":
    main()
