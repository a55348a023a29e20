"""MHA -> GQA uptraining (Ainslie et al., 2023): convert a checkpoint's key/value heads, then train a little.

    tune run gqa_tune/recipes/uptrain.py --config configs/gqa_small/uptrain.yaml

The source model is loaded, its key/value projection heads are pooled to ``num_kv_heads``
groups (``method``: ``mean`` as in the paper, ``first`` or ``random``; see
:func:`gqa_tune.convert.pooling.convert_model_`), and the grouped model is trained on the
dataset for a fraction of the source's pre-training steps, then evaluated and saved as an
ordinary gqa_tune checkpoint whose ``config.json`` describes the grouped model (builder
``num_kv_heads`` = the new count), so ``recipes/generate.py`` and the fine-tune recipes load it.

Config keys, on top of :class:`~gqa_tune.training.finetune.FinetuneRecipe`'s:

- ``source_checkpoint_dir``: a gqa_tune checkpoint (``model.safetensors`` + ``config.json``), an
  ``output_dir`` with a ``LATEST`` file, a torchtune checkpointer's ``output_dir`` or any Hugging Face
  model directory. The model is rebuilt from ``config.json``'s ``gqa_tune.model`` builder (or, without
  one, from its architecture); ``model:`` without a ``_component_`` overrides single arguments
  (e.g. ``model.backend=sdpa``), ``model:`` with one replaces the builder.
- ``hf_model_dir``: instead, a Hugging Face model directory (Llama, Mistral, Qwen2, Gemma, Gemma 2);
  it replaces ``source_checkpoint_dir``, ``checkpointer`` and ``model``'s builder.
- ``checkpointer``: instead of ``source_checkpoint_dir``, any torchtune checkpointer; needs an
  explicit ``model:`` with a ``_component_``.
- ``num_kv_heads``: the target; must divide the source's kv heads. ``method``: ``mean`` / ``first`` /
  ``random``. ``conversion_seed``: for ``random`` (default: ``seed``).
- ``uptrain_steps``: optimizer steps; or ``uptrain_fraction``: that fraction of the source's
  ``global_step`` (from its ``recipe_state.pt``, or ``source_global_step`` when the source has
  none). Exactly one of the two. ``epochs`` and ``max_steps_per_epoch`` are derived from it
  (leave them null).
- ``eval_before_uptrain``: also evaluate the converted model before any training (logged at step 0).

The builder must take a ``num_kv_heads`` argument (e.g. ``gqa_tune.models.gqa_decoder``), since the
saved checkpoint is rebuilt with the new count.
"""

import inspect
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

from gqa_tune.config_check import ConfigError, exits_on_config_error
from gqa_tune.convert.pooling import check_conversion, convert_model_
from gqa_tune.schema import UptrainConfig
from gqa_tune.training.finetune import FinetuneRecipe
from gqa_tune.training.weights import WeightSource, fit_weights, load_weights


def builder_accepts_num_kv_heads(component: str) -> bool:
    """Whether the builder at ``component`` (a dotted path) takes a ``num_kv_heads`` argument."""
    fn = _get_component_from_path(component)
    params = inspect.signature(fn).parameters
    return "num_kv_heads" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


#: How to make a source checkpoint (appended to the error when ``source_checkpoint_dir`` is missing).
_PRETRAIN_HINT = (
    "pretrain first, e.g. `tune run gqa_tune/recipes/full_finetune_single_device.py "
    "--config configs/gqa_small/mha_pretrain.yaml`, or set hf_model_dir"
)


