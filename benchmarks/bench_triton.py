"""How fast are gqa_tune's Triton kernels against torch SDPA and compiled flex_attention, on a CUDA GPU?

bf16; each configuration is checked first (output, and dQ/dK/dV, against SDPA's within ``--atol``/``--rtol``: a
mismatch aborts, exit code 1). ``fwd``: ``scaled_dot_product_gqa(backend="triton")``, SDPA and
``torch.compile(flex_attention)``, head_dim 64/128, seq 512..16k, G 1/4/8, causal or not, about 16k tokens: TFLOP/s.
``fwdbwd``: with ``torch.autograd.grad`` (3.5x the FLOPs). ``decode``: ``flash_decode_gqa`` (n_h 32, n_kv 8, d 128,
batch 1..64, length 1k..32k) against SDPA and flex over the filled K/V: bandwidth and % of ``--hbm-peak``; also
with an int8 cache (checked against SDPA over the dequantized one). Timing: ``triton.testing.do_bench`` (L2
flushed; ``--cuda-graph``: ``do_bench_cudagraph``) through ``_harness.autorange``. An OOM or a raising call marks
its cell (``oom``, ``error``: exit code 1). Without a GPU: exit code 2. ``--smoke``: tiny float32 shapes on CPU
through Triton's interpreter (every path and check, no flex).

Commands::

    .venv/bin/python benchmarks/bench_triton.py [--mode fwd|fwdbwd|decode|all] [--quick] [--methods triton sdpa]
        [--seqs ...] [--head-dims ...] [--groups ...] [--batches ...] [--lengths ...] [--cuda-graph] [--json PATH]
    .venv/bin/python benchmarks/bench_triton.py --smoke   # CPU dry run, under a minute
"""

import functools
import os
import sys
import traceback

import _harness as H
import torch
import torch.nn.functional as F

FULL = dict(seqs=[512, 1024, 2048, 4096, 8192, 16384], head_dims=[64, 128], groups=[1, 4, 8], hidden=2048,
            tokens=16384, batches=[1, 4, 16, 64], lengths=[1024, 4096, 16384, 32768], decode_heads=32,
            decode_kv_heads=8, decode_head_dim=128, warmup_ms=25.0, rep_ms=100.0)  # fmt: skip
PRESETS = {
    "full": FULL,
    "quick": {**FULL, "seqs": [2048], "groups": [1, 8], "batches": [1, 16], "lengths": [4096, 32768],
              "warmup_ms": 10.0, "rep_ms": 40.0},
    # Tiny float32 shapes for the interpreter; 40 and the cache slack (cache_len) exercise partial blocks.
    "smoke": dict(seqs=[32, 40], head_dims=[16], groups=[1, 2], hidden=64, tokens=64, batches=[1, 2], lengths=[32, 40],
                  decode_heads=4, decode_kv_heads=2, decode_head_dim=16, warmup_ms=0.0, rep_ms=0.0, cache_len=48),
}  # fmt: skip
METHODS = ("triton", "sdpa", "flex")


@functools.cache
def compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 4096  # one specialized graph per shape
    torch._dynamo.config.accumulated_recompile_limit = 65536
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def causal_block_mask(s: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, s, s, device=device)


def attention(method: str, q, k, v, causal: bool):
    """Training-shaped (s_q == s_kv) attention by ``method``."""
    if method == "triton":
        from gqa_tune import scaled_dot_product_gqa

        return scaled_dot_product_gqa(q, k, v, is_causal=causal, backend="triton")
    if method == "sdpa":  # enable_gqa only with groups: at G = 1 it would only narrow torch's choice of kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] > k.shape[1])
    mask = causal_block_mask(q.shape[2], str(q.device)) if causal else None
    return compiled_flex()(q, k, v, block_mask=mask, enable_gqa=True)


def decode(method: str, q, kc, vc, lens, n: int, scales=None):
    """One query position over the first ``n`` positions of the cache by ``method`` (``scales``: an int8 cache's)."""
    if method == "triton":
        from gqa_tune import flash_decode_gqa

        return flash_decode_gqa(q, kc, vc, lens, **({"k_scale": scales[0], "v_scale": scales[1]} if scales else {}))
    if scales:  # the reference reads the dequantized cache
        kc, vc = (H.dequantize_kv(c, scale, q.dtype) for c, scale in zip((kc, vc), scales))
    attend = F.scaled_dot_product_attention if method == "sdpa" else compiled_flex()
    return attend(q, kc[:, :, :n], vc[:, :, :n], enable_gqa=True)


