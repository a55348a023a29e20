import pytest
import torch
from torchtune.models.llama3_2 import lora_llama3_2_1b
from torchtune.modules.peft import LoRALinear, get_adapter_params, get_merged_lora_ckpt, set_trainable_params

from gqa_tune.models import gqa_decoder, gqa_tiny
from gqa_tune.models._lora_builders import lora_gqa_decoder, lora_gqa_tiny

ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")
SMALL = dict(
    vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=48, max_seq_len=32
)


def lora_keys(layers, modules, prefix="attn"):
    return {f"layers.{i}.{prefix}.{m}.lora_{ab}.weight" for i in range(layers) for m in modules for ab in "ab"}


def randomize_adapters(model):
    """Non-zero ``lora_b`` so the adapters change the output (they start at zero)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b.weight, std=0.05)


def merged(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = next(m for m in model.modules() if isinstance(m, LoRALinear))
    return get_merged_lora_ckpt(sd, rank=first.rank, alpha=first.alpha)


@pytest.mark.parametrize("mlp", [False, True])
def test_tiny_param_names_are_gqa_tiny_plus_adapters(mlp):
    torch.manual_seed(0)
    plain = gqa_tiny()
    torch.manual_seed(0)
    lora = lora_gqa_tiny(apply_lora_to_mlp=mlp)
    plain_sd, lora_sd = plain.state_dict(), lora.state_dict()
    expected = lora_keys(2, ATTN) | (lora_keys(2, ("w1", "w2", "w3"), "mlp") if mlp else set())
    assert set(lora_sd) == set(plain_sd) | expected
    # Same seed, same base weights: the adapters are added after the plain model is built.
    assert all(torch.equal(plain_sd[k], lora_sd[k]) for k in plain_sd)
    q = lora.layers[0].attn.q_proj
    assert isinstance(q, LoRALinear) and (q.rank, q.alpha, q.in_dim, q.out_dim) == (8, 16, 128, 128)
    assert isinstance(lora.layers[1].mlp.w2, LoRALinear) == mlp
    assert torch.count_nonzero(q.lora_b.weight) == 0 and torch.count_nonzero(q.lora_a.weight) > 0
    tokens = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(lora(tokens), plain(tokens), rtol=0, atol=0)  # B = 0: the plain model


def test_only_adapters_train_after_set_trainable_params():
    model = lora_gqa_tiny(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4)
    adapters = get_adapter_params(model)
    assert set(adapters) == lora_keys(2, ("q_proj", "v_proj"))
    set_trainable_params(model, adapters)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapters)
    randomize_adapters(model)
    tokens = torch.randint(0, 256, (2, 12))
    model(tokens).logsumexp(-1).mean().backward()
    assert all((p.grad is not None) == (n in adapters) for n, p in model.named_parameters())
    # per layer: q 128 -> 4 -> 128, v 128 -> 4 -> 32 (2 kv heads x 16)
    assert sum(p.numel() for p in adapters.values()) == 2 * ((128 * 4 + 4 * 128) + (128 * 4 + 4 * 32))


def test_merged_tiny_loads_into_gqa_tiny_with_same_logits():
    lora = lora_gqa_tiny(apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8)
    randomize_adapters(lora)
    plain = gqa_tiny()
    plain.load_state_dict(merged(lora), strict=True)
    tokens = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        expected, got = lora(tokens), plain(tokens)
        assert not torch.allclose(expected, gqa_tiny()(tokens))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decoder_every_option_merges_into_gqa_decoder():
    kwargs = dict(SMALL, head_dim=12, qk_norm=True, attn_bias=True, tie_word_embeddings=False, rope_base=10_000)
    lora = lora_gqa_decoder(
        lora_attn_modules=["k_proj", "output_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True,
        lora_rank=2, lora_alpha=3.0, lora_dropout=0.1, **kwargs,
    )  # fmt: skip
    plain = gqa_decoder(**kwargs)
    assert set(lora.state_dict()) == set(plain.state_dict()) | lora_keys(2, ("k_proj", "output_proj")) | lora_keys(
        2, ("w1", "w2", "w3"), "mlp"
    ) | {"output.lora_a.weight", "output.lora_b.weight"}
    k = lora.layers[0].attn.k_proj
    assert k.bias is not None and (k.in_dim, k.out_dim) == (32, 24)  # biases kept, head_dim 12 x 2 kv heads
    assert isinstance(lora.output, LoRALinear) and not isinstance(lora.layers[0].attn.q_proj, LoRALinear)
    randomize_adapters(lora)
    plain.load_state_dict(merged(lora), strict=True)
    lora.eval()  # no LoRA dropout
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), lora(tokens), rtol=1e-5, atol=1e-5)


def test_llama3_2_1b_shape_matches_torchtune_lora_keys():
    shape = dict(
        vocab_size=128_256, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192,
        max_seq_len=256, rope_scale_factor=32,
    )  # fmt: skip
    with torch.device("meta"):
        ours = lora_gqa_decoder(
            lora_attn_modules=list(ATTN), apply_lora_to_mlp=True, lora_rank=8, lora_alpha=16, **shape
        )
        theirs = lora_llama3_2_1b(lora_attn_modules=list(ATTN), apply_lora_to_mlp=True, lora_rank=8, lora_alpha=16)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    assert get_adapter_params(ours).keys() == get_adapter_params(theirs).keys()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(lora_attn_modules=["q_proj", "o_proj"]), r"unknown LoRA attention module 'o_proj'"),
        (dict(lora_attn_modules="q_proj"), r"must be a list of names, got the string 'q_proj'"),
        (dict(lora_attn_modules=[]), "LoRA adapts nothing"),
        (dict(lora_rank=0), "lora_rank must be a positive int, got 0"),
        (dict(lora_alpha=-1.0), "lora_alpha must be a finite positive number"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(apply_lora_to_output=True), "apply_lora_to_output needs tie_word_embeddings=False"),
        (dict(num_kv_heads=3), r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
    ],
)
def test_decoder_rejects_bad_values(overrides, message):
    kwargs = dict(SMALL, lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        lora_gqa_decoder(**kwargs)


def test_tiny_rejects_bad_module_name():
    with pytest.raises(ValueError, match="unknown LoRA attention module 'gate_proj'"):
        lora_gqa_tiny(lora_attn_modules=("q_proj", "gate_proj"))


@pytest.mark.parametrize("which", ["gemma", "gemma2"])
def test_gemma_lora_builders_start_as_their_base_model(which):
    from gqa_tune.models import gqa_gemma2_decoder, gqa_gemma_decoder, lora_gqa_gemma2_decoder, lora_gqa_gemma_decoder

    base_builder, lora_builder = {
        "gemma": (gqa_gemma_decoder, lora_gqa_gemma_decoder),
        "gemma2": (gqa_gemma2_decoder, lora_gqa_gemma2_decoder),
    }[which]
    args = dict(vocab_size=64, num_layers=2, num_heads=4, head_dim=16, num_kv_heads=2, embed_dim=64,
                intermediate_dim=128, max_seq_len=32)  # fmt: skip
    torch.manual_seed(0)
    lora = lora_builder(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, **args)
    assert lora_builder.__name__ == f"lora_gqa_{which}_decoder" and "tied" in lora_builder.__doc__
    assert isinstance(lora.layers[0].attn.q_proj, LoRALinear) and not isinstance(lora.layers[0].attn.k_proj, LoRALinear)
    base = base_builder(**args)
    base.load_state_dict(get_merged_lora_ckpt(dict(lora.state_dict()), 4, 8), strict=True)
    tokens = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(lora(tokens), base(tokens))  # the adapters start at zero
    with pytest.raises(TypeError):
        lora_builder(lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8, apply_lora_to_output=True, **args)
