"""What does a training step (forward + backward) cost with gqa_tune's attention against torchtune 0.6.1's, on CPU?

Outputs and gradients are checked against torchtune's first; the cases take turns. Cases (``--case``):

- ``attention``: one attention module of Llama-3.2-1B's shape, the same weights, ``attn(x, x)`` (causal) and
  ``backward``; also the activations saved for backward (distinct storages, parameters and buffers left out).
- ``packed``: torchtune's ``llama3_2`` (2 layers, width 256), one row of ``--seq`` tokens holding ``--docs``
  documents: torchtune's attention with its CPU packed collate's dense mask, against a ``swap_attention`` copy given
  that mask and given ``gqa_tune.data.packing``'s ``BlockMask``; the largest single allocation of a step.

Commands::

    .venv/bin/python benchmarks/bench_train.py [--batch 2] [--seq 1024] [--repeats 5] [--threads N]
    .venv/bin/python benchmarks/bench_train.py --case packed [--seq 4096] [--docs 40] [--repeats 7]
    .venv/bin/python benchmarks/bench_train.py --case CASE --smoke   # tiny sizes, seconds
"""

import copy
import random

import _harness as H
import torch
from torch.profiler import profile
from torchtune.modules.attention_utils import create_block_causal_mask

import gqa_tune

DEFAULTS = {"attention": dict(seq=1024, repeats=5), "packed": dict(seq=4096, repeats=5)}
SMOKE = dict(seq=128, repeats=2, docs=5)


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


def attention(args) -> dict:
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
    times = H.time_cases({n: (lambda a=a: step(a), clear) for n, a in modules.items()}, args.repeats, warmup=1)
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
    times = H.time_cases({n: (lambda c=c: step(*c)) for n, c in cases.items()}, args.repeats, warmup=0)
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
    p.add_argument("--batch", type=int, default=2, help="attention: batch size")
    p.add_argument("--seq", type=int, help="attention: sequence length (1024); packed: the row's tokens (4096)")
    p.add_argument("--docs", type=int, default=40, help="packed: documents in the row")
    p.add_argument("--repeats", type=int, help="timed steps per case (5)")
    p.add_argument("--backend", default="auto", help="attention: gqa_tune attention backend")
    H.run(H.parse(p, DEFAULTS, SMOKE), {"attention": attention, "packed": packed})


if __name__ == "__main__":
    main()
