"""What every benchmark shares (not a public API): timing, reports, the model shapes, gqa_tune's internals.

Timing: :func:`autorange` times repeated calls of one function (CPU: ``torch.utils.benchmark.Timer``'s
``blocked_autorange``; CUDA: ``triton.testing.do_bench``, L2 flushed before each call, or ``do_bench_cudagraph``).
:func:`time_cases` times single calls of several cases with ``torch.utils.benchmark``'s timer, taking turns
(``interleaved``: each call finds the CPU caches as the other case left them, and a drifting machine load hits all
alike) or not (``blocked``), with an untimed cleanup after each call; a call that returns a ``float`` reports its
own seconds (e.g. a decode loop timed inside a generation call). Results are ``Measurement`` objects; tables
show ``median (IQR)``. gqa_tune is imported lazily (``bench_triton.py --smoke`` sets ``TRITON_INTERPRET`` first), its
names beyond the stable top-level API through :data:`INTERNAL`, the one place to change when they move.
"""

import argparse
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.benchmark import Measurement, Timer
from torch.utils.benchmark.utils.common import TaskSpec
from torch.utils.benchmark.utils.timer import timer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TUNE = str(Path(sys.executable).with_name("tune"))
FULL, LORA = (f"gqa_tune/recipes/{name}_finetune_single_device.py" for name in ("full", "lora"))

#: gqa_tune's names beyond its stable top-level API, by the modules that hold them (the first one found wins).
INTERNAL = {name: modules.split() for names, modules in (
    ("from_torchtune_attention", "gqa_tune.modules.swap"), ("convert_model_ pool_heads", "gqa_tune.convert.pooling"),
    ("latest_checkpoint load_checkpoint", "gqa_tune.training.checkpoint"),
    ("hf_config model_shape", "gqa_tune.hf gqa_tune.training.checkpoint"),
    ("task_accuracy heldout_loss", "gqa_tune.training.evaluate"), ("GenerateRecipe", "gqa_tune.recipes.generate"),
    ("ConfigError", "gqa_tune.config_check"), ("weight_bytes", "gqa_tune.quantization"),
    ("resolve_data_file", "gqa_tune.data"), ("document_block_mask", "gqa_tune.data.packing"),
    ("quantize_kv dequantize_kv", "gqa_tune.ops.kv_quant"), ("kernel_problem", "gqa_tune.ops.backends.triton"),
    ("dispatch", "gqa_tune.ops"),  # the module whose hide_masked_nans attention calls
) for name in names.split()}  # fmt: skip


def __getattr__(name: str):
    for module in INTERNAL.get(name, ()):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"_harness has no {name!r} (looked in {INTERNAL.get(name)})")


def measurement(label: str, seconds: Sequence[float]) -> Measurement:
    """A ``Measurement`` of one call per sample (``seconds``)."""
    spec = TaskSpec(stmt=label, setup="", label=label, num_threads=torch.get_num_threads())
    return Measurement(number_per_run=1, raw_times=list(seconds), task_spec=spec)


def fmt(m: Measurement, scale: float = 1e3, digits: int = 3) -> str:
    """``median (IQR)`` of ``m`` times ``scale`` (default: milliseconds)."""
    return f"{m.median * scale:.{digits}f} ({m.iqr * scale:.{digits}f})"


def autorange(fn: Callable[[], object], *, label: str = "", min_run_time: float = 0.5, cuda: bool = False,
              cuda_graph: bool = False, warmup_ms: float = 25, rep_ms: float = 100) -> Measurement:  # fmt: skip
    """Time repeated calls of ``fn``: ``Timer.blocked_autorange`` on CPU, ``triton.testing.do_bench`` on CUDA
    (``do_bench_cudagraph`` with ``cuda_graph``: replays of a CUDA graph of the calls, no launch overhead)."""
    if cuda:
        from triton.testing import do_bench, do_bench_cudagraph

        ms = do_bench_cudagraph(fn, rep=rep_ms, return_mode="all") if cuda_graph else do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")  # fmt: skip
        return measurement(label, [t / 1e3 for t in ms])
    t = Timer("fn()", globals={"fn": fn}, label=label, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time)


def time_cases(cases: Dict[str, object], repeats: int, warmup: int = 1, order: str = "interleaved"):
    """Per case (name -> ``fn`` or ``(fn, cleanup)``), ``repeats`` timed calls after ``warmup`` untimed ones, the
    cases taking turns (``order="interleaved"``) or not (``"blocked"``); see the module docstring."""
    if order not in ("interleaved", "blocked"):
        raise ValueError(f"order must be 'interleaved' or 'blocked', got {order!r}")
    seconds: Dict[str, List[float]] = {name: [] for name in cases}  # the cases' Measurements, by name
    calls = range(warmup + repeats)
    plan = [(n, i) for i in calls for n in cases] if order == "interleaved" else [(n, i) for n in cases for i in calls]
    for name, i in plan:
        fn, cleanup = cases[name] if isinstance(cases[name], tuple) else (cases[name], None)
        start = timer()
        out = fn()
        elapsed = timer() - start
        if cleanup is not None:
            cleanup()
        if i >= warmup:
            seconds[name].append(out if isinstance(out, float) else elapsed)
    return {name: measurement(name, s) for name, s in seconds.items()}


