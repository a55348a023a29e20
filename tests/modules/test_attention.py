"""MultiHeadAttention against torchtune 0.6.1's class, with shared weights."""

import copy

import pytest
import torch
from torch import nn
from torchtune.modules import MultiHeadAttention as TorchtuneMHA
from torchtune.modules import RMSNorm, RotaryPositionalEmbeddings

import gqa_tune.ops.backends.sdpa as sdpa_module
from gqa_tune.convert import from_torchtune_attention
from gqa_tune.models import gqa_attention
from gqa_tune.modules import MultiHeadAttention

E, MAX_LEN = 64, 32


def make_pair(
    num_heads=8,
    num_kv_heads=2,
    head_dim=None,
    *,
    rope=True,
    qk_norm=False,
    is_causal=True,
    bias=False,
    dtype=torch.float32,
):
    """A torchtune MHA and ours with identical (but separate) weights."""
    head_dim = head_dim or E // num_heads
    tt = TorchtuneMHA(
        embed_dim=E,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        q_proj=nn.Linear(E, num_heads * head_dim, bias=bias),
        k_proj=nn.Linear(E, num_kv_heads * head_dim, bias=bias),
        v_proj=nn.Linear(E, num_kv_heads * head_dim, bias=bias),
        output_proj=nn.Linear(num_heads * head_dim, E, bias=False),
        pos_embeddings=RotaryPositionalEmbeddings(head_dim, MAX_LEN) if rope else None,
        q_norm=RMSNorm(head_dim) if qk_norm else None,
        k_norm=RMSNorm(head_dim) if qk_norm else None,
        max_seq_len=MAX_LEN,
        is_causal=is_causal,
    ).to(dtype)
    ours = from_torchtune_attention(copy.deepcopy(tt))
    return tt, ours


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


HEADS = [(8, 8), (8, 2), (8, 1)]


