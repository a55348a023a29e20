"""Greedy generation, ms per decode step: gqa_tune.generate against torchtune 0.6.1 and HF transformers.

One random-weight Llama 3.2-style model (``torchtune.models.llama3_2.llama3_2``: 4 layers, width 512,
8 query / 2 kv heads of 64, MLP 1536, scaled RoPE, untied embeddings) in five forms, all with the same
weights, fp32 on CPU, each decoding ``--steps`` tokens for a batch of 4 random 1024-token prompts:

- ``torchtune``: the model as torchtune builds it (its ``MultiHeadAttention``), ``torchtune.generation.generate``.
- ``hf_static``: ``LlamaForCausalLM`` built from ``gqa_tune.training.checkpoint.hf_config(model)`` with the
  weights through ``torchtune.models.convert_weights.tune_to_hf``; ``model.generate(...,
  cache_implementation="static", do_sample=False)`` (eager, SDPA attention).
- ``hf_static_compiled``: the same with transformers' own compiled decode step (``CompileConfig(fullgraph=True,
  dynamic=False, mode="default")``; ``_compile_all_devices`` is transformers' switch to compile on CPU).
  Skipped with ``--no-hf-compile``.
- ``torchtune_swapped``: a copy after ``gqa_tune.swap_attention``, ``torchtune.generation.generate``.
- ``gqa_generate`` / ``gqa_generate_compiled``: that copy, ``gqa_tune.generate(..., compile=False/True)``.
- ``gqa_generate_compiled_no_nan_rule`` (only with ``--diagnose-nan-rule``): a diagnostic, not a mode of the
  library: the compiled step with ``gqa_tune.ops.nan_rule.hide_masked_nans`` replaced by a no-op for the run
  (its own graph), to measure what the NaN rule costs a compiled step (there it cannot skip its work).

Every cache holds prompt + steps positions. Per decode step: the time from the first decode step's start
to the last one's end over the decode steps, measured inside each library's own loop (a
``LogitsProcessor`` for transformers, ``custom_generate_next_token`` for torchtune, ``GenerationStats``
for gqa_tune), so prefill and compilation are left out. Each case runs ``--repeats`` times after one
untimed warm-up run (which compiles), the cases taking turns; the median run and the best run are
reported (each run's figure is its mean over its decode steps). All cases must give
the same greedy tokens as torchtune (checked; a mismatch fails the run).

Usage: python benchmarks/bench_generate.py [--steps 16] [--repeats 5] [--threads N] [--vocab 32000]
       [--no-hf-compile] [--diagnose-nan-rule] [--json PATH]
"""

import argparse
import contextlib
import copy
import statistics
import time
from typing import Dict, List

import torch
from _timing import environment, markdown_table, print_environment, time_interleaved, write_json
from torchtune.generation import generate as tt_generate
from torchtune.generation import generate_next_token
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules.common_utils import local_kv_cache
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

import gqa_tune
from gqa_tune.generation import GenerationStats
from gqa_tune.ops import dispatch
from gqa_tune.training.checkpoint import hf_config, model_shape

NUM_LAYERS, EMBED_DIM, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, MLP_DIM = 4, 512, 8, 2, 64, 1536
BATCH, PROMPT = 4, 1024


