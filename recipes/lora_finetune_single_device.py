"""LoRA fine-tuning of a gqa_tune model on one device.

    tune run gqa_tune/recipes/full_finetune_single_device.py --config configs/gqa_tiny/full.yaml
    tune run gqa_tune/recipes/lora_finetune_single_device.py --config configs/gqa_tiny/lora.yaml

The model comes from a LoRA builder (``gqa_tune.models.lora_gqa_tiny`` / ``lora_gqa_decoder``); only
the adapters train. Base weights, first found of:

* ``base_checkpoint_dir``: a gqa_tune checkpoint directory (e.g. the full recipe's ``epoch_0``), or
  an ``output_dir`` holding a ``LATEST`` pointer (its newest checkpoint is used);
* ``checkpointer``: a torchtune checkpointer;
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
"""

import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torchtune import config, training
from torchtune.models.convert_weights import tune_to_peft_adapter_config, tune_to_peft_adapter_weights
from torchtune.modules.peft import LoRALinear, get_adapter_params, get_merged_lora_ckpt, set_trainable_params

from gqa_tune.config_check import check_config, exits_on_config_error
from gqa_tune.models import init_from_scratch
from gqa_tune.schema import LoRAConfig
from gqa_tune.training.checkpoint import latest_checkpoint, load_checkpoint, model_shape
from gqa_tune.training.finetune import FinetuneRecipe

ADAPTER_DIR, ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter", "adapter_model.safetensors", "adapter_config.json"

#: Builder arguments that only LoRA builders take (dropped to derive the plain builder).
LORA_BUILDER_KEYS = (
    "lora_attn_modules",
    "apply_lora_to_mlp",
    "apply_lora_to_output",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
)


