"""How fast does a whole generation loop decode: gqa_tune against torchtune 0.6.1 and HF transformers, on CPU?

Decode time per step is measured inside each library's loop (stamps around torchtune's ``generate_next_token``, a
``LogitsProcessor``, ``GenerationStats``: no prefill, no compilation); the cases take turns and must all decode
torchtune's greedy tokens (checked). ``--case transformers``: a random Llama 3.2-style model (4 layers, width 512,
vocab 32000), 4 prompts of 1024 tokens, through torchtune's ``generate``, HF ``LlamaForCausalLM`` with a static
cache (eager and compiled), torchtune's ``generate`` after ``swap_attention``, ``gqa_tune.generate`` (eager and
``compile=True``), and with ``--diagnose-nan-rule`` the compiled step without the NaN rule (a diagnostic).
``--case long-context``: gqa_tiny's shape, a 2048-token prompt, 64 steps, ``max_seq_len`` 4096: torchtune's model
and a swapped copy in torchtune's ``generate`` (4096-position caches), the copy in ``gqa_tune.generate`` (caches
sized to the request). (How a decode step's cost follows the cache fill: ``bench_attention.py --case decode``.)

Commands::

    .venv/bin/python benchmarks/bench_generate.py --threads 1 [--steps 16] [--repeats 5] [--diagnose-nan-rule]
    .venv/bin/python benchmarks/bench_generate.py --case long-context --threads 1 [--context 2048] [--repeats 3]
    .venv/bin/python benchmarks/bench_generate.py --case CASE --smoke   # tiny sizes, under a minute
"""

import contextlib
import copy
import functools
from unittest import mock

import _harness as H
import torch
from torchtune.generation import generate as tt_generate
from torchtune.generation import generate_next_token
from torchtune.models.convert_weights import tune_to_hf
from torchtune.modules.common_utils import local_kv_cache

import gqa_tune

DEFAULTS = {"transformers": dict(repeats=5, prompt=1024), "long-context": dict(repeats=3, prompt=2048)}
SMOKE = dict(repeats=1, prompt=32, steps=4, new_tokens=4, cache=64, vocab=512)
PAD_ID = 258  # the byte tokenizer's


