import io
import re
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration  # noqa: E402

from gqa_tune._versions import SUPPORTED, UnsupportedVersionError  # noqa: E402
from gqa_tune.convert.t5 import convert_t5_to_gqa, kv_heads_of, set_attn_implementation  # noqa: E402

NUM_HEADS, D_KV, MAX_NEW = 4, 8, 8
IMPLEMENTATIONS = ("sdpa", "eager")


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=64, d_model=32, d_kv=D_KV, num_heads=NUM_HEADS, num_layers=2, num_decoder_layers=2, d_ff=64,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        initializer_factor=4.0,  # livelier random outputs, so that greedy decoding is not one token repeated
    )  # fmt: skip
    kwargs.update(overrides)
    return T5Config(**kwargs)


def tiny_t5(attn_implementation="sdpa"):
    torch.manual_seed(0)
    return T5ForConditionalGeneration(tiny_config(attn_implementation=attn_implementation)).eval()


def inputs():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 64, (2, 7), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # a padded source row
    decoder_input_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(2, 64, (2, 5), generator=gen)], 1)
    return input_ids, attention_mask, decoder_input_ids


def logits(model):
    input_ids, attention_mask, decoder_input_ids = inputs()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits


def generate(model, **kwargs):
    input_ids, attention_mask, _ = inputs()
    with torch.no_grad():
        return model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1, **kwargs
        )


def greedy_without_cache(model):
    """Greedy decoding by re-running the whole decoder prefix each step (use_cache=False), stopping like generate()."""
    input_ids, attention_mask, _ = inputs()
    config = model.config
    seq = torch.full((input_ids.shape[0], 1), config.decoder_start_token_id, dtype=torch.long)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(MAX_NEW):
            out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=seq, use_cache=False)
            token = out.logits[:, -1].argmax(-1)
            token = torch.where(finished, torch.full_like(token, config.pad_token_id), token)
            seq = torch.cat([seq, token[:, None]], 1)
            finished |= token == config.eos_token_id
            if finished.all():
                break
    return seq


def is_grouped(attn):
    return type(attn).__name__ == "T5Attention" and kv_heads_of(attn) < attn.n_heads


def generated_cache(out):
    """The cache of a dict ``generate()`` output: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def attention_modules(model):
    encoder = [block.layer[0].SelfAttention for block in model.encoder.block]
    decoder_self = [block.layer[0].SelfAttention for block in model.decoder.block]
    decoder_cross = [block.layer[1].EncDecAttention for block in model.decoder.block]
    return encoder, decoder_self, decoder_cross


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("encoder", [False, True])
def test_same_number_of_heads_reproduces_the_model(impl, encoder):
    model = tiny_t5(impl)
    expected_logits, expected_tokens = logits(model), generate(model)
    assert expected_tokens.shape[1] > 3 and len(set(expected_tokens[0].tolist())) > 2  # a non-trivial decode
    converted = convert_t5_to_gqa(model, NUM_HEADS, encoder=encoder)
    assert converted is model
    assert model.config._attn_implementation == f"gqa_tune_{impl}"
    assert model.decoder.config._attn_implementation == model.encoder.config._attn_implementation == f"gqa_tune_{impl}"
    assert torch.equal(logits(model), expected_logits)
    assert torch.equal(generate(model), expected_tokens)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_pooled_weights_and_shared_bias(kv_heads):
    model = tiny_t5()
    _, old_self, old_cross = attention_modules(model)
    old_k = old_self[1].k.weight.detach().clone()
    old_v = old_cross[0].v.weight.detach().clone()
    q_weight, o_weight = old_self[0].q.weight, old_self[0].o.weight
    bias = old_self[0].relative_attention_bias.weight
    bias_before = bias.detach().clone()

    convert_t5_to_gqa(model, kv_heads)
    encoder, dec_self, dec_cross = attention_modules(model)
    group = NUM_HEADS // kv_heads
    for attn in dec_self + dec_cross:
        assert type(attn).__name__ == "T5Attention"  # the module keeps its class: only k/v are replaced
        assert kv_heads_of(attn) == kv_heads
        assert attn.k.weight.shape == attn.v.weight.shape == (kv_heads * D_KV, 32)
        assert attn.q.weight.shape == (NUM_HEADS * D_KV, 32) and attn.o.weight.shape == (32, NUM_HEADS * D_KV)
    # kv head j is the mean of the heads j*group .. (j+1)*group-1, checked for one self- and one cross-attention
    for new, old in ((dec_self[1].k.weight, old_k), (dec_cross[0].v.weight, old_v)):
        for j in range(kv_heads):
            heads = [old[h * D_KV : (h + 1) * D_KV] for h in range(j * group, (j + 1) * group)]
            torch.testing.assert_close(new[j * D_KV : (j + 1) * D_KV], torch.stack(heads).mean(0))
    # q, o and the relative position bias are the very same parameters; only layer 0 owns the bias (shared down)
    assert dec_self[0].q.weight is q_weight and dec_self[0].o.weight is o_weight
    assert dec_self[0].relative_attention_bias.weight is bias and torch.equal(bias, bias_before)
    assert bias.shape == (8, NUM_HEADS)  # still one bias per query head
    assert not dec_self[1].has_relative_attention_bias
    # the encoder is left as multi-head attention by default
    assert not any(is_grouped(attn) for attn in encoder)
    assert encoder[0].k.weight.shape == (NUM_HEADS * D_KV, 32)

    out = logits(model)
    assert out.shape == (2, 6, 64) and torch.isfinite(out).all()


def repeated_heads_reference(model, kv_heads, impl):
    """The converted model as a plain multi-head T5 on transformers' own ``impl``: every query head gets a copy of
    its group's kv head (the independent oracle: none of gqa_tune's attention code runs in it)."""
    reference = tiny_t5(impl)
    converted = dict(model.named_modules())
    for name, attn in reference.named_modules():
        if type(attn).__name__ == "T5Attention" and is_grouped(converted[name]):
            for proj in ("k", "v"):
                pooled = getattr(converted[name], proj).weight.detach().view(kv_heads, D_KV, -1)
                full = pooled.repeat_interleave(NUM_HEADS // kv_heads, dim=0).reshape(NUM_HEADS * D_KV, -1)
                getattr(attn, proj).weight.data.copy_(full)
    assert reference.config._attn_implementation == impl
    return reference


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_attention_matches_multi_head_with_shared_heads(impl, kv_heads):
    # float64, so that only the attention's grouping is compared, not float32 rounding (logits are ~50 here);
    # the inputs hold a padded source row, so the masks reach the registered functions
    model = convert_t5_to_gqa(tiny_t5(impl), kv_heads, encoder=True).double()
    reference = repeated_heads_reference(model, kv_heads, impl).double()
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_generate_with_reduced_cache_matches_no_cache_greedy(impl, kv_heads):
    model = convert_t5_to_gqa(tiny_t5(impl), kv_heads)
    out = generate(model, return_dict_in_generate=True)
    expected = greedy_without_cache(model)
    assert torch.equal(out.sequences, expected)
    cache = generated_cache(out)
    batch, steps, src = 2, out.sequences.shape[1] - 1, inputs()[0].shape[1]
    for layer in range(2):
        self_layer, cross_layer = cache.self_attention_cache.layers[layer], cache.cross_attention_cache.layers[layer]
        assert self_layer.keys.shape == self_layer.values.shape == (batch, kv_heads, steps, D_KV)
        assert cross_layer.keys.shape == cross_layer.values.shape == (batch, kv_heads, src, D_KV)


def test_sdpa_gets_grouped_keys_and_values(monkeypatch):
    # K/V reach torch's SDPA at kv_heads heads with enable_gqa: never repeated to num_heads
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.shape[1], key.shape[1], value.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, **kwargs)

    model = convert_t5_to_gqa(tiny_t5("sdpa"), 2, encoder=True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    logits(model)
    assert len(seen) == 6  # 2 encoder + 2 decoder self + 2 cross-attention calls
    assert all(call == (NUM_HEADS, 2, 2, True) for call in seen)


def test_eager_and_sdpa_agree_after_conversion():
    model = convert_t5_to_gqa(tiny_t5("sdpa"), 2, encoder=True).double()
    sdpa = logits(model)
    set_attn_implementation(model, "gqa_tune_eager")
    assert model.decoder.config._attn_implementation == model.encoder.config._attn_implementation == "gqa_tune_eager"
    torch.testing.assert_close(logits(model), sdpa, rtol=1e-10, atol=1e-10)
    model.float()
    input_ids, attention_mask, decoder_input_ids = inputs()
    with torch.no_grad():
        out = model(
            input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, output_attentions=True
        )
    assert out.decoder_attentions[0].shape == (2, NUM_HEADS, 6, 6)
    assert out.cross_attentions[0].shape == (2, NUM_HEADS, 6, 7)
    assert torch.all(out.cross_attentions[0][1, :, :, 5:] == 0)  # the padded source positions get no weight
    torch.testing.assert_close(out.cross_attentions[0].sum(-1), torch.ones(2, NUM_HEADS, 6))


def test_encoder_flag_and_partial_conversion():
    model = convert_t5_to_gqa(tiny_t5(), 2, encoder=True, decoder_cross=False)
    encoder, dec_self, dec_cross = attention_modules(model)
    assert all(kv_heads_of(a) == 2 and a.k.weight.shape == (16, 32) for a in encoder + dec_self)
    assert all(not is_grouped(a) and a.v.weight.shape == (32, 32) for a in dec_cross)
    assert torch.isfinite(logits(model)).all()
    # converting again pools further from the current kv heads
    convert_t5_to_gqa(model, 1, encoder=True)
    assert all(kv_heads_of(a) == 1 for a in encoder + dec_self + dec_cross)
    assert model.config._attn_implementation == "gqa_tune_sdpa"


def test_not_inplace_leaves_the_original():
    model = tiny_t5()
    before = logits(model)
    converted = convert_t5_to_gqa(model, 1, inplace=False)
    assert converted is not model
    assert not any(is_grouped(m) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model), before)
    assert kv_heads_of(converted.decoder.block[0].layer[1].EncDecAttention) == 1


def test_random_method_is_seeded_and_first_picks_heads():
    a = convert_t5_to_gqa(tiny_t5(), 2, method="random", seed=3)
    b = convert_t5_to_gqa(tiny_t5(), 2, method="random", seed=3)
    assert torch.equal(
        a.decoder.block[0].layer[0].SelfAttention.k.weight, b.decoder.block[0].layer[0].SelfAttention.k.weight
    )
    model = tiny_t5()
    old = model.decoder.block[0].layer[1].EncDecAttention.k.weight.detach().clone()
    convert_t5_to_gqa(model, 2, method="first")
    new = model.decoder.block[0].layer[1].EncDecAttention.k.weight
    assert torch.equal(new, torch.cat([old[0:D_KV], old[2 * D_KV : 3 * D_KV]]))


def test_training_state_dict_and_pickle():
    model = convert_t5_to_gqa(tiny_t5(), 2)
    model.train()
    input_ids, attention_mask, decoder_input_ids = inputs()
    loss = model(
        input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        labels=input_ids[:, :6].contiguous(),
    ).loss
    loss.backward()
    assert model.decoder.block[0].layer[0].SelfAttention.k.weight.grad.shape == (16, 32)
    model.eval()
    expected = logits(model)
    # reload: build the T5, convert with the same arguments, load the state dict
    fresh = convert_t5_to_gqa(T5ForConditionalGeneration(tiny_config()).eval(), 2)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(logits(torch.load(buffer, weights_only=False)), expected)


def test_encoder_only_model():
    torch.manual_seed(0)
    model = T5EncoderModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="encoder=True"):
        convert_t5_to_gqa(model, 2)
    convert_t5_to_gqa(model, 2, encoder=True)
    assert all(kv_heads_of(b.layer[0].SelfAttention) == 2 for b in model.encoder.block)
    with torch.no_grad():
        assert model(inputs()[0]).last_hidden_state.shape == (2, 7, 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kv_heads=3), r"kv_heads \(3\) must divide num_heads \(4\)"),
        (dict(kv_heads=8), r"kv_heads \(8\) cannot exceed num_heads \(4\)"),
        (dict(kv_heads=0), "positive int, got 0"),
        (dict(kv_heads=2, method="median"), "unknown pooling method 'median'"),
    ],
)
def test_bad_requests(kwargs, match):
    model = tiny_t5()
    with pytest.raises(ValueError, match=match):
        convert_t5_to_gqa(model, **kwargs)
    assert not any(is_grouped(m) for m in model.modules())  # nothing half-converted
    assert model.config._attn_implementation == "sdpa"


def test_rejects_models_that_are_not_t5():
    with pytest.raises(ValueError, match="Hugging Face T5 model.*got Linear"):
        convert_t5_to_gqa(torch.nn.Linear(4, 4), 1)
    model = convert_t5_to_gqa(tiny_t5(), 2)
    with pytest.raises(ValueError, match=r"kv_heads \(4\) must divide the 2 kv heads"):
        convert_t5_to_gqa(model, 4)


def test_rejects_other_attention_implementations():
    model = tiny_t5()
    model.config._attn_implementation = "flash_attention_2"  # no kernel here; only the name is read
    with pytest.raises(ValueError, match="got 'flash_attention_2'"):
        convert_t5_to_gqa(model, 2)
    assert not any(is_grouped(m) for m in model.modules())


def test_missing_transformers_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.models.t5", None)
    with pytest.raises(ImportError, match=r"pip install 'gqa_tune\[t5\]'"):
        convert_t5_to_gqa(torch.nn.Linear(4, 4), 1)


def test_static_cache_generation_matches_dynamic():
    model = convert_t5_to_gqa(tiny_t5(), 2)
    assert torch.equal(generate(model, cache_implementation="static"), generate(model))


@pytest.mark.parametrize("version", ["5.14.1", "5.25.0", "6.0.0"])
def test_unsupported_transformers_names_the_supported_range(monkeypatch, version):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    model = tiny_t5()
    with pytest.raises(UnsupportedVersionError) as info:
        convert_t5_to_gqa(model, 2)
    message = str(info.value)
    assert re.search(re.escape(f"transformers{SUPPORTED['transformers']}"), message)
    assert f"found transformers {version}" in message
    assert "upgrade" not in message.lower()  # a user on a newer release must not be told to upgrade
    assert not any(is_grouped(m) for m in model.modules())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_caller_built_4d_bool_mask_is_honoured(impl):
    # transformers passes a 4-D mask through unchanged; True = attend, as the 2-D padding mask it stands for
    model = convert_t5_to_gqa(tiny_t5(impl), 2, encoder=True)
    input_ids, attention_mask, decoder_input_ids = inputs()
    bool_mask = attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s]
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=bool_mask, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(out, logits(model))
