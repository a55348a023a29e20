"""Full fine-tuning (or training from scratch) of a gqa_tune model on one device.

    tune run gqa_tune/recipes/full_finetune_single_device.py --config configs/gqa_tiny/full.yaml

See :class:`gqa_tune.training.finetune.FinetuneRecipe` for the config keys.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from gqa_tune.config_check import exits_on_config_error
from gqa_tune.training.finetune import FinetuneRecipe


class FullFinetuneRecipeSingleDevice(FinetuneRecipe):
    """Single device: the shared loop as it is."""


@config.parse
@exits_on_config_error
def recipe_main(cfg: DictConfig) -> None:
    recipe = FullFinetuneRecipeSingleDevice(cfg, overrides=sys.argv[1:])  # checks the whole config first
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
