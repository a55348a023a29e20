"""The shared fine-tuning loop through ``tune run``: the ``loss:`` choices.

Each loss choice reruns the expected-loss file's fixed tiny run (6 steps, 2 micro-batches each) with only
``loss`` changed: the losses it logs are those of the default loss, up to float rounding.
"""

import json

import pytest
import torch
from conftest import read_logged
from test_expected_loss import CONFIG, EXPECTED, OVERRIDES, RECIPE

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
