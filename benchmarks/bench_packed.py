"""Packed-document training, module level: torchtune 0.6.1 against gqa_tune, forward + backward, on CPU.

The model: torchtune's ``llama3_2`` builder, 2 layers, width 256, 8 query / 2 kv heads (head_dim 32), its
default MLP, vocabulary 260, one packed row of ``--seq`` tokens (4096) holding ``--docs`` documents (about 40)
of random lengths, positions restarting per document. gqa_tune's model is a copy with
``swap_attention`` (the same weights). Cases, each a forward and a backward of the summed logits:

- ``torchtune, dense``: torchtune's attention with the dense block-causal ``[1, s, s]`` mask its CPU packed
  collate builds (``padded_collate_packed`` / ``create_block_causal_mask``), the baseline;
- ``gqa_tune, dense``: our attention given that same dense mask (it recognizes the documents in it);
- ``gqa_tune, BlockMask``: our attention given the ``BlockMask`` our packed collate builds from the document
  lengths (``gqa_tune.data.packing.packed_collate``; no ``s x s`` tensor is ever built).

Before timing, logits and the gradients of every parameter are checked to match torchtune's. Time: the
median of ``--repeats`` steps, the cases taking turns. Memory: the largest single allocation of one step
(torch's profiler, ``profile_memory=True``), against the ``s x s`` float32 scores a dense kernel would hold.

Usage: python benchmarks/bench_packed.py [--seq 4096] [--docs 40] [--repeats 5] [--threads N] [--json PATH]
"""

import argparse
import copy
import random
import statistics
import time

import torch
from _timing import environment, markdown_table, print_environment, write_json
from torch.profiler import profile
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules.attention_utils import create_block_causal_mask

from gqa_tune import swap_attention
from gqa_tune.data.packing import document_block_mask

VOCAB = 260


def packed_row(seq: int, docs: int, seed: int):
    """Random document lengths that fill one row, tokens, and positions restarting per document."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, seq), docs - 1))
    lengths = torch.tensor([b - a for a, b in zip([0, *cuts], [*cuts, seq])])
    positions = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    tokens = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seed))
    return lengths, tokens, positions


def build(seq: int):
    torch.manual_seed(0)
    model = llama3_2(vocab_size=VOCAB, num_layers=2, num_heads=8, num_kv_heads=2, embed_dim=256, max_seq_len=seq)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ours = copy.deepcopy(model)
    swap_attention(ours)
    return model, ours


def step(model, tokens, mask, positions):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, mask=mask, input_pos=positions)
    logits.sum().backward()
    return logits.detach()


def largest_allocation(model, tokens, mask, positions) -> int:
    with profile(profile_memory=True) as prof:
        step(model, tokens, mask, positions)
    return max((max(e.cpu_memory_usage, 0) for e in prof.events()), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)

    lengths, tokens, positions = packed_row(args.seq, args.docs, args.seed)
    dense = create_block_causal_mask([lengths])  # torchtune's CPU packed collate
    block_mask = document_block_mask([lengths], args.seq)  # ours
    tt, ours = build(args.seq)
    cases = {
        "torchtune, dense mask": (tt, dense),
        "gqa_tune, dense mask": (ours, dense),
        "gqa_tune, BlockMask": (ours, block_mask),
    }

    expected = step(tt, tokens, dense, positions)
    tt_grads = [p.grad.clone() for p in tt.parameters()]
    for name in list(cases)[1:]:
        model, mask = cases[name]
        got = step(model, tokens, mask, positions)
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
        for p, g in zip(model.parameters(), tt_grads):
            torch.testing.assert_close(p.grad, g, atol=2e-4, rtol=1e-3)
    print("logits and gradients match torchtune's")

    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (model, mask) in cases.items():
            start = time.perf_counter()
            step(model, tokens, mask, positions)
            times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["torchtune, dense mask"])
    rows, results = [], {}
    for name, (model, mask) in cases.items():
        ms = statistics.median(times[name])
        peak = largest_allocation(model, tokens, mask, positions)
        results[name] = {"ms": ms, "speedup": base / ms, "largest_allocation_mib": peak / 2**20}
        rows.append([name, f"{ms:.0f}", f"{base / ms:.2f}x", f"{peak / 2**20:.1f}"])
    scores = args.seq * args.seq * 4 / 2**20
    print(
        f"\nForward + backward, 2 layers, width 256, 8/2 heads, one row of {args.seq} tokens, {args.docs} "
        f"documents, {args.threads} threads, median of {args.repeats} (an s x s float32 tensor: {scores:.0f} MiB)\n"
    )
    print(markdown_table(["case", "ms", "speedup", "largest allocation MiB"], rows))
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
