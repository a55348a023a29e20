"""gqa_tune's Triton kernels against torch SDPA and compiled flex_attention, on a CUDA GPU.

Three measurements, bf16:

- ``fwd``: forward TFLOP/s of ``scaled_dot_product_gqa(..., backend="triton")``,
  ``F.scaled_dot_product_attention(..., enable_gqa=...)`` (torch picks its kernel) and
  ``torch.compile(flex_attention)(..., enable_gqa=True)`` (causal through a ``BlockMask``),
  for head_dim 64/128, seq 512..16k, G = n_h / n_kv in {1, 4, 8}, causal and not. Batch
  ``b = max(1, tokens // s)`` (about 16k tokens, as in the FlashAttention papers), ``n_h =
  hidden // head_dim`` (32 heads at head_dim 64, 16 at 128). FLOPs ``4 b n_h s^2 d``, halved
  when causal.
- ``fwdbwd``: forward + backward (``torch.autograd.grad``) of the same, FLOPs 3.5x forward.
- ``decode``: ``flash_decode_gqa`` over a KV cache (s_q = 1, n_h 32, n_kv 8, d 128, every
  row filled to the length) against SDPA and compiled flex over K/V sliced to the filled
  length. Achieved bandwidth = bytes of the filled K/V (``2 b n_kv len d * 2``) / time, also
  as a fraction of HBM peak (``--hbm-peak``, default 3.35e12 B/s, H100 SXM). Each configuration also
  runs with an int8 cache (``cache int8`` rows: the same K/V quantized per token and kv head,
  ``gqa_tune.ops.kv_quant``), where the kernel reads int8 tiles and their float32 scales: bytes
  ``2 b n_kv len (d + 4)``; checked against SDPA over the dequantized cache, and only the kernel is
  timed (the other columns are the bf16 row's business).

Every configuration is first checked: the Triton output (and for ``fwdbwd`` dQ/dK/dV) must
match SDPA's within ``--atol``/``--rtol`` (``torch.testing.assert_close``), else the run
aborts. Timing: CUDA events around each call, a 256 MiB buffer zeroed before each call
to flush L2 (untimed), ``--warmup-ms`` of untimed calls first, median over ``--rep-ms``.

``--smoke`` runs tiny float32 shapes on CPU through Triton's interpreter (no flex, no
TFLOP/s or bandwidth claims) to exercise every code path in well under a minute.

Usage: python benchmarks/bench_triton.py [--mode fwd|fwdbwd|decode|all] [--quick | --smoke]
       [--seqs ...] [--head-dims ...] [--groups ...] [--batches ...] [--lengths ...]
       [--hbm-peak B/s] [--json PATH]
"""

# gqa_tune (also through _timing) is imported only inside functions, after main() has
# decided about TRITON_INTERPRET: Triton reads it when gqa_tune's kernels are defined.

import argparse
import functools
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

DEFAULTS = {
    "full": dict(
        seqs=[512, 1024, 2048, 4096, 8192, 16384],
        head_dims=[64, 128],
        groups=[1, 4, 8],
        hidden=2048,
        tokens=16384,
        batches=[1, 4, 16, 64],
        lengths=[1024, 4096, 16384, 32768],
        decode_heads=32,
        decode_kv_heads=8,
        decode_head_dim=128,
        warmup_ms=25.0,
        rep_ms=100.0,
    ),
    "quick": dict(
        seqs=[2048],
        head_dims=[64, 128],
        groups=[1, 8],
        hidden=2048,
        tokens=16384,
        batches=[1, 16],
        lengths=[4096, 32768],
        decode_heads=32,
        decode_kv_heads=8,
        decode_head_dim=128,
        warmup_ms=10.0,
        rep_ms=40.0,
    ),
    # Tiny float32 shapes for Triton's CPU interpreter; 40 and the cache slack exercise partial blocks.
    "smoke": dict(
        seqs=[32, 40],
        head_dims=[16],
        groups=[1, 2],
        hidden=64,
        tokens=64,
        batches=[1, 2],
        lengths=[32, 40],
        decode_heads=4,
        decode_kv_heads=2,
        decode_head_dim=16,
        warmup_ms=0.0,
        rep_ms=0.0,
    ),
}
METHODS = ("triton", "sdpa", "flex")


