"""A probe of 1061 bad or edge inputs over the public surfaces found these answered wrongly (a ``TypeError``,
``RuntimeError`` or ``IndexError`` from deep inside, a silent NaN or wrong state): each is now a ``ValueError``
naming the value, or the right answer."""

import math

import pytest
import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask

import gqa_tune
from gqa_tune import KVCache, scaled_dot_product_gqa, swap_attention
from gqa_tune.catalog import find_config
from gqa_tune.config_check import check_config_file
from gqa_tune.convert import pooling
from gqa_tune.convert.hf import convert_hf_checkpoint
from gqa_tune.models import gqa_attention, gqa_decoder, gqa_tiny, lora_gqa_tiny
from gqa_tune.modules import setup_caches


def qkv():
    return torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)


def refused(call, *named):
    with pytest.raises(ValueError) as info:
        call()
    for text in named:
        assert text in str(info.value), str(info.value)


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("sink", [0.0, float("inf")])
def test_weights_with_sinks(sink):
    q, k, v = qkv()
    sinks = torch.full((4,), sink)
    out, weights = scaled_dot_product_gqa(q, k, v, need_weights=True, sinks=sinks)
    assert weights.shape == (1, 4, 3, 3) and not out.isnan().any()
    expected = torch.zeros(4, 3) if math.isinf(sink) else 1 - 1 / (1 + weights.sum(-1)[0])  # mass left for the sink
    if math.isinf(sink):
        torch.testing.assert_close(weights.sum(-1)[0], expected)
        assert torch.count_nonzero(out) == 0
    torch.testing.assert_close(out, scaled_dot_product_gqa(q, k, v, sinks=sinks))


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_a_scale_whose_scores_overflow_float32_is_refused(backend):
    q, k, v = qkv()
    call = lambda: scaled_dot_product_gqa(q, k, v, scale=1e38, backend=backend)  # noqa: E731
    refused(call, "scale must be at most 1e+06", "1e+38")
    scaled_dot_product_gqa(q, k, v, scale=1e3, backend=backend)


# ---------------------------------------------------------------- the module and its cache