def configs(args, mode: str):
    """Per configuration of ``mode``: its result row, ``work`` (TFLOP or bytes) and the function giving its calls."""
    if mode == "decode":
        n_h, n_kv, d = args.decode_heads, args.decode_kv_heads, args.decode_head_dim
        for b, n, cache in ((b, n, c) for b in args.batches for n in args.lengths for c in ("fp", "int8")):
            per_token = d * args.dtype.itemsize if cache == "fp" else d + 4  # int8 values + a float32 scale
            yield ({"mode": mode, "batch": b, "length": n, "cache": cache, "where": f"decode b={b} len={n} n_h={n_h} "
                    f"n_kv={n_kv} d={d} {cache} cache"}, 2 * b * n_kv * n * per_token,
                   functools.partial(decode_calls, args, b, n_h, n_kv, d, n, cache == "int8"))  # fmt: skip
        return
    backward = mode == "fwdbwd"
    for d, g, causal, s in ((d, g, c, s) for d in args.head_dims for g in args.groups for c in (False, True)
                            for s in args.seqs if (args.hidden // d) % g == 0):  # fmt: skip
        n_h, b = args.hidden // d, max(1, args.tokens // s)
        yield ({"mode": mode, "head_dim": d, "group": g, "n_h": n_h, "n_kv": n_h // g, "causal": causal, "batch": b,
                "seq": s, "where": f"{mode} d={d} G={g} n_h={n_h} causal={causal} b={b} s={s}"},
               4 * b * n_h * s * s * d / (2 if causal else 1) * (3.5 if backward else 1.0) / 1e12,
               functools.partial(training_calls, args, b, n_h, n_h // g, s, d, causal, backward))  # fmt: skip


def randn(args, *shape, grad=False):
    return torch.randn(shape, device=args.device, dtype=args.dtype, requires_grad=grad)


def training_calls(args, b, n_h, n_kv, s, d, causal, backward):
    q, k, v = randn(args, b, n_h, s, d, grad=backward), *(randn(args, b, n_kv, s, d, grad=backward) for _ in "kv")
    dout = randn(args, b, n_h, s, d) if backward else None

    def step(method):
        out = attention(method, q, k, v, causal)
        return (out, *torch.autograd.grad(out, (q, k, v), dout)) if backward else (out,)

    for name, x, y in zip(("output", "dq", "dk", "dv"), step("triton"), step("sdpa")):
        torch.testing.assert_close(x, y, atol=args.atol, rtol=args.rtol, msg=lambda m, name=name: f"{name}: {m}")
    return {m: functools.partial(step, m) for m in args.methods}


def decode_calls(args, b, n_h, n_kv, d, n, int8):
    q, lens = randn(args, b, n_h, 1, d), torch.full((b,), n, device=args.device, dtype=torch.int32)
    kc, vc = (randn(args, b, n_kv, args.cache_len or n, d) for _ in "kv")
    scales = None
    if int8:
        (kc, ks), (vc, vs) = H.quantize_kv(kc, torch.int8), H.quantize_kv(vc, torch.int8)
        scales = (ks, vs)
    torch.testing.assert_close(decode("triton", q, kc, vc, lens, n, scales), decode("sdpa", q, kc, vc, lens, n, scales),
                               atol=args.atol, rtol=args.rtol)  # fmt: skip
    return {m: functools.partial(decode, m, q, kc, vc, lens, n, scales) for m in (["triton"] if int8 else args.methods)}


def measure(args, row, work: float, make_calls, errors: list) -> None:
    """Check, then time each method into ``row`` (``s``, ``iqr``, ``status``; ``per_s`` = ``work`` / median)."""
    print(row["where"], flush=True)
    row.update(s={}, iqr={}, per_s={}, status={m: "skipped" for m in METHODS})
    try:
        calls = make_calls()  # checked against SDPA first: an AssertionError aborts the benchmark
    except torch.cuda.OutOfMemoryError:
        row["status"] = {m: "oom" for m in METHODS}
        return
    for method, call in calls.items():
        try:
            with torch.inference_mode() if row["mode"] == "decode" else torch.enable_grad():
                m = H.autorange(call, label=method, min_run_time=0.0 if args.smoke else 0.5, cuda=not args.smoke,
                                cuda_graph=args.cuda_graph and row["mode"] == "decode", warmup_ms=args.warmup_ms,
                                rep_ms=args.rep_ms)  # fmt: skip
            row["s"][method], row["iqr"][method], row["status"][method] = m.median, m.iqr, "ok"
            row["per_s"][method] = work / m.median
        except torch.cuda.OutOfMemoryError:
            row["status"][method] = "oom"
        except Exception:
            row["status"][method] = "error"
            errors.append(f"{method} at {row['where']}:\n{traceback.format_exc()}")
            print(f"  ERROR {errors[-1]}", file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    others = [row["per_s"][m] for m in ("sdpa", "flex") if m in row["per_s"]]
    row["triton_over_best"] = row["per_s"]["triton"] / max(others) if "triton" in row["per_s"] and others else None


def tables(results, args) -> None:
    dtype = "fp32" if args.smoke else "bf16"
    timing = "smoke: the interpreter's times" if args.smoke else "do_bench median"

    def cell(r, method, scale=1.0, spec=".1f") -> str:  # a figure, or why there is none
        if r["status"][method] != "ok" or (args.smoke and scale != 1e6):
            return r["status"][method] if r["status"][method] != "ok" else "-"
        return format((r["s"][method] if scale == 1e6 else r["per_s"][method]) * scale, spec)

    for mode, rs in results.items():
        best = ["-" if args.smoke or r["triton_over_best"] is None else f"{r['triton_over_best']:.2f}" for r in rs]
        if mode == "decode":
            peak = 1 / args.hbm_peak
            rows = [[r["cache"].replace("fp", dtype), r["batch"], r["length"], cell(r, "triton", 1e6),
                     cell(r, "triton", 1e-12, ".2f"), *(cell(r, m, 100 * peak) for m in METHODS), x]
                    for r, x in zip(rs, best)]  # fmt: skip
            H.table(["cache", "batch", "length", "triton µs", "triton TB/s", *(f"{m} % of peak" for m in METHODS),
                     "triton/best"], rows, f"Decode ({dtype}, {timing}{', CUDA graphs' * args.cuda_graph}): n_h "
                    f"{args.decode_heads}, n_kv {args.decode_kv_heads}, d {args.decode_head_dim}; HBM peak "
                    f"{args.hbm_peak:.3g} B/s")  # fmt: skip
        else:
            rows = [[r["head_dim"], r["group"], f"{r['n_h']}/{r['n_kv']}", "yes" if r["causal"] else "no", r["batch"],
                     r["seq"], cell(r, "triton", 1e6), *(cell(r, m) for m in METHODS), x] for r, x in zip(rs, best)]
            H.table(["head_dim", "G", "n_h/n_kv", "causal", "batch", "seq", "triton µs",
                     *(f"{m} TFLOP/s" for m in METHODS), "triton/best"], rows,
                    f"{'Forward' if mode == 'fwd' else 'Forward + backward'} ({dtype}, {timing}): n_h = {args.hidden} "
                    f"// head_dim, batch = max(1, {args.tokens} // seq)")  # fmt: skip


def parse_args(argv=None):
    p = H.parser(__doc__)
    p.add_argument("--mode", choices=["fwd", "fwdbwd", "decode", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="a small subset, for a fast check on the GPU")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to time")
    for name, nargs in (("seqs", "+"), ("head-dims", "+"), ("groups", "+"), ("batches", "+"), ("lengths", "+"),
                        ("hidden", None), ("tokens", None), ("decode-heads", None), ("decode-kv-heads", None),
                        ("decode-head-dim", None), ("cache-len", None)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, nargs=nargs, help="see the module docstring; default per preset")
    p.add_argument("--warmup-ms", type=float, help="do_bench's untimed calls, in ms (default 25)")
    p.add_argument("--rep-ms", type=float, help="do_bench's timed calls, in ms (default 100)")
    p.add_argument("--cuda-graph", action="store_true", help="decode: time CUDA-graph replays (no launch overhead)")
    p.add_argument("--hbm-peak", type=float, default=3.35e12, help="HBM bytes/s for decode (default H100 SXM)")
    p.add_argument("--atol", type=float, default=2e-2, help="correctness check against SDPA")
    p.add_argument("--rtol", type=float, default=2e-2, help="correctness check against SDPA")
    args = p.parse_args(argv)
    if args.quick and args.smoke:
        p.error("--quick and --smoke do not go together")
    for name, value in PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"].items():
        setattr(args, name, value if getattr(args, name, None) is None else getattr(args, name))
    if args.decode_heads % args.decode_kv_heads:
        p.error("--decode-heads must be a multiple of --decode-kv-heads")
    args.device, args.dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    args.methods = [m for m in args.methods if not (args.smoke and m == "flex")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before gqa_tune is imported (lazily, below)
    elif not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench_triton.py needs a CUDA GPU (TRITON_INTERPRET unset); --smoke: a CPU dry run", file=sys.stderr)
        return 2
    import triton

    for head_dim in {*args.head_dims, args.decode_head_dim}:  # flash_decode_gqa would silently fall back
        problem = H.kernel_problem(torch.device(args.device), args.dtype, head_dim)
        if problem is not None:
            print(f"the Triton kernels cannot run here (head_dim {head_dim}): {problem}", file=sys.stderr)
            return 2
    env = H.start(args)
    env.update(triton=triton.__version__, gpu=None if args.smoke else torch.cuda.get_device_name())
    smoke = "SMOKE RUN: CPU, Triton interpreter, float32, tiny shapes, no flex: the times measure the interpreter"
    print(f"triton {triton.__version__}; " + (smoke if args.smoke else f"GPU {env['gpu']}, CUDA {torch.version.cuda}"))
    torch.manual_seed(args.seed)
    results, errors = {}, []
    try:
        for mode in ["fwd", "fwdbwd", "decode"] if args.mode == "all" else [args.mode]:
            results[mode] = []
            for row, work, make_calls in configs(args, mode):
                measure(args, row, work, make_calls, errors)
                results[mode].append(row)
    except AssertionError as e:
        print(f"\n{'!' * 100}\nCORRECTNESS CHECK FAILED (triton against SDPA at the last configuration above), "
              f"benchmark aborted:\n{e}\n{'!' * 100}", file=sys.stderr)
        return 1
    print(f"\nall checks passed (triton vs SDPA, atol {args.atol:g}, rtol {args.rtol:g})")
    tables(results, args)
    if errors:
        print(f"\n{len(errors)} timed call(s) raised (cells marked 'error'); tracebacks above", file=sys.stderr)
    H.finish(args, env, {"results": results})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
