import pytest
import torch
import torch.nn.functional as F

from gqa_tune.convert import convert_model_
from gqa_tune.models._encoder_decoder import GQATransformer, GQATransformerLM, gqa_transformer, gqa_transformer_lm
from gqa_tune.modules import MultiHeadAttention

V, BOS, EOS, PAD = 16, 1, 2, 0
SMALL = dict(d_model=32, nhead=4, kv_heads=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def lm(**overrides):
    kwargs = dict(SMALL, max_seq_len=32)
    kwargs.update(overrides)
    return gqa_transformer_lm(V, **kwargs).eval()


def tokens(b, s):
    return torch.randint(3, V, (b, s))


def test_shapes():
    model = gqa_transformer(**SMALL)
    assert isinstance(model, GQATransformer)
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    assert model(src, tgt).shape == (2, 5, 32)
    assert model.encode(src).shape == (2, 7, 32)
    assert model(src, tgt, src_mask=torch.ones(2, 7, dtype=torch.bool)).shape == (2, 5, 32)
    language_model = lm()
    assert isinstance(language_model, GQATransformerLM)
    assert language_model(tokens(3, 6), tokens(3, 4)).shape == (3, 4, V)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kv_heads_set_projection_sizes(kv_heads):
    model = lm(kv_heads=kv_heads)
    attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(attns) == 2 + 2 * 2  # encoder self, decoder self + cross
    for attn in attns:
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, kv_heads, 8)
        assert attn.k_proj.out_features == attn.v_proj.out_features == kv_heads * 8
        assert attn.q_proj.out_features == 32
    assert model(tokens(2, 5), tokens(2, 3)).shape == (2, 3, V)


def test_decoder_self_attention_is_causal():
    model = lm()
    src, tgt = tokens(2, 6), tokens(2, 5)
    changed = tgt.clone()
    changed[:, 3] = (changed[:, 3] + 1 - 3) % (V - 3) + 3
    a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_cross_attention_sees_the_whole_source():
    model = lm()
    src, tgt = tokens(2, 6), tokens(2, 5)
    changed = src.clone()
    changed[:, -1] = (changed[:, -1] + 1 - 3) % (V - 3) + 3
    a, b = model(src, tgt), model(changed, tgt)
    # The first target position sees the last source token: no causal mask on cross-attention.
    assert (a[:, 0] - b[:, 0]).abs().amax() > 1e-4


def test_source_padding_is_hidden():
    model = lm(pad_id=PAD)
    src, tgt = tokens(2, 6), tokens(2, 5)
    src_mask = torch.ones(2, 6, dtype=torch.bool)
    src_mask[0, 4:] = False
    changed = src.clone()
    changed[0, 4:] = torch.tensor([7, 9])
    a, b = model(src, tgt, src_mask=src_mask), model(changed, tgt, src_mask=src_mask)
    torch.testing.assert_close(a, b)
    # Without the mask the same change is visible.
    assert not torch.allclose(model(src, tgt), model(changed, tgt))
    # pad_id gives the mask by default.
    padded = src.clone()
    padded[0, 4:] = PAD
    torch.testing.assert_close(model(padded, tgt), a)


def test_fully_padded_source_gives_finite_output():
    model = lm()
    src_mask = torch.zeros(2, 6, dtype=torch.bool)
    src_mask[1] = True
    out = model(tokens(2, 6), tokens(2, 4), src_mask=src_mask)
    assert torch.isfinite(out).all()