class CorrectnessError(AssertionError):
    """The Triton output differs from SDPA's: the benchmark must not go on."""


# ----------------------------------------------------------------------------- timing


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")


def _graph_call(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay  # the bound method keeps the graph (and its memory pool) alive


def time_cuda_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float, cuda_graph: bool = False) -> float:
    """Median milliseconds per call: CUDA events around each call, L2 flushed before each (untimed)."""
    flush = _l2_flush_buffer()
    fn()  # compile / autotune outside everything
    torch.cuda.synchronize()
    call = _graph_call(fn) if cuda_graph else fn
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        call()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)  # includes the flushes: errs towards fewer calls
    n_warmup = max(1, int(warmup_ms / estimate))
    n_rep = min(2000, max(10, int(rep_ms / estimate)))
    for _ in range(n_warmup):
        call()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush.zero_()
        starts[i].record()
        call()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_cpu_ms(fn: Callable[[], object], repeats: int = 2) -> float:
    """Smoke runs only: median ``perf_counter`` milliseconds after one warmup call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- methods


def _raise_recompile_limits() -> None:
    """One compiled flex serves every shape (``dynamic=False``: one specialized graph each)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", 4096), ("accumulated_recompile_limit", 65536)):
        if hasattr(cfg, name):
            setattr(cfg, name, value)
        elif hasattr(cfg, name.replace("recompile", "cache_size")):  # the pre-2.6 names
            setattr(cfg, name.replace("recompile", "cache_size"), value)


@functools.cache
def compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    _raise_recompile_limits()
    return torch.compile(flex_attention, dynamic=False)


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def causal_block_mask(s: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal_mod, None, None, s, s, device=device)


def attention_fn(method: str, causal: bool, group: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]:
    """``f(q, k, v) -> out`` for training-shaped (s_q == s_kv) attention."""
    if method == "triton":
        from gqa_tune import scaled_dot_product_gqa

        return lambda q, k, v: scaled_dot_product_gqa(q, k, v, is_causal=causal, backend="triton")
    if method == "sdpa":
        # enable_gqa only when there is a group: at G = 1 the flag would only narrow torch's choice of kernel.
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)
    if method == "flex":
        flex = compiled_flex()

        def run(q, k, v):
            mask = causal_block_mask(q.shape[2], str(q.device)) if causal else None
            return flex(q, k, v, block_mask=mask, enable_gqa=True)

        return run
    raise ValueError(method)


def decode_fn(method: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], object]:
    """``f(q, k_cache, v_cache, cache_seqlens, length) -> out`` for one query position over the cache."""
    if method == "triton":
        from gqa_tune import flash_decode_gqa

        return lambda q, kc, vc, lens, length: flash_decode_gqa(q, kc, vc, lens)
    if method == "sdpa":
        return lambda q, kc, vc, lens, length: F.scaled_dot_product_attention(
            q, kc[:, :, :length], vc[:, :, :length], enable_gqa=True
        )
    if method == "flex":
        flex = compiled_flex()
        return lambda q, kc, vc, lens, length: flex(q, kc[:, :, :length], vc[:, :, :length], enable_gqa=True)
    raise ValueError(method)


# ----------------------------------------------------------------------------- helpers


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, where: str):
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as e:
        raise CorrectnessError(f"triton {name} differs from SDPA's at {where}:\n{e}") from None


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cell(result: Dict[str, object], method: str, key: str, spec: str, smoke: bool) -> str:
    """A table cell: a number, or why there is none ("oom", "error", "skipped", "-" in smoke runs)."""
    status = result["status"].get(method)
    if status != "ok":
        return status or "-"
    if smoke and key != "ms":
        return "-"
    return fmt(result[key].get(method), spec)


