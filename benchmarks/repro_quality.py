"""Does uptraining reproduce the GQA paper's quality results (Ainslie et al., 2023, Figs. 3-6) at small scale?

Per seed: pre-train the small MHA model (``configs/gqa_small/mha_pretrain.yaml``) for P steps; convert it to 4, 2, 1
kv heads (mean, first, random pooling) and uptrain 5% and 10% of P (``recipes/uptrain.py``); references: the MHA
model continued as long (the identity conversion) and GQA trained from scratch for P + those steps; longer
uptraining (``--long-fractions``) with mean pooling only. Held-out loss and accuracy on ``data/tasks/val.jsonl``
(also right after conversion), then the pooling diagnostic (pooling only K, only V, or both). Writes
``<out-dir>/quality.{json,md}``, ``pooling_diagnostic.json`` and ``quality_{loss,accuracy,recovery}.png``.

Commands::

    .venv/bin/python benchmarks/repro_quality.py            # what docs/reproduction.md reports (P = 500, 2 seeds)
    .venv/bin/python benchmarks/repro_quality.py --replot   # redraw the figures from <out-dir>/quality.json
    .venv/bin/python benchmarks/repro_quality.py --pooling-diagnostic   # only the diagnostic, on <runs-dir>
    .venv/bin/python benchmarks/repro_quality.py --smoke    # P = 4, one seed, temporary directories
"""

import contextlib
import copy
import json
import math
import os
import statistics
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import _harness as H
import torch
from omegaconf import OmegaConf

from gqa_tune.data import byte_tokenizer, task_dataset
from gqa_tune.models import gqa_decoder

PRETRAIN, UPTRAIN = H.REPO / "configs/gqa_small/mha_pretrain.yaml", H.REPO / "configs/gqa_small/uptrain.yaml"
NUM_HEADS, EPOCH_STEPS = 8, 625  # 20000 training examples at batch 32
KINDS = {"pretrain": "MHA pre-trained (P)", "mha_continued": "MHA continued", "uptrain": "GQA uptrained",
         "scratch": "GQA from scratch"}  # the tables' order
METRICS = ("heldout_loss", "accuracy_all", "accuracy_copy", "accuracy_add")


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    os.chdir(H.REPO)


def run_job(job: dict) -> dict:
    """One training run in this (worker) process: its eval results and wall seconds."""
    cfg, log = OmegaConf.load(job["config"]), Path(job["output_dir"]) / "run.log"
    for key, value in job["overrides"].items():
        OmegaConf.update(cfg, key, value, force_add=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = H.timer()
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        if job["kind"] in ("pretrain", "scratch"):
            from gqa_tune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice as Recipe
        else:
            from gqa_tune.recipes.uptrain import UptrainRecipe as Recipe
        recipe = Recipe(cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()
    before = getattr(recipe, "eval_before", None)
    return {**{k: v for k, v in job.items() if k not in ("overrides", "config")}, "eval": dict(recipe.eval_results),
            "before": dict(before) if before else None, "steps": recipe.global_step, "seconds": H.timer() - start,
            "final_train_loss": recipe.loss_history[-1] if recipe.loss_history else None}  # fmt: skip


def make_jobs(args):
    """(jobs to start now, {seed: jobs that need that seed's pre-trained model})."""
    first, after, small = [], {}, {"eval.max_examples": 8} if args.smoke else {}

    def job(kind, seed, kv, method, fraction, config, out, /, **overrides):
        return {"kind": kind, "seed": seed, "kv": kv, "method": method, "fraction": fraction, "config": str(config),
                "output_dir": str(out), "overrides": {"output_dir": str(out), **small, **overrides}}  # fmt: skip

    for seed in args.seeds:
        pre = args.runs_dir / f"seed{seed}/mha_pretrain"
        first.append(job("pretrain", seed, NUM_HEADS, None, 0.0, PRETRAIN, pre, seed=seed, epochs=1,
                         max_steps_per_epoch=args.pretrain_steps, log_every_n_steps=25))  # fmt: skip
        after[seed] = []
        for fraction in args.fractions + args.long_fractions:
            total = args.pretrain_steps + max(1, round(fraction * args.pretrain_steps))
            epochs = math.ceil(total / EPOCH_STEPS)  # past one epoch: equal epochs (total rounded up)
            for kv in args.kv_heads:
                out = args.runs_dir / f"seed{seed}/scratch_kv{kv}_f{fraction}"
                first.append(job("scratch", seed, kv, None, fraction, PRETRAIN, out, seed=seed, epochs=epochs,
                                 max_steps_per_epoch=math.ceil(total / epochs), log_every_n_steps=25,
                                 **{"model.num_kv_heads": kv}))  # fmt: skip
            methods = args.methods if fraction in args.fractions else ["mean"]
            for kv, method in [(NUM_HEADS, "mean")] + [(kv, m) for kv in args.kv_heads for m in methods]:
                kind = "mha_continued" if kv == NUM_HEADS else "uptrain"
                out = args.runs_dir / f"seed{seed}/{kind}_kv{kv}_{method}_f{fraction}"
                # another data order than pre-training's first epoch; conversion seed = seed
                after[seed].append(job(kind, seed, kv, method if kind == "uptrain" else None, fraction, UPTRAIN, out,
                                       source_checkpoint_dir=str(pre), seed=seed + 1000, conversion_seed=seed,
                                       num_kv_heads=kv, method=method, uptrain_fraction=fraction, uptrain_steps=None,
                                       eval_before_uptrain=True))  # fmt: skip
    return first, after


def run_all(args):
    first, after = make_jobs(args)
    total, results, t0 = len(first) + sum(map(len, after.values())), [], H.timer()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(args.threads or 1,)) as pool:  # fmt: skip
        pending = {pool.submit(run_job, job): job for job in first}
        while pending:
            for future in wait(pending, return_when=FIRST_COMPLETED)[0]:
                job, result = pending.pop(future), future.result()
                results.append(result)
                e = result["eval"]
                print(f"[{len(results)}/{total} {H.timer() - t0:6.0f}s] {job['kind']:13s} seed {job['seed']} kv "
                      f"{job['kv']} {job['method'] or '-':6s} f {job['fraction']:<5} steps {result['steps']:4d}: loss "
                      f"{e['heldout_loss']:.4f} acc {e.get('accuracy_all', 0):.3f} ({result['seconds']:.0f}s)",
                      flush=True)
                if job["kind"] == "pretrain":  # its uptraining runs go first: they are short
                    pending.update({pool.submit(run_job, j): j for j in after[job["seed"]]})
    return results, H.timer() - t0


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}  # fmt: skip


