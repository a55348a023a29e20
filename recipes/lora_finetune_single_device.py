"""LoRA fine-tuning of a gqa_tune model on one device.

    tune run gqa_tune/recipes/full_finetune_single_device.py --config configs/gqa_tiny/full.yaml
    tune run gqa_tune/recipes/lora_finetune_single_device.py --config configs/gqa_tiny/lora.yaml

The model comes from a LoRA builder (``gqa_tune.models.lora_gqa_tiny`` / ``lora_gqa_decoder``); only
the adapters train. QLoRA is the same recipe with a QLoRA builder (``qlora_gqa_tiny``,
``configs/gqa_tiny/qlora.yaml``) or ``model.quantize_base=true``: the frozen base in torchao NF4; its
checkpoints are saved in the base dtype, like LoRA's. Base weights, first found of
(:func:`gqa_tune.training.weights.load_weights`):

* ``hf_model_dir``: a Hugging Face model directory; its architecture replaces ``model``'s (the LoRA
  builder of that architecture, with ``model``'s LoRA settings);
* ``checkpointer``: a torchtune checkpointer;
* ``base_checkpoint_dir``: a gqa_tune checkpoint directory (e.g. the full recipe's ``epoch_0``), an
  ``output_dir`` holding a ``LATEST`` pointer (its newest checkpoint is used), a torchtune
  checkpointer's ``output_dir`` or any Hugging Face model directory;
* ``init_from_scratch: true``: random weights (for tests and demos).

A checkpoint ``<output_dir>/<name>/`` holds:

* ``model.safetensors`` + ``config.json``: the MERGED model (``W + alpha/r * B @ A``) in Hugging Face
  layout, with the plain builder (e.g. ``gqa_tune.models.gqa_tiny``) in ``config.json``, so the full
  and generation recipes load it as they load any checkpoint;
* ``adapter/adapter_model.safetensors`` + ``adapter/adapter_config.json``: the adapter alone, in
  Hugging Face PEFT layout (loads with ``peft.PeftModel`` on the HF base), plus gqa_tune's settings;
* ``recipe_state.pt``: optimizer (adapter parameters only), scheduler, counters and RNG states.

Resuming (``resume_from_checkpoint=True``) does not load the merged weights (that would apply the
adapter twice): it loads the base again from the configured source, then the adapter from the
newest checkpoint, and checks that base + adapter reproduce the checkpoint's merged weights, so a
base that changed in the meantime is an error rather than a silently different model.

See :class:`gqa_tune.training.finetune.FinetuneRecipe` for the shared config keys; the LoRA ones
are ``base_checkpoint_dir`` and ``base_model`` (the plain builder of the merged checkpoint; by
default derived from ``model``: ``lora_gqa_tiny`` -> ``gqa_tiny`` without the LoRA arguments).
The LoRA library code (adapters in PEFT layout, merging, checks) is :mod:`gqa_tune.training.lora`.
"""

import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from gqa_tune.config_check import ConfigError, exits_on_config_error
from gqa_tune.hf import model_shape
from gqa_tune.models import init_from_scratch
from gqa_tune.schema import LoRAConfig
from gqa_tune.training.checkpoint import load_checkpoint
from gqa_tune.training.finetune import FinetuneRecipe
from gqa_tune.training.lora import (
    adapter_config,
    base_builder_config,
    check_merged,
    load_adapter,
    load_base_weights,
    lora_modules,
    lora_settings,
    merged_state_dict,
    save_adapter,
)
from gqa_tune.training.weights import WeightSource, load_weights


