"""How long does one KV-cached decode step take: gqa_tune against torchtune 0.6.1, and against fewer kv heads?

Outputs are checked before timing. Cases (``--case``):

- ``attention``: one attention module of Llama-3.2-1B's shape, torchtune's and gqa_tune's with the same weights,
  batch 1, a 4096-position cache filled to each of ``--fills``, torchtune's call, every step undone (untimed);
  ``--order interleaved`` (each step finds the CPU caches as the other module left them) or ``blocked``.
  ``bound`` = (projection weight + filled K/V bytes) / copy bandwidth (the best copy of a 256 MiB tensor).
- ``gemma2``: a Gemma 2 2B-shaped local layer (window 1024, cache 8192 filled to 8000): torchtune's
  ``Gemma2Attention`` against gqa_tune's ring of the window, checked against a full-length cache and float64
  attention over the window (torchtune's own error is shown: its windowed cache is wrong past the window).
- ``kv-heads`` (the paper's Fig. 6): ``gqa_decoder`` (4 layers, embed 512, 16 heads, batch 8) with 1..16 kv heads,
  caches filled to 2048, real decode steps; 1 thread by default. Writes ``<out-dir>/speed.json`` and ``speed.png``.

Commands::

    .venv/bin/python benchmarks/bench_decode.py [--fills 128 1024 4000] [--repeats 50] [--order blocked]
    .venv/bin/python benchmarks/bench_decode.py --case gemma2
    .venv/bin/python benchmarks/bench_decode.py --case kv-heads --repeats 32 [--device cuda --dtype bf16 --batch 32]
    .venv/bin/python benchmarks/bench_decode.py --case CASE --smoke   # tiny sizes, seconds
"""

import tempfile
from pathlib import Path

import _harness as H
import torch

import gqa_tune
from gqa_tune.models import gqa_decoder

DEFAULTS = {
    "attention": dict(fills=[128, 1024, 4000], cache=4096, repeats=50, warmup=5),
    "gemma2": dict(fills=[8000], cache=8192, repeats=20, warmup=3),
    "kv-heads": dict(fills=[2048], cache=4096, repeats=16, warmup=3),
}
SMOKE = {"fills": [100], "cache": 128, "repeats": 3, "warmup": 1, "window": 32, "kv_heads": [1, 16], "batch": 2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_kv(n_kv: int, fill: int, head_dim: int, seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n_kv, fill, head_dim, generator=g) for _ in range(2))


def copy_bandwidth() -> float:
    """The best read + write bytes/s of copying a 256 MiB float32 tensor."""
    src = torch.rand(2**26)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / min(H.autorange(lambda: dst.copy_(src), min_run_time=0.5).times)


