"""The generate recipe: greedy output equals a no-cache loop, seeded sampling repeats, clear errors.

Checkpoints are random-init models written with ``save_checkpoint`` (fast; no training).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO
from gqa_tune.recipes.generate import GenerateRecipe, take_prompt_args
from omegaconf import OmegaConf

from gqa_tune.data import ByteTokenizer
from gqa_tune.generation import generate, left_padded, new_tokens
from gqa_tune.models import gqa_tiny
from gqa_tune.training.checkpoint import save_checkpoint

CONFIG = "configs/gqa_tiny/generate.yaml"
BUILDER = {"_component_": "gqa_tune.models.gqa_tiny", "max_seq_len": 64}
PROMPTS = ["a=12 b=7 c=33 ?b=", "123+456=", "x=5 ?x="]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed: int) -> torch.nn.Module:
    """gqa_tiny with every matrix N(0, 0.3): varied greedy output with clear margins between top logits."""
    torch.manual_seed(seed)
    model = gqa_tiny(max_seq_len=64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with two checkpoints; LATEST names the second."""
    out = tmp_path_factory.mktemp("run")
    for seed, name in ((1, "epoch_0"), (2, "epoch_1")):
        model = random_model(seed)
        save_checkpoint(out, name, model, model.state_dict(), builder=BUILDER)
    return out


def make_cfg(**overrides):
    cfg = OmegaConf.load(REPO / CONFIG)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def run_recipe(**overrides):
    cfg = make_cfg(**overrides)
    recipe = GenerateRecipe(cfg)
    recipe.setup()
    return recipe, recipe.generate()


@torch.no_grad()
def greedy_no_cache(model, prompt_ids, max_new_tokens, stop_tokens):
    """Reference: the whole sequence through the model each step, argmax of the last logits."""
    tokens = list(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([tokens]))[0, -1].argmax())
        if nxt in stop_tokens:
            break
        out.append(nxt)
        tokens.append(nxt)
    return out


def test_greedy_matches_no_cache_loop(run_dir, capsys):
    recipe, result = run_recipe(checkpoint_dir=str(run_dir), prompts=PROMPTS, max_new_tokens=20)
    assert recipe.source == str(run_dir / "epoch_1")  # LATEST followed
    tok = ByteTokenizer()
    for prompt, ids in zip(PROMPTS, result["tokens"]):
        prompt_ids = tok.encode(prompt, add_bos=True, add_eos=False)
        assert ids == greedy_no_cache(recipe.model, prompt_ids, 20, tok.stop_tokens)
    assert result["texts"] == [tok.decode(ids) for ids in result["tokens"]]
    out = capsys.readouterr().out
    assert "prefill:" in out and "decode:" in out and "tokens/s" in out
    # gqa_tiny: 2 layers x (K + V) x batch 3 x 2 kv heads x (prompt 18 + 20) positions x head_dim 16 x fp32
    expected = 2 * 2 * 3 * 2 * (len(PROMPTS[0]) + 1 + 20) * 16 * 4
    assert result["kv_cache_bytes"] == expected
    assert f"KV cache: {expected} bytes" in out and f"would take {expected * 4} bytes" in out


def test_checkpoint_dir_itself_and_checkpointer_give_same_tokens(run_dir, tmp_path):
    _, direct = run_recipe(checkpoint_dir=str(run_dir / "epoch_0"), prompts=PROMPTS, max_new_tokens=10)
    _, latest = run_recipe(checkpoint_dir=str(run_dir), prompts=PROMPTS, max_new_tokens=10)
    assert direct["tokens"] != latest["tokens"]  # different weights, so the other checkpoint was loaded
    checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(run_dir / "epoch_0"),
        "checkpoint_files": ["model.safetensors"],
        "model_type": "LLAMA3_2",
        "output_dir": str(tmp_path / "unused"),
    }
    _, via_tt = run_recipe(checkpoint_dir=None, checkpointer=checkpointer, model=BUILDER, prompts=PROMPTS)
    _, again = run_recipe(checkpoint_dir=str(run_dir / "epoch_0"), prompts=PROMPTS)
    assert via_tt["tokens"] == again["tokens"]


def test_model_override_merges_into_stored_builder(run_dir):
    recipe, _ = run_recipe(checkpoint_dir=str(run_dir), prompts=["1+1="], max_new_tokens=2, model={"max_seq_len": 96})
    assert recipe.model.max_seq_len == 96


def test_seeded_sampling_is_reproducible(run_dir, capsys):
    kw = dict(checkpoint_dir=str(run_dir), prompts=PROMPTS, max_new_tokens=16, temperature=1.5)
    _, first = run_recipe(**kw, seed=7)
    _, second = run_recipe(**kw, seed=7)
    _, other = run_recipe(**kw, seed=8)
    assert first["tokens"] == second["tokens"]
    assert first["tokens"] != other["tokens"]
    _, top1 = run_recipe(**kw, seed=9, top_k=1)  # top-1 sampling is greedy
    _, greedy = run_recipe(checkpoint_dir=str(run_dir), prompts=PROMPTS, max_new_tokens=16)
    assert top1["tokens"] == greedy["tokens"]
    assert "sampling (temperature 1.5" in capsys.readouterr().out


def test_single_prompt_streams(run_dir, capsys):
    _, result = run_recipe(checkpoint_dir=str(run_dir), prompts=None, prompt="123+456=", max_new_tokens=12)
    out = capsys.readouterr().out
    text = result["texts"][0]
    assert out.startswith("123+456=" + text + "\n")


