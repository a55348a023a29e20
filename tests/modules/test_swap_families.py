"""``swap_attention`` on a tiny model of every torchtune 0.6.1 decoder family: the same logits as torchtune's,
cached decoding equal to the model's own full forward, and torchtune's ``generate`` giving the same greedy
tokens (within Gemma 2's window, where torchtune's own cache is right)."""

import warnings

import pytest
import torch
from helpers import decoding_mask
from torch import nn
from torchtune.generation import generate
from torchtune.models.gemma import gemma
from torchtune.models.gemma2 import gemma2
from torchtune.models.gemma2._attention import Gemma2Attention
from torchtune.models.llama2 import llama2
from torchtune.models.llama3 import llama3
from torchtune.models.llama3_1 import llama3_1
from torchtune.models.llama3_2 import llama3_2
from torchtune.models.mistral import mistral
from torchtune.models.phi3 import phi3
from torchtune.models.qwen2 import qwen2
from torchtune.modules import MultiHeadAttention as TorchtuneMHA

from gqa_tune import swap_attention
from gqa_tune.modules import MultiHeadAttention

VOCAB, MAX_LEN = 64, 48
COMMON = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=MAX_LEN)

# code_llama2 is built by llama2's builder, llama3_3 by llama3_1's, qwen2_5 by qwen2's and phi4 by phi3's.
FAMILIES = {
    "llama2 / code_llama2": lambda: llama2(**COMMON, intermediate_dim=128),
    "llama3": lambda: llama3(**COMMON, intermediate_dim=128),
    "llama3_1 / llama3_3": lambda: llama3_1(**COMMON, intermediate_dim=128, scale_factor=8),
    "llama3_2": lambda: llama3_2(**COMMON, intermediate_dim=128),
    "mistral": lambda: mistral(**COMMON, intermediate_dim=128),
    "gemma": lambda: gemma(**COMMON, head_dim=16, intermediate_dim=128),
    "gemma2": lambda: gemma2(
        **COMMON,
        head_dim=16,
        intermediate_dim=128,
        sliding_window_size=8,
        query_pre_attn_scalar=16,
        hidden_capping_value=5.0,
        final_capping_value=3.0,
    ),  # fmt: skip
    "qwen2 / qwen2_5": lambda: qwen2(**COMMON, intermediate_dim=128),
    "phi3 / phi4": lambda: phi3(**COMMON, intermediate_dim=128),
}


def build(name):
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    for param in model.parameters():  # some builders leave weights at zero or one: make every layer matter
        nn.init.normal_(param, std=0.2)
    return model