def summarize(results):
    """Mean / std / min / max over seeds for every (kind, kv, method, fraction)."""
    groups = {}
    for r in results:
        groups.setdefault((r["kind"], r["kv"], r["method"], r["fraction"]), []).append(r)
    rows = []
    for (kind, kv, method, fraction), rs in sorted(groups.items(), key=lambda x: (x[0][3], x[0][0], -x[0][1])):
        row = {"kind": kind, "kv": kv, "method": method, "fraction": fraction, "steps": rs[0]["steps"]}
        for metric in METRICS:
            row[metric] = _stats([r["eval"].get(metric) for r in rs])
            before = [(r["before"] or {}).get(metric) for r in rs]
            row[f"converted_{metric}"] = _stats(before) if rs[0]["before"] else None
        rows.append(row)
    return rows


def _fmt(s, pct=False):
    if s is None:
        return "-"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if pct else f"{s['mean']:.3f} ± {s['std']:.3f}"


def tables(rows, args) -> str:
    """Per uptraining fraction, the models' mean ± std over seeds (printed; returned as markdown)."""
    p, texts, methods = args.pretrain_steps, [], {m: i for i, m in enumerate(args.methods)}
    for fraction in args.fractions + args.long_fractions:
        extra = max(1, round(fraction * p))
        sel = sorted((r for r in rows if r["kind"] == "pretrain" or r["fraction"] == fraction),
                     key=lambda r: (list(KINDS).index(r["kind"]), -r["kv"], methods.get(r["method"], -1)))
        texts.append(H.table(
            ["model", "kv heads", "method", "train steps", "held-out loss", "accuracy %",
             "right after conversion: loss", "acc %"],
            [[KINDS[r["kind"]], r["kv"], r["method"] or "-",
              r["steps"] if r["kind"] in ("pretrain", "scratch") else f"{p} + {extra}", _fmt(r["heldout_loss"]),
              _fmt(r["accuracy_all"], True), *(_fmt(r[f"converted_{m}"], m != "heldout_loss") for m in METRICS[:2])]
             for r in sel],
            f"### Uptraining {fraction:.0%} of P ({extra} steps; P = {p}), mean ± std over {len(args.seeds)} seeds",
        ))  # fmt: skip
    return "\n\n".join(texts)


def _errorbar(ax, rows, metric, scale, xs, **style) -> None:
    ax.errorbar(xs, [scale * r[metric]["mean"] for r in rows], yerr=[scale * r[metric]["std"] for r in rows],
                capsize=3, **style)  # fmt: skip


