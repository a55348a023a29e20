import pytest
import torch
from helpers import greedy_without_cache
from torchtune.generation import generate
from torchtune.models.llama3_2 import llama3_2_1b

from gqa_tune.models import gqa_attention, gqa_decoder, gqa_llama3_2_1b, gqa_tiny
from gqa_tune.modules import MultiHeadAttention


def test_tiny_model_trains_a_step():
    model = gqa_tiny()
    tokens = torch.randint(0, 256, (2, 33))
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, 32, 260)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    attn = model.layers[0].attn
    assert isinstance(attn, MultiHeadAttention) and (attn.num_heads, attn.num_kv_heads) == (8, 2)
    assert attn.kv_cache is None


def test_1b_builder_matches_torchtune_state_dict():
    with torch.device("meta"):
        ours = gqa_llama3_2_1b(max_seq_len=256)
        theirs = llama3_2_1b()
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert ours.layers[0].attn.kv_cache is None and ours.layers[0].attn.num_kv_heads == 8


def test_attention_builder_options():
    attn = gqa_attention(embed_dim=96, num_heads=6, num_kv_heads=3, head_dim=20, qk_norm=True, bias=True)
    assert attn.q_proj.out_features == 120 and attn.k_proj.out_features == 60
    assert attn.q_norm is not None and attn.k_proj.bias is not None
    assert attn(torch.randn(1, 4, 96), torch.randn(1, 4, 96)).shape == (1, 4, 96)
    assert gqa_attention(embed_dim=32, num_heads=4, num_kv_heads=1, use_rope=False).pos_embeddings is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_kv_heads=3), r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
        (dict(vocab_size=0), "vocab_size must be a positive int, got 0"),
        (dict(num_heads=0), "num_heads must be a positive int, got 0"),
        (dict(backend="fast"), "unknown attention backend 'fast'"),
    ],
)
def test_decoder_builder_rejects_bad_values(overrides, message):
    kwargs = dict(
        vocab_size=50, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64, max_seq_len=64
    )
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        gqa_decoder(**kwargs)


def test_torchtune_generate_with_caches_matches_no_cache_greedy():
    model = gqa_decoder(
        vocab_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        intermediate_dim=64,
        max_seq_len=64,
        qk_norm=True,
    ).eval()
    prompt = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = greedy_without_cache(model, prompt, 10)
        model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=64)
        tokens, _ = generate(model, prompt, max_generated_tokens=10, pad_id=-1, temperature=0.0, top_k=None)
    assert torch.equal(tokens, expected)
    assert model.layers[0].attn.kv_cache.k_cache.shape == (2, 2, 64, 8)  # n_kv heads, not n_h
    model.reset_caches()
    assert model.layers[0].attn.kv_cache.size == 0
