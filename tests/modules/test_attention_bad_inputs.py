"""Bad and edge calls of ``MultiHeadAttention`` with a ``KVCache``: each is refused before the cache is
written (the cache is left exactly as it was), or answered correctly."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from gqa_tune.models import gqa_attention
from gqa_tune.modules import KVCache

E, MAX_LEN = 64, 32


def attention(backend="auto", batch=2, max_len=MAX_LEN):
    attn = gqa_attention(embed_dim=E, num_heads=4, num_kv_heads=2, max_seq_len=max_len, backend=backend).eval()
    attn.setup_cache(batch, torch.float32, max_len)
    return attn


def state(cache: KVCache):
    return cache.size, int(cache.cache_pos[0]), int(cache.rows[0]), cache.k_cache.clone(), cache.v_cache.clone()


def assert_unchanged(cache: KVCache, before):
    size, pos, rows, k, v = before
    assert (cache.size, int(cache.cache_pos[0]), int(cache.rows[0])) == (size, pos, rows)
    assert torch.equal(cache.k_cache, k) and torch.equal(cache.v_cache, v)


def refused(attn, message, *args, **kwargs):
    before = state(attn.kv_cache)
    with pytest.raises(ValueError) as info:
        attn(*args, **kwargs)
    assert message in str(info.value)
    assert_unchanged(attn.kv_cache, before)


@pytest.fixture
def prefilled():
    torch.manual_seed(0)
    attn = attention()
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        attn(x, x)
    return attn, torch.randn(2, 1, E)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.float16])
def test_masks_of_other_dtypes_are_refused(prefilled, dtype):
    attn, x = prefilled
    mask = torch.ones(2, 1, MAX_LEN, dtype=dtype)
    refused(attn, f"mask must be bool (True = attend) or additive in the input's dtype torch.float32, got {dtype}",
            x, x, mask=mask)  # fmt: skip


@pytest.mark.parametrize(
    "input_pos, message",
    [
        (torch.full((2, 1), -1), "input_pos must lie in [0, 32)"),
        (torch.full((2, 1), MAX_LEN), "input_pos must lie in [0, 32)"),
        (torch.zeros(2, 1), "input_pos must be an integer tensor"),
        (torch.zeros(2, 3, dtype=torch.long), "input_pos of shape (2, 3) does not fit [b=2, s_x=1]"),
        (torch.zeros(3, 1, dtype=torch.long), "input_pos of shape (3, 1) does not fit [b=2, s_x=1]"),
    ],
)
def test_bad_input_pos_is_refused(prefilled, input_pos, message):
    attn, x = prefilled
    refused(attn, message, x, x, input_pos=input_pos)


def test_a_batch_other_than_the_cached_rows_is_refused():
    attn = attention()
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        attn(x[:1], x[:1])  # batch-1 prefill
        refused(attn, "the cache holds 1 row(s) written since reset(), got a batch of 2", x[:, :1], x[:, :1])
        refused(attn, "batch size 2 differs from the 1 row(s) the cache holds", x[:, :1])
        attn.reset_cache()
        attn(x[:, :1], x[:, :1])  # after reset, any batch


def test_other_inputs_are_refused(prefilled):
    attn, x = prefilled
    refused(attn, "x has 32 features, embed_dim is 64", x[..., :32], x)
    refused(attn, "x must be a floating-point tensor", x.long(), x)
    refused(attn, "y's dtype torch.float64 differs from x's torch.float32", x, x.double())
    refused(attn, "x is torch.float64, the attention's weights are torch.float32", x.double(), x.double())
    refused(
        attn, "cannot write 40 positions: 5 of max_seq_len 32 are filled", torch.randn(2, 40, E), torch.randn(2, 40, E)
    )
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.output_proj):
        proj.double()  # weights in float64, the cache still float32
    refused(attn, "the KV cache holds torch.float32, the input is torch.float64", x.double(), x.double())


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_a_backend_that_cannot_serve_the_call_is_refused_before_the_write(backend, prefilled, monkeypatch):
    attn, x = prefilled
    attn.backend = backend
    if backend == "flex":
        attn.train()
        attn.attn_dropout = 0.1
        reason = "it has no dropout (dropout_p=0.1)"
    else:
        import gqa_tune.kernels.triton._common as common

        monkeypatch.setattr(common, "INTERPRET", False)
        reason = "on CPU only in Triton's interpreter"
    with torch.no_grad():
        refused(attn, reason, x, x)


def test_kv_cache_refuses_a_batch_of_zero():
    cache = KVCache(2, 8, 2, 4, torch.float32)
    before = state(cache)
    with pytest.raises(ValueError, match="cannot write a batch of 0 rows"):
        cache.update(torch.zeros(0, 2, 1, 4), torch.zeros(0, 2, 1, 4))
    assert_unchanged(cache, before)


# ---------------------------------------------------------------- flex: chunks and decode


def test_flex_prefills_in_chunks_and_decodes_like_sdpa():
    torch.manual_seed(0)
    flex, sdpa = attention("flex"), attention("sdpa")
    sdpa.load_state_dict(flex.state_dict())
    x = torch.randn(2, 20, E)
    counters.clear()
    with torch.no_grad():
        outs = {}
        for name, attn in (("flex", flex), ("sdpa", sdpa)):
            chunks = [attn(x[:, :6], x[:, :6]), attn(x[:, 6:9], x[:, 6:9])]  # a chunk after a prefix
            chunks += [attn(x[:, i : i + 1], x[:, i : i + 1]) for i in range(9, 20)]  # 11 decode steps
            outs[name] = torch.cat(chunks, dim=1)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], atol=1e-5, rtol=1e-5)
    # Automatic dynamic shapes: a growing cache does not recompile every step (it used to, 8 times, then gave up).
    assert counters["stats"]["unique_graphs"] <= 4


# ---------------------------------------------------------------- compiled and eager steps


def _decode_setup():
    torch.manual_seed(0)
    attn = attention(batch=1, max_len=8)
    ref = gqa_attention(embed_dim=E, num_heads=4, num_kv_heads=2, max_seq_len=8).eval()
    ref.load_state_dict(attn.state_dict())
    seq = torch.randn(1, 9, E)
    with torch.no_grad():
        full = ref(seq[:, :8], seq[:, :8])
    return attn, seq, full


def test_eager_steps_after_compiled_steps_need_no_sync():
    attn, seq, full = _decode_setup()
    counter = CompileCounter()
    step = torch.compile(lambda t: attn(t, t), backend=counter, fullgraph=True)
    with torch.no_grad():
        outs = [attn(seq[:, :3], seq[:, :3])]
        outs += [step(seq[:, i : i + 1]) for i in range(3, 5)]
        outs += [attn(seq[:, i : i + 1], seq[:, i : i + 1]) for i in range(5, 7)]  # eager, no sync_size()
        outs += [step(seq[:, 7:8])]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert attn.kv_cache.size == 8
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_compiled_step_past_the_cache_end_raises_value_error(backend):
    attn, seq, _ = _decode_setup()
    step = torch.compile(lambda t: attn(t, t), backend=backend, fullgraph=True)
    with torch.no_grad():
        attn(seq[:, :7], seq[:, :7])
        step(seq[:, 7:8])
        before = state(attn.kv_cache)
        with pytest.raises(ValueError, match="cannot write 1 positions: 8 of max_seq_len 8 are filled"):
            step(seq[:, 8:9])
    assert_unchanged(attn.kv_cache, before)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_kv_heads=True), "num_kv_heads must be a positive int, got True"),
        (dict(attn_dropout="0.1"), "attn_dropout ('0.1') must be between 0.0 and 1.0"),
        (dict(attn_dropout=float("nan")), "attn_dropout (nan) must be between 0.0 and 1.0"),
        (dict(is_causal=1), "is_causal must be True or False, got 1"),
        (dict(backend=None), "unknown attention backend None"),
    ],
)
def test_bad_constructor_values_are_refused(change, message):
    from torch import nn

    from gqa_tune.modules import MultiHeadAttention

    kwargs = dict(embed_dim=E, num_heads=4, num_kv_heads=2, head_dim=16, q_proj=nn.Linear(E, 64),
                  k_proj=nn.Linear(E, 32), v_proj=nn.Linear(E, 32), output_proj=nn.Linear(64, E))  # fmt: skip
    with pytest.raises(ValueError) as info:
        MultiHeadAttention(**{**kwargs, **change})
    assert message in str(info.value)


def test_kv_cache_refuses_bool_sizes():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got True"):
        KVCache(True, 8, 2, 4, torch.float32)


def test_reset_before_setup_raises_a_value_error_that_is_also_torchtunes_runtime_error():
    attn = gqa_attention(embed_dim=E, num_heads=4, num_kv_heads=2, max_seq_len=MAX_LEN)
    with pytest.raises(ValueError, match="caches are not setup"):
        attn.reset_cache()
    with pytest.raises(RuntimeError, match="caches are not setup"):
        attn.reset_cache()


# ---------------------------------------------------------------- torchtune's shapes, and edge calls


def test_input_pos_of_every_shape_torchtunes_attention_takes():
    """``[b, s_x]``, ``[s_x]``, and for one token per row ``[b]`` (torchtune's generate on a padded batch) or a
    0-d tensor (its one-token prompt of one row): the same answer as ``[b, 1]``."""
    x = torch.randn(2, 5, E)
    step = torch.randn(2, 1, E)
    outs = []
    for input_pos in (torch.tensor([[5], [3]]), torch.tensor([5, 3])):
        torch.manual_seed(0)
        attn = attention()
        with torch.no_grad():
            attn(x, x)
            outs.append(attn(step, step, input_pos=input_pos))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.manual_seed(0)
    one = attention(batch=1)
    with torch.no_grad():
        by_scalar = one(step[:1], step[:1], input_pos=torch.tensor(0))
        one.reset_cache()
        by_row = one(step[:1], step[:1], input_pos=torch.tensor([[0]]))
    torch.testing.assert_close(by_scalar, by_row, rtol=0, atol=0)


@pytest.mark.parametrize("cached", [False, True])
def test_positions_past_ropes_table_are_refused(cached):
    """RoPE's table holds max_seq_len (32) positions: a longer input, or a cache larger than the table decoding
    past it, is refused naming the positions, not an IndexError inside RoPE."""
    attn = gqa_attention(embed_dim=E, num_heads=4, num_kv_heads=2, max_seq_len=MAX_LEN).eval()
    if not cached:
        message = r"must lie in \[0, 32\) \(the position embedding's max_seq_len\), got 0..39"
        with pytest.raises(ValueError, match=message):
            attn(torch.randn(1, 40, E), torch.randn(1, 40, E))
        return
    attn.setup_cache(1, torch.float32, 64)  # larger than RoPE's table
    x = torch.randn(1, 30, E)
    with torch.no_grad():
        attn(x, x)
        refused(attn, "must lie in [0, 32) (the position embedding's max_seq_len), got 30..33", x[:, :4], x[:, :4])
        attn(x[:, :2], x[:, :2])  # positions 30, 31: the last ones RoPE has


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("b, s", [(0, 3), (2, 0)])
def test_empty_inputs_give_the_empty_output_and_leave_the_cache(b, s, cached):
    attn = attention() if cached else gqa_attention(embed_dim=E, num_heads=4, num_kv_heads=2, max_seq_len=MAX_LEN)
    x = torch.randn(b, s, E)
    if cached:
        with torch.no_grad():
            attn(torch.randn(2, 3, E), torch.randn(2, 3, E))
        before = state(attn.kv_cache)
    out = attn(x, x)
    assert out.shape == (b, s, E)
    if cached:
        assert_unchanged(attn.kv_cache, before)
        assert attn(x).shape == (b, s, E)  # attending to what the cache holds
        assert_unchanged(attn.kv_cache, before)


@pytest.mark.parametrize("cached", [False, True])
def test_a_y_of_another_width_is_refused(cached):
    attn = attention() if cached else gqa_attention(embed_dim=E, num_heads=4, num_kv_heads=2, max_seq_len=MAX_LEN)
    x, y = torch.randn(2, 3, E), torch.randn(2, 3, 32)
    if cached:
        refused(attn, "y has 32 features, k_proj and v_proj take 64", x, y)
    else:
        with pytest.raises(ValueError, match="y has 32 features, k_proj and v_proj take 64"):
            attn(x, y)


def test_an_output_projection_of_another_width_is_refused_at_construction():
    from torch import nn

    from gqa_tune.modules import MultiHeadAttention

    with pytest.raises(ValueError, match=r"output_proj takes 48 features, expected 64 \(num_heads 4 x head_dim 16\)"):
        MultiHeadAttention(embed_dim=E, num_heads=4, num_kv_heads=2, head_dim=16, q_proj=nn.Linear(E, 64),
                           k_proj=nn.Linear(E, 32), v_proj=nn.Linear(E, 32), output_proj=nn.Linear(48, E))  # fmt: skip


def test_kv_cache_refuses_integer_values_and_values_its_dtype_cannot_hold():
    cache = KVCache(1, 8, 2, 4, torch.float16)
    before = state(cache)
    ones = torch.ones(1, 2, 1, 4)
    with pytest.raises(ValueError, match="k_val and v_val must be floating-point, got torch.int64 and torch.int64"):
        cache.update(ones.long(), ones.long())
    with pytest.raises(ValueError, match=r"k_val holds 1e\+06, beyond the largest torch.float16 value 6.55e\+04"):
        cache.update(ones * 1e6, ones)
    assert_unchanged(cache, before)
    cache.update(ones * 6e4, ones)  # within float16's range
    assert cache.size == 1 and torch.isfinite(cache.k_cache).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_value_in_a_cache_slot_the_mask_hides_never_reaches_the_output(poison):
    """torchtune's padded decoding hides slots; whatever they hold (a NaN, or an inf) must not reach the row."""
    torch.manual_seed(0)
    attn = attention()
    x = torch.randn(2, 5, E)
    mask = torch.ones(2, 1, MAX_LEN, dtype=torch.bool)
    mask[0, :, 1] = False  # row 0 does not see slot 1
    step = torch.randn(2, 1, E)
    with torch.no_grad():
        attn(x, x)
        clean = attn(step, step, mask=mask)
        attn.kv_cache.truncate(5)
        attn.kv_cache.v_cache[:, 0, 1, 0] = poison  # both rows' slot 1
        attn.kv_cache.k_cache[:, 1, 1, 0] = poison
        out = attn(step, step, mask=mask)
    torch.testing.assert_close(out[0], clean[0])
    assert out[1].isnan().all()  # row 1 sees slot 1


def test_a_ring_cache_refuses_to_rewind_past_what_it_holds():
    """A ring of window 4 after 12 tokens holds positions 8..11: the token at 10 would need position 7."""
    torch.manual_seed(0)
    attn = gqa_attention(embed_dim=E, num_heads=4, num_kv_heads=2, max_seq_len=MAX_LEN, sliding_window_size=4).eval()
    ref = gqa_attention(embed_dim=E, num_heads=4, num_kv_heads=2, max_seq_len=MAX_LEN, sliding_window_size=4).eval()
    ref.load_state_dict(attn.state_dict())
    attn.setup_cache(1, torch.float32, MAX_LEN)
    x = torch.randn(1, 14, E)
    with torch.no_grad():
        full = ref(x, x)
        for i in range(12):
            attn(x[:, i : i + 1], x[:, i : i + 1])
        before = state(attn.kv_cache)
        for length, needed in ((10, 7), (7, 4)):
            with pytest.raises(ValueError) as info:
                attn.kv_cache.truncate(length)
            assert f"to {length}: the next token, at position {length}, sees position {needed}" in str(info.value)
            assert "holds positions 8..11); truncate to 11 or later" in str(info.value)
            assert_unchanged(attn.kv_cache, before)
        attn.kv_cache.truncate(11)  # one step back: the ring still holds 8..10
        torch.testing.assert_close(attn(x[:, 11:12], x[:, 11:12]), full[:, 11:12], atol=1e-5, rtol=1e-5)
        attn.kv_cache.truncate(0)  # everything: nothing is needed
        torch.testing.assert_close(attn(x[:, :1], x[:, :1]), full[:, :1], atol=1e-5, rtol=1e-5)
