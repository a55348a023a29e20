"""How fast are gqa_tune's Triton kernels against torch SDPA and compiled flex_attention, on a CUDA GPU?

Modes (``--mode``, default all), bf16, every configuration checked before it is timed (the Triton output, and
for ``fwdbwd`` dQ/dK/dV, against SDPA's within ``--atol``/``--rtol``; a mismatch aborts with exit code 1):

- ``fwd``: ``scaled_dot_product_gqa(..., backend="triton")`` against ``F.scaled_dot_product_attention`` (torch
  picks its kernel; ``enable_gqa`` only when G > 1) and ``torch.compile(flex_attention)`` (``dynamic=False``,
  causal through a cached ``BlockMask``): head_dim 64 / 128, seq 512..16384, G = n_h / n_kv in {1, 4, 8}, causal
  and not, ``n_h = --hidden // head_dim``, batch ``max(1, --tokens // seq)``; TFLOP/s from ``4 b n_h s^2 d``
  FLOPs, halved when causal.
- ``fwdbwd``: forward then ``torch.autograd.grad`` for q, k, v, timed together; FLOPs 3.5x forward.
- ``decode``: ``flash_decode_gqa`` over a KV cache (s_q 1, n_h 32, n_kv 8, d 128, every row filled to the
  length; batch 1..64, length 1k..32k) against SDPA and flex over K/V sliced to the length; bandwidth = bytes of
  the filled K/V / time, and its fraction of ``--hbm-peak`` (H100 SXM). Each configuration runs again with the
  cache in int8 (``cache int8`` rows: per-token scales, ``2 b n_kv len (d + 4)`` bytes), checked against SDPA
  over the dequantized cache; only the kernel is timed there. ``--cuda-graph``: CUDA-graph replays.

Timing: ``_harness.autorange``, i.e. ``triton.testing.do_bench`` (L2 flushed before each call; ``--warmup-ms``,
``--rep-ms``) or ``do_bench_cudagraph``; the median is reported. The first call (flex's compilation) is untimed.
An OOM marks its cell ``oom``; a call that raises, ``error`` (exit code 1 after the tables). Without a GPU the
script exits with code 2; ``--smoke`` runs tiny float32 shapes on CPU through Triton's interpreter (every code
path and check, no flex, times of the interpreter only). ``--quick``: a small subset for a fast GPU check.

Commands::

    .venv/bin/python benchmarks/bench_triton.py [--mode fwd|fwdbwd|decode|all] [--quick] [--methods triton sdpa]
        [--seqs ...] [--head-dims ...] [--groups ...] [--batches ...] [--lengths ...] [--cuda-graph] [--json PATH]
    .venv/bin/python benchmarks/bench_triton.py --smoke   # CPU dry run, about 30 s
"""

import argparse
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
    # Tiny float32 shapes for the interpreter; 40 and the cache slack exercise partial blocks.
    "smoke": dict(seqs=[32, 40], head_dims=[16], groups=[1, 2], hidden=64, tokens=64, batches=[1, 2], lengths=[32, 40],
                  decode_heads=4, decode_kv_heads=2, decode_head_dim=16, warmup_ms=0.0, rep_ms=0.0),
}  # fmt: skip
METHODS = ("triton", "sdpa", "flex")


class CorrectnessError(AssertionError):
    """The Triton output differs from SDPA's: the benchmark must not go on."""


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


def attention_fn(method: str, causal: bool, group: int):
    """``f(q, k, v)`` for training-shaped (s_q == s_kv) attention."""
    if method == "triton":
        from gqa_tune import scaled_dot_product_gqa

        return lambda q, k, v: scaled_dot_product_gqa(q, k, v, is_causal=causal, backend="triton")
    if method == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)
    mask = (lambda q: causal_block_mask(q.shape[2], str(q.device))) if causal else (lambda q: None)
    return lambda q, k, v: compiled_flex()(q, k, v, block_mask=mask(q), enable_gqa=True)


