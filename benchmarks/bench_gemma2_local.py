"""A Gemma 2-shaped local (sliding-window) attention layer decoding one token: torchtune vs gqa_tune, on CPU.

Gemma 2 2B's attention shape (width 2304, 8 query / 4 kv heads of 256, ``query_pre_attn_scalar`` 256,
soft-cap 50) with window 1024, a cache of 8192 positions, 8000 of them filled. torchtune's
``Gemma2Attention`` caches K/V expanded to 8 heads over all 8192 positions and scores the whole buffer
every step; gqa_tune's module (the same weights, ``from_torchtune_attention``) keeps a ring of the last
1024 positions at 4 heads and attends over those.

Both get torchtune's decoding call ``attn(x, x, mask=mask, input_pos=[[fill]])`` with a bool mask
``[1, 1, 8192]`` True for positions ``<= fill``. Every timed step is undone afterwards (untimed), so
each repetition sees the same cache. Correctness: gqa_tune's ring-cache step is checked against gqa_tune
with a plain full-length cache and against float64 attention over the window written out here;
torchtune's own step is reported beside it (its windowed cache is wrong past the window, torchtune 0.6.1).

Usage: python benchmarks/bench_gemma2_local.py [--fill 8000] [--window 1024] [--cache 8192] [--repeats 20]
       [--threads N] [--json PATH]
"""

import argparse

import torch
from _timing import environment, markdown_table, median_ms, print_environment, time_interleaved, write_json
from torch import nn
from torchtune.models.gemma2._attention import Gemma2Attention
from torchtune.modules import RotaryPositionalEmbeddings

from gqa_tune.convert.swap import from_torchtune_attention
from gqa_tune.modules.kv_cache import KVCache

EMBED_DIM, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, SCALAR, SOFTCAP = 2304, 8, 4, 256, 256, 50.0


