"""The packed config through ``tune run``: rows of several examples train, evaluate and save."""

import math

from conftest import read_logged

CONFIG = "configs/gqa_tiny/full_packed.yaml"


def test_packed_rows_train_through_tune_run(tune, tmp_path):
    out = tmp_path / "run"
    tune("full_finetune_single_device", CONFIG,
         ["batch_size=2", "max_steps_per_epoch=8", "epochs=1", "log_every_n_steps=1", "eval.max_examples=8",
          f"output_dir={out}"])  # fmt: skip
    losses = read_logged(out / "logs")
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # it learns
    assert (out / "epoch_0" / "model.safetensors").is_file()
    assert read_logged(out / "logs", "heldout_loss")  # the evaluation of unpacked examples ran after packed training