def base_builder_config(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The plain builder's config for a LoRA builder's: ``..lora_gqa_tiny`` -> ``gqa_tune.models.gqa_tiny``."""
    module, _, name = str(model_cfg.get("_component_", "")).rpartition(".")
    if not name.startswith("lora_"):
        raise ValueError(
            f"cannot derive the plain model builder from {model_cfg.get('_component_')!r} (expected a name "
            "starting with 'lora_'): set base_model to the builder config of the merged model"
        )
    if module.endswith("._lora_builders"):
        module = module.rpartition(".")[0]
    base = {k: v for k, v in model_cfg.items() if k not in LORA_BUILDER_KEYS}
    base["_component_"] = f"{module}.{name[len('lora_') :]}"
    return base


def lora_modules(model: torch.nn.Module) -> Dict[str, LoRALinear]:
    """The model's ``LoRALinear`` modules by qualified name (without activation-checkpoint wrappers)."""
    return {
        name.replace("_checkpoint_wrapped_module.", ""): module
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def lora_settings(model: torch.nn.Module) -> Dict[str, Any]:
    """Rank, alpha, dropout and adapted projections of a LoRA model (one rank and alpha throughout)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRALinear: build it with a LoRA builder (e.g. lora_gqa_tiny)")
    ranks = {m.rank for m in modules.values()}
    alphas = {float(m.alpha) for m in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"adapters must share one rank and alpha to be merged, got ranks {ranks}, alphas {alphas}")
    local = list(dict.fromkeys(name.rpartition(".")[2] for name in modules))
    dropout = next(iter(modules.values())).dropout
    return {
        "lora_attn_modules": [n for n in local if n in ("q_proj", "k_proj", "v_proj", "output_proj")],
        "apply_lora_to_mlp": any(n in ("w1", "w2", "w3") for n in local),
        "apply_lora_to_output": "output" in local,
        "lora_rank": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "lora_dropout": float(getattr(dropout, "p", 0.0)),
        "target_modules": local,
    }


def _permute_rows(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of torchtune's HF permutation of q/k rows (``hf_to_tune``'s ``_permute``)."""
    return t.view(n_heads, 2, head_dim // 2, t.shape[-1]).transpose(1, 2).reshape(n_heads * head_dim, t.shape[-1])


def adapter_to_peft(adapter: Dict[str, torch.Tensor], shape: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """torchtune adapter keys (``layers.0.attn.q_proj.lora_a.weight``) -> PEFT's, q/k ``lora_b`` rows permuted."""
    return tune_to_peft_adapter_weights(
        adapter, num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"], dim=shape["dim"],
        head_dim=shape["head_dim"],
    )  # fmt: skip


def adapter_from_peft(
    peft: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], shape: Dict[str, int], source: str
) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`adapter_to_peft` for the adapter keys of ``expected`` (torchtune keys -> tensors)."""
    names = list(expected)
    peft_names = list(adapter_to_peft(dict(expected), shape))  # same order as ``names``
    missing = [p for p in peft_names if p not in peft]
    unexpected = sorted(set(peft) - set(peft_names))
    if missing or unexpected:
        raise ValueError(f"adapter {source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = {}
    for name, peft_name in zip(names, peft_names):
        value = peft[peft_name]
        if value.shape != expected[name].shape:
            raise ValueError(f"adapter {source}: {peft_name} has shape {tuple(value.shape)}, "
                             f"the model's {name} {tuple(expected[name].shape)}")  # fmt: skip
        if name.endswith("lora_b.weight") and (".q_proj." in name or ".k_proj." in name):
            heads = shape["num_heads"] if ".q_proj." in name else shape["num_kv_heads"]
            value = _permute_rows(value, heads, shape["head_dim"])
        out[name] = value
    return out


class LoRAFinetuneRecipeSingleDevice(FinetuneRecipe):
    """LoRA on one device: the shared loop, with frozen base weights and adapter-aware checkpoints."""

    SCHEMA = LoRAConfig

    # ------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        if cfg.get("base_checkpoint_dir") and cfg.get("checkpointer") is not None:
            raise ValueError("set only one of base_checkpoint_dir and checkpointer as the source of the base weights")
        self._resume_from = latest_checkpoint(self.output_dir) if cfg.get("resume_from_checkpoint", False) else None
        self._base_source = "init_from_scratch" if cfg.get("init_from_scratch", True) else "builder"
        base_cfg = cfg.get("base_model")
        self.base_model_cfg = (
            OmegaConf.to_container(base_cfg, resolve=True)
            if base_cfg is not None
            else base_builder_config(OmegaConf.to_container(cfg.model, resolve=True))
        )
        super().setup(cfg)

    def build_model(self, cfg: DictConfig) -> torch.nn.Module:
        model = super().build_model(cfg)
        self.lora = lora_settings(model)
        # The plain model on the meta device: describes merged checkpoints (config.json) and checks they fit it.
        with training.set_default_dtype(self.dtype), torch.device("meta"):
            try:
                self.base_model = config.instantiate(OmegaConf.create(self.base_model_cfg))
            except Exception as err:
                raise ValueError(f"cannot build the plain model {self.base_model_cfg}: {err}; set base_model") from err
        base_sd = self.base_model.state_dict()
        lora_sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
        if base_sd.keys() != lora_sd.keys() or any(base_sd[k].shape != lora_sd[k].shape for k in base_sd):
            diff = sorted(set(base_sd) ^ set(lora_sd)) or [k for k in base_sd if base_sd[k].shape != lora_sd[k].shape]
            raise ValueError(
                f"base_model {self.base_model_cfg} does not match the LoRA model's base weights: {diff[:5]}"
            )
        return model

    def load_weights(self, model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
        if self._resume_from is not None and source == str(self._resume_from):
            # Resume: ``state_dict`` is the MERGED model; load base + adapter instead and check them against it.
            self._load_base(model, resume=True)
            self._load_adapter(model, self._resume_from)
            self._check_merged(model, state_dict, self._resume_from)
            return
        if source == "checkpointer":
            self._base_source = "checkpointer"
        super().load_weights(model, state_dict, source)

    def _load_base(self, model: torch.nn.Module, resume: bool = False) -> None:
        """Base weights from ``base_checkpoint_dir``, else (when resuming) the checkpointer or a fresh init."""
        directory = self.cfg.get("base_checkpoint_dir")
        if directory:
            path = Path(directory)
            if (path / "LATEST").is_file():
                path = latest_checkpoint(path)
            state_dict, _, _ = load_checkpoint(path)
            super().load_weights(model, state_dict, str(path))
            self._base_source = str(path)
        elif resume and self.cfg.get("checkpointer") is not None:
            checkpointer = config.instantiate(self.cfg.checkpointer)
            super().load_weights(model, checkpointer.load_checkpoint()[training.MODEL_KEY], "checkpointer")
            self._base_source = "checkpointer"
        elif resume and self.cfg.get("init_from_scratch", True):
            # Same RNG state as the first run's init (right after the model was built), so the same base.
            init_from_scratch(model, std=self.cfg.get("init_std", 0.02))

    def _load_adapter(self, model: torch.nn.Module, checkpoint: Path) -> None:
        directory = Path(checkpoint) / ADAPTER_DIR
        weights, settings = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
        if not weights.is_file() or not settings.is_file():
            raise ValueError(f"checkpoint {str(checkpoint)!r} has no LoRA adapter ({ADAPTER_DIR}/{ADAPTER_WEIGHTS})")
        saved = json.loads(settings.read_text()).get("gqa_tune", {})
        for key in ("lora_rank", "lora_alpha", "target_modules"):
            if key in saved and saved[key] != self.lora[key]:
                raise ValueError(
                    f"adapter in {str(directory)!r} has {key}={saved[key]!r}, the model {self.lora[key]!r}"
                )
        expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        adapter = adapter_from_peft(load_file(str(weights)), expected, model_shape(self.base_model), repr(str(weights)))
        model.load_state_dict(adapter, strict=False)

    def _check_merged(self, model: torch.nn.Module, merged: Dict[str, torch.Tensor], checkpoint: Path) -> None:
        ours = self.merged_state_dict(model)
        if ours.keys() != merged.keys():
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} does not fit the model: {sorted(ours.keys() ^ merged.keys())[:5]}"
            )
        tol = 1e-5 if self.dtype == torch.float32 else 1e-2
        for key, value in ours.items():
            diff = (value.float() - merged[key].float()).abs().max().item()
            if diff > tol * max(1.0, merged[key].float().abs().max().item()):
                raise ValueError(
                    f"cannot resume from {str(checkpoint)!r}: base weights ({self._base_source}) + adapter differ from "
                    f"the checkpoint's merged model at {key} (max |diff| {diff:.3g}); the base weights have changed"
                )

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self._resume_from is None:
            if self.cfg.get("base_checkpoint_dir"):
                self._load_base(model)
            for module in lora_modules(model).values():
                module.initialize_parameters()  # fresh adapters (init_from_scratch also re-initialized lora_a/b)
        set_trainable_params(model, get_adapter_params(model))
        return model

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return list(get_adapter_params(self.model).values())

    # ------------------------------------------------------------ checkpoints

    def merged_state_dict(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """The plain model's weights: every ``W`` of a LoRA projection becomes ``W + alpha/r * B @ A``."""
        state_dict = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        for name in lora_modules(model):
            state_dict[f"{name}.weight"] = state_dict[f"{name}.weight"].clone()  # merged in place below
        return get_merged_lora_ckpt(state_dict, rank=self.lora["lora_rank"], alpha=self.lora["lora_alpha"])

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu") for k, v in self.model.state_dict().items() if "lora_" in k}

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.merged_state_dict(self.model)

    def adapter_config(self) -> Dict[str, Any]:
        """``adapter_config.json``: PEFT's keys, plus gqa_tune's settings under ``"gqa_tune"``."""
        peft = tune_to_peft_adapter_config(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": self.lora["lora_rank"],
                "lora_alpha": self.lora["lora_alpha"],
                "lora_dropout": self.lora["lora_dropout"],
                "target_modules": list(self.lora["target_modules"]),
                "bias": "none",
            },
            base_model_name_or_path=self._base_source if Path(self._base_source).is_dir() else None,
        )
        return {**peft, "gqa_tune": {**self.lora, "base_model": self.base_model_cfg, "base_weights": self._base_source}}

    def extra_checkpoint_files(self, directory: Path) -> None:
        adapter = adapter_to_peft(self.adapter_state_dict(), model_shape(self.base_model))
        (directory / ADAPTER_DIR).mkdir()
        save_file(
            {k: v.contiguous() for k, v in adapter.items()},
            str(directory / ADAPTER_DIR / ADAPTER_WEIGHTS),
            metadata={"format": "pt"},
        )
        (directory / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(self.adapter_config(), indent=2) + "\n")

    def checkpoint_model(self) -> torch.nn.Module:
        return self.base_model  # config.json describes the merged (plain) model

    def checkpoint_builder(self) -> Dict[str, Any]:
        return self.base_model_cfg


@config.parse
@exits_on_config_error
def recipe_main(cfg: DictConfig) -> None:
    check_config(cfg, recipe=__file__)  # before anything is built
    recipe = LoRAFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
