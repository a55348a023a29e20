"""The ``gqa-tune`` command: ls, cp, validate, run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from gqa_tune import cli
from gqa_tune.schema import RECIPES

RECIPE, CONFIG = "full_finetune_single_device", "gqa_tiny/full"
CONFIG_FILE = REPO / "configs" / "gqa_tiny" / "full.yaml"
TINY = ["batch_size=8", "epochs=1", "max_steps_per_epoch=2", "eval=null", "tokenizer.max_seq_len=48"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name data files relative to the repository root


@pytest.fixture
def no_subprocess(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError(f"tried to run {args}")

    monkeypatch.setattr(cli.subprocess, "call", fail)


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- ls


def test_ls(capsys):
    code, out, _ = run_cli(capsys, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIGS", "WHAT"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(RECIPES) and CONFIG in rows[RECIPE]
    for name, entry in RECIPES.items():
        assert all(config in rows[name] for config in entry.configs) and entry.summary in rows[name]


# ---------------------------------------------------------------- cp


def test_cp_recipe_and_config(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "cp", RECIPE, str(tmp_path))
    assert code == 0
    assert (tmp_path / f"{RECIPE}.py").read_text() == (REPO / "recipes" / f"{RECIPE}.py").read_text()

    code, out, _ = run_cli(capsys, "cp", CONFIG, str(tmp_path / "mine"))  # the suffix is added
    assert code == 0 and "mine.yaml" in out
    assert (tmp_path / "mine.yaml").read_text() == CONFIG_FILE.read_text()

    code, _, _ = run_cli(capsys, "cp", "configs/gqa_tiny/full.yaml", str(tmp_path / "sub" / "by_path.yaml"))
    assert code == 0 and (tmp_path / "sub" / "by_path.yaml").is_file()


def test_cp_refuses_to_overwrite(capsys, tmp_path):
    dest = tmp_path / "mine.yaml"
    dest.write_text("mine: 1\n")
    code, _, err = run_cli(capsys, "cp", CONFIG, str(dest))
    assert code == 1
    assert "already exists" in err and "--force" in err
    assert dest.read_text() == "mine: 1\n"
    code, _, _ = run_cli(capsys, "cp", "--force", CONFIG, str(dest))
    assert code == 0 and dest.read_text() == CONFIG_FILE.read_text()


def test_cp_unknown_name(capsys, tmp_path):
    code, _, err = run_cli(capsys, "cp", "gqa_tiny/fulll", str(tmp_path))
    assert code == 1
    assert "unknown recipe or config 'gqa_tiny/fulll' (did you mean 'gqa_tiny/full'?)" in err
    assert RECIPE in err and CONFIG in err  # the choices
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- validate


def test_validate_ok(capsys):
    code, out, _ = run_cli(capsys, "validate", CONFIG)
    assert code == 0 and "config is valid" in out
    code, out, _ = run_cli(capsys, "validate", str(CONFIG_FILE), "epochs=2", "optimizer.lr=1e-3")
    assert code == 0 and "config is valid" in out


def test_validate_problems(capsys):
    code, out, err = run_cli(
        capsys, "validate", CONFIG, "epcohs=2", "optimizer.lrr=0.1", "model=gqa_tune.models.gqa_tinyy"
    )
    assert code == 1 and "config is valid" not in out
    assert "3 problems" in err
    assert "unknown key 'epcohs' (did you mean 'epochs'?)" in err
    assert "optimizer.lrr: unexpected keyword for torch.optim.AdamW (did you mean 'lr'?)" in err
    assert "model._component_: cannot import 'gqa_tune.models.gqa_tinyy'" in err


def test_validate_values(capsys):
    code, _, err = run_cli(capsys, "validate", CONFIG, "epochs=three", "gradient_accumulation_steps=0")
    assert code == 1 and "2 problems" in err
    assert "epochs: expected an int >= 1 (passes over the dataset), got 'three'" in err
    assert "gradient_accumulation_steps: expected an int >= 1 (micro-batches per optimizer step), got 0" in err


def test_validate_copied_config_and_explicit_recipe(capsys, tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text(CONFIG_FILE.read_text())
    code, _, err = run_cli(capsys, "validate", str(copy), "epcohs=2")
    assert code == 1 and "unknown key 'epcohs'" in err  # the recipe named in its header
    code, _, err = run_cli(capsys, "validate", str(copy), "epcohs=2", "--recipe", "nope")
    assert code == 1 and "unknown recipe 'nope'" in err


def test_validate_unknown_config(capsys):
    code, _, err = run_cli(capsys, "validate", "gqa_tiny/ful")
    assert code == 1 and "unknown config 'gqa_tiny/ful' (did you mean 'gqa_tiny/full'?)" in err


# ---------------------------------------------------------------- run


def test_run_resolves_names():
    command, config_path, recipe, overrides = cli.tune_run_command([RECIPE, "--config", CONFIG, "epochs=2"])
    assert command[-5:] == ["run", f"gqa_tune/recipes/{RECIPE}.py", "--config", str(CONFIG_FILE), "epochs=2"]
    assert Path(command[0]).name == "tune" or command[:3] == [sys.executable, "-m", "torchtune._cli.tune"]
    assert (config_path, recipe, overrides) == (CONFIG_FILE, RECIPE, ["epochs=2"])

    # torchrun's options stay in front of the recipe; paths and --config=... work too
    tokens = ["--nproc_per_node", "2", f"gqa_tune/recipes/{RECIPE}.py", "--config=configs/gqa_tiny/full.yaml", "a=1"]
    command, *_ = cli.tune_run_command(tokens)
    i = command.index("run")
    assert command[i:] == [
        "run",
        "--nproc_per_node",
        "2",
        f"gqa_tune/recipes/{RECIPE}.py",
        "--config",
        str(CONFIG_FILE),
        "a=1",
    ]

    with pytest.raises(cli.CLIError, match="unknown recipe 'full_finetune'"):
        cli.tune_run_command(["full_finetune", "--config", CONFIG])
    with pytest.raises(cli.CLIError, match="--config is required"):
        cli.tune_run_command([RECIPE, "epochs=1"])
    with pytest.raises(cli.CLIError, match="unknown config 'gqa_tiny/nope'"):
        cli.tune_run_command([RECIPE, "--config", "gqa_tiny/nope"])


def test_run_dry_run(capsys, no_subprocess):
    code, _, err = run_cli(capsys, "run", "--dry-run", RECIPE, "--config", CONFIG, "epochs=2")
    assert code == 0
    assert f"run gqa_tune/recipes/{RECIPE}.py --config {CONFIG_FILE} epochs=2" in err


def test_run_aborts_on_invalid_config(capsys, tmp_path, no_subprocess):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", RECIPE, "--config", CONFIG, *TINY, "epcohs=1", f"output_dir={out_dir}")
    assert code == 1
    assert "unknown key 'epcohs' (did you mean 'epochs'?)" in err and "not starting the recipe" in err
    assert not out_dir.exists()


def test_run_aborts_on_a_bad_value(capsys, tmp_path, no_subprocess):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "run", RECIPE, "--config", CONFIG, *TINY, "log_every_n_steps=0", f"output_dir={out_dir}"
    )
    assert code == 1 and "log_every_n_steps: expected an int >= 1" in err and "not starting the recipe" in err
    assert not out_dir.exists()


def test_run_trains(tmp_path):
    """End to end through the installed script and `tune run`: 2 steps of the tiny model."""
    script = Path(sys.executable).with_name("gqa-tune")
    exe = [str(script)] if script.is_file() else [sys.executable, "-m", "gqa_tune.cli"]
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [*exe, "run", RECIPE, "--config", CONFIG, *TINY, f"output_dir={out_dir}"],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"run gqa_tune/recipes/{RECIPE}.py --config {CONFIG_FILE}" in proc.stderr
    assert (out_dir / "LATEST").is_file() and (out_dir / "epoch_0" / "model.safetensors").is_file()
    assert "2/2" in proc.stderr  # the progress bar reached step 2 of 2


# ---------------------------------------------------------------- convert


def _tiny_hf_llama(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)


def test_convert_pools_a_hugging_face_directory(capsys, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src, dst = tmp_path / "mha", tmp_path / "gqa"
    _tiny_hf_llama(src)
    code, out, err = run_cli(capsys, "convert", str(src), str(dst), "--num-kv-heads", "2")
    assert code == 0, err
    assert f"wrote {dst}: 2 kv heads (mean of each group's heads)" in out
    source = AutoModelForCausalLM.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert model.config.num_key_value_heads == 2
    k_old = source.model.layers[0].self_attn.k_proj.weight  # [4 heads * 8, 32]
    k_new = model.model.layers[0].self_attn.k_proj.weight  # [2 heads * 8, 32]: the mean of each pair of heads
    torch.testing.assert_close(k_new, k_old.view(2, 2, 8, 32).mean(1).reshape(16, 32))
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_convert_refuses_bad_input_and_writes_nothing(capsys, tmp_path):
    src, dst = tmp_path / "mha", tmp_path / "gqa"
    _tiny_hf_llama(src)
    code, _, err = run_cli(capsys, "convert", str(src), str(dst), "--num-kv-heads", "3")
    assert code == 1 and "gqa-tune convert: " in err and "3" in err
    assert not dst.exists()
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "nope"), str(dst), "--num-kv-heads", "2")
    assert code == 1 and "nope" in err and not dst.exists()