def test_gradients_flow_to_every_parameter():
    model = lm(tie_word_embeddings=False).train()
    logits = model(tokens(2, 6), tokens(2, 5))
    F.cross_entropy(logits.flatten(0, 1), tokens(2, 5).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dropout_only_while_training():
    model = lm(dropout=0.2, activation="relu")
    src, tgt = tokens(2, 6), tokens(2, 5)
    torch.testing.assert_close(model(src, tgt), model(src, tgt))  # eval: deterministic
    model.train()
    assert not torch.allclose(model(src, tgt), model(src, tgt))


def test_backends_agree():
    src, tgt = tokens(2, 6), tokens(2, 5)
    src_mask = torch.ones(2, 6, dtype=torch.bool)
    src_mask[1, 3:] = False
    torch.manual_seed(1)
    auto = lm(backend="auto")
    torch.manual_seed(1)
    math = lm(backend="math")
    torch.testing.assert_close(auto(src, tgt, src_mask=src_mask), math(src, tgt, src_mask=src_mask))


def test_cached_generation_matches_recomputation():
    model = lm(init_std=0.5, pad_id=PAD)  # large weights: varied greedy tokens
    src = tokens(3, 7)
    src[2, 5:] = PAD
    cached = model.generate(src, 12, bos_id=BOS)
    recomputed = model.generate(src, 12, bos_id=BOS, use_cache=False)
    assert cached.shape == (3, 12) and cached.dtype == torch.long
    torch.testing.assert_close(cached, recomputed)
    assert len(cached.unique()) > 1
    # Caches are gone afterwards: training forward works as before.
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, MultiHeadAttention))
    assert model(src, tokens(3, 4)).shape == (3, 4, V)
    # The greedy tokens are the argmax of the full (teacher-forced) forward.
    inp = torch.cat([torch.full((3, 1), BOS), cached[:, :-1]], dim=1)
    torch.testing.assert_close(model(src, inp).argmax(-1), cached)


def test_generation_runs_the_library_loop_on_a_torchtune_decoder(monkeypatch):
    """``generate`` hands ``as_decoder()`` (a torchtune TransformerDecoder of layers built on torchtune's
    TransformerCrossAttentionLayer) to ``gqa_tune.generate``, which gives the same tokens called directly."""
    from torchtune.modules import TransformerCrossAttentionLayer, TransformerDecoder

    import gqa_tune
    import gqa_tune.models._encoder_decoder as encdec

    model = lm(init_std=0.5, pad_id=PAD)
    src = tokens(3, 7)
    src[1, 4:] = PAD
    calls = []
    monkeypatch.setattr(encdec, "generate", lambda *a, **kw: calls.append(kw) or gqa_tune.generate(*a, **kw))
    out = model.generate(src, 9, bos_id=BOS)
    assert len(calls) == 1 and calls[0]["encoder_input"].shape == (3, 7, 32)
    decoder = model.as_decoder()
    assert isinstance(decoder, TransformerDecoder)
    assert all(isinstance(layer.cross, TransformerCrossAttentionLayer) for layer in decoder.layers)
    memory = model.transformer.encode(model.tok_embeddings(src), src != PAD)
    prompt = torch.full((3, 1), BOS)
    direct, logits = gqa_tune.generate(decoder, prompt, 9, pad_id=-1, encoder_input=memory,
                                       encoder_mask=(src != PAD)[:, None, :])  # fmt: skip
    assert torch.equal(direct[:, 1:], out) and logits.shape == (3, 9, V)
    assert not decoder.caches_are_setup()  # generate set them up and removed them