@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("head_dim", [None, 12], ids=["hd=d/h", "hd=12"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_self_attention_matches_torchtune(num_heads, num_kv_heads, head_dim, qk_norm):
    tt, ours = make_pair(num_heads, num_kv_heads, head_dim, qk_norm=qk_norm, bias=True)
    x = torch.randn(2, 11, E)
    out_tt, out = tt(x, x), ours(x, x)
    torch.testing.assert_close(out, out_tt, rtol=1e-5, atol=1e-5)
    out_tt.square().sum().backward()
    out.square().sum().backward()
    g_tt, g = grads(tt), grads(ours)
    assert g.keys() == g_tt.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_tt[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_dtypes_match_torchtune(dtype, tol):
    tt, ours = make_pair(dtype=dtype)
    x = torch.randn(2, 9, E, dtype=dtype)
    torch.testing.assert_close(ours(x, x), tt(x, x), rtol=tol, atol=tol)


def test_cross_attention_matches_torchtune():
    tt, ours = make_pair(8, 2, rope=False, is_causal=False)
    x, y = torch.randn(2, 5, E), torch.randn(2, 13, E)
    mask = torch.rand(2, 5, 13) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(ours(x, y), tt(x, y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x, y, mask=mask), tt(x, y, mask=mask), rtol=1e-5, atol=1e-6)


def test_bool_mask_and_packed_positions_match_torchtune():
    tt, ours = make_pair(8, 2, qk_norm=True)
    x = torch.randn(2, 10, E)
    # two packed documents of lengths 4 and 6: block-causal mask, positions restart
    doc = torch.tensor([0] * 4 + [1] * 6)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    mask = mask.expand(2, -1, -1)
    input_pos = torch.cat([torch.arange(4), torch.arange(6)]).expand(2, -1)
    out_tt = tt(x, x, mask=mask, input_pos=input_pos)
    out = ours(x, x, mask=mask, input_pos=input_pos)
    torch.testing.assert_close(out, out_tt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS, ids=["mha", "gqa", "mqa"])
def test_cached_prefill_and_decode_match_torchtune(num_heads, num_kv_heads):
    """torchtune-style call: masks [b, s, max_seq_len] and explicit positions."""
    tt, ours = make_pair(num_heads, num_kv_heads, qk_norm=True)
    tt.eval(), ours.eval()
    for m in (tt, ours):
        m.setup_cache(2, torch.float32, MAX_LEN)
    causal = torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool).tril().expand(2, -1, -1)
    pos = torch.arange(MAX_LEN).expand(2, -1)
    seq = torch.randn(2, 14, E)
    with torch.no_grad():
        chunks = [(0, 7), (7, 8), (8, 9), (9, 12), (12, 13), (13, 14)]
        for lo, hi in chunks:
            x = seq[:, lo:hi]
            out_tt = tt(x, x, mask=causal[:, lo:hi], input_pos=pos[:, lo:hi])
            out = ours(x, x, mask=causal[:, lo:hi], input_pos=pos[:, lo:hi])
            torch.testing.assert_close(out, out_tt, rtol=1e-5, atol=1e-6)
    assert ours.kv_cache.size == 14


@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS, ids=["mha", "gqa", "mqa"])
def test_decode_without_mask_or_positions_equals_full_forward(num_heads, num_kv_heads):
    attn = gqa_attention(
        embed_dim=E, num_heads=num_heads, num_kv_heads=num_kv_heads, max_seq_len=MAX_LEN, qk_norm=True
    ).eval()
    seq = torch.randn(3, 15, E)
    with torch.no_grad():
        full = attn(seq, seq)
        attn.setup_cache(3, torch.float32, MAX_LEN)
        pieces = [attn(seq[:, lo:hi], seq[:, lo:hi]) for lo, hi in [(0, 5), (5, 6), (6, 10), (10, 11), (11, 15)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-6)


def test_attention_to_cache_only_with_y_none():
    attn = gqa_attention(embed_dim=E, num_heads=8, num_kv_heads=2, use_rope=False, is_causal=False).eval()
    x, y = torch.randn(2, 3, E), torch.randn(2, 6, E)
    with torch.no_grad():
        expected = attn(x, y)
        expected_first4 = attn(x, y[:, :4])
        attn.setup_cache(2, torch.float32, 16)
        attn(x, y)  # fills the cache with y's keys/values
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
        mask = torch.zeros(2, 3, 16, dtype=torch.bool)
        mask[..., :4] = True
        torch.testing.assert_close(attn(x, mask=mask), expected_first4, rtol=1e-5, atol=1e-6)
    assert attn.kv_cache.size == 6


def test_decode_reads_grouped_kv_of_filled_length_only(monkeypatch):
    """The backend sees n_kv heads and only the filled positions (no expand, no full buffer)."""
    seen = []
    real = sdpa_module.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((k.shape[1], k.shape[2]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", spy)
    attn = gqa_attention(embed_dim=E, num_heads=8, num_kv_heads=2, max_seq_len=MAX_LEN).eval()
    attn.setup_cache(1, torch.float32, MAX_LEN)
    mask = torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        x = torch.randn(1, 6, E)
        attn(x, x, mask=mask[:, :6], input_pos=torch.arange(6)[None])
        for i in range(6, 9):
            t = torch.randn(1, 1, E)
            attn(t, t, mask=mask[:, i : i + 1], input_pos=torch.tensor([[i]]))
    assert seen == [(2, 6), (2, 7), (2, 8), (2, 9)]


def test_compiled_decode_step_matches_eager_without_recompiles():
    from torch._dynamo.testing import CompileCounter

    attn = gqa_attention(embed_dim=E, num_heads=8, num_kv_heads=2, max_seq_len=MAX_LEN).eval()
    seq = torch.randn(2, 12, E)
    with torch.no_grad():
        full = attn(seq, seq)
        attn.setup_cache(2, torch.float32, MAX_LEN)
        attn(seq[:, :5], seq[:, :5])
        counter = CompileCounter()
        step = torch.compile(lambda t: attn(t, t), backend=counter, fullgraph=True)
        outs = [step(seq[:, i : i + 1]) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full[:, 5:], rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    assert attn.kv_cache.size == 12


# ---------------------------------------------------------------- validation


def _build(**overrides):
    kwargs = dict(
        embed_dim=E,
        num_heads=8,
        num_kv_heads=2,
        head_dim=8,
        q_proj=nn.Linear(E, 64),
        k_proj=nn.Linear(E, 16),
        v_proj=nn.Linear(E, 16),
        output_proj=nn.Linear(64, E),
    )
    kwargs.update(overrides)
    return MultiHeadAttention(**kwargs)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            dict(num_kv_heads=3, k_proj=nn.Linear(E, 24), v_proj=nn.Linear(E, 24)),
            r"num_heads \(8\) must be divisible by num_kv_heads \(3\)",
        ),
        (
            dict(embed_dim=60, q_proj=nn.Linear(60, 64), k_proj=nn.Linear(60, 16), v_proj=nn.Linear(60, 16)),
            r"embed_dim \(60\) must be divisible by num_heads \(8\)",
        ),
        (dict(attn_dropout=1.5), r"attn_dropout \(1.5\)"),
        (dict(attn_dropout=-0.1), r"attn_dropout \(-0.1\)"),
        (dict(q_norm=RMSNorm(8)), "q_norm and k_norm must be set together"),
        (dict(k_norm=RMSNorm(8)), "q_norm and k_norm must be set together"),
        (dict(k_proj=nn.Linear(E, 32)), "k_proj outputs 32 features, expected 16"),
        (dict(num_kv_heads=0), "num_kv_heads must be a positive int, got 0"),
        (dict(backend="cuda_magic"), "unknown attention backend 'cuda_magic'"),
    ],
)
def test_bad_configuration_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        _build(**overrides)


def test_missing_y_without_cache_raises():
    with pytest.raises(ValueError, match="Must provide y"):
        _build()(torch.randn(1, 3, E))


def test_bad_mask_shape_raises():
    attn = _build()
    x = torch.randn(2, 4, E)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4, 5\)"):
        attn(x, x, mask=torch.ones(2, 4, 5, dtype=torch.bool))


def _filled_cache_module():
    attn = gqa_attention(embed_dim=E, num_heads=8, num_kv_heads=2, max_seq_len=8).eval()
    attn.setup_cache(2, torch.float32, 8)
    x = torch.randn(2, 6, E)
    with torch.no_grad():
        attn(x, x)
    return attn


@pytest.mark.parametrize(
    "batch,length,message",
    [
        (2, 3, "cannot write 3 positions: 6 of max_seq_len 8 are filled"),
        (3, 1, "batch size 3 is larger than the cache's batch_size 2"),
    ],
)
def test_rejected_cache_write_leaves_cache_unchanged(batch, length, message):
    attn = _filled_cache_module()
    cache = attn.kv_cache
    before = (cache.k_cache.clone(), cache.v_cache.clone(), cache.cache_pos.clone(), cache.size)
    x = torch.randn(batch, length, E)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        attn(x, x)
    assert torch.equal(cache.k_cache, before[0]) and torch.equal(cache.v_cache, before[1])
    assert torch.equal(cache.cache_pos, before[2]) and cache.size == before[3]
    with torch.no_grad():  # still usable afterwards
        t = torch.randn(2, 2, E)
        attn(t, t)
    assert cache.size == 8


def test_cache_methods_mirror_torchtune(caplog):
    attn = gqa_attention(embed_dim=E, num_heads=8, num_kv_heads=2)
    with pytest.raises(RuntimeError, match="not setup"):
        attn.reset_cache()
    attn.setup_cache(1, torch.bfloat16, 16)
    assert attn.cache_enabled and attn.kv_cache.k_cache.shape == (1, 2, 16, 8)
    assert attn.kv_cache.k_cache.dtype == torch.bfloat16
    attn.setup_cache(4, torch.float32, 32)
    assert "already setup" in caplog.text and attn.kv_cache.k_cache.shape == (1, 2, 16, 8)


def test_state_dict_loads_into_torchtune_and_back():
    tt, ours = make_pair(8, 2, qk_norm=True)
    assert ours.state_dict().keys() == tt.state_dict().keys()
    fresh_tt, _ = make_pair(8, 2, qk_norm=True)
    fresh_tt.load_state_dict(ours.state_dict())
    x = torch.randn(1, 5, E)
    torch.testing.assert_close(fresh_tt(x, x), ours(x, x))


def test_dropout_only_in_training():
    attn = gqa_attention(embed_dim=E, num_heads=8, num_kv_heads=2, attn_dropout=0.5)
    x = torch.randn(1, 6, E)
    attn.eval()
    torch.testing.assert_close(attn(x, x), attn(x, x))
    attn.train()
    assert not torch.allclose(attn(x, x), attn(x, x))