def attention(**kwargs):
    return gqa_attention(embed_dim=16, num_heads=4, num_kv_heads=2, max_seq_len=8, **kwargs).eval()


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(pos_embeddings="rope"), "pos_embeddings must be an nn.Module or None, got str"),
        (dict(q_proj=None), "q_proj must be an nn.Module, got NoneType"),
        (dict(kv_cache="cache"), "kv_cache must be a gqa_tune KVCache or None, got str"),
        (dict(query_pre_attn_scalar=1e-30), "scale must be at most 1e+06"),
    ],
)
def test_bad_parts_are_refused_at_construction(change, named):
    from gqa_tune.modules import MultiHeadAttention

    parts = dict(embed_dim=16, num_heads=4, num_kv_heads=2, head_dim=4, q_proj=nn.Linear(16, 16),
                 k_proj=nn.Linear(16, 8), v_proj=nn.Linear(16, 8), output_proj=nn.Linear(16, 16))  # fmt: skip
    refused(lambda: MultiHeadAttention(**{**parts, **change}), named)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_inputs_in_another_dtype_than_the_weights_are_refused(dtype):
    x = torch.randn(1, 3, 16, dtype=dtype)
    refused(lambda: attention()(x, x), f"x is {dtype}, the attention's weights are torch.float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision is not a mismatch
        attention()(x.to(torch.bfloat16), x.to(torch.bfloat16))


def test_inputs_on_another_device_are_refused():
    x = torch.randn(1, 3, 16, device="meta")
    refused(lambda: attention()(x, x), "x is on meta, the attention's weights on cpu")


@pytest.mark.parametrize("length, batch, heads", [(4, 1, 1), (128, 1, 1), (3, 3, 1), (3, 1, 3)])
def test_block_masks_that_do_not_fit_are_refused(length, batch, heads):
    x = torch.randn(2, 3, 16)
    mask = create_block_mask(lambda b, h, q, k: q >= k, batch, heads, length, length, device="cpu")
    refused(lambda: attention()(x, x, mask=mask), "BlockMask of shape", "does not fit (b=2, n_h=4, s_x=3, s_y=3)")


def test_no_keys_gives_zeros():
    attn = attention()
    x = torch.randn(1, 3, 16)
    out = attn(x, torch.randn(1, 0, 16))
    torch.testing.assert_close(out, attn.output_proj(torch.zeros(1, 3, 16)))


@pytest.mark.parametrize("dtype", ["float32", torch.int32, torch.bool, torch.complex64])
def test_cache_dtypes_that_are_not_floating_are_refused(dtype):
    attn = attention()
    refused(lambda: attn.setup_cache(2, dtype, 6), "dtype must be a floating torch.dtype")
    assert attn.kv_cache is None
    refused(lambda: KVCache(2, 4, 2, 4, dtype), "dtype must be a floating torch.dtype")


@pytest.mark.parametrize("device, named", [("nonsense", "is not a torch device"), (5, "must be a torch.device")])
def test_cache_devices_are_checked(device, named):
    refused(lambda: KVCache(2, 4, 2, 4, torch.float32, device=device), f"device {device!r}" if device != 5 else named,
            named)  # fmt: skip


def test_a_cache_refuses_values_on_another_device():
    cache = KVCache(2, 4, 2, 4, torch.float32)
    k = torch.zeros(2, 2, 1, 4, device="meta")
    refused(lambda: cache.update(k, k), "k_val is on meta and v_val on meta, the cache on cpu")
    assert cache.size == 0


# ---------------------------------------------------------------- builders, from_pretrained


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(vocab_size=True), "vocab_size must be a positive int, got True"),
        (dict(num_layers=True), "num_layers must be a positive int, got True"),
        (dict(num_kv_heads=-2), "num_kv_heads must be a positive int, got -2"),
        (dict(embed_dim=16.0), "embed_dim must be a positive int, got 16.0"),
        (dict(embed_dim=15), "embed_dim (15) must be divisible by num_heads (4)"),
        (dict(max_seq_len=-1), "max_seq_len must be a positive int, got -1"),
        (dict(head_dim=3), "head_dim must be even, got 3"),
        (dict(rope_base=0), "rope_base must be a finite positive number, got 0"),
        (dict(rope_base=float("nan")), "rope_base must be a finite positive number, got nan"),
        (dict(rope_scale_factor=0), "rope_scale_factor must be a finite positive number, got 0"),
        (dict(norm_eps=-1.0), "norm_eps must be a finite positive number, got -1.0"),
        (dict(qk_norm="yes"), "qk_norm must be True or False, got 'yes'"),
        (dict(tie_word_embeddings="no"), "tie_word_embeddings must be True or False, got 'no'"),
    ],
)
def test_decoder_builder_arguments(change, named):
    args = dict(vocab_size=32, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=16, intermediate_dim=32,
                max_seq_len=16)  # fmt: skip
    refused(lambda: gqa_decoder(**{**args, **change}), named)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(lora_alpha=float("nan")), "lora_alpha must be a finite positive number, got nan"),
        (dict(lora_alpha=float("inf")), "lora_alpha must be a finite positive number, got inf"),
        (dict(lora_dropout="0.1"), "lora_dropout must be in [0, 1), got '0.1'"),
        (dict(lora_dropout=None), "lora_dropout must be in [0, 1), got None"),
        (dict(lora_attn_modules=None), "lora_attn_modules must be a list of names, got None"),
        (dict(apply_lora_to_mlp="yes"), "apply_lora_to_mlp must be True or False, got 'yes'"),
    ],
)
def test_lora_builder_arguments(change, named):
    refused(lambda: lora_gqa_tiny(**{**dict(lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8), **change}),
            named)  # fmt: skip


def test_from_pretrained_refuses_bad_devices_and_builder_arguments(tmp_path):
    from gqa_tune.training.checkpoint import save_checkpoint

    model = gqa_tiny()
    save_checkpoint(tmp_path, "epoch_0", model, model.state_dict(), builder={"_component_": "gqa_tune.models.gqa_tiny"})
    refused(lambda: gqa_tune.from_pretrained(tmp_path, device="nonsense"), "device 'nonsense' is not a torch device")
    refused(lambda: gqa_tune.from_pretrained(tmp_path, max_seq_len=-5), "with {'max_seq_len': -5}",
            "max_seq_len must be a positive int, got -5")  # fmt: skip
    refused(lambda: gqa_tune.from_pretrained(tmp_path, no_such_arg=1), "with {'no_such_arg': 1}")


# ---------------------------------------------------------------- swap and conversion


@pytest.mark.parametrize("model", [5, None, "model", [nn.Linear(2, 2)], nn.Linear])
def test_swap_attention_refuses_what_is_not_a_model(model):
    refused(lambda: swap_attention(model), "model must be an nn.Module")


def test_swap_attention_checks_the_backend_first():
    refused(lambda: swap_attention(nn.Linear(2, 2), backend="bogus"), "unknown attention backend 'bogus'")


