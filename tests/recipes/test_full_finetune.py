"""The full fine-tune recipe, end to end through ``tune run``."""

import shutil

import pytest
import torch
from conftest import TINY, read_logged
from torchtune.models.llama3_2 import llama3_2
from torchtune.training import FullModelHFCheckpointer

import gqa_tune.training.checkpoint as ckpt
from gqa_tune.models import gqa_tiny
from gqa_tune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

CONFIG = "configs/gqa_tiny/full.yaml"
RECIPE = "full_finetune_single_device"


def test_trains_saves_and_both_libraries_load_the_checkpoint(tune, tmp_path):
    out = tmp_path / "run"
    tune(RECIPE, CONFIG, [*TINY, "max_steps_per_epoch=12", "optimizer.lr=1e-2", f"output_dir={out}"])
    losses = read_logged(out / "logs")
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # falling
    path = latest_checkpoint(out)
    assert path == out / "epoch_0" and (path / "model.safetensors").is_file() and (path / "config.json").is_file()

    # gqa_tune reads it back
    state_dict, config, state = load_checkpoint(path)
    ours = gqa_tiny(max_seq_len=128)
    ours.load_state_dict(state_dict)
    assert config["num_key_value_heads"] == 2 and state["global_step"] == 12

    # torchtune's own HF checkpointer reads it too, into torchtune's llama3_2 of the same shape
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(path), checkpoint_files=["model.safetensors"], model_type="LLAMA3_2",
        output_dir=str(tmp_path / "tt_out"),
    )  # fmt: skip
    theirs = llama3_2(vocab_size=260, num_layers=2, num_heads=8, num_kv_heads=2, embed_dim=128,
                      max_seq_len=128, intermediate_dim=384, rope_base=10_000, scale_factor=1)  # fmt: skip
    theirs.load_state_dict(checkpointer.load_checkpoint()["model"])
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens), rtol=1e-4, atol=1e-4)

    # transformers rebuilds the same function from config.json, with the byte tokenizer's ids
    from transformers import AutoModelForCausalLM

    from gqa_tune.data.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    )  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cut", ["epoch", "mid_epoch"])
def test_resume_logs_the_same_losses_as_an_uninterrupted_run(tune, tmp_path, cut):
    full = tmp_path / "full"
    common = [*TINY, "max_steps_per_epoch=4", "epochs=2", "save_every_n_steps=2"]
    tune(RECIPE, CONFIG, [*common, f"output_dir={full}"])
    expected = read_logged(full / "logs")
    assert len(expected) == 8

    # An interrupted run: only the checkpoint taken at the cut survives.
    name, done = ("epoch_0", 4) if cut == "epoch" else ("step_2", 2)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / name, resumed / name)
    (resumed / "LATEST").write_text(name + "\n")
    tune(RECIPE, CONFIG, [*common, f"output_dir={resumed}", "resume_from_checkpoint=True"])
    got = read_logged(resumed / "logs")
    assert got == pytest.approx(expected[done:], rel=1e-6, abs=1e-7)
    final_a, _, _ = load_checkpoint(full / "epoch_1")
    final_b, _, _ = load_checkpoint(resumed / "epoch_1")
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-5, atol=1e-6)


def test_resume_without_a_checkpoint_says_so(tune, tmp_path):
    proc = tune(RECIPE, CONFIG, [*TINY, f"output_dir={tmp_path}", "resume_from_checkpoint=True"], check=False)
    assert proc.returncode != 0
    assert "nothing to resume in output_dir" in proc.stderr and str(tmp_path / "LATEST") in proc.stderr


@pytest.mark.parametrize(
    "extra", [["dtype=bf16"], ["enable_activation_checkpointing=True", "gradient_accumulation_steps=2"]]
)
def test_precision_and_memory_options_run(tune, tmp_path, extra):
    out = tmp_path / "run"
    tune(RECIPE, CONFIG, [*TINY, "max_steps_per_epoch=2", f"output_dir={out}", *extra])
    losses = read_logged(out / "logs")
    assert len(losses) == 2 and all(v == v for v in losses)


def _tiny_checkpoint(tmp_path, name="epoch_0"):
    model = gqa_tiny()
    return save_checkpoint(tmp_path, name, model, model.state_dict(), recipe_state={"global_step": 1}), model


def test_a_write_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    first, model = _tiny_checkpoint(tmp_path)
    before = load_checkpoint(first)[0]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt, "write_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "epoch_0", model, {k: v + 1 for k, v in model.state_dict().items()})
    assert latest_checkpoint(tmp_path) == first
    after = load_checkpoint(first)[0]
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "epoch_1", model, model.state_dict())
    assert not (tmp_path / "epoch_1").exists() and latest_checkpoint(tmp_path) == first


def test_corrupt_or_missing_checkpoints_raise_value_errors_naming_the_file(tmp_path):
    path, _ = _tiny_checkpoint(tmp_path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"cannot read checkpoint '{path}'"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
