"""Training forward + backward of the attention module alone: torchtune vs gqa_tune, on CPU.

Both modules share the same weights and RoPE (``from_torchtune_attention``) and
get the same call ``attn(x, x)`` (no mask: causal) with ``x`` ``[b, s, E]``
requiring grad, then ``out.backward(grad_out)`` with the same random
``grad_out``. Outputs and all gradients (input and weights) are compared once
before timing. Gradients are set to ``None`` between steps (untimed).

Saved activations: bytes of the distinct storages autograd saves for backward
during one forward (``saved_tensors_hooks``, deduplicated by storage pointer,
whole storages), excluding the storages of parameters (also when saved as
views such as ``weight.t()``) and of module buffers (the RoPE table).
The input ``x`` is saved by the projections in both modules and counted.

Usage: python benchmarks/bench_train.py [--batch 2] [--seq 1024] [--repeats 5] [--json PATH]
"""

import argparse

import torch
from _timing import (
    DTYPE,
    EMBED_DIM,
    HEAD_DIM,
    MAX_SEQ_LEN,
    NUM_HEADS,
    NUM_KV_HEADS,
    build_pair,
    environment,
    markdown_table,
    median_ms,
    print_environment,
    saved_activation_bytes,
    time_interleaved,
    write_json,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per module")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per module first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--backend", default="auto", help="gqa_tune attention backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)

    tt, ours = build_pair(
        embed_dim=EMBED_DIM,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_seq_len=max(MAX_SEQ_LEN, args.seq),
        backend=args.backend,
        seed=args.seed,
    )
    tt.train()
    ours.train()
    modules = {"torchtune": tt, "gqa_tune": ours}
    x = torch.randn(args.batch, args.seq, EMBED_DIM, dtype=DTYPE, requires_grad=True)
    grad_out = torch.randn(args.batch, args.seq, EMBED_DIM, dtype=DTYPE)

    def clear_grads() -> None:
        x.grad = None
        tt.zero_grad(set_to_none=True)  # the parameters are shared, so this clears ours too

    def fwd_bwd(attn) -> torch.Tensor:
        out = attn(x, x)
        out.backward(grad_out)
        return out

    # Correctness, once: same output, same input and weight gradients.
    grads = {}
    for name, attn in modules.items():
        clear_grads()
        out = fwd_bwd(attn).detach()
        grads[name] = {"out": out, "x.grad": x.grad.clone()}
        grads[name].update({f"{p_name}.grad": p.grad.clone() for p_name, p in attn.named_parameters()})
    clear_grads()
    max_rel = {}
    for key, ref in grads["torchtune"].items():
        got = grads["gqa_tune"][key]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=key)
        max_rel[key] = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"outputs and grads match; max |diff| / max |ref| = {max(max_rel.values()):.1e} ({len(max_rel)} tensors)")

    # Saved activations for backward, one forward each.
    saved = {}
    for name, attn in modules.items():
        nbytes, count, out = saved_activation_bytes(lambda attn=attn: attn(x, x), attn)
        del out
        saved[name] = {"bytes": nbytes, "storages": count}
        print(f"{name}: saved activations {nbytes / 2**20:.1f} MiB in {count} storages")

    times = time_interleaved(
        {name: (lambda attn=attn: fwd_bwd(attn), clear_grads) for name, attn in modules.items()},
        repeats=args.repeats,
        warmup=args.warmup,
    )
    tt_ms, ours_ms = median_ms(times["torchtune"]), median_ms(times["gqa_tune"])
    tt_mib, ours_mib = saved["torchtune"]["bytes"] / 2**20, saved["gqa_tune"]["bytes"] / 2**20
    result = {
        "torchtune_ms": tt_ms,
        "gqa_tune_ms": ours_ms,
        "time_ratio_tt_over_ours": tt_ms / ours_ms,
        "torchtune_saved_bytes": saved["torchtune"]["bytes"],
        "gqa_tune_saved_bytes": saved["gqa_tune"]["bytes"],
        "torchtune_saved_storages": saved["torchtune"]["storages"],
        "gqa_tune_saved_storages": saved["gqa_tune"]["storages"],
        "memory_ratio_tt_over_ours": tt_mib / ours_mib,
        "max_rel_diff": max_rel,
        "torchtune_times_ms": [t * 1e3 for t in times["torchtune"]],
        "gqa_tune_times_ms": [t * 1e3 for t in times["gqa_tune"]],
    }
    print(f"fwd+bwd: torchtune {tt_ms:.1f} ms  gqa_tune {ours_ms:.1f} ms  ratio {tt_ms / ours_ms:.2f}x")

    print()
    print(
        f"Attention fwd+bwd, CPU float32, E={EMBED_DIM}, {NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, "
        f"RoPE, causal, {args.threads} threads, median of {args.repeats}; ratios are torchtune / gqa_tune"
    )
    print()
    print(
        markdown_table(
            [
                "batch x seq",
                "torchtune ms",
                "gqa_tune ms",
                "time ratio",
                "torchtune saved MiB",
                "gqa_tune saved MiB",
                "memory ratio",
            ],
            [
                [
                    f"{args.batch} x {args.seq}",
                    f"{tt_ms:.1f}",
                    f"{ours_ms:.1f}",
                    f"{tt_ms / ours_ms:.2f}x",
                    f"{tt_mib:.1f}",
                    f"{ours_mib:.1f}",
                    f"{tt_mib / ours_mib:.2f}x",
                ]
            ],
        )
    )
    write_json(
        args.json,
        {
            "benchmark": "train",
            "env": env,
            "config": {
                "embed_dim": EMBED_DIM,
                "num_heads": NUM_HEADS,
                "num_kv_heads": NUM_KV_HEADS,
                "head_dim": HEAD_DIM,
                "batch": args.batch,
                "seq": args.seq,
                "dtype": str(DTYPE),
                "backend": args.backend,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "seed": args.seed,
            },
            "results": result,
        },
    )


if __name__ == "__main__":
    main()