def swapped(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing attention-like may be left behind silently
        report = swap_attention(model)
    assert report == 2 and report.replaced == ["layers.0.attn", "layers.1.attn"] and report.skipped == []
    assert not any(isinstance(m, (TorchtuneMHA, Gemma2Attention)) for m in model.modules())
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_equal_torchtunes(name):
    model = build(name)
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        expected = model(tokens)
        got = swapped(model)(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _causal(s, length=MAX_LEN, start=0):
    return decoding_mask(s, length, start)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_decoding_equals_the_full_forward(name):
    model = swapped(build(name))
    tokens = torch.randint(0, VOCAB, (1, 20))  # past gemma2's window of 8
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=MAX_LEN)
        steps = [model(tokens[:, :6], mask=_causal(6), input_pos=torch.arange(6)[None])]
        for i in range(6, 20):
            steps.append(model(tokens[:, i : i + 1], mask=_causal(1, start=i), input_pos=torch.tensor([[i]])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert model.layers[0].attn.kv_cache.k_cache.shape[1] == 2  # n_kv heads, gemma2 included


def _prompt(batch, padded, length=5):
    """``[batch, length]`` token ids in 1..VOCAB-1, left-padded with 0 (row ``i``: ``1 + i % 3`` pads) if ``padded``."""
    prompt = torch.randint(1, VOCAB, (batch, length))
    if padded:
        for row in range(batch):
            prompt[row, : 1 + row % 3] = 0
    return prompt


@pytest.mark.parametrize("caches", [True, False], ids=["setup_caches", "no-caches"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_generate_gives_torchtunes_greedy_tokens(name, batch, padded, caches):
    """torchtune's own ``generate`` on the swapped model, as users call it: padded batches (each decode step
    then passes ``input_pos`` of shape ``[b]``), with and without caches. Inside gemma2's window of 8, where
    torchtune's own cache is right."""
    model = build(name)
    prompt = _prompt(batch, padded)
    with torch.no_grad():
        if caches:
            model.setup_caches(batch_size=batch, dtype=torch.float32, decoder_max_seq_len=MAX_LEN)
        expected, expected_logits = generate(model, prompt, max_generated_tokens=3, pad_id=0, temperature=0.0)
        if caches:
            model.reset_caches()
        swapped(model)
        got, logits = generate(model, prompt, max_generated_tokens=3, pad_id=0, temperature=0.0)
    assert torch.equal(got, expected)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("caches", [True, False], ids=["setup_caches", "no-caches"])
def test_generate_on_a_one_token_prompt(caches):
    """A one-token prompt of one row: torchtune's prefill passes ``input_pos[:, :1].squeeze()``, a 0-d tensor."""
    model = build("llama3_2")
    prompt = torch.tensor([[7]])
    with torch.no_grad():
        if caches:
            model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=MAX_LEN)
        expected, _ = generate(model, prompt, max_generated_tokens=4, pad_id=0, temperature=0.0)
        if caches:
            model.reset_caches()
        got, _ = generate(swapped(model), prompt, max_generated_tokens=4, pad_id=0, temperature=0.0)
    assert torch.equal(got, expected)


def test_gemma2_decoding_past_the_window_is_right_where_torchtunes_is_not():
    model = build("gemma2")
    tokens = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=MAX_LEN)
        model(tokens[:, :12], mask=_causal(12), input_pos=torch.arange(12)[None])
        theirs = model(tokens[:, 12:13], mask=_causal(1, start=12), input_pos=torch.tensor([[12]]))
        model.reset_caches()
        swapped(model)
        model(tokens[:, :12], mask=_causal(12), input_pos=torch.arange(12)[None])
        ours = model(tokens[:, 12:13], mask=_causal(1, start=12), input_pos=torch.tensor([[12]]))
    torch.testing.assert_close(ours[:, 0], full[:, 12], atol=1e-4, rtol=1e-4)
    assert (theirs[:, 0] - full[:, 12]).abs().max() > 1e-2  # torchtune 0.6.1's windowed cache bug


def test_swap_warns_about_attention_it_leaves_alone():
    class OtherAttention(nn.Module):
        def forward(self, x):
            return x

    model = build("llama3_2")
    model.extra = OtherAttention()
    with pytest.warns(UserWarning, match=r"left these attention modules as they are: extra \(OtherAttention\)"):
        report = swap_attention(model)
    assert report == 2 and report.skipped == ["extra (OtherAttention)"]
    assert isinstance(model.layers[0].attn, MultiHeadAttention)


def _vision_decoder_builder():
    """torchtune's ``llama3_2_vision_decoder``, imported without torchvision if need be.

    The decoder uses no torchvision, but its package imports CLIP's image transforms, which do. The only
    torchvision wheel for torch 2.13 is built for CUDA and fails to load its ops on the CPU wheel, so when
    torchvision is absent a stand-in module satisfies those imports (the transforms are never called) and is
    removed again afterwards.
    """
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("torchvision") is None:

        class _StandIn(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return _StandIn(f"{self.__name__}.{name}")

        names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2"]
        sys.modules.update({name: _StandIn(name) for name in names})
        try:
            from torchtune.models.llama3_2_vision._component_builders import llama3_2_vision_decoder
        finally:
            for name in names:
                sys.modules.pop(name, None)
    else:
        from torchtune.models.llama3_2_vision._component_builders import llama3_2_vision_decoder
    return llama3_2_vision_decoder


ENC_LEN = 12


def build_vision():
    """A tiny llama3_2_vision decoder: self-attention layers, with a cross-attention fusion layer every 2nd."""
    torch.manual_seed(0)
    model = _vision_decoder_builder()(
        vocab_size=VOCAB,
        num_layers=4,
        fusion_interval=2,
        num_special_tokens=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=MAX_LEN,
        encoder_max_seq_len=ENC_LEN,
        rope_base=500_000,
        intermediate_dim=128,
    ).eval()
    for param in model.parameters():
        nn.init.normal_(param, std=0.2)
    return model


def _vision_inputs(batch=2, s=10):
    tokens = torch.randint(0, VOCAB, (batch, s))
    encoder_input = torch.randn(batch, ENC_LEN, 64)  # the vision encoder's output, already projected to 64
    encoder_mask = torch.ones(batch, s, ENC_LEN, dtype=torch.bool)
    encoder_mask[1, :, 8:] = False  # the second sample has fewer image tokens
    return tokens, encoder_input, encoder_mask


def _vision_swapped(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = swap_attention(model)
    self_attn = ["layers.0.attn", "layers.1.layer.attn", "layers.2.attn", "layers.3.layer.attn"]
    cross_attn = ["layers.1.fusion_layer.attn", "layers.3.fusion_layer.attn"]
    assert sorted(report.replaced) == sorted(self_attn + cross_attn) and report.skipped == []
    assert not any(isinstance(m, TorchtuneMHA) for m in model.modules())
    return model


def _vision_cached(model, tokens, encoder_input, encoder_mask, prefill=4):
    """Prefill ``prefill`` tokens with the image, then decode the rest one token at a time."""
    batch, s = tokens.shape
    model.setup_caches(batch_size=batch, dtype=torch.float32, encoder_max_seq_len=ENC_LEN, decoder_max_seq_len=MAX_LEN)
    mask = decoding_mask(prefill, MAX_LEN).expand(batch, -1, -1)
    pos = torch.arange(prefill).expand(batch, -1)
    steps = [model(tokens[:, :prefill], mask=mask, input_pos=pos, encoder_input=encoder_input,
                   encoder_mask=encoder_mask[:, :prefill])]  # fmt: skip
    for i in range(prefill, s):
        mask = decoding_mask(1, MAX_LEN, i).expand(batch, -1, -1)
        pos = torch.full((batch, 1), i)
        steps.append(model(tokens[:, i : i + 1], mask=mask, input_pos=pos, encoder_mask=encoder_mask[:, i : i + 1]))
    model.reset_caches()
    return torch.cat(steps, dim=1)


def test_llama3_2_vision_self_and_cross_attention_logits_equal_torchtunes():
    model = build_vision()
    tokens, encoder_input, encoder_mask = _vision_inputs()
    with torch.no_grad():
        expected = model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
        got = _vision_swapped(model)(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_llama3_2_vision_cached_decoding_equals_the_full_forward_and_torchtunes():
    model = build_vision()
    tokens, encoder_input, encoder_mask = _vision_inputs()
    with torch.no_grad():
        full = model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
        theirs = _vision_cached(model, tokens, encoder_input, encoder_mask)  # torchtune's cache is right here
        ours = _vision_cached(_vision_swapped(model), tokens, encoder_input, encoder_mask)
    torch.testing.assert_close(ours, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))  # the same greedy tokens at every step