def parser(doc: str, cases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The options every script has (``--threads``, ``--seed``, ``--json``, ``--smoke``), and ``--case``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if cases:
        p.add_argument("--case", choices=list(cases), default=cases[0], help="the question to answer")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check that every code path runs (no figures)")
    return p


def parse(p: argparse.ArgumentParser, defaults: Dict[str, dict], smoke: dict) -> argparse.Namespace:
    """Parsed options; those left unset taken from ``defaults[args.case]``, and with ``--smoke`` all of ``smoke``."""
    args = p.parse_args()
    for key, value in defaults.get(getattr(args, "case", None), {}).items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    for key, value in smoke.items() if args.smoke else ():
        setattr(args, key, value)
    return args


def run(args: argparse.Namespace, cases: Dict[str, Callable[[argparse.Namespace], dict]]) -> None:
    """:func:`start`, the function of ``--case``, :func:`finish` with what it returns."""
    env = start(args)
    finish(args, env, {"case": args.case, **cases[args.case](args)})


def start(args: argparse.Namespace) -> Dict[str, object]:
    """Set the thread count; print and return the environment and the exact command."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    env = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "loadavg_1min": os.getloadavg()[0], "command": shlex.join([sys.executable, *sys.argv]),
    }  # fmt: skip
    print(f"torch {env['torch']}, threads {env['threads']} (cpu_count {env['cpu_count']}), python {env['python']}, "
          f"1-min load average at start {env['loadavg_1min']:.2f}\ncommand: {env['command']}", flush=True)  # fmt: skip
    return env


def finish(args: argparse.Namespace, env: Dict[str, object], data: Dict[str, object]) -> None:
    """Print the end load average; write ``{"env": env, "args": args, **data}`` to ``--json``."""
    env["loadavg_1min_end"] = os.getloadavg()[0]
    print(f"\n1-min load average at the end {env['loadavg_1min_end']:.2f}")
    if getattr(args, "json", None):
        def jsonable(obj: object) -> object:
            if isinstance(obj, Measurement):
                return {"median_s": obj.median, "iqr_s": obj.iqr, "times_s": obj.times}
            return str(obj)

        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args), **data}, indent=2, default=jsonable))
        print(f"wrote {args.json}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    """Print and return ``title`` and a markdown table."""
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    text = "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])
    print(f"\n{text}", flush=True)
    return text


#: Llama-3.2-1B's attention: the module-level decode, training and int8-cache benchmarks.
ATTENTION = dict(embed_dim=2048, num_heads=32, num_kv_heads=8, head_dim=64)
#: Gemma 2 2B's attention (soft-capped, ``query_pre_attn_scalar``), local layers with a sliding window.
GEMMA2 = dict(embed_dim=2304, num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256, softcapping=50.0)
#: ``torchtune.models.llama3_2.llama3_2`` shapes. ``tiny``: gqa_tiny's function with torchtune's attention,
#: as the recipe benchmark's torchtune config writes it (read from there, below).
LLAMA = {
    "packed": dict(vocab_size=260, num_layers=2, num_heads=8, num_kv_heads=2, embed_dim=256),
    "generate": dict(vocab_size=32000, num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=512,
                     intermediate_dim=1536, tie_word_embeddings=False),  # tied random weights repeat the last token
}  # fmt: skip
#: ``gqa_tune.models.gqa_decoder``'s shape for the decode time against the number of kv heads (the paper's Fig. 6).
KV_SWEEP = dict(vocab_size=260, num_layers=4, num_heads=16, embed_dim=512, intermediate_dim=1536, rope_base=10_000)


def llama(shape: str, max_seq_len: int, **overrides) -> torch.nn.Module:
    """torchtune's ``llama3_2`` in one of the :data:`LLAMA` shapes."""
    from omegaconf import OmegaConf
    from torchtune.models.llama3_2 import llama3_2

    if shape == "tiny":
        node = OmegaConf.to_container(OmegaConf.load(HERE / "configs/torchtune_full_single_device.yaml").model)
        kwargs = {k: v for k, v in node.items() if k != "_component_"}
    else:
        kwargs = dict(LLAMA[shape])
    return llama3_2(**{**kwargs, "max_seq_len": max_seq_len, **overrides})


def attention_pair(shape: Dict[str, object], max_seq_len: int, *, window: Optional[int] = None,
                   backend: str = "auto", seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:  # fmt: skip
    """torchtune's attention (bias-free projections, RoPE; ``Gemma2Attention`` for the :data:`GEMMA2` shape) and
    gqa_tune's sharing its weights and RoPE (``from_torchtune_attention``), both in eval mode."""
    from torchtune.models.gemma2._attention import Gemma2Attention
    from torchtune.modules import MultiHeadAttention, RotaryPositionalEmbeddings

    torch.manual_seed(seed)
    e, h, kv, d = (shape[k] for k in ("embed_dim", "num_heads", "num_kv_heads", "head_dim"))
    parts = dict(
        embed_dim=e, num_heads=h, num_kv_heads=kv, head_dim=d, max_seq_len=max_seq_len,
        q_proj=nn.Linear(e, h * d, bias=False), k_proj=nn.Linear(e, kv * d, bias=False),
        v_proj=nn.Linear(e, kv * d, bias=False), output_proj=nn.Linear(h * d, e, bias=False),
        pos_embeddings=RotaryPositionalEmbeddings(dim=d, max_seq_len=max_seq_len),
    )  # fmt: skip
    if "softcapping" in shape:
        tt = Gemma2Attention(**parts, sliding_window_size=window, softcapping=shape["softcapping"],
                             query_pre_attn_scalar=shape["query_pre_attn_scalar"])  # fmt: skip
    else:
        tt = MultiHeadAttention(**parts)
    ours = __getattr__("from_torchtune_attention")(tt, backend=backend)
    return tt.eval(), ours.eval()


def fill_cache(cache: torch.nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
    """Make ``cache`` (torchtune's or gqa_tune's) hold ``k``/``v`` ``[b, n_kv, fill, d]`` in positions ``0..fill-1``
    (torchtune's Gemma 2 cache holds every query head: the kv heads repeated)."""
    cache.reset()
    if hasattr(cache, "truncate"):  # gqa_tune's (ring and quantized caches included)
        if k.shape[2]:
            cache.update(k, v)
        return
    repeat = cache.k_cache.shape[1] // k.shape[1]
    cache.k_cache[:, :, : k.shape[2]].copy_(k.repeat_interleave(repeat, 1))
    cache.v_cache[:, :, : k.shape[2]].copy_(v.repeat_interleave(repeat, 1))
    cache.cache_pos.add_(k.shape[2])


def rewinder(cache: torch.nn.Module, fill: int) -> Callable[[], None]:
    """A function that undoes one step written at position ``fill`` (a ring cache's overwritten slot restored)."""
    if not hasattr(cache, "truncate"):  # torchtune's: the written K/V stay past the fill, overwritten next time
        return lambda: cache.cache_pos.sub_(1)
    if cache.window is None or cache.k_cache.shape[2] > fill:
        return lambda: cache.truncate(fill)
    slot = fill % cache.k_cache.shape[2]
    saved = [t[:, :, slot].clone() for t in (cache.k_cache, cache.v_cache)] + [cache.slot_pos[slot].clone()]

    def undo() -> None:
        cache.truncate(fill)
        cache.k_cache[:, :, slot], cache.v_cache[:, :, slot], cache.slot_pos[slot] = saved

    return undo


def random_kv(n_kv: int, fill: int, head_dim: int, seed: int, batch: int = 1) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n_kv, fill, head_dim, generator=g) for _ in range(2)]


def decode_steps(modules: Dict[str, torch.nn.Module], fill: int, mask_len: int, repeats: int, warmup: int,
                 order: str = "interleaved", seed: int = 0):  # fmt: skip
    """One decode step of each attention module (caches set up, the same shape), torchtune's call ``attn(x, x,
    mask=mask, input_pos=[[fill]])``, ``mask`` ``[1, 1, mask_len]`` True up to ``fill``; every cache holds the same
    random K/V and every step is undone (untimed), so each repetition sees the same cache (checked: the same output
    again). Returns (first output by name, :func:`time_cases` measurements by name, (x, k, v))."""
    m = next(iter(modules.values()))
    k, v = random_kv(m.num_kv_heads, fill, m.head_dim, seed + fill)
    x = torch.randn(1, 1, m.embed_dim, generator=torch.Generator().manual_seed(seed))
    mask, pos = (torch.arange(mask_len) <= fill).view(1, 1, mask_len), torch.tensor([[fill]])
    cases, outputs = {}, {}
    with torch.no_grad():
        for name, module in modules.items():
            fill_cache(module.kv_cache, k, v)
            cases[name] = (lambda m=module: m(x, x, mask=mask, input_pos=pos)), rewinder(module.kv_cache, fill)
            outputs[name] = cases[name][0]()
            cases[name][1]()
        times = time_cases(cases, repeats, warmup, order)
        for name, (step, undo) in cases.items():
            torch.testing.assert_close(step(), outputs[name], rtol=0, atol=0, msg=f"{name}: the cache changed")
            undo()
    return outputs, times, (x, k, v)


def tune_run(recipe: str, config: str, overrides: Sequence[str], threads: int, env: Optional[dict] = None) -> str:
    """``tune run recipe --config config *overrides`` from the repository root with ``threads`` OpenMP threads;
    returns stdout + stderr, exits with their tails if it fails."""
    cmd = [TUNE, "run", recipe, "--config", config, *overrides]
    print(shlex.join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr
