"""QLoRA builders: the frozen base in torchao NF4, computing what the dequantized weights compute.

The oracle of every numeric test is the unquantized LoRA model (or transformers' model) holding the NF4
weights dequantized by torchao (``NF4Tensor.get_original_weight``), so the NF4 path is checked against plain
``F.linear`` on the same values.
"""

import pytest
import torch
from helpers import tiny_hf_model
from omegaconf import OmegaConf
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
from torchtune import config, training
from torchtune.models.convert_weights import tune_to_hf
from torchtune.modules.low_precision import FrozenNF4Linear
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

from gqa_tune.models import (
    gqa_tiny,
    init_from_scratch,
    lora_gqa_decoder,
    lora_gqa_llama3_2_1b,
    lora_gqa_tiny,
    qlora_gqa_decoder,
    qlora_gqa_llama3_2_1b,
    qlora_gqa_tiny,
)
from gqa_tune.models._lora_builders import nf4_kwargs
from gqa_tune.quantization import weight_bytes
from gqa_tune.training.weights import WeightSource, fit_weights, load_weights

ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")
MLP = ("w1", "w2", "w3")
#: The LoRA settings a config's ``model:`` gives (carried over to the architecture of ``hf_model_dir``).
LORA_CFG = {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 8}
SMALL = dict(
    vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=32
)


def linear_weights(model):
    """Names of the base weights of every linear layer in the transformer layers (adapters left out)."""
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if name.startswith("layers.") and isinstance(module, (torch.nn.Linear, LoRALinear))
        and not name.endswith(("lora_a", "lora_b"))
    ]  # fmt: skip


def randomize_adapters(model, seed=1):
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b.weight, std=0.05)


def dequantized_twin(qlora, builder, **kwargs):
    """The unquantized LoRA model holding ``qlora``'s dequantized base weights and its adapters."""
    twin = builder(**kwargs)
    twin.load_state_dict(qlora.state_dict(), strict=True)
    return twin


@pytest.mark.parametrize("modules,mlp", [(ATTN, False), (("q_proj", "v_proj"), True)])
def test_every_base_linear_is_nf4_and_frozen(modules, mlp):
    model = qlora_gqa_tiny(lora_attn_modules=modules, apply_lora_to_mlp=mlp)
    names = linear_weights(model)
    assert len(names) == 2 * (len(ATTN) + len(MLP))
    params = dict(model.named_parameters())
    for name in names:
        assert isinstance(params[name], NF4Tensor), name
        assert not params[name].requires_grad, name
    for i in range(2):
        for m in ATTN:
            expected = LoRALinear if m in modules else FrozenNF4Linear
            assert type(model.layers[i].attn.get_submodule(m)) is expected, (i, m)
        assert all(type(model.layers[i].mlp.get_submodule(m)) is (LoRALinear if mlp else FrozenNF4Linear) for m in MLP)
    q = model.layers[0].attn.q_proj
    assert isinstance(q.weight, NF4Tensor) and type(q.lora_a.weight) is torch.nn.Parameter
    # Embedding, norms and adapters stay in the base dtype.
    assert type(model.tok_embeddings.weight) is torch.nn.Parameter
    for name, p in params.items():
        if "lora_" in name or "norm" in name:
            assert type(p) is torch.nn.Parameter and p.dtype == torch.float32, name


def test_narrow_kv_projections_get_a_scaler_block_that_divides_them():
    model = qlora_gqa_tiny()
    k = model.layers[0].attn.k_proj.weight  # 32 x 128: 64 blocks of 64, fewer than torchao's 256 per scale group
    assert (k.block_size, k.scaler_block_size) == (64, 64)
    assert model.layers[0].mlp.w1.weight.scaler_block_size == 256  # 384 x 128: 768 blocks
    assert nf4_kwargs(torch.empty(260, 128), "x") == {"block_size": 64, "scaler_block_size": 130}
    # 4.13 bits per weight: the 4-bit codes, one int8 scale per 64 weights, a float factor per scale group
    plain = lora_gqa_tiny()
    assert weight_bytes(model, linear_only=True) / weight_bytes(plain, linear_only=True) == pytest.approx(
        4.13 / 32, rel=0.01
    )


