"""Contracts with the dependencies' internals that gqa_tune touches, and the version ranges it declares.

One test per internal (listed in ``gqa_tune/_versions.py``): it imports the
internal and checks the names, signatures and behaviour gqa_tune relies on,
so that a new release that moves one fails here, loudly and by name, rather
than somewhere deep in a recipe. Widen a range in ``gqa_tune/_versions.py``
and ``pyproject.toml`` together, and only once these pass on its new ends.
"""

import importlib
import inspect
import re
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from gqa_tune._versions import SUPPORTED, installed_version, is_supported, lowest_supported

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def moved(distribution: str, what: str, used_by: str) -> str:
    """The failure message: which dependency, at which version, and what moved."""
    return (
        f"{distribution} {installed_version(distribution)} (supported: {SUPPORTED[distribution]}): {what}. "
        f"gqa_tune relies on it in {used_by}; adapt that code before widening the range."
    )


def import_internal(distribution: str, module: str, name: str, used_by: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(moved(distribution, f"{module}.{name} is gone ({exc!r})", used_by))


def require_parameters(distribution: str, fn, names, used_by: str) -> None:
    params = inspect.signature(fn).parameters
    missing = [n for n in names if n not in params]
    if missing:
        pytest.fail(moved(distribution, f"{fn.__qualname__} lost parameters {missing} (now {list(params)})", used_by))


# ---- declared ranges -------------------------------------------------------------------------------------------


def declared_requirements() -> dict:
    """distribution -> every specifier pyproject.toml declares for it (core dependencies and extras)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    declared: dict = {}
    for line in lines:
        requirement = Requirement(line)
        declared.setdefault(requirement.name, set()).add(str(requirement.specifier))
    return declared


@pytest.mark.parametrize("distribution", sorted(SUPPORTED))
def test_pyproject_declares_the_supported_range(distribution):
    from packaging.specifiers import SpecifierSet

    declared = declared_requirements().get(distribution)
    assert declared, f"pyproject.toml declares no requirement on {distribution}"
    for spec in declared:
        assert SpecifierSet(spec) == SpecifierSet(SUPPORTED[distribution]), (
            f"pyproject.toml declares {distribution}{spec}, gqa_tune/_versions.py {SUPPORTED[distribution]}"
        )


def test_transformers_range_is_declared_in_the_t5_and_test_extras():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for extra in ("t5", "test"):
        assert f"transformers{SUPPORTED['transformers']}" in extras[extra], extras[extra]


def test_the_docs_state_the_transformers_range():
    page = (PYPROJECT.parent / "docs" / "conversion.md").read_text(encoding="utf-8")
    assert f"transformers {SUPPORTED['transformers']}" in page, "docs/conversion.md states another range"


@pytest.mark.parametrize("distribution", sorted(SUPPORTED))
def test_installed_versions_are_supported(distribution):
    version = installed_version(distribution)
    if version is None:
        pytest.skip(f"{distribution} is not installed")
    assert is_supported(distribution, version), (
        f"{distribution} {version} is installed, outside the supported {SUPPORTED[distribution]}"
    )


def test_supported_ranges_treat_local_builds_and_next_pre_releases_as_expected():
    assert is_supported("torch", "2.13.0+cpu") and is_supported("torch", "2.11.0+cu128")
    assert not is_supported("torch", "2.14.0.dev20260101")
    assert is_supported("transformers", "5.15.0") and is_supported("transformers", "5.24.3")
    assert not is_supported("transformers", "5.14.1") and not is_supported("transformers", "5.25.0rc0")


def test_ci_tests_the_lower_end_of_the_transformers_range():
    assert lowest_supported("transformers") == re.match(r">=([0-9.]+),", SUPPORTED["transformers"]).group(1)
    ci = (PYPROJECT.parent / ".ci" / "run").read_text()
    install = ci.index('pip install -q "transformers==$lowest_transformers"')
    assert "lowest_supported('transformers')" in ci[:install], ".ci/run must install the lowest supported transformers"
    assert "tests/convert/test_t5.py tests/test_dependency_contracts.py" in ci[install:], (
        ".ci/run must run the T5 and dependency-contract tests against the lowest supported transformers"
    )


# ---- torchtune ---------------------------------------------------------------------------------------------------


def test_torchtune_merge_yaml_and_cli_args():
    used_by = "gqa_tune/config_check.py (load_config)"
    merge = import_internal("torchtune", "torchtune.config._utils", "_merge_yaml_and_cli_args", used_by)
    require_parameters("torchtune", merge, ["yaml_args", "cli_args"], used_by)
    yaml_args = Namespace(
        model={"_component_": "gqa_tune.models.gqa_tiny", "dropout": 0.1},
        optimizer={"lr": 1e-3, "betas": [0.9, 0.95]},
        seed=1,
    )
    merged = merge(yaml_args, ["model=gqa_tune.models.other", "optimizer.lr=0.5", "~seed", "epochs=None", "new.key=3"])
    got = dict(
        component=merged.model._component_,
        dropout=merged.model.dropout,
        lr=merged.optimizer.lr,
        betas=list(merged.optimizer.betas),
        seed="seed" in merged,
        epochs=merged.epochs,
        new=merged.new.key,
    )
    expected = dict(
        component="gqa_tune.models.other", dropout=0.1, lr=0.5, betas=[0.9, 0.95], seed=False, epochs=None, new=3
    )
    if got != expected:
        pytest.fail(moved("torchtune", f"_merge_yaml_and_cli_args now merges to {got}, not {expected}", used_by))
    with pytest.raises(ValueError, match="key=value"):
        merge(Namespace(a=1), ["a"])


def test_torchtune_get_component_from_path():
    used_by = "recipes/uptrain.py (builder_accepts_num_kv_heads)"
    get = import_internal("torchtune", "torchtune.config._utils", "_get_component_from_path", used_by)
    require_parameters("torchtune", get, ["path"], used_by)
    from gqa_tune.models import gqa_tiny

    if get("gqa_tune.models.gqa_tiny") is not gqa_tiny:
        pytest.fail(moved("torchtune", "_get_component_from_path no longer resolves a dotted path", used_by))


def test_torchtune_llama3_scaled_rope():
    used_by = "gqa_tune/models/_component_builders.py (llama3_1 RoPE)"
    rope_cls = import_internal(
        "torchtune", "torchtune.models.llama3_1._position_embeddings", "Llama3ScaledRoPE", used_by
    )
    require_parameters("torchtune", rope_cls.__init__, ["dim", "max_seq_len", "base", "scale_factor"], used_by)
    require_parameters("torchtune", rope_cls.forward, ["x", "input_pos"], used_by)
    rope = rope_cls(dim=8, max_seq_len=16, base=500_000, scale_factor=8)
    x = torch.randn(2, 5, 3, 8)  # [b, s, n_h, h_d]
    out = rope(x, input_pos=torch.arange(5).expand(2, 5))
    if out.shape != x.shape or not torch.allclose(out[:, 0], x[:, 0]):  # position 0 is not rotated
        pytest.fail(moved("torchtune", "Llama3ScaledRoPE.forward changed its layout or positions", used_by))


def test_torchtune_gemma2_attention_fields():
    used_by = "gqa_tune/modules/swap.py (from_torchtune_attention, swap_attention on Gemma 2 models)"
    cls = import_internal("torchtune", "torchtune.models.gemma2._attention", "Gemma2Attention", used_by)
    require_parameters(
        "torchtune", cls.__init__, ["sliding_window_size", "softcapping", "query_pre_attn_scalar", "kv_cache"], used_by
    )
    linear = torch.nn.Linear
    attn = cls(embed_dim=16, num_heads=4, num_kv_heads=2, head_dim=4, q_proj=linear(16, 16), k_proj=linear(16, 8),
               v_proj=linear(16, 8), output_proj=linear(16, 16), sliding_window_size=3, softcapping=7.0,
               query_pre_attn_scalar=9)  # fmt: skip
    read = ("sliding_window_size", "softcapping", "scaling", "num_heads", "num_kv_heads", "head_dim", "embed_dim",
            "max_seq_len", "is_causal", "attn_dropout", "kv_cache", "cache_enabled", "pos_embeddings", "q_norm",
            "k_norm")  # fmt: skip
    missing = [name for name in read if not hasattr(attn, name)]
    if missing or attn.scaling != 9**-0.5 or attn.sliding_window_size != 3 or attn.softcapping != 7.0:
        pytest.fail(moved("torchtune", f"Gemma2Attention no longer keeps {missing or 'its scaling/window/cap'}",
                          used_by))  # fmt: skip
    attn.setup_cache(1, torch.float32, 8)
    if tuple(attn.kv_cache.k_cache.shape) != (1, 4, 8, 4):  # it caches n_h heads; swap keeps one per group
        pytest.fail(moved("torchtune", "Gemma2Attention's cache layout changed", used_by))


# ---- torch -------------------------------------------------------------------------------------------------------


def test_torch_flex_block_mask_internals():
    used_by = "gqa_tune/ops/masks.py (block_mask_to_dense) and gqa_tune/ops/functional.py (BlockMask checks)"
    module = "torch.nn.attention.flex_attention"
    block_mask_cls = import_internal("torch", module, "BlockMask", used_by)
    create_mask = import_internal("torch", module, "create_mask", used_by)
    create_block_mask = import_internal("torch", module, "create_block_mask", used_by)
    require_parameters("torch", block_mask_cls.from_kv_blocks, ["kv_num_blocks", "kv_indices", "BLOCK_SIZE"], used_by)
    require_parameters("torch", block_mask_cls.from_kv_blocks, ["seq_lengths"], used_by)
    require_parameters("torch", create_mask, ["mod_fn", "B", "H", "Q_LEN", "KV_LEN", "device"], used_by)

    def causal(b, h, q, kv):
        return q >= kv

    s_q = s_kv = 200  # not a multiple of the 128 block: full and partial blocks, and a ragged edge
    block_mask = create_block_mask(causal, 1, 1, s_q, s_kv, device="cpu")
    attributes = ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths", "shape", "mask_mod", "to_dense")
    missing = [name for name in attributes if not hasattr(block_mask, name)]
    if missing:
        pytest.fail(moved("torch", f"BlockMask lost {missing}", used_by))
    if tuple(block_mask.seq_lengths) != (s_q, s_kv) or tuple(block_mask.shape[:2]) != (1, 1):
        pytest.fail(
            moved("torch", f"BlockMask.seq_lengths/shape now {block_mask.seq_lengths}/{block_mask.shape}", used_by)
        )
    if block_mask.kv_num_blocks.device.type != "cpu":
        pytest.fail(moved("torch", "create_block_mask(device='cpu') no longer builds on the CPU", used_by))
    from gqa_tune.ops.masks import block_mask_to_dense

    dense = block_mask_to_dense(block_mask, s_q, s_kv, torch.device("cpu"))
    expected = torch.ones(s_q, s_kv, dtype=torch.bool).tril()  # an independent oracle
    if not torch.equal(dense[0, 0], expected):
        pytest.fail(moved("torch", "BlockMask's full/partial block fields no longer rebuild the mask", used_by))


# ---- torchao -------------------------------------------------------------------------------------------------------


def test_torchao_nf4_behaviour_the_qlora_builders_rely_on():
    """A plain tensor copied into an NF4 parameter is quantized (``load_state_dict`` into a QLoRA model), and the
    block sizes are kept: gqa_tune/models/_lora_builders.py."""
    used_by = "gqa_tune/models/_lora_builders.py (QLoRA)"
    from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4

    require_parameters("torchao", to_nf4, ["block_size", "scaler_block_size"], used_by)
    weight = torch.randn(32, 128)
    param = torch.nn.Parameter(to_nf4(torch.zeros(32, 128), block_size=64, scaler_block_size=64), requires_grad=False)
    with torch.no_grad():
        param.copy_(weight)
    if not isinstance(param, NF4Tensor) or (param.block_size, param.scaler_block_size) != (64, 64):
        pytest.fail(moved("torchao", "copy_ into an NF4 parameter no longer keeps it NF4 with its blocks", used_by))
    if not torch.equal(param.get_original_weight(), to_nf4(weight, 64, 64).get_original_weight()):
        pytest.fail(moved("torchao", "copy_ of a plain tensor into NF4 no longer quantizes it", used_by))


def test_torchao_int4_config_fields_read_by_quantizer_limits():
    used_by = "gqa_tune/quantization.py (quantizer_limits, describe)"
    from torchao.quantization import Int4WeightOnlyConfig

    config = Int4WeightOnlyConfig()
    packing = getattr(config.int4_packing_format, "value", config.int4_packing_format)
    if (config.version, packing, type(config.layout).__name__) != (2, "plain", "TensorCoreTiledLayout"):
        what = f"Int4WeightOnlyConfig() is now version {config.version}, packing {packing!r}, {config.layout}"
        pytest.fail(moved("torchao", what, used_by))


# ---- transformers ------------------------------------------------------------------------------------------------


def test_transformers_t5_dispatches_grouped_kv_to_the_registered_attention():
    pytest.importorskip("transformers")
    used_by = "gqa_tune/convert/t5.py (convert_t5_to_gqa)"
    attention_interface = import_internal("transformers", "transformers", "AttentionInterface", used_by)
    mask_interface = import_internal("transformers", "transformers", "AttentionMaskInterface", used_by)
    eager_mask = import_internal("transformers", "transformers.masking_utils", "eager_mask", used_by)
    require_parameters("transformers", eager_mask, ["batch_size", "q_length", "kv_length", "dtype"], used_by)
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.models.t5.modeling_t5 import eager_attention_forward

    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.shape[1], key.shape[1], attention_mask, kwargs.get("position_bias")))
        # T5's own eager attention, fed K/V repeated to the query heads (the probe only has to run)
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    attention_interface.register("gqa_tune_contract_probe", probe)
    mask_interface.register("gqa_tune_contract_probe", eager_mask)
    config = T5Config(
        vocab_size=32, d_model=16, d_kv=4, num_heads=4, num_layers=1, num_decoder_layers=1, d_ff=32,
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    attn = model.decoder.block[0].layer[0].SelfAttention
    attn.k, attn.v = torch.nn.Linear(16, 4, bias=False), torch.nn.Linear(16, 4, bias=False)  # one kv head
    for module in (model, model.encoder, model.decoder):
        module.set_attn_implementation("gqa_tune_contract_probe")
    if model.decoder.config._attn_implementation != "gqa_tune_contract_probe":
        pytest.fail(moved("transformers", "set_attn_implementation no longer sets a registered function", used_by))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 0]]), decoder_input_ids=ids[:, :3])
    if len(seen) != 3:
        pytest.fail(moved("transformers", f"T5 called the registered attention {len(seen)} times, not 3", used_by))
    (_, enc_kv, enc_mask, enc_bias), (dec_q, dec_kv, dec_mask, dec_bias), _ = seen
    if (enc_kv, dec_q, dec_kv) != (4, 4, 1):
        pytest.fail(
            moved("transformers", "T5Attention.forward no longer infers the kv heads from the k/v width", used_by)
        )
    if enc_bias is None or dec_bias is None or tuple(dec_bias.shape) != (1, 4, 3, 3):
        pytest.fail(moved("transformers", "T5 no longer passes its relative bias as position_bias", used_by))
    if enc_mask is None or not enc_mask.is_floating_point() or tuple(enc_mask.shape) != (1, 1, 4, 4):
        pytest.fail(moved("transformers", "the registered mask function no longer gives T5 a float mask", used_by))
    future = torch.ones(3, 3, dtype=torch.bool).triu(1)
    if not (dec_mask[0, 0][future] < -1e30).all() or (dec_mask[0, 0][~future] != 0).any():
        pytest.fail(moved("transformers", "T5's decoder self-attention mask is no longer causal", used_by))


def test_no_gqa_tune_module_imports_an_internal_not_listed_here():
    """A new ``._private`` import of a dependency must come with a contract test in this file."""
    root = PYPROJECT.parent
    listed = {
        "torchtune.config._utils._merge_yaml_and_cli_args",
        "torchtune.config._utils._get_component_from_path",
        "torchtune.models.llama3_1._position_embeddings.Llama3ScaledRoPE",
        "torchtune.models.gemma2._attention.Gemma2Attention",
    }
    pattern = re.compile(r"^\s*from ((?:torch|torchtune|torchao|transformers)(?:\.\w+)*) import \(?([\w, ]+)", re.M)
    found = set()
    for path in [*root.joinpath("gqa_tune").rglob("*.py"), *root.joinpath("recipes").rglob("*.py")]:
        for module, names in pattern.findall(path.read_text()):
            private_module = any(part.startswith("_") for part in module.split("."))
            for name in filter(None, (n.strip() for n in names.split(","))):
                if private_module or name.startswith("_"):
                    found.add(f"{module}.{name}")
    unlisted = sorted(found - listed)
    assert not unlisted, f"private imports without a contract test in {Path(__file__).name}: {unlisted}"