class LoRAFinetuneRecipeSingleDevice(FinetuneRecipe):
    """LoRA on one device: the shared loop, with frozen base weights and adapter-aware checkpoints."""

    SCHEMA = LoRAConfig
    CHECKPOINT_DIR_KEY = "base_checkpoint_dir"

    # ------------------------------------------------------------ setup

    def weights_required(self, cfg: DictConfig) -> bool:
        """Base weights must come from somewhere, unless ``init_from_scratch`` asks for random ones."""
        return not cfg.init_from_scratch

    def base_builder(self, builder: DictConfig) -> Dict[str, Any]:
        """The plain model's builder: ``base_model`` if given, else the LoRA builder's plain twin."""
        if self.cfg.base_model is not None:
            return OmegaConf.to_container(self.cfg.base_model, resolve=True)
        return base_builder_config(OmegaConf.to_container(builder, resolve=True))

    def plain_model(self, base_cfg: Dict[str, Any]) -> torch.nn.Module:
        """The plain model of the merged checkpoints, on the meta device: what ``config.json`` describes."""
        with training.set_default_dtype(self.dtype), torch.device("meta"):
            try:
                return config.instantiate(OmegaConf.create(base_cfg))
            except Exception as err:
                problem = f"base_model: cannot build the plain model {base_cfg}: {err}; set base_model"
                raise ConfigError(problem, what="base_model") from err

    def load_model(
        self, cfg: DictConfig, resume_path: Optional[Path]
    ) -> Tuple[torch.nn.Module, DictConfig, WeightSource]:
        """Base weights from the configured source (also when resuming: a checkpoint holds the MERGED model,
        which would apply the adapter twice), then fresh adapters, or the checkpoint's adapter checked to
        reproduce its merged weights with this base. The plain model (``base_model``) must fit the LoRA
        model's base weights."""
        hint = "or init_from_scratch=true for random base weights"
        state_dict, builder, source = load_weights(
            cfg, checkpoint_key=self.CHECKPOINT_DIR_KEY, required=self.weights_required(cfg), hint=hint
        )
        model = self.build_model(builder)
        base_cfg = self.base_builder(builder)
        plain = self.plain_model(base_cfg)
        base_sd = plain.state_dict()
        lora_sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
        if base_sd.keys() != lora_sd.keys() or any(base_sd[k].shape != lora_sd[k].shape for k in base_sd):
            diff = sorted(set(base_sd) ^ set(lora_sd)) or [k for k in base_sd if base_sd[k].shape != lora_sd[k].shape]
            raise ConfigError(
                f"base_model {base_cfg} does not match the LoRA model's base weights: {diff[:5]}", what="base_model"
            )
        settings = lora_settings(model)
        if state_dict is not None:
            load_base_weights(model, state_dict, settings, source.name)
            del state_dict
        elif source.kind == "init_from_scratch":
            # Resuming, this is the first run's RNG state right after the model was built: the same base.
            init_from_scratch(model, std=cfg.init_std)
        if resume_path is None:
            for module in lora_modules(model).values():
                module.initialize_parameters()  # fresh adapters (init_from_scratch also re-initialized lora_a/b)
            return model, builder, source
        load_adapter(resume_path, model, settings, model_shape(plain))
        merged, _, _ = load_checkpoint(resume_path)
        tol = 1e-5 if self.dtype == torch.float32 else 1e-2
        problem = check_merged(model, settings, merged, repr(str(resume_path)), tol)
        if problem is not None:
            raise ConfigError(
                f"resume_from_checkpoint: cannot resume from {str(resume_path)!r}: with the base weights from "
                f"{source.name}, {problem}; the base weights have changed",
                what="resume_from_checkpoint",
            )
        return model, builder, source

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        set_trainable_params(model, get_adapter_params(model))
        return model

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return list(get_adapter_params(self.model).values())

    # ------------------------------------------------------------ checkpoints

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        return merged_state_dict(self.model, lora_settings(self.model))

    def extra_checkpoint_files(self, directory: Path) -> None:
        base_cfg = self.base_builder(self.builder)
        extra: Dict[str, Any] = {"base_model": base_cfg, "base_weights": self.source.name}
        settings = adapter_config(lora_settings(self.model), self.source.path, extra)
        save_adapter(directory, self.model, model_shape(self.plain_model(base_cfg)), settings)

    def checkpoint_model(self) -> torch.nn.Module:
        return self.plain_model(self.base_builder(self.builder))  # config.json describes the merged (plain) model

    def checkpoint_builder(self) -> Dict[str, Any]:
        return self.base_builder(self.builder)


@config.parse
@exits_on_config_error
def recipe_main(cfg: DictConfig) -> None:
    recipe = LoRAFinetuneRecipeSingleDevice(cfg, overrides=sys.argv[1:])  # checks the whole config first
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