def decode_fn(method: str):
    """``f(q, k_cache, v_cache, cache_seqlens, length)``: one query position over the cache."""
    if method == "triton":
        from gqa_tune import flash_decode_gqa

        return lambda q, kc, vc, lens, n: flash_decode_gqa(q, kc, vc, lens)
    attend = F.scaled_dot_product_attention if method == "sdpa" else compiled_flex()
    return lambda q, kc, vc, lens, n: attend(q, kc[:, :, :n], vc[:, :, :n], enable_gqa=True)


def check_close(name, actual, expected, args, where) -> None:
    try:
        torch.testing.assert_close(actual, expected, atol=args.atol, rtol=args.rtol)
    except AssertionError as e:
        raise CorrectnessError(f"triton {name} differs from SDPA's at {where}:\n{e}") from None


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args, self.smoke, self.errors = args, args.smoke, []
        self.device, self.dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
        self.methods = [m for m in args.methods if not (self.smoke and m == "flex")]

    def randn(self, *shape, grad=False):
        return torch.randn(shape, device=self.device, dtype=self.dtype, requires_grad=grad)

    def measure(self, result, method, fn, cuda_graph=False) -> None:
        """Median seconds of ``fn`` into ``result["s"][method]``; an OOM or an error marks the cell instead."""
        a = self.args
        try:
            m = H.autorange(fn, label=method, min_run_time=0.0 if self.smoke else 0.5, cuda=not self.smoke,
                            cuda_graph=cuda_graph, warmup_ms=a.warmup_ms, rep_ms=a.rep_ms)  # fmt: skip
            result["s"][method], result["iqr"][method], result["status"][method] = m.median, m.iqr, "ok"
        except torch.cuda.OutOfMemoryError:
            result["status"][method] = "oom"
        except Exception:
            result["status"][method] = "error"
            self.errors.append(f"{method} at {result['where']}:\n{traceback.format_exc()}")
            print(f"  ERROR {self.errors[-1]}", file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, result, configure, work: float, key: str) -> None:
        """``configure(result)`` checks and times; then per method ``key`` = ``work`` / time, and triton / best."""
        print(result["where"], flush=True)
        try:
            configure(result)
        except torch.cuda.OutOfMemoryError:
            result["status"] = {m: "oom" for m in METHODS}
        result[key] = {m: work / seconds for m, seconds in result["s"].items()}
        others = [result[key][m] for m in ("sdpa", "flex") if m in result[key]]
        if "triton" in result[key] and others:
            result["triton_over_best"] = result[key]["triton"] / max(others)

    def training(self, backward: bool):
        a, mode, results = self.args, "fwdbwd" if backward else "fwd", []
        for d in a.head_dims:
            n_h = a.hidden // d
            for g in (g for g in a.groups if n_h % g == 0):
                for causal in (False, True):
                    for s in a.seqs:
                        b = max(1, a.tokens // s)
                        flops = 4 * b * n_h * s * s * d / (2 if causal else 1) * (3.5 if backward else 1.0) / 1e12
                        r = {"mode": mode, "head_dim": d, "n_h": n_h, "n_kv": n_h // g, "group": g, "causal": causal,
                             "batch": b, "seq": s, "where": f"{mode} d={d} G={g} n_h={n_h} causal={causal} b={b} s={s}",
                             "s": {}, "iqr": {}, "status": {m: "skipped" for m in METHODS}}  # fmt: skip
                        self.run(r, functools.partial(self._training, backward, b, n_h, n_h // g, s, d, causal, g),
                                 flops, "tflops")  # fmt: skip
                        results.append(r)
        return results

    def _training(self, backward, b, n_h, n_kv, s, d, causal, g, result) -> None:
        q, k, v = self.randn(b, n_h, s, d, grad=backward), *(self.randn(b, n_kv, s, d, grad=backward) for _ in "kv")
        dout = self.randn(b, n_h, s, d) if backward else None

        def step(attn):
            out = attn(q, k, v)
            return (out, *torch.autograd.grad(out, (q, k, v), dout)) if backward else (out,)

        expected, actual = step(attention_fn("sdpa", causal, g)), step(attention_fn("triton", causal, g))
        for name, x, y in zip(("output", "dq", "dk", "dv"), actual, expected):
            check_close(name, x, y, self.args, result["where"])
        del expected, actual
        for method in self.methods:
            self.measure(result, method, functools.partial(step, attention_fn(method, causal, g)))

    def decode(self):
        a, results = self.args, []
        n_h, n_kv, d = a.decode_heads, a.decode_kv_heads, a.decode_head_dim
        for b, n, cache in ((b, n, c) for b in a.batches for n in a.lengths for c in ("fp", "int8")):
            per_token = d * self.dtype.itemsize if cache == "fp" else d + 4  # int8 values + a float32 scale
            where = f"decode b={b} len={n} (cache {a.cache_len or n}) n_h={n_h} n_kv={n_kv} d={d}"
            where += " int8 cache" if cache == "int8" else ""
            r = {"mode": "decode", "batch": b, "length": n, "cache_len": a.cache_len or n, "cache": cache,
                 "kv_bytes": 2 * b * n_kv * n * per_token, "s": {}, "iqr": {},
                 "status": {m: "skipped" for m in METHODS}, "where": where}  # fmt: skip
            if r["cache_len"] >= n:
                self.run(r, functools.partial(self._decode, b, n_h, n_kv, d, n, r["cache_len"], cache), r["kv_bytes"],
                         "bytes_per_s")  # fmt: skip
            r["peak_fraction"] = {m: bw / a.hbm_peak for m, bw in r.get("bytes_per_s", {}).items()}
            results.append(r)
        return results

    def _decode(self, b, n_h, n_kv, d, n, cache_len, cache, result) -> None:
        from gqa_tune import flash_decode_gqa

        q, lens = self.randn(b, n_h, 1, d), torch.full((b,), n, device=self.device, dtype=torch.int32)
        kc, vc = (self.randn(b, n_kv, cache_len, d) for _ in "kv")
        if cache == "int8":
            (kc, ks), (vc, vs) = H.quantize_kv(kc, torch.int8), H.quantize_kv(vc, torch.int8)
            expected = decode_fn("sdpa")(q, H.dequantize_kv(kc, ks, q.dtype), H.dequantize_kv(vc, vs, q.dtype), lens, n)
            calls = {"triton": functools.partial(flash_decode_gqa, q, kc, vc, lens, k_scale=ks, v_scale=vs)}
        else:
            expected = decode_fn("sdpa")(q, kc, vc, lens, n)
            calls = {m: functools.partial(decode_fn(m), q, kc, vc, lens, n) for m in self.methods}
        name = "int8 decode output" if cache == "int8" else "decode output"
        check_close(name, calls["triton"](), expected, self.args, result["where"])
        with torch.inference_mode():
            for method, call in calls.items():
                self.measure(result, method, call, self.args.cuda_graph)


def cell(r, method, key, spec, smoke) -> str:
    """A number, or why there is none (``oom``, ``error``, ``skipped``; ``-`` for figures of a smoke run)."""
    if r["status"].get(method) != "ok":
        return r["status"].get(method) or "-"
    return "-" if smoke and key != "s" else format(r[key][method] * (1e6 if key == "s" else 1), spec)  # s: in µs


def tables(results, args) -> None:
    smoke = args.smoke
    dtype, timing = ("fp32", "smoke: the interpreter's times") if smoke else ("bf16", "do_bench median")
    for mode, rs in results.items():
        best = ["-" if smoke or r.get("triton_over_best") is None else f"{r['triton_over_best']:.2f}" for r in rs]
        if mode == "decode":
            headers = ["cache", "batch", "length", "KV MiB", "triton µs", "triton B/s"]
            headers += [f"{m} % of peak" for m in METHODS]
            rows = [[r["cache"].replace("fp", dtype), r["batch"], r["length"], f"{r['kv_bytes'] / 2**20:.1f}",
                     cell(r, "triton", "s", ".1f", smoke), cell(r, "triton", "bytes_per_s", ".3g", smoke),
                     *(cell(r, m, "peak_fraction", ".1%", smoke) for m in METHODS), ratio]
                    for r, ratio in zip(rs, best)]
            title = (f"Decode ({dtype}, {timing}{', CUDA graphs' * args.cuda_graph}): n_h {args.decode_heads}, n_kv "
                     f"{args.decode_kv_heads}, d {args.decode_head_dim}; HBM peak {args.hbm_peak:.3g} B/s")
        else:
            headers = ["head_dim", "G", "n_h/n_kv", "causal", "batch", "seq", "triton µs"]
            headers += [f"{m} TFLOP/s" for m in METHODS]
            rows = [[r["head_dim"], r["group"], f"{r['n_h']}/{r['n_kv']}", "yes" if r["causal"] else "no", r["batch"],
                     r["seq"], cell(r, "triton", "s", ".1f", smoke),
                     *(cell(r, m, "tflops", ".1f", smoke) for m in METHODS), ratio] for r, ratio in zip(rs, best)]
            title = (f"{'Forward' if mode == 'fwd' else 'Forward + backward'} ({dtype}, {timing}): n_h = {args.hidden} "
                     f"// head_dim, batch = max(1, {args.tokens} // seq)")
        H.table([*headers, "triton/best"], rows, title)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = H.parser(__doc__)
    p.add_argument("--mode", choices=["fwd", "fwdbwd", "decode", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="a small subset, for a fast check on the GPU")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to time")
    for name, kind in (("seqs", "+"), ("head-dims", "+"), ("groups", "+"), ("batches", "+"), ("lengths", "+"),
                       ("hidden", None), ("tokens", None), ("decode-heads", None), ("decode-kv-heads", None),
                       ("decode-head-dim", None), ("cache-len", None)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, nargs=kind, help="see the module docstring; default per preset")
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
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke and args.cache_len is None:
        args.cache_len = max(args.lengths) + 8  # slack past the fill: the kernel must stop at cache_seqlens
    if args.decode_heads % args.decode_kv_heads:
        p.error("--decode-heads must be a multiple of --decode-kv-heads")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before gqa_tune is imported (below)
    elif not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench_triton.py needs a CUDA GPU (and TRITON_INTERPRET unset); use --smoke for a CPU dry run",
              file=sys.stderr)
        return 2
    import triton

    runner = Runner(args)
    for head_dim in {*args.head_dims, args.decode_head_dim}:  # flash_decode_gqa would silently fall back
        problem = H.kernel_problem(torch.device(runner.device), runner.dtype, head_dim)
        if problem is not None:
            print(f"the Triton kernels cannot run here (head_dim {head_dim}): {problem}", file=sys.stderr)
            return 2
    env = H.start(args)
    env.update(triton=triton.__version__, gpu=None if args.smoke else torch.cuda.get_device_name())
    smoke = "SMOKE RUN: CPU, Triton interpreter, float32, tiny shapes, no flex: the times measure the interpreter"
    print(f"triton {triton.__version__}; " + (smoke if args.smoke else f"GPU {env['gpu']}, CUDA {torch.version.cuda}"))
    torch.manual_seed(args.seed)
    results = {}
    try:
        for mode in ["fwd", "fwdbwd", "decode"] if args.mode == "all" else [args.mode]:
            results[mode] = runner.decode() if mode == "decode" else runner.training(mode == "fwdbwd")
    except CorrectnessError as e:
        print(f"\n{'!' * 100}\nCORRECTNESS CHECK FAILED, benchmark aborted: {e}\n{'!' * 100}", file=sys.stderr)
        return 1
    print(f"\nall checks passed (triton vs SDPA, atol {args.atol:g}, rtol {args.rtol:g})")
    tables(results, args)
    if runner.errors:
        print(f"\n{len(runner.errors)} timed call(s) raised (cells marked 'error'); tracebacks above", file=sys.stderr)
    H.finish(args, env, {"results": results})
    return 1 if runner.errors else 0


if __name__ == "__main__":
    sys.exit(main())
