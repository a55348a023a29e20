"""``MultiHeadAttention(sliding_window_size=, softcapping=, query_pre_attn_scalar=)`` as a drop-in for
torchtune's ``Gemma2Attention``: the same outputs without a cache, with bool masks and packed positions;
with a cache, decoding equals the full forward past the window, and the cache holds ``n_kv`` heads."""

import pytest
import torch
from torch import nn
from torchtune.models.gemma2._attention import Gemma2Attention
from torchtune.modules import RotaryPositionalEmbeddings

from gqa_tune.modules import MultiHeadAttention

E, H, KV, D, WINDOW = 64, 4, 2, 16, 4
GEMMA = dict(sliding_window_size=WINDOW, softcapping=20.0, query_pre_attn_scalar=8)


def pair(**gemma):
    torch.manual_seed(0)
    parts = dict(
        q_proj=nn.Linear(E, H * D, bias=False),
        k_proj=nn.Linear(E, KV * D, bias=False),
        v_proj=nn.Linear(E, KV * D, bias=False),
        output_proj=nn.Linear(H * D, E, bias=False),
        pos_embeddings=RotaryPositionalEmbeddings(D, max_seq_len=64),
    )
    shape = dict(embed_dim=E, num_heads=H, num_kv_heads=KV, head_dim=D, max_seq_len=64)
    theirs = Gemma2Attention(**shape, **parts, **{"softcapping": None, **gemma}).eval()
    ours = MultiHeadAttention(**shape, **parts, **gemma).eval()
    return theirs, ours


@pytest.mark.parametrize(
    "gemma", [GEMMA, dict(sliding_window_size=3), dict(softcapping=5.0), dict(query_pre_attn_scalar=32)],
    ids=["all", "window", "softcap", "scalar"],
)  # fmt: skip
def test_same_outputs_without_a_cache(gemma):
    theirs, ours = pair(**gemma)
    x = torch.randn(2, 12, E)
    mask = torch.ones(2, 12, 12, dtype=torch.bool).tril()
    mask[:, 6:, :6] = False  # two packed documents
    positions = torch.cat([torch.arange(6), torch.arange(6)])[None].expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, x), theirs(x, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours(x, x, mask=mask, input_pos=positions),
            theirs(x, x, mask=mask, input_pos=positions),
            atol=1e-5,
            rtol=1e-5,
        )


def test_gradients_match():
    theirs, ours = pair(**GEMMA)
    x = torch.randn(2, 10, E, requires_grad=True)
    ours(x, x).sum().backward()
    ours_grads = [x.grad.clone()] + [p.grad.clone() for p in ours.parameters()]
    x.grad = None
    for p in ours.parameters():
        p.grad = None
    theirs(x, x).sum().backward()
    theirs_grads = [x.grad] + [p.grad for p in theirs.parameters()]
    for got, want in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cached_decoding_past_the_window_equals_the_full_forward():
    _, ours = pair(**GEMMA)
    x = torch.randn(2, 14, E)
    with torch.no_grad():
        full = ours(x, x)
        ours.setup_cache(2, torch.float32, 32)
        # n_kv heads (Gemma2Attention caches n_h), and only the window: a ring of WINDOW slots, not 32
        assert ours.kv_cache.k_cache.shape == (2, KV, WINDOW, D)
        outs = [ours(x[:, :3], x[:, :3]), ours(x[:, 3:8], x[:, 3:8])]  # a prefill, then a chunk longer than the ring
        outs += [ours(x[:, i : i + 1], x[:, i : i + 1]) for i in range(8, 14)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_compiled_windowed_decode_equals_eager():
    _, ours = pair(**GEMMA)
    x = torch.randn(1, 10, E)
    with torch.no_grad():
        full = ours(x, x)
        ours.setup_cache(1, torch.float32, 16)
        outs = [ours(x[:, :4], x[:, :4])]
        step = torch.compile(lambda t: ours(t, t), backend="eager", fullgraph=True)
        outs += [step(x[:, i : i + 1]) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sliding_window_size=0), "sliding_window_size must be None or a positive int, got 0"),
        (dict(sliding_window_size=2.0), "sliding_window_size must be None or a positive int, got 2.0"),
        (dict(softcapping=0.0), "softcapping must be None or a finite positive number, got 0.0"),
        (dict(softcapping=float("nan")), "softcapping must be None or a finite positive number, got nan"),
        (dict(query_pre_attn_scalar=-1), "query_pre_attn_scalar must be None or a finite positive number, got -1"),
    ],
)
def test_bad_gemma_arguments_raise(kwargs, message):
    with pytest.raises(ValueError) as info:
        pair(**kwargs)
    assert message in str(info.value)


def test_ring_cache_wraps_around_and_keeps_the_window_only():
    _, ours = pair(**GEMMA)
    x = torch.randn(1, 30, E)
    with torch.no_grad():
        full = ours(x, x)
        ours.setup_cache(1, torch.float32, 64)
        outs = [ours(x[:, i : i + 1], x[:, i : i + 1]) for i in range(30)]  # wraps around a 4-slot ring 7 times
        assert sorted(ours.kv_cache.slot_pos.tolist()) == [26, 27, 28, 29]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert ours.kv_cache.k_cache.numel() * 4 == 1 * KV * WINDOW * D * 4  # bytes: the window, not max_seq_len