def test_take_prompt_args_keeps_equals_signs():
    argv = ["generate.py", "--config", "x.yaml", "prompt=a=1 b=2 ?a=", "max_new_tokens=3", "prompt=1+2="]
    assert take_prompt_args(argv) == ["a=1 b=2 ?a=", "1+2="]
    assert argv == ["generate.py", "--config", "x.yaml", "max_new_tokens=3"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"checkpoint_dir": "/nonexistent/run"}, "checkpoint_dir '/nonexistent/run' does not exist"),
        ({"checkpoint_dir": None}, "set checkpoint_dir"),
        (
            {"checkpoint_dir": None, "checkpointer": {"_component_": "x.Y"}},
            "checkpointer._component_: cannot import 'x.Y'",
        ),
    ],
)
def test_load_errors(overrides, message):
    cfg = make_cfg(**overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerateRecipe(cfg).setup()


def test_prompt_errors(run_dir):
    for bad in ({"prompts": []}, {"prompts": None}, {"prompts": ["ok", ""]}):
        recipe = GenerateRecipe(make_cfg(checkpoint_dir=str(run_dir), **bad))
        recipe.setup()
        with pytest.raises(ValueError, match="no prompts|is empty"):
            recipe.generate()
    long_prompt = "9" * 60  # 61 tokens with BOS; max_seq_len 64
    recipe = GenerateRecipe(make_cfg(checkpoint_dir=str(run_dir), prompts=["1+1=", long_prompt]))
    recipe.setup()
    with pytest.raises(ValueError, match=r"prompt 1 is 61 tokens long; with max_new_tokens=8 .*max_seq_len=64"):
        recipe.generate()
    with pytest.raises(ValueError, match="max_new_tokens: expected an int >= 1"):
        GenerateRecipe(make_cfg(checkpoint_dir=str(run_dir), max_new_tokens=0))


def test_tune_run_cli(run_dir, tmp_path, tune):
    """End to end through ``tune run``: prompt= with '=' in it; greedy ids (JSON output) equal the no-cache loop's."""
    out_file = tmp_path / "gen.json"
    proc = tune(
        "generate",
        CONFIG,
        [f"checkpoint_dir={run_dir}", "prompt=a=12 b=7 c=33 ?b=", "prompt=123+456=", "max_new_tokens=12",
         f"output_file={out_file}"],
    )  # fmt: skip
    data = json.loads(Path(out_file).read_text())
    assert data["prompts"] == ["a=12 b=7 c=33 ?b=", "123+456="]
    model, tok = random_model(2).eval(), ByteTokenizer()  # the weights LATEST names
    for prompt, ids in zip(data["prompts"], data["tokens"]):
        assert ids == greedy_no_cache(model, tok.encode(prompt, add_bos=True, add_eos=False), 12, tok.stop_tokens)
    assert data["num_heads"] == 8 and data["num_kv_heads"] == 2
    assert data["mha_kv_cache_bytes"] == 4 * data["kv_cache_bytes"]
    assert "decode:" in proc.stdout and "KV cache:" in proc.stdout


def test_tune_run_with_an_int8_kv_cache(run_dir, tmp_path, tune):
    """kv_cache_dtype=int8 through ``tune run``: the library's int8 greedy ids, at (16 + 4) / 64 of fp32's bytes.

    (Equality with fp32's tokens is shown on models with clear margins in tests/modules/test_kv_cache_int8.py;
    this random model's top two logits come within 0.1 of each other, which int8 noise may flip.)
    """
    out_file = tmp_path / "gen.json"
    tune("generate", CONFIG, [f"checkpoint_dir={run_dir}", "max_new_tokens=12", "kv_cache_dtype=int8",
                              f"output_file={out_file}", *(f"prompt={p}" for p in PROMPTS)])  # fmt: skip
    data = json.loads(Path(out_file).read_text())
    model, tok = random_model(2).eval(), ByteTokenizer()
    batch = left_padded(data["prompt_tokens"], tok.pad_id)
    tokens, _ = generate(model, batch, 12, pad_id=tok.pad_id, stop_tokens=tok.stop_tokens, kv_cache_dtype=torch.int8)
    assert data["tokens"] == new_tokens(tokens, batch.shape[1], tok.stop_tokens)[0]
    positions = max(len(ids) for ids in data["prompt_tokens"]) + 12
    fp32_bytes = 2 * 2 * len(PROMPTS) * 2 * positions * 16 * 4  # K and V, 2 layers, 3 rows, 2 kv heads, head_dim 16
    assert data["kv_cache_bytes"] == fp32_bytes * 20 // 64  # 16 int8 values + one float32 scale per token and head


def test_bad_kv_cache_dtype_is_refused_naming_it():
    with pytest.raises(ValueError, match="kv_cache_dtype: expected one of null, int8, float8_e4m3fn"):
        GenerateRecipe(make_cfg(kv_cache_dtype="int4"))


def test_compile_true_gives_the_eager_tokens_and_reports_rates(run_dir, capsys):
    eager_recipe, eager = run_recipe(checkpoint_dir=str(run_dir), prompts=PROMPTS, max_new_tokens=12)
    recipe, compiled = run_recipe(checkpoint_dir=str(run_dir), prompts=PROMPTS, max_new_tokens=12, compile=True)
    assert compiled["tokens"] == eager["tokens"]  # left-padded batch, stop tokens cut, as the eager loop gives
    assert compiled["compile_seconds"] > 0 and compiled["decode_tokens"] > 0 and compiled["decode_seconds"] > 0
    assert compiled["kv_cache_bytes"] > 0
    assert "compiled step (its first call" in capsys.readouterr().out