def plot(rows, args, metric: str, ylabel: str, path: Path) -> None:
    """Per uptraining fraction: ``metric`` against kv heads, uptrained (per method) and from scratch, with the
    MHA references as lines."""
    import matplotlib.pyplot as plt

    scale = 100.0 if metric.startswith("accuracy") else 1.0
    n = len(args.fractions)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), sharey=True, squeeze=False)
    kvs, markers = sorted(args.kv_heads, reverse=True), {"mean": "o", "first": "s", "random": "^"}
    for ax, fraction in zip(axes[0], args.fractions):
        sel = sorted((r for r in rows if r["fraction"] == fraction), key=lambda r: -r["kv"])
        for method in args.methods:
            pts = [r for r in sel if r["kind"] == "uptrain" and r["method"] == method]
            _errorbar(ax, pts, metric, scale, [r["kv"] for r in pts], marker=markers.get(method, "o"),
                      label=f"uptrained ({method})")
        pts = [r for r in sel if r["kind"] == "scratch"]
        _errorbar(ax, pts, metric, scale, [r["kv"] for r in pts], marker="x", linestyle="--", color="gray",
                  label="from scratch (P + extra steps)")  # fmt: skip
        for kind, style, label in (("mha_continued", "-", "MHA continued"), ("pretrain", ":", "MHA at P")):
            ref = [r for r in rows if r["kind"] == kind and (kind == "pretrain" or r["fraction"] == fraction)]
            if ref:
                s = ref[0][metric]
                ax.axhline(scale * s["mean"], color="black", linestyle=style, linewidth=1, label=label)
                if kind == "mha_continued":
                    low, high = scale * (s["mean"] - s["std"]), scale * (s["mean"] + s["std"])
                    ax.axhspan(low, high, color="black", alpha=0.08)
        extra = max(1, round(fraction * args.pretrain_steps))
        ax.set(xscale="log", xlabel="kv heads (8 = MHA, 1 = MQA)",
               title=f"uptrain {fraction:.0%} of P={args.pretrain_steps} ({extra} steps)")
        ax.set_xticks(kvs + [NUM_HEADS], [str(k) for k in kvs + [NUM_HEADS]])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.legend(*axes[0][-1].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8)
    fig.suptitle(f"small model (2 layers, 8 heads, d=128), {len(args.seeds)} seeds: mean ± std", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recovery(rows, args, path: Path) -> None:
    """Held-out loss against uptraining steps (mean pooling), from the converted model (0 steps) on."""
    import matplotlib.pyplot as plt

    p = args.pretrain_steps
    fractions = sorted(args.fractions + args.long_fractions)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, kv in enumerate(sorted(args.kv_heads, reverse=True)):
        up = {r["fraction"]: r for r in rows if r["kind"] == "uptrain" and r["kv"] == kv and r["method"] == "mean"}
        sc = [r for f in fractions for r in rows if r["kind"] == "scratch" and r["kv"] == kv and r["fraction"] == f]
        fs = [f for f in fractions if f in up]
        if not fs:
            continue
        conv = {"heldout_loss": up[fs[0]]["converted_heldout_loss"]}
        _errorbar(ax, [conv] + [up[f] for f in fs], "heldout_loss", 1.0, [0] + [round(f * p) for f in fs], marker="o",
                  color=f"C{i}", label=f"{kv} kv heads: uptrained (mean)")  # fmt: skip
        _errorbar(ax, sc, "heldout_loss", 1.0, [round(r["fraction"] * p) for r in sc], marker="x", linestyle="--",
                  color=f"C{i}", label=f"{kv} kv heads: from scratch, P + x steps")  # fmt: skip
    mha = sorted((r for r in rows if r["kind"] == "mha_continued"), key=lambda r: r["fraction"])
    pre = [r for r in rows if r["kind"] == "pretrain"]
    if mha and pre:
        _errorbar(ax, pre[:1] + mha, "heldout_loss", 1.0, [0] + [round(r["fraction"] * p) for r in mha], marker="s",
                  color="black", label="MHA (8 kv heads) continued")  # fmt: skip
    ticks = sorted({0, *(round(f * p) for f in fractions)})
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel=f"uptraining steps x after P={p} pre-training steps (0: right after conversion)",
           ylabel="held-out loss (val.jsonl)", title=f"recovery of the converted models, {len(args.seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pooling_diagnostic(args) -> str:
    """Held-out loss of each seed's pre-trained MHA model with only K, only V, or both mean-pooled; the pooled
    head repeated over its group computes what the grouped model computes (checked against ``convert_model_``).
    Writes ``<out-dir>/pooling_diagnostic.json``; returns a markdown table."""
    torch.set_num_threads(1)
    tokenizer = byte_tokenizer(64)
    dataset = task_dataset(tokenizer, data_file="data/tasks/val.jsonl")
    rows = []
    for seed in args.seeds:
        sd, hf, _ = H.load_checkpoint(H.latest_checkpoint(args.runs_dir / f"seed{seed}/mha_pretrain"))
        model = gqa_decoder(**{k: v for k, v in hf["gqa_tune"]["model"].items() if k != "_component_"})
        model.load_state_dict(sd)
        row = {"seed": seed, "mha": H.heldout_loss(model.eval(), dataset, tokenizer)}
        for kv in args.kv_heads:
            for which in ("k", "v", "kv"):
                pooled = copy.deepcopy(model)
                for attn in (layer.attn for layer in pooled.layers):
                    for linear in (getattr(attn, f"{name}_proj") for name in which):
                        w = H.pool_heads(linear.weight, NUM_HEADS, kv, attn.head_dim, "mean")
                        w = w.view(kv, attn.head_dim, -1).repeat_interleave(NUM_HEADS // kv, 0)
                        with torch.no_grad():
                            linear.weight.copy_(w.reshape(NUM_HEADS * attn.head_dim, -1))
                row[f"kv{kv}_{which}"] = H.heldout_loss(pooled, dataset, tokenizer)
            converted = copy.deepcopy(model)
            H.convert_model_(converted, kv, "mean")
            row[f"kv{kv}_converted"] = H.heldout_loss(converted, dataset, tokenizer)
            assert abs(row[f"kv{kv}_converted"] - row[f"kv{kv}_kv"]) < 1e-3, "grouped and repeated models differ"
        rows.append(row)
    (args.out_dir / "pooling_diagnostic.json").write_text(json.dumps(rows, indent=2))
    columns = [(kv, w) for kv in args.kv_heads for w in ("k", "v", "kv")]
    return H.table(["seed", "MHA (P)", *(f"{kv} kv: pool {w.upper()}" for kv, w in columns)],
                   [[r["seed"], f"{r['mha']:.3f}", *(f"{r[f'kv{kv}_{w}']:.3f}" for kv, w in columns)] for r in rows],
                   "### Held-out loss right after mean pooling only K, only V, or both (no uptraining)")


def write_figures(rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    plot(rows, args, "heldout_loss", "held-out loss (val.jsonl)", args.out_dir / "quality_loss.png")
    plot(rows, args, "accuracy_all", "task accuracy % (greedy, 200 val examples)",
         args.out_dir / "quality_accuracy.png")
    plot_recovery(rows, args, args.out_dir / "quality_recovery.png")


def main() -> None:
    p = H.parser(__doc__)
    p.add_argument("--pretrain-steps", type=int, default=500, help="P (250: about half the time)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10])
    p.add_argument("--long-fractions", type=float, nargs="*", default=[0.25, 1.0], help="mean pooling only")
    p.add_argument("--kv-heads", type=int, nargs="+", default=[4, 2, 1])
    p.add_argument("--methods", nargs="+", default=["mean", "first", "random"])
    p.add_argument("--workers", type=int, default=2, help="runs at a time, each with --threads threads (default 1)")
    p.add_argument("--runs-dir", type=Path, default=H.REPO / "outputs/repro_quality")
    p.add_argument("--out-dir", type=Path, default=H.REPO / "docs/repro")
    p.add_argument("--pooling-diagnostic", action="store_true", help="only the diagnostic, on the runs in --runs-dir")
    p.add_argument("--replot", action="store_true", help="only redraw the figures from <out-dir>/quality.json")
    args = p.parse_args()
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="repro_quality_smoke_"))
        args.pretrain_steps, args.seeds, args.fractions, args.long_fractions = 4, [0], [0.5], [1.0]
        args.kv_heads, args.methods, args.runs_dir, args.out_dir = [4], ["mean"], tmp / "runs", tmp / "out"
    if args.pretrain_steps > EPOCH_STEPS:
        p.error(f"P must fit one epoch ({EPOCH_STEPS} steps at batch 32)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.pooling_diagnostic:
        return pooling_diagnostic(args)
    if args.replot:
        data = json.loads((args.out_dir / "quality.json").read_text())
        for key in ("pretrain_steps", "seeds", "fractions", "long_fractions", "kv_heads", "methods"):
            setattr(args, key, data["meta"][key])
        write_figures(data["summary"], args)
        return
    env = H.start(args)
    results, wall = run_all(args)
    rows = summarize(results)
    md = tables(rows, args)
    meta = {**{k: getattr(args, k) for k in ("pretrain_steps", "seeds", "fractions", "long_fractions", "kv_heads",
                                              "methods", "workers")}, **env,
            "wall_seconds": wall, "cpu_seconds_in_runs": sum(r["seconds"] for r in results)}  # fmt: skip
    (args.out_dir / "quality.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=2))
    (args.out_dir / "quality.md").write_text(f"<!-- {env['command']} -->\n\n{md}\n\n{pooling_diagnostic(args)}\n")
    write_figures(rows, args)
    print(f"wrote {args.out_dir}/quality.json, quality.md and quality_{{loss,accuracy,recovery}}.png ({wall:.0f}s)")


if __name__ == "__main__":
    main()
