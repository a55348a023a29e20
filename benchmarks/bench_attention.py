"""How do gqa_tune's attention layers compare with torchtune 0.6.1's, step by step: decoding, training, kv heads?

Outputs (and gradients) are checked before timing. ``--case``: ``decode``, one KV-cached decode step of an attention
module of Llama-3.2-1B's shape, the cache filled to each of ``--fills``, every step undone (untimed), the modules
taking turns (``--order blocked``: not), and the bound (projection weight + filled K/V bytes) / copy bandwidth;
``gemma2``, the same for a Gemma 2 2B-shaped local layer (window 1024, 8000 of 8192 positions), also checked against
float64 attention over the window; ``kv-heads`` (the paper's Fig. 6), decode steps of ``gqa_decoder`` (4 layers,
width 512, 16 heads, batch 8, 2048 cached) with 1..16 kv heads, writing ``<out-dir>/speed.json`` and ``speed.png``;
``train``, forward + backward of the attention module (batch 2 x 1024) and the activations it saves; ``packed``,
forward + backward of ``llama3_2`` (2 layers, width 256) on a 4096-token row of ``--docs`` documents: torchtune
with its dense block-causal mask, gqa_tune given that mask and given its ``BlockMask``, and the largest allocation.

Commands::

    .venv/bin/python benchmarks/bench_attention.py [--fills 128 1024 4000] [--repeats 50] [--order blocked]
    .venv/bin/python benchmarks/bench_attention.py --case gemma2
    .venv/bin/python benchmarks/bench_attention.py --case kv-heads --repeats 32 [--device cuda --dtype bf16 --batch 32]
    .venv/bin/python benchmarks/bench_attention.py --case train [--batch 2] [--seq 1024] [--repeats 5]
    .venv/bin/python benchmarks/bench_attention.py --case packed [--seq 4096] [--docs 40] [--repeats 7]
    .venv/bin/python benchmarks/bench_attention.py --case CASE --smoke   # tiny sizes, seconds
"""

import copy
import random
import tempfile
from pathlib import Path

import _harness as H
import torch
from torch.profiler import profile
from torchtune.modules.attention_utils import create_block_causal_mask

import gqa_tune
from gqa_tune.models import gqa_decoder

