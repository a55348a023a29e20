"""The shared fine-tuning loop through ``tune run``: the ``loss:`` choices, pruning and the curves.

Each loss choice reruns the expected-loss file's fixed tiny run (6 steps, 2 micro-batches each) with only
``loss`` changed: the losses it logs are those of the default loss, up to float rounding.
"""

import json

import pytest
import torch
from conftest import TINY, read_logged
from PIL import Image
from test_expected_loss import CONFIG, EXPECTED, OVERRIDES, RECIPE

from gqa_tune.models import gqa_tiny
from gqa_tune.training.checkpoint import latest_checkpoint, load_checkpoint
from gqa_tune.training.curves import CURVES_FILE

LOSSES = {
    "chunked": ["loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss", "loss.num_output_chunks=4"],
    "ce_mean": ["loss._component_=torch.nn.CrossEntropyLoss"],
    "ce_sum": ["loss._component_=torch.nn.CrossEntropyLoss", "loss.reduction=sum"],
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_choice_trains_with_the_default_losses(tune, tmp_path, loss):
    out = tmp_path / "run"
    tune(RECIPE, CONFIG, [*OVERRIDES, *LOSSES[loss], f"output_dir={out}"])
    got = read_logged(out / "logs")
    expected = json.loads(EXPECTED.read_text())["losses"]
    assert len(got) == len(expected) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)


def test_keeps_the_last_checkpoints_and_draws_the_curves_beside_the_logs(tune, tmp_path):
    out = tmp_path / "run"
    overrides = [o for o in TINY if o != "eval=null"]
    overrides += ["max_steps_per_epoch=3", "epochs=2", "save_every_n_steps=2", "keep_last_n_checkpoints=2"]
    overrides += ["eval.dataset.max_examples=32", "eval.max_examples=16", f"output_dir={out}"]
    proc = tune("full_finetune_single_device", "configs/gqa_tiny/full.yaml", overrides)

    # saved in turn: step_2, epoch_0 (step 3), step_4, epoch_1 (step 6); the last two stay
    assert proc.stdout.count("removed checkpoint") == 2
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["epoch_1", "logs", "step_4"]
    path = latest_checkpoint(out)
    assert path == out / "epoch_1"
    weights, _, state = load_checkpoint(path)
    gqa_tiny(max_seq_len=128).load_state_dict(weights)
    assert state["global_step"] == 6

    picture = out / "logs" / CURVES_FILE
    assert f"wrote {picture}" in proc.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(picture) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 600