def test_generate_refuses_encoder_inputs_that_do_not_fit():
    import gqa_tune
    from gqa_tune.models import gqa_tiny

    model = lm()
    decoder, prompt = model.as_decoder(), torch.full((2, 1), BOS)
    memory = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="encoder_mask was given without encoder_input"):
        gqa_tune.generate(decoder, prompt, 3, encoder_mask=torch.ones(2, 1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"encoder_mask must be bool \[b, s, s_enc\] = \[2, 1, 5\]"):
        gqa_tune.generate(decoder, prompt, 3, encoder_input=memory)
    with pytest.raises(ValueError, match=r"encoder_input must be \[b=2, s_enc, d\]"):
        gqa_tune.generate(decoder, prompt, 3, encoder_input=memory[0], encoder_mask=torch.ones(2, 1, 5).bool())
    with pytest.raises(ValueError, match="compile=True does not take encoder_input"):
        gqa_tune.generate(decoder, prompt, 3, compile=True, encoder_input=memory,
                          encoder_mask=torch.ones(2, 1, 5, dtype=torch.bool))  # fmt: skip
    with pytest.raises(ValueError, match="encoder_input needs a model with cross-attention layers"):
        gqa_tune.generate(gqa_tiny(), prompt, 3, encoder_input=memory, encoder_mask=torch.ones(2, 1, 5).bool())


def test_generation_stops_at_eos():
    model = lm(init_std=0.5, pad_id=PAD)
    src = tokens(3, 5)
    free = model.generate(src, 10, bos_id=BOS)
    eos = int(free[0, 2])  # row 0 produces it by step 2
    out = model.generate(src, 10, bos_id=BOS, eos_id=eos)
    ends = []
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 10
        ends.append(end)
    assert out.shape == (3, max(ends))
    for row, end in enumerate(ends):
        torch.testing.assert_close(out[row, :end], free[row, :end])
        assert (out[row, end:] == PAD).all()
    assert ends[0] <= 3
    assert model.generate(src, 0, bos_id=BOS).shape == (3, 0)


def test_training_on_a_copy_task_reduces_loss():
    model = lm(num_encoder_layers=1, num_decoder_layers=1, pad_id=PAD).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        src = tokens(16, 6)
        target = torch.cat([src, torch.full((16, 1), EOS)], dim=1)
        inp = torch.cat([torch.full((16, 1), BOS), src], dim=1)
        loss = F.cross_entropy(model(src, inp).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_convert_model_pools_every_attention():
    model = lm(kv_heads=4)
    assert convert_model_(model, num_kv_heads=1) == 6
    assert all(m.k_proj.out_features == 8 for m in model.modules() if isinstance(m, MultiHeadAttention))
    assert model(tokens(2, 5), tokens(2, 3)).shape == (2, 3, V)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(d_model=30), r"d_model \(30\) must be divisible by nhead \(4\)"),
        (dict(kv_heads=3), r"nhead \(4\) must be divisible by kv_heads \(3\)"),
        (dict(nhead=0), "nhead must be a positive int, got 0"),
        (dict(num_decoder_layers=0), "num_decoder_layers must be a positive int, got 0"),
        (dict(dim_feedforward=-1), "dim_feedforward must be a positive int, got -1"),
        (dict(dropout=1.5), "dropout must be between 0.0 and 1.0, got 1.5"),
        (dict(activation="tanh"), "unknown activation 'tanh'"),
        (dict(d_model=36, nhead=12, kv_heads=4), "RoPE needs an even head_dim"),
        (dict(backend="fast"), "unknown attention backend 'fast'"),
    ],
)
def test_bad_arguments_raise(overrides, message):
    kwargs = dict(SMALL)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        gqa_transformer(**kwargs)


def test_bad_calls_raise():
    model = lm(max_seq_len=8)
    with pytest.raises(ValueError, match=r"src_mask of shape \(2, 5\) does not fit"):
        model(tokens(2, 6), tokens(2, 3), src_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="src_mask must be a bool tensor"):
        model(tokens(2, 6), tokens(2, 3), src_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="more than max_seq_len=8"):
        model(tokens(2, 9), tokens(2, 3))
    with pytest.raises(ValueError, match=r"max_new_tokens \(9\) exceeds max_seq_len \(8\)"):
        model.generate(tokens(2, 4), 9, bos_id=BOS)
    with pytest.raises(ValueError, match=r"bos_id \(99\) is outside the vocabulary"):
        model.generate(tokens(2, 4), 3, bos_id=99)
    with pytest.raises(ValueError, match=r"pad_id \(16\) is outside the vocabulary"):
        gqa_transformer_lm(V, pad_id=V, **SMALL)
    with pytest.raises(ValueError, match="memory .* is required"):
        model.transformer.decode(torch.randn(2, 3, 32), None)
