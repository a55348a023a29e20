"""The training progress bar redraws at most every PROGRESS_INTERVAL seconds, its postfix no more often."""

import pytest
from gqa_tune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice
from helpers import REPO
from tqdm import tqdm

from gqa_tune.catalog import find_config
from gqa_tune.config_check import load_config
from gqa_tune.training import finetune


def test_the_interval_is_a_few_redraws_a_second():
    assert 0 < finetune.PROGRESS_INTERVAL <= 0.5
    bar = finetune.progress_bar(10, 0, disable=False)
    try:
        assert bar.mininterval == finetune.PROGRESS_INTERVAL
    finally:
        bar.close()


@pytest.fixture
def counting_bar(monkeypatch):
    class CountingBar(tqdm):
        displays = 0
        postfix_refreshes = []

        def display(self, *args, **kwargs):
            type(self).displays += 1
            return super().display(*args, **kwargs)

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            type(self).postfix_refreshes.append(refresh)
            return super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    monkeypatch.setattr(finetune, "tqdm", CountingBar)
    return CountingBar


def test_steps_within_the_interval_neither_redraw_nor_update_the_postfix(tmp_path, monkeypatch, counting_bar):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(finetune, "PROGRESS_INTERVAL", 1e6)  # every step falls within one interval
    overrides = ["batch_size=8", "max_steps_per_epoch=6", "epochs=1", "eval=null", "tokenizer.max_seq_len=48"]
    cfg = load_config(find_config("gqa_tiny/full"), [*overrides, f"output_dir={tmp_path}"])
    recipe = FullFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
    assert len(recipe.loss_history) == 6
    assert counting_bar.postfix_refreshes == [False]  # the first step's, shown at the next redraw
    # drawn when opened, around the one "saved checkpoint" line (tqdm.write clears and redraws), when closed
    assert counting_bar.displays <= 4, counting_bar.displays