def torchtune_run(model, prompt, tokens: int, pad_id: int = 0, cache: int = 0):
    """``torchtune.generation.generate``, greedy; returns (tokens, prefill s, decode s per step). With ``cache``,
    in caches of that many positions, set up for the call; else in the model's own (already set up)."""
    marks = []

    def timed_step(*args, **kwargs):
        marks.append(H.timer())
        out = generate_next_token(*args, **kwargs)
        marks.append(H.timer())
        return out

    with (local_kv_cache(model, batch_size=prompt.shape[0], device=prompt.device, dtype=torch.float32,
                         decoder_max_seq_len=cache) if cache else contextlib.nullcontext()):  # fmt: skip
        if not cache:
            model.reset_caches()
        start = H.timer()
        out, _ = tt_generate(model, prompt, max_generated_tokens=tokens, pad_id=pad_id, temperature=1e-9, top_k=1,
                             custom_generate_next_token=timed_step)  # fmt: skip
    return out, marks[0] - start, (marks[-1] - marks[0]) / (len(marks) // 2)


def gqa_run(model, prompt, tokens: int, compile: bool = False, pad_id: int = 0):
    stats = gqa_tune.GenerationStats()
    out, _ = gqa_tune.generate(model, prompt, tokens, pad_id=pad_id, compile=compile, stats=stats)
    return out, stats.prefill_seconds, stats.decode_seconds / stats.decode_steps


def time_runs(runs, args, reference: str):
    """Every run through ``time_cases`` (each reporting its own decode seconds per step); greedy tokens checked."""
    found = {}

    def call(name: str) -> float:
        found[name] = runs[name]()
        return found[name][2]

    times = H.time_cases({name: functools.partial(call, name) for name in runs}, args.repeats, warmup=1)
    ref = found[reference][0]
    same = {name: bool(torch.equal(out[0].to(ref.dtype), ref)) for name, out in found.items()}
    if not all(same.values()):
        raise SystemExit(f"greedy tokens differ from {reference}'s: {[n for n, ok in same.items() if not ok]}")
    return times, found


def transformers(args) -> dict:
    from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    total = args.prompt + args.steps
    torch.manual_seed(args.seed)
    tt = H.llama("generate", max(total, 8192), vocab_size=args.vocab).eval()  # 8192: Llama 3.2's RoPE scaling base
    swapped = copy.deepcopy(tt)
    gqa_tune.swap_attention(swapped)
    config = {k: v for k, v in H.hf_config(tt).items() if k not in ("gqa_tune", "architectures", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    missing, unexpected = hf.load_state_dict(tune_to_hf(tt.state_dict(), **H.model_shape(tt)), strict=False)
    if missing or unexpected or not torch.equal(hf.lm_head.weight, tt.output.weight):
        raise SystemExit(f"HF weights do not fit: missing {missing}, unexpected {unexpected}")
    prompt = torch.randint(1, args.vocab, (4, args.prompt), generator=torch.Generator().manual_seed(args.seed))

    class StepClock(LogitsProcessor):  # called once per generated token
        def __call__(self, input_ids, scores):
            self.marks = [*getattr(self, "marks", []), H.timer()]
            return scores

    def hf_run(compiled: bool):
        kwargs = {}
        if compiled:
            kwargs["compile_config"] = CompileConfig(fullgraph=True, dynamic=False, mode="default")
            kwargs["compile_config"]._compile_all_devices = True  # transformers' switch for compiling on CPU
        clock = StepClock()
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.steps,
                          min_new_tokens=args.steps, do_sample=False, cache_implementation="static",
                          logits_processor=LogitsProcessorList([clock]), pad_token_id=0, **kwargs)  # fmt: skip
        return out, 0.0, (clock.marks[-1] - clock.marks[0]) / (len(clock.marks) - 1)

    def gqa_no_nan_rule():  # diagnostic only: attention without the NaN rule (K/V as given, output unchanged)
        with mock.patch.object(H.dispatch, "hide_masked_nans", lambda q, k, v, *a, **kw: (k, v, lambda out: out)):
            return gqa_run(swapped, prompt, args.steps, compile=True)

    runs = {
        "torchtune": lambda: torchtune_run(tt, prompt, args.steps, cache=total),
        "hf_static": lambda: hf_run(False),
        "hf_static_compiled": None if args.no_hf_compile else lambda: hf_run(True),
        "torchtune_swapped": lambda: torchtune_run(swapped, prompt, args.steps, cache=total),
        "gqa_generate": lambda: gqa_run(swapped, prompt, args.steps),
        "gqa_generate_compiled": lambda: gqa_run(swapped, prompt, args.steps, compile=True),
        "gqa_generate_compiled_no_nan_rule": gqa_no_nan_rule if args.diagnose_nan_rule else None,
    }
    times, _ = time_runs({name: run for name, run in runs.items() if run is not None}, args, "torchtune")
    hf_ms, hf_best = times["hf_static"].median, min(times["hf_static"].times)
    H.table(
        ["case", "ms per decode step (IQR)", "decode tokens/s", "vs hf_static", "best run ms", "best vs best"],
        [[name, H.fmt(m, digits=2), f"{4 / m.median:.0f}", f"{hf_ms / m.median:.2f}x", f"{min(m.times) * 1e3:.2f}",
          f"{hf_best / min(m.times):.2f}x"] for name, m in times.items()],
        f"Greedy decode, CPU fp32, {torch.get_num_threads()} threads: {H.LLAMA['generate']} (vocab {args.vocab}), "
        f"batch 4, prompt {args.prompt}, {args.steps} tokens, median of {args.repeats}; all give torchtune's tokens",
    )  # fmt: skip
    return {"times": times}


def long_context(args) -> dict:
    if args.prompt + args.new_tokens + 1 > args.cache:
        raise SystemExit("--context + --new-tokens + 1 must fit in --cache")
    torch.manual_seed(args.seed)
    tt = H.llama("tiny", args.cache).eval()
    with torch.no_grad():
        for p in tt.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    ours = copy.deepcopy(tt)
    gqa_tune.swap_attention(ours, backend=args.backend)
    ours_tt_loop = copy.deepcopy(ours)
    for model in (tt, ours_tt_loop):
        model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=args.cache)
    prompt = torch.randint(0, 256, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    n = args.new_tokens + 1  # one token from the prefill, then --new-tokens one-token steps
    attn = tt.layers[0].attn
    per_position = 2 * len(tt.layers) * attn.num_kv_heads * attn.head_dim * 4
    cases = {  # name: (attention, loop, cache positions, run)
        "torchtune": ("torchtune llama3_2", "torchtune.generation.generate", args.cache,
                      lambda: torchtune_run(tt, prompt, n, PAD_ID)),
        "gqa_tune_tt_loop": ("gqa_tune attention", "torchtune.generation.generate", args.cache,
                             lambda: torchtune_run(ours_tt_loop, prompt, n, PAD_ID)),
        "gqa_tune": ("gqa_tune attention", "gqa_tune.generate", args.prompt + n,
                     lambda: gqa_run(ours, prompt, n, pad_id=PAD_ID)),
    }  # fmt: skip
    times, found = time_runs({name: c[3] for name, c in cases.items()}, args, "torchtune")
    base = times["torchtune"].median
    H.table(
        ["attention", "generation loop", "cache positions", "KV cache MiB", "prefill tokens/s", "decode ms/token (IQR)",
         "decode tokens/s", "vs torchtune"],
        [[c[0], c[1], c[2], f"{c[2] * per_position / 2**20:.2f}", f"{args.prompt / found[name][1]:.0f}",
          H.fmt(times[name]), f"{1 / times[name].median:.0f}", f"{base / times[name].median:.2f}x"]
         for name, c in cases.items()],
        f"Decoding, CPU fp32, gqa_tiny's shape, max_seq_len {args.cache}, batch 1, greedy, prompt {args.prompt} random "
        f"tokens, {args.new_tokens} one-token steps, {torch.get_num_threads()} threads, median of {args.repeats}; "
        f"all give torchtune's tokens (prefill: the last run's)",
    )  # fmt: skip
    return {"times": times}


def main() -> None:
    p = H.parser(__doc__, cases=list(DEFAULTS))
    p.add_argument("--repeats", type=int, help="timed generations per case (transformers 5, long-context 3)")
    p.add_argument("--prompt", "--context", type=int, help="prompt tokens (transformers 1024, long-context 2048)")
    p.add_argument("--steps", type=int, default=16, help="transformers: tokens generated per prompt")
    p.add_argument("--vocab", type=int, default=32000, help="transformers: vocabulary size")
    p.add_argument("--no-hf-compile", action="store_true", help="transformers: skip its compiled decode step")
    p.add_argument("--diagnose-nan-rule", action="store_true", help="transformers: add the step without the NaN rule")
    p.add_argument("--new-tokens", type=int, default=64, help="long-context: one-token decode steps")
    p.add_argument("--cache", type=int, default=4096, help="long-context: max_seq_len and torchtune's cache positions")
    p.add_argument("--backend", default="auto", help="long-context: gqa_tune attention backend")
    args = H.parse(p, DEFAULTS, SMOKE)
    args.no_hf_compile = args.no_hf_compile or args.smoke  # its compilation alone takes minutes on a CPU
    if args.steps < 3:
        p.error("--steps must be at least 3")
    H.run(args, {"transformers": transformers, "long-context": long_context})


if __name__ == "__main__":
    main()