def test_pooling_arguments():
    refused(lambda: pooling.check_conversion("4", 2, "mean"), "current num_kv_heads must be a positive int, got '4'")
    refused(lambda: pooling.pool_heads([[0.0] * 4] * 8, 4, 2, 2), "got a list")
    refused(lambda: pooling.pool_heads(torch.zeros(8, 4), 4, 2, 2.0), "head_dim must be a positive int, got 2.0")
    refused(lambda: pooling.pool_heads(torch.zeros(8, 4), 4, 2, 2, "random", 5), "generator must be None or a torch.")
    refused(lambda: pooling.convert_state_dict(None, num_kv_heads=4, new_num_kv_heads=2, head_dim=2),
            "state_dict must be a mapping")  # fmt: skip
    refused(lambda: pooling.convert_model_(None, 1), "model must be an nn.Module, got NoneType")
    refused(lambda: pooling.convert_model_(gqa_tiny(), 1, seed="x"), "seed must be an int, got 'x'")


def test_converting_a_model_with_quantized_caches_keeps_them():
    model = gqa_tiny().eval()
    setup_caches(model, 1, torch.float32, decoder_max_seq_len=8, kv_cache_dtype=torch.int8)
    assert pooling.convert_model_(model, 1) == 2
    for layer in model.layers:
        cache = layer.attn.kv_cache
        assert layer.attn.num_kv_heads == 1 and cache.num_kv_heads == 1 and cache.kv_cache_dtype == torch.int8
    tokens, _ = gqa_tune.generate(model, torch.tensor([[256, 40, 41]]), 2)  # the converted caches work
    assert tokens.shape == (1, 5)


def test_converting_keeps_a_ring_caches_positions_and_window():
    model = gqa_decoder(vocab_size=32, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=16, intermediate_dim=32,
                        max_seq_len=8, sliding_window_size=2)  # fmt: skip
    model.setup_caches(1, torch.float32, decoder_max_seq_len=8)
    pooling.convert_model_(model, 1)
    cache = model.layers[0].attn.kv_cache
    assert (cache.max_seq_len, cache.window, cache.num_kv_heads) == (8, 2, 1)


def test_convert_hf_checkpoint_arguments(tmp_path):
    refused(lambda: convert_hf_checkpoint(None, tmp_path / "out", 2), "src_dir must be a directory path, got None")
    refused(lambda: convert_hf_checkpoint(tmp_path, None, 2), "dst_dir must be a directory path, got None")
    refused(lambda: convert_hf_checkpoint(tmp_path, tmp_path / "o", 2, seed="x"), "seed must be an int, got 'x'")
    refused(lambda: convert_hf_checkpoint(tmp_path, tmp_path / "o", 2, overwrite="yes"),
            "overwrite must be True or False, got 'yes'")  # fmt: skip


# ---------------------------------------------------------------- component values in a config


@pytest.mark.parametrize(
    "config, override, named",
    [
        ("gqa_tiny/full", "optimizer.weight_decay=-1", "Invalid weight_decay value: -1"),
        ("gqa_tiny/full", "optimizer.betas=[0.9]", "optimizer: torch.optim.AdamW refuses"),
        ("gqa_tiny/full", "optimizer.betas=[2.0,0.9]", "optimizer.betas=[2.0, 0.9]"),
        ("gqa_tiny/full", "model.max_seq_len=0", "model: max_seq_len must be a positive int, got 0"),
        ("gqa_tiny/full", "model.backend=bogus", "model: unknown attention backend 'bogus'"),
        ("gqa_tiny/full", "model.vocab_size=10", "model: vocab_size 10 is smaller than the tokenizer's"),
        ("gqa_tiny/full", "lr_scheduler.num_training_steps=5", "lr_scheduler.num_training_steps: the recipe sets it"),
        ("gqa_tiny/full", "dataset.data_file=5", "dataset.data_file: expected a file path, got 5"),
        ("gqa_tiny/full", "tokenizer.max_seq_len=0", "tokenizer: gqa_tune.data.byte_tokenizer refuses tokenizer."),
        ("gqa_tiny/lora", "model.lora_rank=0", "model: lora_rank must be a positive int, got 0"),
        ("gqa_tiny/lora", "model.lora_dropout=1.5", "model: lora_dropout must be in [0, 1), got 1.5"),
        ("gqa_tiny/lora", "model.lora_attn_modules=[bogus]", "model: unknown LoRA attention module 'bogus'"),
        ("gqa_tiny/lora", "model.quantize_base=maybe", "model: quantize_base must be True or False, got 'maybe'"),
        ("gqa_tiny/generate", "model.max_seq_len=-1", "model.max_seq_len: expected a positive int, got -1"),
    ],
)
def test_component_values_are_checked_before_the_recipe_starts(config, override, named):
    problems = check_config_file(find_config(config), [override])
    assert len(problems) == 1 and named in problems[0], problems


def test_check_config_file_of_no_path():
    assert check_config_file(None, []) == ["config file must be a path, got None"]
