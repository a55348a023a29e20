import pytest
import torch
from torchtune.generation import generate
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules import MultiHeadAttention as TorchtuneMHA

from gqa_tune import swap_attention
from gqa_tune.convert import from_torchtune_attention
from gqa_tune.modules import MultiHeadAttention


def small_llama():
    return llama3_2(
        vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64, intermediate_dim=128
    ).eval()


def test_swap_keeps_outputs_weights_and_state_dict():
    model = small_llama()
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(tokens)
    keys = model.state_dict().keys()
    q_weight = model.layers[0].attn.q_proj.weight
    assert swap_attention(model) == 2
    assert all(isinstance(layer.attn, MultiHeadAttention) for layer in model.layers)
    assert not any(isinstance(m, TorchtuneMHA) for m in model.modules())
    assert model.layers[0].attn.q_proj.weight is q_weight  # shared, not copied
    assert model.state_dict().keys() == keys
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, rtol=1e-5, atol=1e-5)


def test_swapped_model_generates_like_torchtune():
    model = small_llama()
    prompt = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=32)
        expected, _ = generate(model, prompt, max_generated_tokens=8, pad_id=-1, temperature=0.0)
        model.reset_caches()
        swap_attention(model)
        got, _ = generate(model, prompt, max_generated_tokens=8, pad_id=-1, temperature=0.0)
    assert torch.equal(got, expected)


def test_swap_carries_a_filled_cache():
    model = small_llama()
    with torch.no_grad():
        model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=16)
        model(
            torch.randint(0, 96, (1, 5)),
            mask=torch.ones(1, 5, 16, dtype=torch.bool).tril(),
            input_pos=torch.arange(5)[None],
        )
    old = model.layers[0].attn.kv_cache
    swap_attention(model, backend="math")
    new = model.layers[0].attn
    assert new.backend == "math" and new.cache_enabled and new.kv_cache.size == 5
    assert torch.equal(new.kv_cache.k_cache, old.k_cache)


def test_swap_rejects_a_bare_attention_module():
    model = small_llama()
    with pytest.raises(ValueError, match="use from_torchtune_attention"):
        swap_attention(model.layers[0].attn)
    assert isinstance(from_torchtune_attention(model.layers[0].attn), MultiHeadAttention)