class StepClock(LogitsProcessor):
    """Called once per generated token inside ``model.generate``: records when."""

    def __init__(self) -> None:
        self.times: List[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


@contextlib.contextmanager
def without_nan_rule():
    """Diagnostic only: attention without the NaN rule (K/V as given, output unchanged)."""
    saved = dispatch.hide_masked_nans
    dispatch.hide_masked_nans = lambda q, k, v, *args, **kwargs: (k, v, lambda out: out)
    try:
        yield
    finally:
        dispatch.hide_masked_nans = saved


def build(vocab: int, max_seq_len: int, seed: int):
    """The torchtune model, its swapped copy and the HF model, all with the same weights."""
    torch.manual_seed(seed)
    tt = llama3_2(
        vocab_size=vocab,
        num_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        embed_dim=EMBED_DIM,
        max_seq_len=max_seq_len,
        intermediate_dim=MLP_DIM,
        tie_word_embeddings=False,  # tied random embeddings make every row repeat its last token
    ).eval()
    swapped = copy.deepcopy(tt)
    gqa_tune.swap_attention(swapped)
    config = {k: v for k, v in hf_config(tt).items() if k not in ("gqa_tune", "architectures", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    shape = model_shape(tt)
    hf_sd = tune_to_hf(tt.state_dict(), **shape)
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF weights do not fit: missing {missing}, unexpected {unexpected}")
    if not torch.equal(hf.lm_head.weight, tt.output.weight):
        raise RuntimeError("the HF model's lm_head does not hold torchtune's output weights")
    return tt, swapped, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--prompt", type=int, default=PROMPT, help="prompt length")
    parser.add_argument("--no-hf-compile", action="store_true", help="skip transformers' compiled decode step")
    parser.add_argument(
        "--diagnose-nan-rule", action="store_true", help="add the compiled step without the NaN rule (diagnostic)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3")

    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)
    total = args.prompt + args.steps
    tt, swapped, hf = build(args.vocab, max(total, 8192), args.seed)  # 8192: Llama 3.2's RoPE scaling base
    prompt = torch.randint(1, args.vocab, (BATCH, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    weight_bytes = sum(p.numel() * p.element_size() for p in tt.parameters())
    print(f"model: {weight_bytes / 2**20:.1f} MiB of fp32 weights, vocab {args.vocab}, cache {total} positions")

    per_step: Dict[str, List[float]] = {}
    tokens: Dict[str, torch.Tensor] = {}
    extra: Dict[str, List[float]] = {}

    def torchtune_case(model):
        def run():
            marks: List[float] = []

            def timed_step(*a, **kw):
                marks.append(time.perf_counter())
                out = generate_next_token(*a, **kw)
                marks.append(time.perf_counter())
                return out

            with local_kv_cache(model, batch_size=BATCH, device=prompt.device, dtype=torch.float32,
                                decoder_max_seq_len=total):  # fmt: skip
                out, _ = tt_generate(model, prompt, max_generated_tokens=args.steps, temperature=1e-9, top_k=1,
                                     custom_generate_next_token=timed_step)  # fmt: skip
            return out, (marks[-1] - marks[0]) / (len(marks) // 2)

        return run

    def hf_case(compiled: bool):
        kwargs = {}
        if compiled:
            compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
            compile_config._compile_all_devices = True  # transformers' switch for compiling on CPU
            kwargs["compile_config"] = compile_config

        def run():
            clock = StepClock()
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.steps,
                              min_new_tokens=args.steps, do_sample=False, cache_implementation="static",
                              logits_processor=LogitsProcessorList([clock]), pad_token_id=0, **kwargs)  # fmt: skip
            return out, (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)

        return run

    def gqa_case(compiled: bool, nan_rule: bool = True):
        def run():
            stats = GenerationStats()
            with contextlib.ExitStack() as stack:
                if not nan_rule:
                    stack.enter_context(without_nan_rule())
                out, _ = gqa_tune.generate(swapped, prompt, args.steps, compile=compiled, stats=stats)
            if compiled:
                extra.setdefault(f"compile_seconds_{'with' if nan_rule else 'without'}_nan_rule", []).append(
                    stats.compile_seconds
                )
            return out, stats.decode_seconds / stats.decode_steps

        return run

    runs = {
        "torchtune": torchtune_case(tt),
        "hf_static": hf_case(False),
        "hf_static_compiled": None if args.no_hf_compile else hf_case(True),
        "torchtune_swapped": torchtune_case(swapped),
        "gqa_generate": gqa_case(False),
        "gqa_generate_compiled": gqa_case(True),
        "gqa_generate_compiled_no_nan_rule": gqa_case(True, nan_rule=False) if args.diagnose_nan_rule else None,
    }
    runs = {name: fn for name, fn in runs.items() if fn is not None}

    def case(name):
        def fn():
            out, seconds = runs[name]()
            tokens.setdefault(name, out)
            per_step.setdefault(name, []).append(seconds)

        return fn

    started = time.perf_counter()
    time_interleaved({name: (case(name), None) for name in runs}, repeats=args.repeats, warmup=1)
    print(f"all runs: {time.perf_counter() - started:.0f} s")

    reference = tokens["torchtune"]
    same = {name: bool(torch.equal(out.to(reference.dtype), reference)) for name, out in tokens.items()}
    results = []
    hf_ms = statistics.median(per_step["hf_static"][1:]) * 1e3
    hf_best = min(per_step["hf_static"][1:]) * 1e3
    for name in runs:
        ms = statistics.median(per_step[name][1:]) * 1e3  # the first run is the warm-up
        best = min(per_step[name][1:]) * 1e3
        results.append(
            {
                "case": name,
                "ms_per_step": ms,
                "best_ms_per_step": best,
                "decode_tokens_per_s": BATCH / ms * 1e3,
                "speedup_vs_hf_static": hf_ms / ms,
                "best_speedup_vs_hf_static": hf_best / best,
                "same_tokens_as_torchtune": same[name],
                "ms_per_step_runs": [t * 1e3 for t in per_step[name]],
            }
        )
    print()
    print(
        f"Greedy decode, CPU fp32, {args.threads} threads: {NUM_LAYERS} layers, width {EMBED_DIM}, "
        f"{NUM_HEADS}/{NUM_KV_HEADS} heads of {HEAD_DIM}, MLP {MLP_DIM}, vocab {args.vocab}, batch {BATCH}, "
        f"prompt {args.prompt}, {args.steps} tokens, median of {args.repeats}"
    )
    print()
    print(
        markdown_table(
            [
                "case",
                "ms per decode step",
                "decode tokens/s",
                "vs hf_static",
                "best run ms",
                "best vs best",
                "same tokens",
            ],
            [
                [
                    r["case"],
                    f"{r['ms_per_step']:.2f}",
                    f"{r['decode_tokens_per_s']:.0f}",
                    f"{r['speedup_vs_hf_static']:.2f}x",
                    f"{r['best_ms_per_step']:.2f}",
                    f"{r['best_speedup_vs_hf_static']:.2f}x",
                    "yes" if r["same_tokens_as_torchtune"] else "NO",
                ]
                for r in results
            ],
        )
    )
    for key, seconds in extra.items():
        print(f"{key}: first call {seconds[0]:.1f} s, then {max(seconds[1:], default=0):.2f} s at most (untimed)")
    write_json(
        args.json,
        {
            "benchmark": "generate",
            "env": env,
            "config": {
                "num_layers": NUM_LAYERS,
                "embed_dim": EMBED_DIM,
                "num_heads": NUM_HEADS,
                "num_kv_heads": NUM_KV_HEADS,
                "head_dim": HEAD_DIM,
                "intermediate_dim": MLP_DIM,
                "vocab_size": args.vocab,
                "batch": BATCH,
                "prompt": args.prompt,
                "steps": args.steps,
                "repeats": args.repeats,
                "seed": args.seed,
                "weight_bytes": weight_bytes,
            },
            "results": results,
            "extra": extra,
        },
    )
    if not all(same.values()):
        raise SystemExit(f"greedy tokens differ from torchtune's: {[n for n, ok in same.items() if not ok]}")


if __name__ == "__main__":
    main()
