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
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

from gqa_tune.config_check import ConfigError, build_component, check_config, exits_on_config_error
from gqa_tune.convert.pooling import METHODS, check_conversion, convert_model_
from gqa_tune.schema import UptrainConfig
from gqa_tune.training.finetune import FinetuneRecipe
from gqa_tune.training.weights import fit_weights, load_weights


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
    """Load an MHA (or grouped) checkpoint, pool its kv heads, uptrain, evaluate, save."""

    SCHEMA = UptrainConfig

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.target_kv_heads = cfg.get("num_kv_heads")
        self.method = cfg.get("method", "mean")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.target_kv_heads, int) or isinstance(self.target_kv_heads, bool):
            raise ConfigError(f"num_kv_heads must be set to a positive int, got {self.target_kv_heads!r}")
        if self.target_kv_heads < 1:
            raise ConfigError(f"num_kv_heads must be a positive int, got {self.target_kv_heads!r}")
        steps, fraction = cfg.get("uptrain_steps"), cfg.get("uptrain_fraction")
        if (steps is None) == (fraction is None):
            raise ConfigError(
                "set exactly one of uptrain_steps (optimizer steps) and uptrain_fraction (a fraction of the "
                f"source's pre-training steps); got uptrain_steps={steps!r}, uptrain_fraction={fraction!r}"
            )
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"uptrain_steps must be a positive int, got {steps!r}")
        if fraction is not None and (not isinstance(fraction, (int, float)) or not 0 < fraction):
            raise ConfigError(f"uptrain_fraction must be a positive number, got {fraction!r}")
        self.builder: Optional[Dict[str, Any]] = None
        self.source_global_step: Optional[int] = None
        self.source_kv_heads: Optional[int] = None
        self.eval_before: Optional[Dict[str, float]] = None

    # ------------------------------------------------------------ the source

    def load_source(self, cfg: DictConfig):
        """``(weights, builder config, source)`` of the source model (:func:`~gqa_tune.training.weights.load_weights`:
        ``hf_model_dir``, ``checkpointer`` + ``model``, or ``source_checkpoint_dir``)."""
        loaded = load_weights(cfg, checkpoint_key="source_checkpoint_dir", required=True, hint=_PRETRAIN_HINT)
        state = loaded[2].recipe_state
        if state is not None and "global_step" in state:
            self.source_global_step = int(state["global_step"])
        return loaded

    def uptrain_steps(self) -> int:
        """The number of optimizer steps to run."""
        if self.cfg.get("uptrain_steps") is not None:
            return int(self.cfg.uptrain_steps)
        source_steps = self.cfg.get("source_global_step")
        if source_steps is None:
            source_steps = self.source_global_step
        if source_steps is None:
            raise ConfigError(
                "uptrain_fraction needs the source's pre-training steps, but the source has no recipe_state.pt "
                "with a global_step: set source_global_step=N or give uptrain_steps instead"
            )
        return max(1, round(float(self.cfg.uptrain_fraction) * int(source_steps)))

    def load_model(self, cfg: DictConfig, resume_path: Optional[Path]) -> torch.nn.Module:
        """The source model with its weights, converted to ``num_kv_heads`` kv heads; when resuming, the
        converted model then takes the checkpoint's weights."""
        state_dict, builder, source = self._source
        self._source = None  # free the source weights once loaded
        component = builder.get("_component_")
        if not component:
            raise ConfigError(f"the model builder from {source.name} has no _component_")
        if not builder_accepts_num_kv_heads(component):
            raise ConfigError(
                f"model builder {component} has no num_kv_heads argument, so the uptrained model could not be "
                "rebuilt with its new kv heads; use a builder that takes num_kv_heads (e.g. "
                "gqa_tune.models.gqa_decoder with the same shape)"
            )
        self.builder, self.source = builder, source
        model = self.build_model(cfg)
        fit_weights(model, state_dict, source)
        del state_dict
        self.source_kv_heads = model.layers[0].attn.num_kv_heads
        check_conversion(self.source_kv_heads, self.target_kv_heads, self.method)
        seed = self.cfg.get("conversion_seed")
        convert_model_(model, self.target_kv_heads, self.method, seed=self.seed if seed is None else seed)
        self.builder = OmegaConf.merge(builder, {"num_kv_heads": self.target_kv_heads})
        print(
            f"uptrain: {source.name} ({self.source_kv_heads} kv heads) -> {self.target_kv_heads} kv heads "
            f"by {self.method!r} pooling",
            flush=True,
        )
        if resume_path is not None:
            resumed, _, self.source = load_weights(cfg, checkpoint_key="source_checkpoint_dir", resume_from=resume_path)
            fit_weights(model, resumed, self.source)
        return model

    def checkpoint_builder(self) -> Dict[str, Any]:
        return OmegaConf.to_container(self.builder, resolve=True)

    # ------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        # The weights come from load_model (source + conversion); the base setup gets the step budget as
        # epochs x max_steps_per_epoch.
        self._source = self.load_source(cfg)
        steps = self.uptrain_steps()
        tokenizer = build_component(cfg.tokenizer, "tokenizer")
        dataset_len = len(build_component(cfg.dataset, "dataset", tokenizer))
        epoch_steps = dataset_len // (cfg.batch_size * cfg.get("gradient_accumulation_steps", 1))
        if epoch_steps < 1:
            raise ConfigError(
                f"no optimizer step fits in an epoch: {dataset_len} examples, batch_size {cfg.batch_size}"
            )
        epochs = math.ceil(steps / epoch_steps)
        inner = cfg.copy()
        inner.epochs, inner.max_steps_per_epoch = epochs, math.ceil(steps / epochs)
        super().setup(inner)
        self.cfg.epochs = epochs  # the training loop reads it
        self.cfg.max_steps_per_epoch = self.steps_per_epoch
        note = "" if self.total_steps == steps else f" ({steps} requested, rounded up to whole epochs)"
        print(f"uptrain: {self.total_steps} steps in {epochs} epoch(s){note}", flush=True)

    # ------------------------------------------------------------ training

    def train(self) -> None:
        if self.cfg.get("eval_before_uptrain", False) and self.global_step == 0 and self.cfg.get("eval") is not None:
            self.eval_before = dict(self.evaluate())
        super().train()


@config.parse
@exits_on_config_error
def recipe_main(cfg: DictConfig) -> None:
    check_config(cfg, recipe=__file__, overrides=sys.argv[1:])  # before anything is built
    recipe = UptrainRecipe(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