def cache_bytes(cache: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (cache.k_cache, cache.v_cache))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fill", type=int, default=8000)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--cache", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if not args.window <= args.fill < args.cache:
        parser.error("need window <= fill < cache")
    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)
    torch.manual_seed(0)

    tt = Gemma2Attention(
        embed_dim=EMBED_DIM, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
        q_proj=nn.Linear(EMBED_DIM, NUM_HEADS * HEAD_DIM, bias=False),
        k_proj=nn.Linear(EMBED_DIM, NUM_KV_HEADS * HEAD_DIM, bias=False),
        v_proj=nn.Linear(EMBED_DIM, NUM_KV_HEADS * HEAD_DIM, bias=False),
        output_proj=nn.Linear(NUM_HEADS * HEAD_DIM, EMBED_DIM, bias=False),
        pos_embeddings=RotaryPositionalEmbeddings(HEAD_DIM, max_seq_len=args.cache),
        max_seq_len=args.cache, sliding_window_size=args.window, softcapping=SOFTCAP, query_pre_attn_scalar=SCALAR,
    ).eval()  # fmt: skip
    ours = from_torchtune_attention(tt)
    plain = from_torchtune_attention(tt)  # gqa_tune with a full-length cache: the same function, a larger cache
    tt.setup_cache(1, torch.float32, args.cache)
    ours.setup_cache(1, torch.float32, args.cache)  # a ring of the window
    plain.kv_cache = KVCache(1, args.cache, NUM_KV_HEADS, HEAD_DIM, torch.float32)
    plain.cache_enabled = True

    fill, window, group = args.fill, args.window, NUM_HEADS // NUM_KV_HEADS
    k = torch.randn(1, NUM_KV_HEADS, fill, HEAD_DIM)
    v = torch.randn(1, NUM_KV_HEADS, fill, HEAD_DIM)
    with torch.no_grad():
        tt.kv_cache.k_cache[:, :, :fill] = k.repeat_interleave(group, 1)  # torchtune caches n_h heads
        tt.kv_cache.v_cache[:, :, :fill] = v.repeat_interleave(group, 1)
        tt.kv_cache.cache_pos.add_(fill)
        plain.kv_cache.update(k, v)
        ring = ours.kv_cache
        ring.update(k, v)  # keeps the last `window` positions

    x = torch.randn(1, 1, EMBED_DIM)
    mask = (torch.arange(args.cache) <= fill).view(1, 1, -1)
    input_pos = torch.tensor([[fill]])
    slot = fill % ring.k_cache.shape[2]
    saved = (ring.k_cache[:, :, slot].clone(), ring.v_cache[:, :, slot].clone(), ring.slot_pos[slot].clone())

    def step(attn):
        return attn(x, x, mask=mask, input_pos=input_pos)

    def rewind_tt():
        tt.kv_cache.cache_pos.sub_(1)

    def rewind_ours():
        ring.truncate(fill)
        ring.k_cache[:, :, slot], ring.v_cache[:, :, slot], ring.slot_pos[slot] = saved  # the slot the step took

    def rewind_plain():
        plain.kv_cache.truncate(fill)

    with torch.no_grad():
        out_ours, out_plain, out_tt = step(ours), step(plain), step(tt)
        # float64 oracle: the new token's q against keys fill-window+1 .. fill (the new one included)
        q = ours.q_proj(x).view(1, 1, NUM_HEADS, HEAD_DIM)
        q = ours.pos_embeddings(q, input_pos=input_pos).transpose(1, 2).double()
        keys = torch.cat([k[:, :, fill - window + 1 :], plain.kv_cache.k_cache[:, :, fill : fill + 1]], 2).double()
        values = torch.cat([v[:, :, fill - window + 1 :], plain.kv_cache.v_cache[:, :, fill : fill + 1]], 2).double()
        scores = q @ keys.repeat_interleave(group, 1).transpose(-2, -1) * SCALAR**-0.5
        scores = SOFTCAP * torch.tanh(scores / SOFTCAP)
        attn_out = torch.softmax(scores, -1) @ values.repeat_interleave(group, 1)
        oracle = ours.output_proj(attn_out.transpose(1, 2).reshape(1, 1, -1).float())
        rewind_tt(), rewind_ours(), rewind_plain()
        diff_oracle = (out_ours - oracle).abs().max().item()
        diff_plain = (out_ours - out_plain).abs().max().item()
        diff_tt = (out_tt - oracle).abs().max().item()
        torch.testing.assert_close(out_ours, oracle, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out_ours, out_plain, atol=1e-5, rtol=1e-5)

        times = time_interleaved(
            {"torchtune": (lambda: step(tt), rewind_tt), "gqa_tune": (lambda: step(ours), rewind_ours)},
            repeats=args.repeats,
            warmup=args.warmup,
        )
        torch.testing.assert_close(step(ours), out_ours, atol=0, rtol=0)  # the repetitions left it as it was
    tt_ms, ours_ms = median_ms(times["torchtune"]), median_ms(times["gqa_tune"])
    result = {
        "fill": fill, "window": window, "cache": args.cache,
        "torchtune_ms": tt_ms, "gqa_tune_ms": ours_ms, "speedup": tt_ms / ours_ms,
        "torchtune_cache_bytes": cache_bytes(tt.kv_cache), "gqa_tune_cache_bytes": cache_bytes(ring),
        "gqa_tune_vs_oracle": diff_oracle, "gqa_tune_ring_vs_full_cache": diff_plain, "torchtune_vs_oracle": diff_tt,
    }  # fmt: skip
    print()
    print(
        f"Gemma 2-shaped local layer, one decode step, CPU float32, E={EMBED_DIM}, {NUM_HEADS}/{NUM_KV_HEADS} heads "
        f"of {HEAD_DIM}, window {window}, cache {args.cache}, fill {fill}, {args.threads} threads, "
        f"median of {args.repeats}, interleaved"
    )
    print()
    print(
        markdown_table(
            ["", "torchtune 0.6.1", "gqa_tune", "ratio"],
            [
                ["decode step ms", f"{tt_ms:.2f}", f"{ours_ms:.2f}", f"{tt_ms / ours_ms:.1f}x"],
                [
                    "KV cache MiB (this layer)",
                    f"{cache_bytes(tt.kv_cache) / 2**20:.1f}",
                    f"{cache_bytes(ring) / 2**20:.1f}",
                    f"{cache_bytes(tt.kv_cache) / cache_bytes(ring):.1f}x",
                ],
                ["max abs diff vs float64 window attention", f"{diff_tt:.2e}", f"{diff_oracle:.2e}", ""],
            ],
        )  # fmt: skip
    )
    write_json(args.json, {"environment": env, "result": result})


if __name__ == "__main__":
    main()
