"""The generate recipe's ``quantizer:``: torchao-quantized weights answer the tiny tasks' prompts; refusals are clear.

One checkpoint per module: ``gqa_tiny`` trained by the full recipe (150 steps) on 24 rows of the tiny tasks
(copy and addition prompts from ``data/tasks/val.jsonl``), which it then answers exactly. Each quantizer runs
through ``tune run`` and must give those answers, with its linear weights stored smaller than fp32's.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_tune
from gqa_tune.recipes.generate import GenerateRecipe
from omegaconf import OmegaConf
from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

from gqa_tune.config_check import ConfigError
from gqa_tune.data import resolve_data_file
from gqa_tune.quantization import build_quantizer, quantizer_limits, tensor_bytes, weight_bytes

CONFIG = "configs/gqa_tiny/generate.yaml"
ROWS = [json.loads(line) for line in resolve_data_file("data/tasks/val.jsonl").read_text().splitlines()[:24]]
INT4_CPU = (
    "{_component_: torchao.quantization.Int4WeightOnlyConfig, group_size: 32, version: 1, "
    "layout: {_component_: torchao.dtypes.Int4CPULayout}}"
)
#: id -> (dtype, quantizer as a command-line value, how the recipe names it)
QUANTIZERS = {
    "int8_weight_only": ("fp32", "{_component_: torchao.quantization.Int8WeightOnlyConfig}", "Int8WeightOnlyConfig"),
    "int8_dynamic": (
        "fp32",
        "{_component_: torchao.quantization.Int8DynamicActivationInt8WeightConfig}",
        "Int8DynamicActivationInt8WeightConfig",
    ),
    "int4_cpu": ("bf16", INT4_CPU, "Int4WeightOnlyConfig(layout=Int4CPULayout, version=1)"),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory whose checkpoint answers :data:`ROWS` (the rows repeated, 150 steps of the full recipe)."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS * 50))
    overrides = [
        f"output_dir={root / 'run'}", f"dataset.data_file={data}", "batch_size=8", "epochs=1",
        "max_steps_per_epoch=150", "lr_scheduler.num_warmup_steps=10", "eval=null", "tokenizer.max_seq_len=48",
    ]  # fmt: skip
    run_tune("full_finetune_single_device", "configs/gqa_tiny/full.yaml", overrides, check=True)
    return root / "run"


def generate_through_tune(run_dir: Path, out_file: Path, dtype: str, quantizer=None):
    overrides = [f"checkpoint_dir={run_dir}", f"dtype={dtype}", f"output_file={out_file}", "max_new_tokens=10"]
    overrides += [f"prompt={row['prompt']}" for row in ROWS]
    if quantizer is not None:
        overrides.append(f"quantizer={quantizer}")
    proc = run_tune("generate", CONFIG, overrides, check=True)
    return json.loads(out_file.read_text()), proc


@pytest.fixture(scope="module")
def fp32_output(trained, tmp_path_factory):
    data, _ = generate_through_tune(trained, tmp_path_factory.mktemp("fp32") / "out.json", "fp32")
    return data


def test_the_unquantized_model_answers_the_prompts(fp32_output):
    assert fp32_output["texts"] == [row["answer"] for row in ROWS]
    assert fp32_output["quantizer"] is None


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_quantized_generation_answers_the_prompts(name, trained, fp32_output, tmp_path):
    dtype, quantizer, described = QUANTIZERS[name]
    data, proc = generate_through_tune(trained, tmp_path / "out.json", dtype, quantizer)
    assert data["quantizer"] == described
    assert f"14 linear layers quantized with {described}" in proc.stdout  # 2 layers x (4 attention + 3 MLP)
    assert data["weight_bytes"] < 0.5 * fp32_output["weight_bytes"]  # the embedding (tied output) stays
    assert data["texts"] == [row["answer"] for row in ROWS]


def make_cfg(**overrides):
    cfg = OmegaConf.load(REPO / CONFIG)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def test_the_recipe_quantizes_after_loading(trained):
    cfg = make_cfg(checkpoint_dir=str(trained), quantizer={"_component_": "torchao.quantization.Int8WeightOnlyConfig"})
    recipe = GenerateRecipe(cfg)
    recipe.setup(cfg)
    weight = recipe.model.layers[0].mlp.w1.weight
    assert type(weight) is not torch.nn.Parameter and tensor_bytes(weight) < weight.numel() * 4 / 3  # int8 + scales
    assert recipe.quantized == 14
    plain = make_cfg(checkpoint_dir=str(trained))
    unquantized = GenerateRecipe(plain)
    unquantized.setup(plain)
    assert weight_bytes(recipe.model, linear_only=True) < 0.3 * weight_bytes(unquantized.model, linear_only=True)


@pytest.mark.parametrize(
    "quantizer,message",
    [
        (
            {"_component_": "torchao.quantization.Int4WeightOnlyConfig"},
            r"quantizer: Int4WeightOnlyConfig\(int4_packing_format='plain', version=2\) cannot run on cpu with dtype "
            r"float32: .*fbgemm-gpu-genai \(>= 1\.2\.0\) is not installed; on a CPU use its CPU layout",
        ),
        (
            {"_component_": "torchao.quantization.Float8DynamicActivationFloat8WeightConfig"},
            "quantizer: Float8DynamicActivationFloat8WeightConfig cannot run on cpu .*: float8 activations need a "
            "CUDA GPU of compute capability 8.9",
        ),
        (
            {"_component_": "gqa_tune.data.ByteTokenizer"},
            "quantizer: 'gqa_tune.data.ByteTokenizer' built a ByteTokenizer, not a torchao quantization config",
        ),
        (
            {
                "_component_": "torchao.quantization.Int4WeightOnlyConfig",
                "layout": {"_component_": "torchao.dtypes.Int4CPULayout", "tiles": 2},
            },
            "quantizer.layout.tiles: unexpected keyword for torchao.dtypes.Int4CPULayout",
        ),
    ],
)
def test_a_quantizer_that_cannot_run_is_refused_before_loading(quantizer, message, tmp_path):
    cfg = make_cfg(checkpoint_dir=str(tmp_path / "nothing_here"), quantizer=quantizer)
    with pytest.raises(ConfigError, match=message):
        GenerateRecipe(cfg)  # the checkpoint is never looked at


def test_a_kernel_that_refuses_the_model_is_found_at_setup(trained):
    quantizer = {"_component_": "torchao.quantization.Int4WeightOnlyConfig", "group_size": 48, "version": 1,
                 "layout": {"_component_": "torchao.dtypes.Int4CPULayout"}}  # fmt: skip
    cfg = make_cfg(checkpoint_dir=str(trained), quantizer=quantizer, dtype="bf16")
    recipe = GenerateRecipe(cfg)
    with pytest.raises(ConfigError, match=r"Int4WeightOnlyConfig\(layout=Int4CPULayout, version=1\) cannot run on "
                       r"cpu with dtype bfloat16: torchao: RuntimeError: .*qGroupSize .*48"):  # fmt: skip
        recipe.setup(cfg)


def test_device_limits_of_the_int4_layouts():
    cpu_layout = build_quantizer(OmegaConf.create({
        "_component_": "torchao.quantization.Int4WeightOnlyConfig", "version": 1,
        "layout": {"_component_": "torchao.dtypes.Int4CPULayout"},
    }))  # fmt: skip
    assert type(cpu_layout.layout).__name__ == "Int4CPULayout"
    assert quantizer_limits(cpu_layout, torch.device("cpu"), torch.bfloat16) is None
    assert "Int4CPULayout is the CPU's int4 kernel" in quantizer_limits(
        cpu_layout, torch.device("cuda"), torch.bfloat16
    )
    tiled = Int4WeightOnlyConfig(version=1)
    assert "TensorCoreTiledLayout needs a CUDA GPU" in quantizer_limits(tiled, torch.device("cpu"), torch.bfloat16)
    assert quantizer_limits(Int8WeightOnlyConfig(), torch.device("cpu"), torch.float32) is None


def test_refused_through_tune_run_with_a_message_not_a_traceback(trained):
    overrides = [f"checkpoint_dir={trained}", "quantizer={_component_: torchao.quantization.Int4WeightOnlyConfig}"]
    proc = run_tune("generate", CONFIG, overrides)
    assert proc.returncode == 1
    assert "gqa_tune: 1 problem with quantizer; not starting:" in proc.stderr
    assert "fbgemm-gpu-genai" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_tune("generate", CONFIG, [f"checkpoint_dir={trained}", "quantizer={_component_: x.Nope}"])
    assert proc.returncode != 0 and "quantizer._component_" in proc.stderr and "Traceback" not in proc.stderr