def test_a_weight_that_is_no_multiple_of_the_nf4_block_is_refused_by_name():
    shape = dict(SMALL, embed_dim=36, num_heads=6, num_kv_heads=2, intermediate_dim=64)  # q_proj 36 x 36
    with pytest.raises(ValueError, match=r"cannot quantize layers\.0\.attn\.q_proj to NF4: .*\(36, 36\).* 64"):
        qlora_gqa_decoder(lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8, **shape)
    with pytest.raises(ValueError, match=r"cannot quantize layers\.0\.mlp\.w1 to NF4"):
        shape = dict(SMALL, embed_dim=48, intermediate_dim=50)  # the attention fits (48 x 48, 24 x 48), w1 does not
        qlora_gqa_decoder(lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8, **shape)
    with pytest.raises(ValueError, match="quantize_base must be True or False, got 'yes'"):
        lora_gqa_tiny(quantize_base="yes")


def test_forward_and_backward_equal_the_dequantized_weights():
    torch.manual_seed(0)
    qlora = init_from_scratch(qlora_gqa_tiny(apply_lora_to_mlp=False))
    randomize_adapters(qlora)
    twin = dequantized_twin(qlora, lora_gqa_tiny)
    for model in (qlora, twin):
        set_trainable_params(model, get_adapter_params(model))
    tokens = torch.randint(0, 256, (2, 17))
    out_q, out_t = qlora(tokens), twin(tokens)
    torch.testing.assert_close(out_q, out_t, rtol=1e-5, atol=1e-5)
    out_q.logsumexp(-1).mean().backward()
    out_t.logsumexp(-1).mean().backward()
    grads_q = {n: p.grad for n, p in qlora.named_parameters() if p.requires_grad}
    grads_t = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_t.keys() == get_adapter_params(qlora).keys()
    for name in grads_q:  # layer 0's adapters: the gradient went back through layer 1's NF4 MLP and projections
        torch.testing.assert_close(grads_q[name], grads_t[name], rtol=1e-4, atol=1e-6, msg=name)
    # and the NF4 weights get no gradient
    assert all(p.grad is None for n, p in qlora.named_parameters() if isinstance(p, NF4Tensor))
    # The quantization is not a no-op: the twin without NF4 rounding differs.
    plain = gqa_tiny()
    torch.manual_seed(0)
    init_from_scratch(plain)
    with torch.no_grad():
        assert not torch.allclose(plain(tokens), out_t.detach(), atol=1e-3)