def attention(args) -> dict:
    tt, ours = H.attention_pair(H.ATTENTION, args.cache, backend=args.backend, seed=args.seed)
    for attn in (tt, ours):
        attn.setup_cache(batch_size=1, dtype=torch.float32, max_seq_len=args.cache)
    weight_bytes = sum(p.nbytes for p in tt.parameters())  # the four projections
    bandwidth, x = copy_bandwidth(), torch.randn(1, 1, H.ATTENTION["embed_dim"])
    rows = []
    for fill in args.fills:
        k, v = random_kv(H.ATTENTION["num_kv_heads"], fill, H.ATTENTION["head_dim"], args.seed + fill)
        mods = {"torchtune": tt, "gqa_tune": ours}
        outs, times = H.decode_steps(mods, x, k, v, args.cache, args.repeats, args.warmup, args.order)
        torch.testing.assert_close(outs["gqa_tune"], outs["torchtune"], rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # the step writes the same K to both caches
            for attn in mods.values():
                attn(x, x, mask=(torch.arange(args.cache) <= fill)[None, None], input_pos=torch.tensor([[fill]]))
            torch.testing.assert_close(ours.kv_cache.k_cache[:, :, : fill + 1], tt.kv_cache.k_cache[:, :, : fill + 1])
            H.rewinder(tt.kv_cache, fill)()
            H.rewinder(ours.kv_cache, fill)()
        rows.append({"fill": fill, "times": times, "kv_bytes": k.nbytes + v.nbytes,
                     "max_abs_diff": (outs["gqa_tune"] - outs["torchtune"]).abs().max().item()})  # fmt: skip
    bandwidth = max(bandwidth, copy_bandwidth())
    for r in rows:
        r["bound_ms"] = (weight_bytes + r["kv_bytes"]) / bandwidth * 1e3
    H.table(
        ["fill", "torchtune ms (IQR)", "gqa_tune ms (IQR)", "speedup", "bound ms", "gqa_tune / bound", "max abs diff"],
        [[r["fill"], H.fmt(r["times"]["torchtune"]), H.fmt(r["times"]["gqa_tune"]),
          f"{r['times']['torchtune'].median / r['times']['gqa_tune'].median:.2f}x", f"{r['bound_ms']:.3f}",
          f"{r['times']['gqa_tune'].median * 1e3 / r['bound_ms']:.2f}", f"{r['max_abs_diff']:.1e}"] for r in rows],
        f"Decode step, CPU fp32, {H.ATTENTION}, cache {args.cache}, batch 1, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}, {args.order}; copy bandwidth {bandwidth / 1e9:.1f} GB/s, weights "
        f"{weight_bytes / 2**20:.1f} MiB",
    )  # fmt: skip
    return {"bandwidth": bandwidth, "weight_bytes": weight_bytes, "results": rows}


def gemma2(args) -> dict:
    s = H.GEMMA2
    fill, window, group = args.fills[0], args.window, s["num_heads"] // s["num_kv_heads"]
    if not window <= fill < args.cache:
        raise SystemExit("gemma2 needs window <= fill < cache")
    tt, ours = H.attention_pair(s, args.cache, window=window, seed=args.seed)
    plain = H.from_torchtune_attention(tt)  # a full-length cache: the same function, a larger cache
    tt.setup_cache(1, torch.float32, args.cache)
    ours.setup_cache(1, torch.float32, args.cache)  # a ring of the window
    plain.kv_cache = gqa_tune.KVCache(1, args.cache, s["num_kv_heads"], s["head_dim"], torch.float32)
    plain.cache_enabled = True
    k, v = random_kv(s["num_kv_heads"], fill, s["head_dim"], args.seed)
    x = torch.randn(1, 1, s["embed_dim"])
    outs, times = H.decode_steps({"torchtune": tt, "gqa_tune": ours}, x, k, v, args.cache, args.repeats, args.warmup)
    with torch.no_grad():
        H.fill_cache(plain.kv_cache, k, v)
        pos = torch.tensor([[fill]])
        out_plain = plain(x, x, mask=(torch.arange(args.cache) <= fill)[None, None], input_pos=pos)
        # float64 oracle: the new token's q against keys fill-window+1 .. fill (the new one included)
        q = ours.pos_embeddings(ours.q_proj(x).view(1, 1, s["num_heads"], -1), input_pos=pos).transpose(1, 2)
        cached = (plain.kv_cache.k_cache, plain.kv_cache.v_cache)
        keys, values = (torch.cat([t[:, :, fill - window + 1 :], c[:, :, fill : fill + 1]], 2).double()
                        .repeat_interleave(group, 1) for t, c in zip((k, v), cached))  # fmt: skip
        scores = q.double() @ keys.transpose(-2, -1) * s["query_pre_attn_scalar"] ** -0.5
        scores = s["softcapping"] * torch.tanh(scores / s["softcapping"])
        oracle = ours.output_proj((torch.softmax(scores, -1) @ values).transpose(1, 2).reshape(1, 1, -1).float())
    torch.testing.assert_close(outs["gqa_tune"], oracle, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["gqa_tune"], out_plain, atol=1e-5, rtol=1e-5)
    mib = {n: (m.kv_cache.k_cache.nbytes + m.kv_cache.v_cache.nbytes) / 2**20 for n, m in (("tt", tt), ("ours", ours))}
    diff = {n: (outs[n] - oracle).abs().max().item() for n in outs}
    tt_ms, ours_ms = times["torchtune"].median, times["gqa_tune"].median
    H.table(
        ["", "torchtune 0.6.1", "gqa_tune", "ratio"],
        [["decode step ms (IQR)", H.fmt(times["torchtune"]), H.fmt(times["gqa_tune"]), f"{tt_ms / ours_ms:.1f}x"],
         ["KV cache MiB (this layer)", f"{mib['tt']:.1f}", f"{mib['ours']:.1f}", f"{mib['tt'] / mib['ours']:.1f}x"],
         ["max abs diff vs float64 window attention", f"{diff['torchtune']:.2e}", f"{diff['gqa_tune']:.2e}", ""]],
        f"Gemma 2-shaped local layer, one decode step, CPU fp32, {s}, window {window}, cache {args.cache}, fill "
        f"{fill}, {torch.get_num_threads()} threads, median of {args.repeats}, interleaved",
    )  # fmt: skip
    return {"times": times, "kv_cache_mib": mib, "max_abs_diff_vs_oracle": diff}


def kv_heads(args) -> dict:
    device, dtype, context, shape = torch.device(args.device), DTYPES[args.dtype], args.fills[0], H.KV_SWEEP
    if context + args.warmup + args.repeats > args.cache:
        raise SystemExit("fill + warmup + repeats must fit in --cache")
    rows, head_dim = [], shape["embed_dim"] // shape["num_heads"]
    for kv in sorted(args.kv_heads):
        torch.manual_seed(args.seed)
        with device:
            model = gqa_decoder(**shape, num_kv_heads=kv, max_seq_len=args.cache, backend=args.backend)
            model = model.to(dtype).eval()
            model.setup_caches(batch_size=args.batch, dtype=dtype, decoder_max_seq_len=args.cache)
        for i, layer in enumerate(model.layers):
            k, v = random_kv(kv, context, head_dim, i, args.batch)
            H.fill_cache(layer.attn.kv_cache, k.to(device, dtype), v.to(device, dtype))
        state = {"pos": context, "tokens": torch.full((args.batch, 1), 7, device=device)}
        positions = torch.arange(args.cache, device=device)

        def step(state=state, model=model, positions=positions):
            mask = (positions <= state["pos"]).view(1, 1, -1).expand(args.batch, 1, -1)
            pos = torch.full((args.batch, 1), state["pos"], device=device)
            logits = model(state["tokens"], mask=mask, input_pos=pos)
            state["tokens"], state["pos"] = logits[:, -1].argmax(-1, keepdim=True), state["pos"] + 1
            return logits

        with torch.inference_mode():
            m = H.time_cases({"step": step}, args.repeats, args.warmup)["step"]  # the cache grows by one each step
            assert torch.isfinite(step()).all()
        per_token = 2 * shape["num_layers"] * kv * head_dim * dtype.itemsize
        rows.append(dict(num_kv_heads=kv, step=m, ms_per_token_per_sequence=m.median * 1e3 / args.batch,
                         tokens_per_s=args.batch / m.median, kv_bytes_per_token=per_token,
                         kv_cache_bytes=sum(layer.attn.kv_cache.nbytes for layer in model.layers),
                         kv_bytes_read_per_step=per_token * args.batch * context))  # fmt: skip
    mha = rows[-1]["step"].median
    title = (f"gqa_decoder: {H.KV_SWEEP} (head_dim {head_dim}), batch {args.batch}, context {context} (cache "
             f"{args.cache}), {args.dtype}, {args.device}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    text = H.table(
        ["kv heads", f"decode step ms (batch {args.batch}, IQR)", "ms/token/sequence", "tokens/s", f"speedup vs "
         f"{rows[-1]['num_kv_heads']}", "KV bytes/token", "KV read per step MiB", "cache MiB"],
        [[r["num_kv_heads"], H.fmt(r["step"], digits=1), f"{r['ms_per_token_per_sequence']:.2f}",
          f"{r['tokens_per_s']:.0f}", f"{mha / r['step'].median:.2f}x", r["kv_bytes_per_token"],
          f"{r['kv_bytes_read_per_step'] / 2**20:.0f}", f"{r['kv_cache_bytes'] / 2**20:.0f}"] for r in rows],
        title)  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kv, (fig, (a, b)) = [r["num_kv_heads"] for r in rows], plt.subplots(1, 2, figsize=(10, 4))
    spread = [[abs(r["step"].median - f(r["step"].times)) * 1e3 / args.batch for r in rows] for f in (min, max)]
    a.errorbar(kv, [r["ms_per_token_per_sequence"] for r in rows], yerr=spread, marker="o", capsize=3)
    a.set_ylabel(f"decode ms per token per sequence (batch {args.batch})")
    b.plot(kv, [r["kv_bytes_per_token"] / 1024 for r in rows], marker="s", color="C1")
    b.set_ylabel("KV cache KiB per token (one sequence)")
    for ax in (a, b):
        ax.set(ylim=(0, None), xscale="log", xlabel=f"kv heads ({max(kv)} = MHA, 1 = MQA)")
        ax.set_xticks(kv, [str(k) for k in kv])
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(args.json).with_suffix(".png"), dpi=110)
    print(f"wrote {Path(args.json).with_suffix('.png')}")
    return {"shape": title, "results": rows, "table": text}