class UptrainRecipe(FinetuneRecipe):
    """Load an MHA (or grouped) checkpoint, pool its kv heads, uptrain, evaluate, save.

    Its own hooks: :meth:`load_model` (the source, converted), :meth:`plan_steps` (the step budget, from
    ``uptrain_steps`` or ``uptrain_fraction`` of the source's steps, in whole epochs) and
    :meth:`resume_settings` (the budget too).
    """

    SCHEMA = UptrainConfig
    CHECKPOINT_DIR_KEY = "source_checkpoint_dir"
    WEIGHTS_REQUIRED = True

    def __init__(self, cfg: DictConfig, *, overrides: Sequence[str] = ()) -> None:
        super().__init__(cfg, overrides=overrides)
        steps, fraction = self.cfg.uptrain_steps, self.cfg.uptrain_fraction
        if (steps is None) == (fraction is None):
            raise ConfigError(
                "set exactly one of uptrain_steps (optimizer steps) and uptrain_fraction (a fraction of the "
                f"source's pre-training steps); got uptrain_steps={steps!r}, uptrain_fraction={fraction!r}"
            )
        self.eval_before: Optional[Dict[str, float]] = None

    # ------------------------------------------------------------ the source, converted

    def load_model(
        self, cfg: DictConfig, resume_path: Optional[Path]
    ) -> Tuple[torch.nn.Module, DictConfig, WeightSource]:
        """The source model (:func:`~gqa_tune.training.weights.load_weights`: ``hf_model_dir``, ``checkpointer`` +
        ``model``, or ``source_checkpoint_dir``) with its weights, converted to ``num_kv_heads`` kv heads, and its
        builder with the new count; when resuming, the converted model then takes the checkpoint's weights. The
        source stays the weights' origin (its steps set ``uptrain_fraction``'s budget)."""
        state_dict, builder, source = load_weights(
            cfg, checkpoint_key=self.CHECKPOINT_DIR_KEY, required=True, hint=_PRETRAIN_HINT
        )
        component = builder.get("_component_")
        if not component:
            raise ConfigError(f"the model builder from {source.name} has no _component_")
        if not builder_accepts_num_kv_heads(component):
            raise ConfigError(
                f"model builder {component} has no num_kv_heads argument, so the uptrained model could not be "
                "rebuilt with its new kv heads; use a builder that takes num_kv_heads (e.g. "
                "gqa_tune.models.gqa_decoder with the same shape)"
            )
        model = self.build_model(builder)
        fit_weights(model, state_dict, source)
        del state_dict
        source_kv_heads = model.layers[0].attn.num_kv_heads
        check_conversion(source_kv_heads, cfg.num_kv_heads, cfg.method)
        seed = self.seed if cfg.conversion_seed is None else cfg.conversion_seed
        convert_model_(model, cfg.num_kv_heads, cfg.method, seed=seed)
        print(
            f"uptrain: {source.name} ({source_kv_heads} kv heads) -> {cfg.num_kv_heads} kv heads "
            f"by {cfg.method!r} pooling",
            flush=True,
        )
        if resume_path is not None:
            resumed, _, at = load_weights(cfg, checkpoint_key=self.CHECKPOINT_DIR_KEY, resume_from=resume_path)
            fit_weights(model, resumed, at)
        return model, OmegaConf.merge(builder, {"num_kv_heads": cfg.num_kv_heads}), source

    # ------------------------------------------------------------ the step budget

    def uptrain_steps(self, source: WeightSource) -> int:
        """The optimizer steps to run: ``uptrain_steps``, or ``uptrain_fraction`` of the source's steps
        (``source_global_step``, else its ``recipe_state.pt``'s ``global_step``)."""
        if self.cfg.uptrain_steps is not None:
            return self.cfg.uptrain_steps
        source_steps = self.cfg.source_global_step
        state = source.recipe_state
        if source_steps is None and state is not None and "global_step" in state:
            source_steps = int(state["global_step"])
        if source_steps is None:
            raise ConfigError(
                "uptrain_fraction needs the source's pre-training steps, but the source has no recipe_state.pt "
                "with a global_step: set source_global_step=N or give uptrain_steps instead"
            )
        return max(1, round(float(self.cfg.uptrain_fraction) * int(source_steps)))

    def plan_steps(self, batches_per_epoch: int, source: WeightSource) -> Tuple[int, int]:
        """The budget in whole epochs: ``ceil(steps / batches)`` epochs of ``ceil(steps / epochs)`` steps."""
        steps = self.uptrain_steps(source)
        epochs = math.ceil(steps / batches_per_epoch)
        per_epoch = math.ceil(steps / epochs)
        note = "" if epochs * per_epoch == steps else f" ({steps} requested, rounded up to whole epochs)"
        print(f"uptrain: {epochs * per_epoch} steps in {epochs} epoch(s){note}", flush=True)
        return epochs, per_epoch

    def resume_settings(self, cfg: DictConfig) -> Dict[str, Any]:
        return {
            **super().resume_settings(cfg),
            "uptrain_steps": cfg.uptrain_steps,
            "uptrain_fraction": cfg.uptrain_fraction,
            "num_kv_heads": cfg.num_kv_heads,
            "method": cfg.method,
        }

    # ------------------------------------------------------------ training

    def train(self) -> None:
        if self.cfg.eval_before_uptrain and self.global_step == 0 and self.cfg.eval is not None:
            self.eval_before = dict(self.evaluate())
        super().train()


@config.parse
@exits_on_config_error
def recipe_main(cfg: DictConfig) -> None:
    recipe = UptrainRecipe(cfg, overrides=sys.argv[1:])  # checks the whole config first
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