def test_only_the_adapters_train():
    model = qlora_gqa_tiny(apply_lora_to_mlp=True, lora_rank=4)
    adapters = get_adapter_params(model)
    set_trainable_params(model, adapters)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapters)
    assert len(adapters) == 2 * (len(ATTN) + len(MLP)) * 2
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randint(0, 256, (2, 12))).logsumexp(-1).mean().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(adapters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_is_the_plain_model_in_the_base_dtype(dtype):
    with training.set_default_dtype(dtype):
        torch.manual_seed(0)
        model = init_from_scratch(qlora_gqa_tiny(apply_lora_to_mlp=True))
        randomize_adapters(model)
    sd = model.state_dict()
    assert all(type(v) is torch.Tensor and v.dtype == dtype for v in sd.values())
    assert set(sd) == set(gqa_tiny().state_dict()) | set(get_adapter_params(model))
    for name in linear_weights(model):  # the stored values are torchao's dequantization of the NF4 weights
        assert torch.equal(sd[name], dict(model.named_parameters())[name].get_original_weight()), name
    # A plain state dict loads back: every weight is quantized into its NF4 parameter again. NF4 of NF4 values
    # is not exactly idempotent (the double-quantized block scales move a little), but stays within 1% of
    # each weight's range; the other weights come back as they were.
    with training.set_default_dtype(dtype):
        again = qlora_gqa_tiny(apply_lora_to_mlp=True)
    again.load_state_dict(sd, strict=True)
    assert all(isinstance(dict(again.named_parameters())[n], NF4Tensor) for n in linear_weights(again))
    for name, value in again.state_dict().items():
        if name in linear_weights(again):
            assert (value.float() - sd[name].float()).abs().max() <= 0.01 * sd[name].float().abs().max(), name
        else:
            assert torch.equal(value, sd[name]), name


def test_loading_plain_weights_quantizes_them():
    torch.manual_seed(0)
    plain = init_from_scratch(gqa_tiny())
    model = qlora_gqa_tiny()
    fit_weights(model, plain.state_dict(), WeightSource("test", "a plain gqa_tiny"))
    sd, plain_sd = model.state_dict(), plain.state_dict()
    for name in linear_weights(model):
        w = plain_sd[name]
        expected = to_nf4(w, **nf4_kwargs(w, name)).get_original_weight()
        assert torch.equal(sd[name], expected), name
        assert 0 < (sd[name] - w).abs().max() <= 0.25 * w.abs().max()  # 4-bit rounding, within its block's range
    assert torch.equal(sd["tok_embeddings.weight"], plain_sd["tok_embeddings.weight"])


def test_from_scratch_is_the_nf4_of_lora_from_scratch():
    """Same seed: the frozen NF4 linears hold the NF4 of what init_from_scratch gives the LoRA model."""
    torch.manual_seed(5)
    qlora = init_from_scratch(qlora_gqa_tiny())
    torch.manual_seed(5)
    lora = init_from_scratch(lora_gqa_tiny())
    q_sd, l_sd = qlora.state_dict(), lora.state_dict()
    assert q_sd.keys() == l_sd.keys()
    for name in l_sd:
        if name in linear_weights(qlora):
            expected = to_nf4(l_sd[name], **nf4_kwargs(l_sd[name], name)).get_original_weight()
            assert torch.equal(q_sd[name], expected), name
        else:
            assert torch.equal(q_sd[name], l_sd[name]), name
    assert torch.count_nonzero(q_sd["layers.0.mlp.w1.weight"]) > 0


def test_llama3_2_1b_keys_and_bytes_on_meta():
    with torch.device("meta"):
        qlora, lora = qlora_gqa_llama3_2_1b(), lora_gqa_llama3_2_1b()
    assert isinstance(qlora.layers[15].mlp.w2.weight, NF4Tensor) and isinstance(qlora.layers[0].attn.v_proj, LoRALinear)
    assert qlora.state_dict().keys() == lora.state_dict().keys()
    ratio = weight_bytes(lora, linear_only=True) / weight_bytes(qlora, linear_only=True)
    assert ratio == pytest.approx(32 / 4.13, rel=0.01)


def test_qlora_decoder_takes_the_lora_decoders_arguments():
    kwargs = dict(SMALL, qk_norm=True, attn_bias=True, tie_word_embeddings=False, rope_base=10_000)
    lora = dict(lora_attn_modules=["k_proj"], apply_lora_to_mlp=True, lora_rank=2, lora_alpha=3.0)
    torch.manual_seed(0)
    qlora = qlora_gqa_decoder(**lora, **kwargs)
    assert qlora.layers[0].attn.k_proj.bias is not None and isinstance(qlora.layers[0].attn.q_proj, FrozenNF4Linear)
    assert qlora.layers[0].attn.q_proj.bias is not None and not qlora.layers[0].attn.q_proj.bias.requires_grad
    assert type(qlora.output) is torch.nn.Linear  # an untied output stays in the base dtype, as in torchtune
    randomize_adapters(qlora)
    twin = dequantized_twin(qlora, lora_gqa_decoder, **lora, **kwargs)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(qlora(tokens), twin(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_cfg", [
    {"_component_": "gqa_tune.models.qlora_gqa_tiny", **LORA_CFG},
    {"_component_": "gqa_tune.models.lora_gqa_tiny", **LORA_CFG, "quantize_base": True},
])  # fmt: skip
def test_from_hugging_face_weights(model_cfg, tmp_path):
    pytest.importorskip("transformers")
    hf = tiny_hf_model(tmp_path, "llama3")  # Llama 3 RoPE scaling, untied output
    cfg = OmegaConf.create({"hf_model_dir": str(tmp_path), "model": model_cfg})
    state_dict, builder, source = load_weights(cfg)
    assert builder._component_ == "gqa_tune.models.lora_gqa_decoder"
    assert builder.quantize_base is True and builder.lora_rank == 4 and builder.rope_scale_factor == 8.0
    model = config.instantiate(builder)
    fit_weights(model, state_dict, source)
    assert all(isinstance(dict(model.named_parameters())[n], NF4Tensor) for n in linear_weights(model))
    # The oracle: transformers' model holding the dequantized weights (and the same adapters, merged).
    randomize_adapters(model)
    sd = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            sd[f"{name}.weight"] = sd[f"{name}.weight"] + module.alpha / module.rank * (
                module.lora_b.weight @ module.lora_a.weight
            )
    sd = {k: v for k, v in sd.items() if "lora_" not in k}
    hf_sd = tune_to_hf(sd, num_heads=4, num_kv_heads=2, dim=64, head_dim=16)
    hf.load_state_dict(hf_sd, strict=True)
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        expected, got = hf(tokens).logits, model(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
