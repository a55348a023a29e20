"""Hardening, round 3: what new users and a probe still found, each refused cleanly (naming the key and the values)
or answered correctly.

Most cases run the recipes in-process: a refusal is a ``ConfigError`` raised by ``setup`` before any step, which
``tune run`` prints as ``gqa_tune: N problem(s) ...; not starting`` (one case checks that end to end).
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY, read_logged, run_tune
from gqa_tune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice
from gqa_tune.recipes.generate import GenerateRecipe
from gqa_tune.recipes.lora_finetune_single_device import LoRAFinetuneRecipeSingleDevice
from helpers import tiny_hf_model
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import gqa_tune
from gqa_tune import catalog
from gqa_tune import config_check as cc
from gqa_tune.data.packing import packed_collate
from gqa_tune.hf import builder_from_hf_config
from gqa_tune.models import gqa_tiny
from gqa_tune.training.checkpoint import LATEST, latest_checkpoint

transformers = pytest.importorskip("transformers")

ONE_STEP = [*TINY, "max_steps_per_epoch=1"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name data files relative to the repository root


def config(name, *overrides):
    return cc.load_config(catalog.find_config(name), list(overrides))


def setup_refuses(recipe_class, cfg, *named):
    """Building ``recipe_class(cfg)`` or its ``setup(cfg)`` raises a ``ConfigError`` (the clean refusal) naming
    every ``named`` text: the config's parse refuses what it can see, setup what needs the model."""
    with pytest.raises(cc.ConfigError) as info:
        recipe_class(cfg).setup(cfg)
    for text in named:
        assert text in str(info.value), str(info.value)
    return info.value


# ---------------------------------------------------------------- 2. generation


@pytest.mark.parametrize("stop", [[10**6], [-1], [3, 300]])
def test_stop_tokens_outside_the_vocabulary_are_refused(stop):
    model = gqa_tiny()
    with pytest.raises(ValueError, match=r"stop_tokens \[.*\] lie outside the vocabulary \[0, 260\)"):
        gqa_tune.generate(model, torch.tensor([[1, 2, 3]]), 4, stop_tokens=stop)


def test_the_generate_recipe_says_when_every_row_stops_at_once(tmp_path, capsys):
    """A model whose every first token is EOS: the answers are empty, and the recipe says why."""
    out = tmp_path / "eos"
    model = gqa_tiny()
    with torch.no_grad():  # layers that add nothing, and a tied output where EOS (257) has the largest logit
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 0.0)
        model.tok_embeddings.weight.fill_(1.0)
        model.tok_embeddings.weight[257].fill_(2.0)
    from gqa_tune.training.checkpoint import save_checkpoint

    save_checkpoint(out, "epoch_0", model, model.state_dict(), builder={"_component_": "gqa_tune.models.gqa_tiny"})
    cfg = config("gqa_tiny/generate", f"checkpoint_dir={out}", "max_new_tokens=4")
    recipe = GenerateRecipe(cfg)
    recipe.setup(cfg)
    result = recipe.generate(cfg)
    assert result["tokens"] == [[], [], [], []] and result["stopped"] == [True] * 4
    printed = capsys.readouterr().out
    assert "every prompt: the first new token was a stop token ([257]), so the answer is empty" in printed
    assert "and nothing was decoded" in printed


# ---------------------------------------------------------------- 3. hf_model_dir and weights


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A Llama directory whose vocabulary (200) cannot hold the byte tokenizer's ids (260)."""
    path = tmp_path_factory.mktemp("small_vocab")
    tiny_hf_model(path, "llama3", vocab_size=200)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_hf_model(path, "llama3")
    return path


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused_at_setup(small_vocab, tmp_path):
    cfg = config("gqa_tiny/full", *ONE_STEP, f"output_dir={tmp_path / 'out'}", f"hf_model_dir={small_vocab}")
    setup_refuses(
        FullFinetuneRecipeSingleDevice, cfg,
        f"hf_model_dir '{small_vocab}': config.json: vocab_size 200 is smaller than the tokenizer's "
        "(gqa_tune.data.byte_tokenizer) 260 ids",
    )  # fmt: skip
    gen = config("gqa_tiny/generate", f"hf_model_dir={small_vocab}")
    setup_refuses(GenerateRecipe, gen, "vocab_size 200 is smaller than the tokenizer's")


