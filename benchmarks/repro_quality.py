"""Small-scale reproduction of the GQA paper's uptraining results (Ainslie et al., 2023, Table/Figs. 3-6).

    .venv/bin/python benchmarks/repro_quality.py            # P=500 pre-training steps, 2 seeds
    .venv/bin/python benchmarks/repro_quality.py --quick    # P=250, the same grid (about half the time)

For each seed: pre-train the small MHA model (configs/gqa_small/mha_pretrain.yaml: 8 heads, 8 kv heads)
for P steps at batch 32; convert it to {4, 2, 1} kv heads with {mean, first, random} pooling and uptrain
for 5% and 10% of P (recipes/uptrain.py, configs/gqa_small/uptrain.yaml); as references, continue the MHA
model for the same extra steps (the uptrain recipe with num_kv_heads=8, the identity conversion: same
schedule, same data), and train GQA models with the same kv heads from scratch for P + extra steps.
Every model is evaluated on data/tasks/val.jsonl (held-out loss; greedy accuracy on 200 examples); the
uptrained ones also right after conversion (before any uptraining).

Runs go in-process in worker processes (``--workers``, default 2, one thread each). Longer uptraining
(``--long-fractions``, default 25% and 100% of P) is run for mean pooling only, with the same references.
Writes ``docs/repro/quality.json``, ``docs/repro/quality_loss.png`` and ``quality_accuracy.png`` (5% and 10%),
``docs/repro/quality_recovery.png`` (loss vs uptraining steps) and ``docs/repro/quality.md`` (the tables),
and prints the tables.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs/gqa_small/mha_pretrain.yaml"
UPTRAIN = REPO / "configs/gqa_small/uptrain.yaml"
NUM_HEADS = 8
EPOCH_STEPS = 625  # 20000 training examples at batch 32


# ---------------------------------------------------------------- one run (in a worker process)


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    os.chdir(REPO)


def run_job(job: dict) -> dict:
    """Run one training job in this process; returns its eval results and timing."""
    from omegaconf import OmegaConf

    out = Path(job["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(job["config"])
    for key, value in job["overrides"].items():
        OmegaConf.update(cfg, key, value, force_add=True)
    start = time.perf_counter()
    with open(out / "run.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if job["kind"] in ("pretrain", "scratch"):
            from gqa_tune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice as Recipe
        else:
            from gqa_tune.recipes.uptrain import UptrainRecipe as Recipe
        recipe = Recipe(cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()
    result = {k: v for k, v in job.items() if k not in ("overrides", "config")}
    result.update(
        eval=dict(recipe.eval_results),
        before=dict(recipe.eval_before) if getattr(recipe, "eval_before", None) else None,
        steps=recipe.global_step,
        final_train_loss=recipe.loss_history[-1] if recipe.loss_history else None,
        seconds=time.perf_counter() - start,
    )
    return result


# ---------------------------------------------------------------- the grid


def make_jobs(args, root: Path):
    """(first jobs, {seed: jobs that need that seed's pre-trained model})."""
    first, after = [], {}
    for seed in args.seeds:
        pre_dir = root / f"seed{seed}/mha_pretrain"
        first.append(
            {
                "kind": "pretrain", "seed": seed, "kv": NUM_HEADS, "method": None, "fraction": 0.0,
                "config": str(PRETRAIN), "output_dir": str(pre_dir),
                "overrides": {"output_dir": str(pre_dir), "seed": seed, "epochs": 1,
                              "max_steps_per_epoch": args.pretrain_steps, "log_every_n_steps": 25},
            }
        )  # fmt: skip
        after[seed] = []
        for fraction in args.fractions + args.long_fractions:
            methods = args.methods if fraction in args.fractions else ["mean"]
            extra = max(1, round(fraction * args.pretrain_steps))
            total = args.pretrain_steps + extra
            epochs = math.ceil(total / EPOCH_STEPS)  # past one epoch: equal epochs (total rounded up)
            for kv in args.kv_heads:
                d = root / f"seed{seed}/scratch_kv{kv}_f{fraction}"
                first.append(
                    {
                        "kind": "scratch", "seed": seed, "kv": kv, "method": None, "fraction": fraction,
                        "config": str(PRETRAIN), "output_dir": str(d),
                        "overrides": {"output_dir": str(d), "seed": seed, "model.num_kv_heads": kv, "epochs": epochs,
                                      "max_steps_per_epoch": math.ceil(total / epochs), "log_every_n_steps": 25},
                    }
                )  # fmt: skip
            grid = [(NUM_HEADS, "mean")] + [(kv, m) for kv in args.kv_heads for m in methods]
            for kv, method in grid:
                kind = "mha_continued" if kv == NUM_HEADS else "uptrain"
                d = root / f"seed{seed}/{kind}_kv{kv}_{method}_f{fraction}"
                after[seed].append(
                    {
                        "kind": kind, "seed": seed, "kv": kv, "method": method if kind == "uptrain" else None,
                        "fraction": fraction, "config": str(UPTRAIN), "output_dir": str(d),
                        "overrides": {
                            "output_dir": str(d), "source_checkpoint_dir": str(pre_dir),
                            # another data order than pre-training's first epoch; conversion seed = seed
                            "seed": seed + 1000, "conversion_seed": seed,
                            "num_kv_heads": kv, "method": method,
                            "uptrain_fraction": fraction, "uptrain_steps": None, "eval_before_uptrain": True,
                        },
                    }
                )  # fmt: skip
    return first, after


def run_all(args, root: Path):
    first, after = make_jobs(args, root)
    total = len(first) + sum(len(v) for v in after.values())
    results, t0 = [], time.perf_counter()
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_init_worker) as pool:
        pending = {pool.submit(run_job, job): job for job in first}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                result = future.result()
                results.append(result)
                e = result["eval"]
                print(
                    f"[{len(results)}/{total} {time.perf_counter() - t0:6.0f}s] {job['kind']:13s} seed {job['seed']} "
                    f"kv {job['kv']} {job['method'] or '-':6s} f {job['fraction']:<5} steps {result['steps']:4d}: "
                    f"loss {e['heldout_loss']:.4f} acc {e.get('accuracy_all', float('nan')):.3f} "
                    f"({result['seconds']:.0f}s)",
                    flush=True,
                )
                if job["kind"] == "pretrain":  # its uptraining runs go first: they are short
                    for j in after[job["seed"]]:
                        pending[pool.submit(run_job, j)] = j
    return results, time.perf_counter() - t0


# ---------------------------------------------------------------- summary


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(results, args):
    """Mean / std / min / max over seeds for every (kind, kv, method, fraction)."""
    groups = {}
    for r in results:
        groups.setdefault((r["kind"], r["kv"], r["method"], r["fraction"]), []).append(r)
    rows = []
    for (kind, kv, method, fraction), rs in sorted(groups.items(), key=lambda x: (x[0][3], x[0][0], -x[0][1])):
        row = {"kind": kind, "kv": kv, "method": method, "fraction": fraction, "steps": rs[0]["steps"]}
        for metric in ("heldout_loss", "accuracy_all", "accuracy_copy", "accuracy_add"):
            row[metric] = _stats([r["eval"].get(metric) for r in rs])
            row[f"converted_{metric}"] = (
                _stats([(r["before"] or {}).get(metric) for r in rs]) if rs[0]["before"] else None
            )
        rows.append(row)
    return rows


def _fmt(s, digits=3, pct=False):
    if s is None:
        return "-"
    if pct:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def tables(rows, args) -> str:
    lines = []
    pre = [r for r in rows if r["kind"] == "pretrain"]
    for fraction in args.fractions + args.long_fractions:
        extra = max(1, round(fraction * args.pretrain_steps))
        lines += [
            f"### Uptraining {fraction:.0%} of P ({extra} steps; P = {args.pretrain_steps}), "
            f"mean ± std over {len(args.seeds)} seeds",
            "",
            "| model | kv heads | method | train steps | held-out loss | accuracy % "
            "| right after conversion: loss | acc % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in pre:
            lines.append(
                f"| MHA pre-trained (P) | {r['kv']} | - | {r['steps']} | {_fmt(r['heldout_loss'])} | "
                f"{_fmt(r['accuracy_all'], pct=True)} | - | - |"
            )
        sel = [r for r in rows if r["fraction"] == fraction]
        order = {"mha_continued": 0, "uptrain": 1, "scratch": 2}
        methods = {m: i for i, m in enumerate(args.methods)}
        for r in sorted(sel, key=lambda r: (order[r["kind"]], -r["kv"], methods.get(r["method"], -1))):
            name = {"mha_continued": "MHA continued", "uptrain": "GQA uptrained", "scratch": "GQA from scratch"}[
                r["kind"]
            ]
            steps = f"{args.pretrain_steps} + {extra}" if r["kind"] != "scratch" else str(r["steps"])
            lines.append(
                f"| {name} | {r['kv']} | {r['method'] or '-'} | {steps} | {_fmt(r['heldout_loss'])} | "
                f"{_fmt(r['accuracy_all'], pct=True)} | {_fmt(r['converted_heldout_loss'])} | "
                f"{_fmt(r['converted_accuracy_all'], pct=True)} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows, args, metric: str, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100.0 if metric.startswith("accuracy") else 1.0
    fig, axes = plt.subplots(1, len(args.fractions), figsize=(5.5 * len(args.fractions), 4.2), sharey=True)
    axes = [axes] if len(args.fractions) == 1 else list(axes)
    kvs = sorted(args.kv_heads, reverse=True)
    markers = {"mean": "o", "first": "s", "random": "^"}
    for ax, fraction in zip(axes, args.fractions):
        sel = [r for r in rows if r["fraction"] == fraction]
        for method in args.methods:
            pts = sorted((r for r in sel if r["kind"] == "uptrain" and r["method"] == method), key=lambda r: -r["kv"])
            ax.errorbar(
                [r["kv"] for r in pts], [scale * r[metric]["mean"] for r in pts],
                yerr=[scale * r[metric]["std"] for r in pts], marker=markers.get(method, "o"), capsize=3,
                label=f"uptrained ({method})",
            )  # fmt: skip
        pts = sorted((r for r in sel if r["kind"] == "scratch"), key=lambda r: -r["kv"])
        ax.errorbar(
            [r["kv"] for r in pts], [scale * r[metric]["mean"] for r in pts],
            yerr=[scale * r[metric]["std"] for r in pts], marker="x", linestyle="--", color="gray", capsize=3,
            label="from scratch (P + extra steps)",
        )  # fmt: skip
        for kind, style, label in (("mha_continued", "-", "MHA continued"), ("pretrain", ":", "MHA at P")):
            ref = [r for r in rows if r["kind"] == kind and (kind == "pretrain" or r["fraction"] == fraction)]
            if ref:
                s = ref[0][metric]
                ax.axhline(scale * s["mean"], color="black", linestyle=style, linewidth=1, label=label)
                if kind == "mha_continued":
                    ax.axhspan(
                        scale * (s["mean"] - s["std"]), scale * (s["mean"] + s["std"]), color="black", alpha=0.08
                    )
        ax.set_xscale("log", base=2)
        ax.set_xticks(kvs + [NUM_HEADS])
        ax.set_xticklabels([str(k) for k in kvs + [NUM_HEADS]])
        ax.set_xlabel("kv heads (8 = MHA, 1 = MQA)")
        extra = max(1, round(fraction * args.pretrain_steps))
        ax.set_title(f"uptrain {fraction:.0%} of P={args.pretrain_steps} ({extra} steps)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
    fig.suptitle(f"small model (2 layers, 8 heads, d=128), {len(args.seeds)} seeds: mean ± std", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recovery(rows, args, path: Path) -> None:
    """Held-out loss vs uptraining steps (mean pooling), from the converted model (0 steps) on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted(args.fractions + args.long_fractions)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, kv in enumerate(sorted(args.kv_heads, reverse=True)):
        up = {r["fraction"]: r for r in rows if r["kind"] == "uptrain" and r["kv"] == kv and r["method"] == "mean"}
        sc = {r["fraction"]: r for r in rows if r["kind"] == "scratch" and r["kv"] == kv}
        fs = [f for f in fractions if f in up]
        if not fs:
            continue
        xs = [0] + [round(f * args.pretrain_steps) for f in fs]
        conv = up[fs[0]]["converted_heldout_loss"]
        ys = [conv["mean"]] + [up[f]["heldout_loss"]["mean"] for f in fs]
        es = [conv["std"]] + [up[f]["heldout_loss"]["std"] for f in fs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=f"C{i}", label=f"{kv} kv heads: uptrained (mean)")
        fs = [f for f in fractions if f in sc]
        ax.errorbar(
            [round(f * args.pretrain_steps) for f in fs], [sc[f]["heldout_loss"]["mean"] for f in fs],
            yerr=[sc[f]["heldout_loss"]["std"] for f in fs], marker="x", linestyle="--", capsize=3, color=f"C{i}",
            label=f"{kv} kv heads: from scratch, P + x steps",
        )  # fmt: skip
    mha = sorted((r for r in rows if r["kind"] == "mha_continued"), key=lambda r: r["fraction"])
    pre = [r for r in rows if r["kind"] == "pretrain"]
    if mha and pre:
        xs = [0] + [round(r["fraction"] * args.pretrain_steps) for r in mha]
        ys = [pre[0]["heldout_loss"]["mean"]] + [r["heldout_loss"]["mean"] for r in mha]
        es = [pre[0]["heldout_loss"]["std"]] + [r["heldout_loss"]["std"] for r in mha]
        ax.errorbar(xs, ys, yerr=es, marker="s", color="black", capsize=3, label="MHA (8 kv heads) continued")
    ax.set_xscale("symlog", linthresh=10)
    ticks = sorted({0, *(round(f * args.pretrain_steps) for f in fractions)})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"uptraining steps x after P={args.pretrain_steps} pre-training steps (0: right after conversion)")
    ax.set_ylabel("held-out loss (val.jsonl)")
    ax.set_title(f"recovery of the converted models, {len(args.seeds)} seeds: mean ± std", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pooling_diagnostic(args) -> str:
    """Held-out loss of each seed's pre-trained MHA model with only K, only V, or both mean-pooled.

    Pooling only K (or V) is done on the MHA model itself: the pooled head is repeated over its group,
    which computes what the grouped model computes (checked against ``convert_model_`` for K and V).
    Writes ``<out-dir>/pooling_diagnostic.json`` and returns a markdown table.
    """
    import copy

    import torch

    from gqa_tune.convert.pooling import convert_model_, pool_heads
    from gqa_tune.data import byte_tokenizer, task_dataset
    from gqa_tune.models import gqa_decoder
    from gqa_tune.training.checkpoint import latest_checkpoint, load_checkpoint
    from gqa_tune.training.evaluate import heldout_loss

    torch.set_num_threads(1)
    tokenizer = byte_tokenizer(64)
    dataset = task_dataset(tokenizer, data_file="data/tasks/val.jsonl")
    rows = []
    for seed in args.seeds:
        sd, hf, _ = load_checkpoint(latest_checkpoint(args.runs_dir / f"seed{seed}/mha_pretrain"))
        builder = {k: v for k, v in hf["gqa_tune"]["model"].items() if k != "_component_"}
        model = gqa_decoder(**builder)
        model.load_state_dict(sd)
        model.eval()
        row = {"seed": seed, "mha": heldout_loss(model, dataset, tokenizer)}
        for kv in args.kv_heads:
            for which in ("k", "v", "kv"):
                pooled = copy.deepcopy(model)
                for layer in pooled.layers:
                    attn = layer.attn
                    for name in which:
                        linear = getattr(attn, f"{name}_proj")
                        w = pool_heads(linear.weight, NUM_HEADS, kv, attn.head_dim, "mean")
                        w = w.view(kv, attn.head_dim, -1).repeat_interleave(NUM_HEADS // kv, 0)
                        with torch.no_grad():
                            linear.weight.copy_(w.reshape(NUM_HEADS * attn.head_dim, -1))
                row[f"kv{kv}_{which}"] = heldout_loss(pooled, dataset, tokenizer)
            converted = copy.deepcopy(model)
            convert_model_(converted, kv, "mean")
            row[f"kv{kv}_converted"] = heldout_loss(converted, dataset, tokenizer)
            assert abs(row[f"kv{kv}_converted"] - row[f"kv{kv}_kv"]) < 1e-3, "grouped and repeated models differ"
        rows.append(row)
    (args.out_dir / "pooling_diagnostic.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| seed | MHA (P) | " + " | ".join(f"{kv} kv: pool K only | V only | K and V" for kv in args.kv_heads) + " |",
        "|---|---|" + "---|---|---|" * len(args.kv_heads),
    ]
    for row in rows:
        cells = [f"{row[f'kv{kv}_{w}']:.3f}" for kv in args.kv_heads for w in ("k", "v", "kv")]
        lines.append(f"| {row['seed']} | {row['mha']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="P=250 instead of 500 (about half the time)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="P (default 500; --quick: 250)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10])
    parser.add_argument(
        "--long-fractions", type=float, nargs="*", default=[0.25, 1.0],
        help="longer uptraining, mean pooling only (with MHA-continued and from-scratch references)",
    )  # fmt: skip
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[4, 2, 1])
    parser.add_argument("--methods", nargs="+", default=["mean", "first", "random"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=REPO / "outputs/repro_quality")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs/repro")
    parser.add_argument(
        "--pooling-diagnostic", action="store_true",
        help="only the K-only / V-only pooling check on the pre-trained models already in --runs-dir",
    )  # fmt: skip
    parser.add_argument("--replot", action="store_true", help="only redraw the figures from <out-dir>/quality.json")
    args = parser.parse_args()
    if args.pretrain_steps is None:
        args.pretrain_steps = 250 if args.quick else 500
    if args.pretrain_steps > EPOCH_STEPS:
        parser.error(f"P must fit one epoch ({EPOCH_STEPS} steps at batch 32)")
    if args.pooling_diagnostic:
        print(pooling_diagnostic(args))
        return
    if args.replot:
        data = json.loads((args.out_dir / "quality.json").read_text())
        for key in ("pretrain_steps", "seeds", "fractions", "long_fractions", "kv_heads", "methods"):
            setattr(args, key, data["meta"][key])
        write_outputs(data["summary"], args)
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"$ {command}\ntorch threads 1 per run, {args.workers} workers, load average {os.getloadavg()}", flush=True)

    results, wall = run_all(args, args.runs_dir)
    rows = summarize(results, args)
    md = tables(rows, args)
    print(md)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {
        "command": command,
        "pretrain_steps": args.pretrain_steps,
        "seeds": args.seeds,
        "fractions": args.fractions,
        "long_fractions": args.long_fractions,
        "kv_heads": args.kv_heads,
        "methods": args.methods,
        "workers": args.workers,
        "wall_seconds": wall,
        "cpu_seconds_in_runs": sum(r["seconds"] for r in results),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_end": os.getloadavg(),
    }
    (args.out_dir / "quality.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=2))
    diagnostic = pooling_diagnostic(args)
    print(diagnostic)
    md += "\n### Held-out loss right after mean pooling only K, only V, or both (no uptraining)\n\n" + diagnostic
    (args.out_dir / "quality.md").write_text(f"<!-- {command} -->\n\n{md}\n")
    write_outputs(rows, args)
    print(f"wrote {args.out_dir}/quality.json, quality.md and quality_{{loss,accuracy,recovery}}.png ({wall:.0f}s)")


def write_outputs(rows, args) -> None:
    """The figures (from the summary rows)."""
    plot(rows, args, "heldout_loss", "held-out loss (val.jsonl)", args.out_dir / "quality_loss.png")
    plot(
        rows, args, "accuracy_all", "task accuracy % (greedy, 200 val examples)", args.out_dir / "quality_accuracy.png"
    )
    plot_recovery(rows, args, args.out_dir / "quality_recovery.png")


if __name__ == "__main__":
    main()