DEFAULTS = {
    "decode": dict(fills=[128, 1024, 4000], cache=4096, repeats=50, warmup=5),
    "gemma2": dict(fills=[8000], cache=8192, repeats=20, warmup=3),
    "kv-heads": dict(fills=[2048], cache=4096, repeats=16, warmup=3, batch=8),
    "train": dict(seq=1024, repeats=5, warmup=1, batch=2),
    "packed": dict(seq=4096, repeats=5, warmup=0),
}
SMOKE = dict(fills=[100], cache=128, repeats=2, warmup=1, window=32, kv_heads=[1, 16], batch=2, seq=128, docs=5)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def decode(args) -> dict:
    tt, ours = H.attention_pair(H.ATTENTION, args.cache, backend=args.backend, seed=args.seed)
    for attn in (tt, ours):
        attn.setup_cache(batch_size=1, dtype=torch.float32, max_seq_len=args.cache)
    weight_bytes = sum(p.nbytes for p in tt.parameters())  # the four projections
    src, dst = torch.rand(2**26), torch.empty(2**26)  # bandwidth: the best read + write bytes/s of copying 256 MiB
    copy_bandwidth = lambda: 2 * src.nbytes / min(H.autorange(lambda: dst.copy_(src)).times)  # noqa: E731
    bandwidth, rows, mods, measured = copy_bandwidth(), [], {"torchtune": tt, "gqa_tune": ours}, {}
    for fill in args.fills:
        outs, times, (x, k, v) = H.decode_steps(mods, fill, args.cache, args.repeats, args.warmup, args.order)
        measured[fill] = times
        torch.testing.assert_close(outs["gqa_tune"], outs["torchtune"], rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # the step writes the same K to both caches
            for attn in mods.values():
                attn(x, x, mask=(torch.arange(args.cache) <= fill)[None, None], input_pos=torch.tensor([[fill]]))
            torch.testing.assert_close(ours.kv_cache.k_cache[:, :, : fill + 1], tt.kv_cache.k_cache[:, :, : fill + 1])
            H.rewinder(tt.kv_cache, fill)()
            H.rewinder(ours.kv_cache, fill)()
        tt_s, ours_s = times["torchtune"].median, times["gqa_tune"].median
        rows.append([fill, H.fmt(times["torchtune"]), H.fmt(times["gqa_tune"]), f"{tt_s / ours_s:.2f}x",
                     ours_s, k.nbytes + v.nbytes, f"{(outs['gqa_tune'] - outs['torchtune']).abs().max().item():.1e}"])
    bandwidth = max(bandwidth, copy_bandwidth())  # the best copy, before and after
    for row in rows:  # bound = bytes to read / bandwidth
        bound = (weight_bytes + row[5]) / bandwidth
        row[4:6] = [f"{bound * 1e3:.3f}", f"{row[4] / bound:.2f}"]
    H.table(
        ["fill", "torchtune ms (IQR)", "gqa_tune ms (IQR)", "speedup", "bound ms", "gqa_tune / bound", "max abs diff"],
        rows,
        f"Decode step, CPU fp32, {H.ATTENTION}, cache {args.cache}, batch 1, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}, {args.order}; copy bandwidth {bandwidth / 1e9:.1f} GB/s, weights "
        f"{weight_bytes / 2**20:.1f} MiB",
    )  # fmt: skip
    return {"bandwidth": bandwidth, "weight_bytes": weight_bytes, "table": rows, "times": measured}


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
    mods = {"torchtune": tt, "gqa_tune": ours}
    outs, times, (x, k, v) = H.decode_steps(mods, fill, args.cache, args.repeats, args.warmup, seed=args.seed)
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
            k, v = H.random_kv(kv, context, head_dim, i, args.batch)
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


def saved_activation_bytes(fn, module: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, not counting ``module``'s own."""
    skip = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def train(args) -> dict:
    tt, ours = H.attention_pair(H.ATTENTION, max(4096, args.seq), backend=args.backend, seed=args.seed)
    modules = {"torchtune": tt.train(), "gqa_tune": ours.train()}
    x = torch.randn(args.batch, args.seq, H.ATTENTION["embed_dim"], requires_grad=True)
    grad_out = torch.randn_like(x)

    def clear() -> None:
        x.grad = None
        tt.zero_grad(set_to_none=True)  # the parameters are shared: this clears ours too

    def step(attn) -> torch.Tensor:
        out = attn(x, x)
        out.backward(grad_out)
        return out

    found = {}
    for name, attn in modules.items():  # correctness, once: same output, input and weight gradients
        clear()
        found[name] = {"out": step(attn).detach(), "x": x.grad.clone()}
        found[name].update({n: p.grad.clone() for n, p in attn.named_parameters()})
    clear()
    ref, got = found["torchtune"], found["gqa_tune"]
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5 * ref[key].abs().max().item(), msg=key)
    rel = max(((got[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
    print(f"outputs and gradients match; max |diff| / max |ref| = {rel:.1e} ({len(ref)} tensors)")
    saved = {name: saved_activation_bytes(lambda a=attn: a(x, x), attn) / 2**20 for name, attn in modules.items()}
    times = H.time_cases({n: (lambda a=a: step(a), clear) for n, a in modules.items()}, args.repeats, args.warmup)
    ratio = times["torchtune"].median / times["gqa_tune"].median
    H.table(
        ["batch x seq", "torchtune ms (IQR)", "gqa_tune ms (IQR)", "time ratio", "torchtune saved MiB",
         "gqa_tune saved MiB", "memory ratio"],
        [[f"{args.batch} x {args.seq}", H.fmt(times["torchtune"], digits=1), H.fmt(times["gqa_tune"], digits=1),
          f"{ratio:.2f}x", f"{saved['torchtune']:.1f}", f"{saved['gqa_tune']:.1f}",
          f"{saved['torchtune'] / saved['gqa_tune']:.2f}x"]],
        f"Attention fwd+bwd, CPU fp32, {H.ATTENTION}, causal, {torch.get_num_threads()} threads, median of "
        f"{args.repeats}; ratios are torchtune / gqa_tune",
    )  # fmt: skip
    return {"times": times, "saved_mib": saved, "max_rel_diff": rel}


def packed(args) -> dict:
    rng = random.Random(args.seed)
    cuts = sorted(rng.sample(range(1, args.seq), args.docs - 1))
    lengths = torch.tensor([b - a for a, b in zip([0, *cuts], [*cuts, args.seq])])
    positions = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    vocab = H.LLAMA["packed"]["vocab_size"]
    tokens = torch.randint(0, vocab, (1, args.seq), generator=torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    tt = H.llama("packed", args.seq)
    for p in tt.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ours = copy.deepcopy(tt)
    gqa_tune.swap_attention(ours)
    dense = create_block_causal_mask([lengths])  # torchtune's CPU packed collate
    cases = {"torchtune, dense mask": (tt, dense), "gqa_tune, dense mask": (ours, dense),
             "gqa_tune, BlockMask": (ours, H.document_block_mask([lengths], args.seq))}  # fmt: skip

    def step(model, mask):
        model.zero_grad(set_to_none=True)
        logits = model(tokens, mask=mask, input_pos=positions)
        logits.sum().backward()
        return logits.detach()

    expected = step(tt, dense)
    tt_grads = [p.grad.clone() for p in tt.parameters()]
    for model, mask in list(cases.values())[1:]:
        torch.testing.assert_close(step(model, mask), expected, atol=2e-4, rtol=1e-4)
        for p, g in zip(model.parameters(), tt_grads):
            torch.testing.assert_close(p.grad, g, atol=2e-4, rtol=1e-3)
    print("logits and gradients match torchtune's")
    times = H.time_cases({n: (lambda c=c: step(*c)) for n, c in cases.items()}, args.repeats, args.warmup)
    base, rows, peaks = times["torchtune, dense mask"].median, [], {}
    for name, case in cases.items():
        with profile(profile_memory=True) as prof:
            step(*case)
        peaks[name] = max((max(e.cpu_memory_usage, 0) for e in prof.events()), default=0) / 2**20
        rows.append([name, H.fmt(times[name], digits=0), f"{base / times[name].median:.2f}x", f"{peaks[name]:.1f}"])
    H.table(["case", "ms (IQR)", "speedup", "largest allocation MiB"], rows,
            f"Forward + backward, {H.LLAMA['packed']}, one row of {args.seq} tokens, {args.docs} documents, "
            f"{torch.get_num_threads()} threads, median of {args.repeats} (an s x s float32 tensor: "
            f"{args.seq**2 * 4 / 2**20:.0f} MiB)")  # fmt: skip
    return {"times": times, "largest_allocation_mib": peaks}


def main() -> None:
    p = H.parser(__doc__, cases=list(DEFAULTS))
    p.add_argument("--fills", type=int, nargs="+", help="decode steps: cache fills (kv-heads: the context)")
    p.add_argument("--cache", type=int, help="decode steps: cache positions (decode 4096, gemma2 8192, kv-heads 4096)")
    p.add_argument("--repeats", type=int, help="timed steps per module (decode 50, gemma2 20, kv-heads 16, else 5)")
    p.add_argument("--warmup", type=int, help="untimed steps per module first")
    p.add_argument("--order", choices=["interleaved", "blocked"], default="interleaved", help="decode: modules' turns")
    p.add_argument("--backend", default="auto", help="gqa_tune attention backend")
    p.add_argument("--window", type=int, default=1024, help="gemma2: the sliding window")
    p.add_argument("--kv-heads", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="kv-heads: the counts")
    p.add_argument("--batch", type=int, help="kv-heads: sequences decoded together (8); train: batch size (2)")
    p.add_argument("--device", default="cpu", help="kv-heads: cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="kv-heads")
    p.add_argument("--out-dir", type=Path, default=H.REPO / "docs/repro", help="kv-heads: speed.json / speed.png here")
    p.add_argument("--seq", type=int, help="train: sequence length (1024); packed: the row's tokens (4096)")
    p.add_argument("--docs", type=int, default=40, help="packed: documents in the row")
    args = H.parse(p, DEFAULTS, SMOKE)
    if args.case == "kv-heads":  # writes <out-dir>/speed.json (speed_cuda.json on a GPU) and the figure beside it
        args.out_dir = Path(tempfile.mkdtemp()) if args.smoke else args.out_dir
        args.out_dir.mkdir(parents=True, exist_ok=True)
        args.json = args.json or str(args.out_dir / ("speed.json" if args.device == "cpu" else "speed_cuda.json"))
        args.threads = args.threads or (1 if args.device == "cpu" else None)  # steadier on a shared machine
    if args.case == "decode" and any(not 0 <= f < args.cache for f in args.fills):
        p.error(f"fills must be in [0, {args.cache - 1}] (one free position for the step)")
    H.run(args, {"decode": decode, "gemma2": gemma2, "kv-heads": kv_heads, "train": train, "packed": packed})


if __name__ == "__main__":
    main()