def test_gqa_tune_validate_checks_hf_model_dir(small_vocab, llama_dir, tmp_path):
    from gqa_tune.cli import main

    assert main(["validate", "gqa_tiny/full", f"hf_model_dir={llama_dir}"]) == 0
    for value, named in (
        (small_vocab, "vocab_size 200 is smaller than the tokenizer's (gqa_tune.data.byte_tokenizer) 260 ids"),
        (tmp_path / "missing", f"hf_model_dir '{tmp_path / 'missing'}' does not exist"),
        (tmp_path, "has no config.json: it is not a Hugging Face model directory"),
    ):
        got = cc.check_config_file(catalog.find_config("gqa_tiny/full"), [f"hf_model_dir={value}"])
        assert len(got) == 1 and named in got[0], got
    odd = tmp_path / "phi"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    (got,) = cc.check_config_file(catalog.find_config("gqa_tiny/full"), [f"hf_model_dir={odd}"])
    assert "model_type='phi3' is not supported by gqa_tune's builders" in got


def test_validate_without_a_recipe_does_not_call_the_config_valid(tmp_path, capsys):
    from gqa_tune.cli import main

    copy = tmp_path / "mine.yaml"
    copy.write_text("\n".join(line for line in catalog.find_config("gqa_tiny/full").read_text().splitlines()
                              if "tune run" not in line))  # fmt: skip
    assert main(["validate", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "no key was checked: gqa-tune cannot tell which recipe reads it. Name it with --recipe NAME" in err
    assert main(["validate", str(copy), "--recipe", "full_finetune_single_device"]) == 0
    assert "config is valid" in capsys.readouterr().out


def test_an_embedding_that_does_not_match_config_json_is_refused(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    settings = json.loads((broken / "config.json").read_text())
    settings["vocab_size"] = 280  # the weights hold 300 rows
    (broken / "config.json").write_text(json.dumps(settings))
    cfg = config("gqa_tiny/full", *ONE_STEP, f"output_dir={tmp_path / 'out'}", f"hf_model_dir={broken}")
    setup_refuses(
        FullFinetuneRecipeSingleDevice, cfg,
        f"hf_model_dir '{broken}': config.json says vocab_size=280, hidden_size=64, but model.embed_tokens.weight "
        "has shape (300, 64)",
    )  # fmt: skip


def test_an_empty_hf_model_dir_is_refused(tmp_path):
    """``hf_model_dir=''`` (a shell's ``hf_model_dir=$UNSET`` too) used to train from random weights, exit 0."""
    (got,) = cc.check_config_file(catalog.find_config("gqa_tiny/full"), ["hf_model_dir="])
    assert got.startswith("hf_model_dir: given no value on the command line (hf_model_dir=)"), got
    for literal in ("''", "' '"):
        (got,) = cc.check_config_file(catalog.find_config("gqa_tiny/full"), [f"hf_model_dir={literal}"])
        assert got.startswith("hf_model_dir: expected a string") and got.endswith(": empty"), got
    assert cc.check_config_file(catalog.find_config("gqa_tiny/full"), ["hf_model_dir=null"]) == []
    out = tmp_path / "out"
    proc = run_tune("full_finetune_single_device", "configs/gqa_tiny/full.yaml",
                    [*ONE_STEP, f"output_dir={out}", "hf_model_dir="], timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "hf_model_dir: given no value on the command line" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_integer_weights_are_refused_not_cast(llama_dir, tmp_path):
    broken = tmp_path / "ints"
    shutil.copytree(llama_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"].round().to(torch.int8)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    cfg = config("gqa_tiny/full", *ONE_STEP, f"output_dir={tmp_path / 'out'}", f"hf_model_dir={broken}")
    setup_refuses(
        FullFinetuneRecipeSingleDevice, cfg,
        f"hf_model_dir '{broken}': model.layers.0.mlp.up_proj.weight (torch.int8) hold integer values",
    )  # fmt: skip
    with pytest.raises(ValueError, match="hold integer values"):
        gqa_tune.from_pretrained(broken)


def test_a_gemma2_config_with_a_null_query_pre_attn_scalar_is_refused():
    settings = dict(
        model_type="gemma2", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    assert builder_from_hf_config(settings)["query_pre_attn_scalar"] == 256  # absent: transformers' default
    with pytest.raises(ValueError, match=r"query_pre_attn_scalar=None is not supported .*gemma2: a positive number"):
        builder_from_hf_config({**settings, "query_pre_attn_scalar": None})
    with pytest.raises(Exception, match="query_pre_attn_scalar"):  # transformers refuses it too
        transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**settings, "query_pre_attn_scalar": None}))


# ---------------------------------------------------------------- 5. recipes


@pytest.mark.parametrize(
    "name, overrides, named",
    [
        ("gqa_tiny/lora", ["model.lora_rank=0"], "model: lora_rank must be a positive int, got 0"),
        ("gqa_tiny/full", ["dataset.packed=maybe"], "dataset: packed must be True or False, got 'maybe'"),
        (
            "gqa_tiny/qlora",
            ["model._component_=gqa_tune.models.qlora_gqa_decoder", "model.vocab_size=260", "model.num_layers=1",
             "model.num_heads=6", "model.num_kv_heads=2", "model.embed_dim=36", "model.intermediate_dim=48"],
            "model: cannot quantize layers.0.attn.q_proj to NF4: its weight of shape (36, 36) has 1296 entries",
        ),
    ],
)  # fmt: skip
def test_a_value_a_component_refuses_is_a_clean_refusal(name, overrides, named, tmp_path):
    recipe = LoRAFinetuneRecipeSingleDevice if "lora" in name else FullFinetuneRecipeSingleDevice
    extra = ["base_checkpoint_dir=null", "init_from_scratch=true"] if "lora" in name else []
    cfg = config(name, *ONE_STEP, *extra, f"output_dir={tmp_path / 'out'}", *overrides)
    setup_refuses(recipe, cfg, named)


def test_tune_run_prints_a_components_refusal_without_a_traceback(tmp_path):
    out = tmp_path / "out"
    proc = run_tune("lora_finetune_single_device", "configs/gqa_tiny/lora.yaml", [
        *ONE_STEP, "base_checkpoint_dir=null", "init_from_scratch=true", f"output_dir={out}", "model.lora_rank=0",
    ], timeout=120)  # fmt: skip
    assert proc.returncode == 1
    # the config check builds the model on the meta device first, so the refusal comes before setup
    refusal = "gqa_tune: 1 problem with the config; not starting:\n  model: lora_rank must be a positive int"
    assert refusal in proc.stderr
    assert "Traceback" not in proc.stderr and "saved checkpoint" not in proc.stdout + proc.stderr
    assert not (out / "epoch_0").exists()


def test_an_empty_prompt_is_a_clean_refusal(monkeypatch):
    """``prompt=`` on the command line (the generate recipe reads ``prompt=TEXT`` verbatim) or ``prompt: ''``."""
    import gqa_tune.recipes.generate as recipe_module

    cfg = config("gqa_tiny/generate")
    monkeypatch.setattr(recipe_module, "_CLI_PROMPTS", [""])
    with pytest.raises(cc.ConfigError, match="prompt 0 is empty or not text: ''"):
        GenerateRecipe(cfg).prompts(cfg)
    monkeypatch.setattr(recipe_module, "_CLI_PROMPTS", [])
    with pytest.raises(cc.ConfigError, match="prompt 1 is empty or not text: ''"):
        GenerateRecipe(cfg).prompts(OmegaConf.merge(cfg, {"prompts": ["a", ""]}))


def test_packed_collate_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="packed_collate needs at least one packed row, got an empty batch"):
        packed_collate([])


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """An output_dir with epoch_0 (step 1) and step_2 (step 2), trained in-process."""
    out = tmp_path_factory.mktemp("two") / "out"
    cfg = config("gqa_tiny/full", *TINY, "max_steps_per_epoch=3", "save_every_n_steps=2", f"output_dir={out}")
    recipe = FullFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    return out


def test_a_missing_latest_falls_back_to_the_newest_complete_checkpoint(two_checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    (out / LATEST).unlink()  # a save killed before its first LATEST was written
    with pytest.warns(UserWarning, match=f"'{out}' has no LATEST file; using its newest complete checkpoint"):
        assert latest_checkpoint(out) == out / "epoch_0"
    cfg = config("gqa_tiny/full", *TINY, "max_steps_per_epoch=3", f"output_dir={out}", "resume_from_checkpoint=true")
    recipe = FullFinetuneRecipeSingleDevice(cfg)
    with pytest.warns(UserWarning, match="has no LATEST file"):
        recipe.setup(cfg)
    assert recipe.global_step == 3
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_torchtunes_keys_are_implemented_or_refused_with_what_to_use(tmp_path):
    got = cc.check_config_file(catalog.find_config("gqa_tiny/full"), ["enable_activation_offloading=true"])
    assert "gqa_tune does not offload activations; to save activation memory set enable_activation_checkpointing" in (
        got[0]
    )
    got = cc.check_config_file(catalog.find_config("gqa_tiny/lora"), ["save_adapter_weights_only=true"])
    assert "every LoRA checkpoint already holds the adapter alone, in its adapter/ directory" in got[0]
    assert cc.check_config_file(
        catalog.find_config("gqa_tiny/lora"), ["save_adapter_weights_only=false", "enable_activation_offloading=false"]
    ) == []
    cfg = config("gqa_tiny/full", *ONE_STEP, f"output_dir={tmp_path / 'a'}", "run_val_every_n_steps=2")
    setup_refuses(FullFinetuneRecipeSingleDevice, cfg, "run_val_every_n_steps=2 needs an evaluation to run")


def test_run_val_every_n_steps_peak_memory_and_the_profiler(tmp_path):
    """torchtune's periodic validation, peak-memory logging and profiler, with their torchtune meanings."""
    out = tmp_path / "out"
    cfg = config(
        "gqa_tiny/full", *TINY, "max_steps_per_epoch=4", f"output_dir={out}", "run_val_every_n_steps=2",
        "log_peak_memory_stats=true", "eval.max_examples=4",
    )  # fmt: skip
    OmegaConf.update(cfg, "profiler", {
        "_component_": "torchtune.training.setup_torch_profiler", "enabled": True, "cpu": True, "cuda": False,
        "output_dir": str(out / "profiling"), "wait_steps": 1, "warmup_steps": 1, "active_steps": 1, "num_cycles": 1,
    }, force_add=True)  # fmt: skip
    recipe = FullFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    assert [step for step, _ in recipe.eval_history] == [2, 4]  # every 2 steps, then the final evaluation
    peak = read_logged(out / "logs", "peak_memory_rss")
    assert len(peak) == 4 and all(value > 0.01 for value in peak)  # GiB
    assert list((out / "profiling").rglob("*.pt.trace.json.gz")), "the profiler wrote no trace"


def test_setup_logs_parameters_resume_and_packing(tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "packed"
    cfg = config("gqa_tiny/full_packed", *ONE_STEP, f"output_dir={out}")
    recipe = FullFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    text = caplog.text
    total = sum(p.numel() for p in recipe.model.parameters())
    assert f"model: {total:,} parameters, {total:,} trainable (100.00%)" in text
    assert "packed data: " in text and "documents per row" in text and "% padding" in text
    recipe.train()
    caplog.clear()
    again = OmegaConf.merge(cfg, {"resume_from_checkpoint": True})
    FullFinetuneRecipeSingleDevice(again).setup(again)
    assert f"resumed from step 1 of {out / 'epoch_0'}" in caplog.text


def test_qlora_setup_says_the_base_is_nf4(tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = config("gqa_tiny/qlora", *ONE_STEP, "base_checkpoint_dir=null", "init_from_scratch=true",
                 f"output_dir={tmp_path / 'q'}")  # fmt: skip
    LoRAFinetuneRecipeSingleDevice(cfg).setup(cfg)
    assert "trainable (" in caplog.text and "the frozen base in NF4 (QLoRA):" in caplog.text


def test_cli_polish(tmp_path, llama_dir, capsys):
    from gqa_tune.cli import main

    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    what = lines[0].index("WHAT")
    assert all(line[what - 2 : what] == "  " for line in lines)  # the columns never run together
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "x").write_text("x")
    assert main(["convert", str(llama_dir), str(dst), "--num-kv-heads", "1"]) == 1
    err = capsys.readouterr().err
    assert "exists and is not empty; pass -f (--force) to replace it" in err and "overwrite=True" not in err


def test_no_torchao_notice_on_import():
    proc = subprocess.run([sys.executable, "-c", "import gqa_tune, gqa_tune.quantization"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


# ---------------------------------------------------------------- 6. from_pretrained


def test_from_pretrained_loads_hf_directories_checkpoints_and_output_dirs(llama_dir, two_checkpoints):
    tokens = torch.randint(0, 300, (2, 20))
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    model = gqa_tune.from_pretrained(llama_dir)
    assert isinstance(model.layers[0].attn, gqa_tune.MultiHeadAttention) and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    latest = gqa_tune.from_pretrained(two_checkpoints)  # follows LATEST (epoch_0, the last save)
    direct = gqa_tune.from_pretrained(two_checkpoints / "epoch_0")
    other = gqa_tune.from_pretrained(two_checkpoints / "step_2", backend="math", dtype=torch.float64)
    assert other.layers[0].attn.backend == "math" and next(other.parameters()).dtype == torch.float64
    small = tokens.clamp(max=259)
    with torch.no_grad():
        torch.testing.assert_close(latest(small), direct(small), rtol=0, atol=0)
        assert not torch.equal(other(small).float(), direct(small))  # step 2's weights, not step 3's
    with pytest.raises(ValueError, match="from_pretrained: path '/nonexistent' does not exist"):
        gqa_tune.from_pretrained("/nonexistent")


def test_the_generate_recipe_compiles_a_quantized_model(two_checkpoints):
    """``compile: true`` with ``quantizer:`` (int8 weight-only, torchao's fast path on a CPU) gives the eager tokens."""
    quantizer = {"_component_": "torchao.quantization.Int8WeightOnlyConfig"}
    results = {}
    for compile in (False, True):
        cfg = config("gqa_tiny/generate", f"checkpoint_dir={two_checkpoints}", "max_new_tokens=4",
                     f"compile={str(compile).lower()}")  # fmt: skip
        OmegaConf.update(cfg, "quantizer", quantizer, force_add=True)
        recipe = GenerateRecipe(cfg)
        recipe.setup(cfg)
        assert recipe.quantized > 0
        results[compile] = recipe.generate()["tokens"]
    assert results[True] == results[False]