def main() -> None:
    p = H.parser(__doc__, cases=list(DEFAULTS))
    p.add_argument("--fills", type=int, nargs="+", help="cache fills (kv-heads: the context before decoding)")
    p.add_argument("--cache", type=int, help="cache positions (attention 4096, gemma2 8192, kv-heads 4096)")
    p.add_argument("--repeats", type=int, help="timed steps per module and fill (50, 20, 16)")
    p.add_argument("--warmup", type=int, help="untimed steps first (5, 3, 3)")
    p.add_argument("--order", choices=["interleaved", "blocked"], default="interleaved", help="attention case")
    p.add_argument("--backend", default="auto", help="gqa_tune attention backend")
    p.add_argument("--window", type=int, default=1024, help="gemma2: the sliding window")
    p.add_argument("--kv-heads", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="kv-heads: the counts")
    p.add_argument("--batch", type=int, default=8, help="kv-heads: sequences decoded together")
    p.add_argument("--device", default="cpu", help="kv-heads: cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="kv-heads")
    p.add_argument("--out-dir", type=Path, default=H.REPO / "docs/repro", help="kv-heads: speed.json / speed.png here")
    args = H.parse(p, DEFAULTS, SMOKE)
    if args.case == "kv-heads":  # writes <out-dir>/speed.json (speed_cuda.json on a GPU) and the figure beside it
        args.out_dir = Path(tempfile.mkdtemp()) if args.smoke else args.out_dir
        args.out_dir.mkdir(parents=True, exist_ok=True)
        name = "speed.json" if args.device == "cpu" else f"speed_{args.device}.json"
        args.json = args.json or str(args.out_dir / name)
        args.threads = args.threads or (1 if args.device == "cpu" else None)  # steadier on a shared machine
    if args.case == "attention" and any(not 0 <= f < args.cache for f in args.fills):
        p.error(f"fills must be in [0, {args.cache - 1}] (one free position for the step)")
    H.run(args, {"attention": attention, "gemma2": gemma2, "kv-heads": kv_heads})


if __name__ == "__main__":
    main()