def ratio_vs_best(result: Dict[str, object], key: str) -> Optional[float]:
    """triton / best of (sdpa, flex), ``key`` a higher-is-better metric."""
    values = result[key]
    others = [values[m] for m in ("sdpa", "flex") if values.get(m) is not None]
    if values.get("triton") is None or not others:
        return None
    return values["triton"] / max(others)


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.smoke
        self.device = "cpu" if args.smoke else "cuda"
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.methods = [m for m in args.methods if not (self.smoke and m == "flex")]
        self.errors: List[str] = []

    def time_ms(self, fn: Callable[[], object], cuda_graph: bool = False) -> float:
        if self.smoke:
            return time_cpu_ms(fn)
        return time_cuda_ms(fn, self.args.warmup_ms, self.args.rep_ms, cuda_graph)

    def measure(self, result: Dict[str, object], method: str, fn: Callable[[], object], cuda_graph: bool = False):
        """Time ``fn`` into ``result["ms"][method]``; an OOM or an error marks the cell instead of stopping."""
        try:
            result["ms"][method] = self.time_ms(fn, cuda_graph)
            result["status"][method] = "ok"
        except torch.cuda.OutOfMemoryError:
            result["status"][method] = "oom"
            print(f"  {method}: oom", flush=True)
        except Exception:
            result["status"][method] = "error"
            message = f"{method} at {result['where']}:\n{traceback.format_exc()}"
            self.errors.append(message)
            print(f"  ERROR {message}", file=sys.stderr, flush=True)
        free_memory()

    def randn(self, *shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(shape, device=self.device, dtype=self.dtype, requires_grad=grad)

    # ------------------------------------------------------------------- fwd / fwd+bwd

    def training_configs(self):
        a = self.args
        for head_dim in a.head_dims:
            n_h = a.hidden // head_dim
            for group in a.groups:
                if n_h < group or n_h % group:
                    print(f"skipping head_dim {head_dim}, G={group}: {n_h} query heads", flush=True)
                    continue
                for causal in (False, True):
                    for s in a.seqs:
                        yield head_dim, n_h, n_h // group, group, causal, max(1, a.tokens // s), s

    def run_training(self, backward: bool) -> List[Dict[str, object]]:
        mode = "fwdbwd" if backward else "fwd"
        results = []
        for head_dim, n_h, n_kv, group, causal, b, s in self.training_configs():
            flops = 4 * b * n_h * s * s * head_dim / (2 if causal else 1) * (3.5 if backward else 1.0)
            where = f"{mode} head_dim={head_dim} G={group} (n_h={n_h}, n_kv={n_kv}) causal={causal} b={b} s={s}"
            result = {
                "mode": mode, "head_dim": head_dim, "n_h": n_h, "n_kv": n_kv, "group": group, "causal": causal,
                "batch": b, "seq": s, "flops": flops, "where": where,
                "ms": {}, "tflops": {}, "status": {m: "skipped" for m in METHODS},
            }  # fmt: skip
            results.append(result)
            print(where, flush=True)
            try:
                self._training_config(result, backward, b, n_h, n_kv, s, head_dim, causal, group)
            except torch.cuda.OutOfMemoryError:
                result["status"] = {m: "oom" for m in METHODS}
                print("  oom (inputs or the SDPA reference)", flush=True)
            free_memory()
            for m in METHODS:
                ms = result["ms"].get(m)
                result["tflops"][m] = None if ms is None else flops / (ms * 1e-3) / 1e12
            result["triton_over_best"] = ratio_vs_best(result, "tflops")
            if not self.smoke:
                line = "  ".join(f"{m} {cell(result, m, 'tflops', '.1f', False)}" for m in METHODS)
                print(f"  TFLOP/s: {line}  triton/best {fmt(result['triton_over_best'], '.2f')}", flush=True)
        return results

    def _training_config(self, result, backward, b, n_h, n_kv, s, head_dim, causal, group) -> None:
        a = self.args
        q = self.randn(b, n_h, s, head_dim, grad=backward)
        k = self.randn(b, n_kv, s, head_dim, grad=backward)
        v = self.randn(b, n_kv, s, head_dim, grad=backward)
        dout = self.randn(b, n_h, s, head_dim) if backward else None

        def step(attn):
            out = attn(q, k, v)
            if not backward:
                return (out,)
            return (out, *torch.autograd.grad(out, (q, k, v), dout))

        # Correctness first: triton against SDPA, abort on a mismatch.
        expected = step(attention_fn("sdpa", causal, group))
        actual = step(attention_fn("triton", causal, group))
        for name, x, y in zip(("output", "dq", "dk", "dv"), actual, expected):
            check_close(name, x, y, a.atol, a.rtol, result["where"])
        del expected, actual
        for method in self.methods:
            attn = attention_fn(method, causal, group)
            self.measure(result, method, lambda attn=attn: step(attn))

    # ------------------------------------------------------------------- decode

    def run_decode(self) -> List[Dict[str, object]]:
        a = self.args
        n_h, n_kv, head_dim = a.decode_heads, a.decode_kv_heads, a.decode_head_dim
        elem = torch.finfo(self.dtype).bits // 8
        results = []
        for b, length, cache in ((b, n, c) for b in a.batches for n in a.lengths for c in ("fp", "int8")):
            cache_len = a.cache_len or length
            per_token = head_dim * elem if cache == "fp" else head_dim + 4  # int8 values + a float32 scale
            kv_bytes = 2 * b * n_kv * length * per_token  # K and V, filled positions only
            where = f"decode b={b} len={length} (cache {cache_len}) n_h={n_h} n_kv={n_kv} d={head_dim}"
            where += " int8 cache" if cache == "int8" else ""
            result = {
                "mode": "decode", "batch": b, "length": length, "cache_len": cache_len, "n_h": n_h,
                "n_kv": n_kv, "head_dim": head_dim, "kv_bytes": kv_bytes, "where": where, "cache": cache,
                "ms": {}, "bytes_per_s": {}, "peak_fraction": {}, "status": {m: "skipped" for m in METHODS},
            }  # fmt: skip
            results.append(result)
            print(where, flush=True)
            if cache_len < length:
                print(f"  skipped: --cache-len {cache_len} is below the length", flush=True)
                continue
            try:
                configure = self._decode_config if cache == "fp" else self._decode_config_int8
                configure(result, b, n_h, n_kv, head_dim, length, cache_len)
            except torch.cuda.OutOfMemoryError:
                result["status"] = {m: "oom" for m in METHODS}
                print("  oom (cache or the SDPA reference)", flush=True)
            free_memory()
            for m in METHODS:
                ms = result["ms"].get(m)
                result["bytes_per_s"][m] = None if ms is None else kv_bytes / (ms * 1e-3)
                result["peak_fraction"][m] = None if ms is None else result["bytes_per_s"][m] / a.hbm_peak
            result["triton_over_best"] = ratio_vs_best(result, "bytes_per_s")
            if not self.smoke:
                line = "  ".join(f"{m} {cell(result, m, 'peak_fraction', '.1%', False)}" for m in METHODS)
                print(f"  of HBM peak: {line}  triton/best {fmt(result['triton_over_best'], '.2f')}", flush=True)
        return results

    def _decode_config(self, result, b, n_h, n_kv, head_dim, length, cache_len) -> None:
        a = self.args
        q = self.randn(b, n_h, 1, head_dim)
        k_cache = self.randn(b, n_kv, cache_len, head_dim)
        v_cache = self.randn(b, n_kv, cache_len, head_dim)
        lens = torch.full((b,), length, device=self.device, dtype=torch.int32)
        expected = decode_fn("sdpa")(q, k_cache, v_cache, lens, length)
        actual = decode_fn("triton")(q, k_cache, v_cache, lens, length)
        check_close("decode output", actual, expected, a.atol, a.rtol, result["where"])
        del expected, actual
        with torch.inference_mode():
            for method in self.methods:
                f = decode_fn(method)
                self.measure(result, method, lambda f=f: f(q, k_cache, v_cache, lens, length), a.cuda_graph)

    def _decode_config_int8(self, result, b, n_h, n_kv, head_dim, length, cache_len) -> None:
        from gqa_tune import flash_decode_gqa
        from gqa_tune.ops.kv_quant import dequantize_kv, quantize_kv

        a = self.args
        q = self.randn(b, n_h, 1, head_dim)
        (k_cache, k_scale), (v_cache, v_scale) = (quantize_kv(self.randn(b, n_kv, cache_len, head_dim), torch.int8)
                                                  for _ in range(2))  # fmt: skip
        lens = torch.full((b,), length, device=self.device, dtype=torch.int32)
        expected = decode_fn("sdpa")(q, dequantize_kv(k_cache, k_scale, q.dtype),
                                     dequantize_kv(v_cache, v_scale, q.dtype), lens, length)  # fmt: skip
        actual = flash_decode_gqa(q, k_cache, v_cache, lens, k_scale=k_scale, v_scale=v_scale)
        check_close("int8 decode output", actual, expected, a.atol, a.rtol, result["where"])
        del expected, actual
        with torch.inference_mode():
            fn = functools.partial(flash_decode_gqa, q, k_cache, v_cache, lens, k_scale=k_scale, v_scale=v_scale)
            self.measure(result, "triton", fn, a.cuda_graph)


# ----------------------------------------------------------------------------- tables


def training_table(results: Sequence[Dict[str, object]], smoke: bool) -> str:
    headers = ["head_dim", "G", "n_h/n_kv", "causal", "batch", "seq", "triton ms"]
    headers += [f"{m} TFLOP/s" for m in METHODS] + ["triton/best"]
    rows = []
    for r in results:
        row = [r["head_dim"], r["group"], f"{r['n_h']}/{r['n_kv']}", "yes" if r["causal"] else "no", r["batch"]]
        row += [r["seq"], cell(r, "triton", "ms", ".3f", smoke)]
        row += [cell(r, m, "tflops", ".1f", smoke) for m in METHODS]
        row.append("-" if smoke else fmt(r["triton_over_best"], ".2f"))
        rows.append(row)
    from _timing import markdown_table

    return markdown_table(headers, rows)


def decode_table(results: Sequence[Dict[str, object]], smoke: bool) -> str:
    headers = ["cache", "batch", "length", "KV MiB", "triton µs", "triton TB/s"]
    headers += [f"{m} % of peak" for m in METHODS] + ["triton/best"]
    rows = []
    for r in results:
        ok = r["status"].get("triton") == "ok"
        us = f"{r['ms']['triton'] * 1e3:.1f}" if ok else cell(r, "triton", "ms", "", smoke)
        tbs = r["bytes_per_s"].get("triton")
        cache = "int8" if r.get("cache") == "int8" else "bf16" if not smoke else "fp32"
        row = [cache, r["batch"], r["length"], f"{r['kv_bytes'] / 2**20:.1f}", us]
        row.append("-" if smoke or tbs is None else f"{tbs / 1e12:.2f}")
        row += [cell(r, m, "peak_fraction", ".1%", smoke) for m in METHODS]
        row.append("-" if smoke else fmt(r["triton_over_best"], ".2f"))
        rows.append(row)
    from _timing import markdown_table

    return markdown_table(headers, rows)


# ----------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["fwd", "fwdbwd", "decode", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="a small subset, for a fast check on the GPU")
    p.add_argument("--smoke", action="store_true", help="tiny float32 shapes on CPU through Triton's interpreter")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to time")
    p.add_argument("--seqs", type=int, nargs="+", help="fwd/fwdbwd sequence lengths (default 512 .. 16384)")
    p.add_argument("--head-dims", type=int, nargs="+", help="fwd/fwdbwd head dims (default 64 128)")
    p.add_argument("--groups", type=int, nargs="+", help="fwd/fwdbwd G = n_h / n_kv (default 1 4 8)")
    p.add_argument("--hidden", type=int, help="n_h = hidden // head_dim (default 2048)")
    p.add_argument("--tokens", type=int, help="fwd/fwdbwd batch = max(1, tokens // seq) (default 16384)")
    p.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 4 16 64)")
    p.add_argument("--lengths", type=int, nargs="+", help="decode filled cache lengths (default 1024 .. 32768)")
    p.add_argument("--cache-len", type=int, help="decode: allocate caches this long (default: each length)")
    p.add_argument("--decode-heads", type=int, help="decode query heads (default 32)")
    p.add_argument("--decode-kv-heads", type=int, help="decode kv heads (default 8)")
    p.add_argument("--decode-head-dim", type=int, help="decode head dim (default 128)")
    p.add_argument("--cuda-graph", action="store_true", help="decode: time CUDA-graph replays (no launch overhead)")
    p.add_argument("--hbm-peak", type=float, default=3.35e12, help="HBM bytes/s for decode (default H100 SXM)")
    p.add_argument("--warmup-ms", type=float, help="untimed calls first, in ms of GPU time (default 25)")
    p.add_argument("--rep-ms", type=float, help="timed calls, in ms of GPU time (default 100)")
    p.add_argument("--atol", type=float, default=2e-2, help="correctness check against SDPA")
    p.add_argument("--rtol", type=float, default=2e-2, help="correctness check against SDPA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.quick and args.smoke:
        p.error("--quick and --smoke do not go together")
    preset = DEFAULTS["smoke" if args.smoke else "quick" if args.quick else "full"]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke and args.cache_len is None:
        args.cache_len = max(args.lengths) + 8  # slack past the fill: the kernel must stop at cache_seqlens
    if args.decode_heads % args.decode_kv_heads:
        p.error("--decode-heads must be a multiple of --decode-kv-heads")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before gqa_tune is imported (below)
    elif not torch.cuda.is_available():
        print("bench_triton.py needs a CUDA GPU; use --smoke for a CPU dry run", file=sys.stderr)
        return 2
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to benchmark on the GPU (or use --smoke)", file=sys.stderr)
        return 2

    import triton
    from _timing import environment, print_environment, write_json

    from gqa_tune.ops.backends.triton import kernel_problem

    torch.manual_seed(args.seed)
    runner = Runner(args)
    # flash_decode_gqa silently falls back to PyTorch where the kernels cannot run: make sure they can.
    for head_dim in {*args.head_dims, args.decode_head_dim}:
        problem = kernel_problem(torch.device(runner.device), runner.dtype, head_dim)
        if problem is not None:
            print(f"the Triton kernels cannot run here (head_dim {head_dim}): {problem}", file=sys.stderr)
            return 2

    env = environment()
    env["triton"] = triton.__version__
    env["gpu"] = torch.cuda.get_device_name() if not args.smoke else None
    print_environment(env)
    if args.smoke:
        print(f"triton {triton.__version__}; SMOKE RUN: CPU, Triton interpreter, float32, tiny shapes, no flex;")
        print("timings below only show the code ran: they measure the interpreter, not the kernels")
    else:
        props = torch.cuda.get_device_properties(0)
        print(
            f"GPU: {env['gpu']} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
            f"triton {triton.__version__}, CUDA {torch.version.cuda}, HBM peak for decode {args.hbm_peak:.3g} B/s"
        )
    print(flush=True)

    modes = ["fwd", "fwdbwd", "decode"] if args.mode == "all" else [args.mode]
    results: Dict[str, List[Dict[str, object]]] = {}
    t0 = time.perf_counter()
    try:
        for mode in modes:
            results[mode] = runner.run_decode() if mode == "decode" else runner.run_training(mode == "fwdbwd")
    except CorrectnessError as e:
        print("\n" + "!" * 100, file=sys.stderr)
        print(f"CORRECTNESS CHECK FAILED, benchmark aborted: {e}", file=sys.stderr)
        print("!" * 100, file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0

    dtype = "float32 (smoke)" if args.smoke else "bf16"
    timing = "perf_counter, CPU" if args.smoke else f"median of CUDA-event times, warmup {args.warmup_ms:g} ms"
    print(f"\nall checks passed (triton vs SDPA, atol {args.atol:g}, rtol {args.rtol:g}); {elapsed:.0f} s")
    for mode in modes:
        print()
        if mode == "decode":
            graph = ", CUDA-graph replays" if args.cuda_graph else ""
            print(
                f"Decode ({dtype}, {timing}{graph}): flash_decode_gqa vs SDPA / flex over K/V sliced to the "
                f"length; n_h {args.decode_heads}, n_kv {args.decode_kv_heads}, d {args.decode_head_dim}, s_q 1; "
                f"% of HBM peak {args.hbm_peak:.3g} B/s (K/V bytes of the filled length / time)"
            )
            print()
            print(decode_table(results[mode], args.smoke))
        else:
            title = "Forward" if mode == "fwd" else "Forward + backward (FLOPs 3.5x forward)"
            print(
                f"{title} ({dtype}, {timing}): n_h = {args.hidden} // head_dim, batch = max(1, {args.tokens} // seq); "
                f"triton/best = triton / best of the others"
            )
            print()
            print(training_table(results[mode], args.smoke))
    if runner.errors:
        print(f"\n{len(runner.errors)} timed call(s) raised (cells marked 'error'); tracebacks above", file=sys.stderr)
    write_json(args.json, {"benchmark": "triton", "env": env, "args": vars(args), "results": results})
    return 1 if runner.errors else 0


if __name__ == "__main__":
    sys.exit(main())
