"""The config schema of every recipe, and the registry of recipes and their configs.

Each recipe's keys are one dataclass: a field's type, default and ``doc`` are the key's
type, default and help, and :func:`setting`'s ``minimum`` / ``choices`` / ``check`` add
the range a recipe needs. A field without a default (``MISSING``) must be set. The dataclass is
the runtime config too: a recipe merges the user's config into ``OmegaConf.structured`` of it
(:func:`gqa_tune.config_check.parse_config`), so every key has one type and one default, written
here only. Keys that take a torchtune ``_component_`` are declared with :func:`component`: the
component's own keyword arguments are checked against its signature, and ``args`` gives the value
rules of some of them (``optimizer.lr``). A nested dataclass is a plain mapping of its own keys
(``eval``).

:data:`RECIPES` is the one list of the project's recipes, with their schemas and configs
(``gqa-tune ls`` prints it). Adding a config key means adding one field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

#: The type of a mapping with a ``_component_`` path, which ``torchtune.config.instantiate`` builds (declared
#: with :func:`component`).
Component = Dict[str, Any]


class Arg(NamedTuple):
    """The value rule of one keyword argument of a component (``optimizer.lr``)."""

    type: Any
    doc: str
    minimum: Optional[float] = None
    exclusive: bool = False


def setting(
    default: Any = MISSING,
    doc: str = "",
    *,
    minimum: Optional[float] = None,
    exclusive: bool = False,
    choices: Tuple[Any, ...] = (),
    check: Optional[Callable[[Any], Optional[str]]] = None,
    input_file: bool = False,
    args: Optional[Dict[str, Arg]] = None,
    is_component: bool = False,
) -> Any:
    """A schema field. ``check(value)`` returns why an otherwise well-typed value is wrong, or None;
    ``input_file``: the value names a file (or files) that must exist."""
    meta = dict(doc=doc, minimum=minimum, exclusive=exclusive, choices=choices, check=check,
                input_file=input_file, args=args or {}, component=is_component)  # fmt: skip
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def component(default: Any = MISSING, doc: str = "", **rules: Any) -> Any:
    """A :func:`setting` whose value is a :data:`Component` (or ``None`` where the default is ``None``)."""
    return setting(default, doc, is_component=True, **rules)


def _torch_device(value: str) -> Optional[str]:
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return "not a torch device (e.g. cpu, cuda, cuda:1)"
    return None


def _not_empty(value: str) -> Optional[str]:
    return None if value.strip() else "empty"


def _no_offloading(value: bool) -> Optional[str]:
    if value:
        return (
            "gqa_tune does not offload activations; to save activation memory set "
            "enable_activation_checkpointing: true (and enable_activation_offloading: false)"
        )
    return None


def _no_adapter_only(value: bool) -> Optional[str]:
    if value:
        return (
            "every LoRA checkpoint already holds the adapter alone, in its adapter/ directory (PEFT format: "
            "adapter_model.safetensors, adapter_config.json), beside the merged model; set it false or remove it"
        )
    return None


DTYPES = ("fp32", "bf16", "fp16", "fp64")


@dataclass(kw_only=True)
class EvalConfig:
    """``eval:``: held-out evaluation after training."""

    dataset: Optional[Component] = component(None, "the held-out dataset")
    accuracy_file: Optional[str] = setting(None, "task file for the accuracy; null: none", input_file=True)
    max_examples: int = setting(200, "examples of accuracy_file scored at most", minimum=1)


@dataclass(kw_only=True)
class FinetuneConfig:
    """Full fine-tuning, or training from scratch (``full_finetune_single_device``, ``full_finetune_distributed``)."""

    output_dir: str = setting(doc="where checkpoints and logs go; created if missing", check=_not_empty)
    model: Optional[Component] = component(None, "the model builder (not needed with hf_model_dir)")
    tokenizer: Component = component(doc="the tokenizer")
    dataset: Component = component(doc="the training dataset")
    optimizer: Component = component(
        doc="the optimizer",
        args={"lr": Arg(float, "learning rate; 0 keeps the weights", minimum=0)},
    )
    metric_logger: Component = component(doc="a torchtune metric logger")
    batch_size: int = setting(doc="examples per micro-batch, per process", minimum=1)
    epochs: int = setting(doc="passes over the dataset", minimum=1)
    checkpointer: Optional[Component] = component(None, "a torchtune checkpointer to start from; null: none")
    hf_model_dir: Optional[str] = setting(
        None,
        "a Hugging Face model directory to start from; replaces model, checkpointer and the other sources",
        check=_not_empty,
    )
    init_from_scratch: bool = setting(True, "random weights when nothing else loads them")
    init_std: float = setting(0.02, "std of the random initialization", minimum=0, exclusive=True)
    lr_scheduler: Optional[Component] = component(
        None,
        "the learning-rate schedule; null: constant",
        args={"num_warmup_steps": Arg(int, "warm-up steps of the learning rate", minimum=0)},
    )
    max_steps_per_epoch: Optional[int] = setting(None, "optimizer steps per epoch at most; null: all", minimum=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", minimum=1)
    clip_grad_norm: Optional[float] = setting(None, "gradient norm clip; null: none", minimum=0, exclusive=True)
    dtype: str = setting("fp32", "parameter and compute precision", choices=DTYPES)
    device: str = setting("cpu", "the torch device", check=_torch_device)
    seed: Optional[int] = setting(0, "seed of data order, initialization and sampling; null: random", minimum=0)
    shuffle: bool = setting(True, "shuffle the dataset each epoch")
    enable_activation_checkpointing: bool = setting(False, "recompute activations in the backward pass")
    compile: bool = setting(False, "torch.compile the model")
    save_every_n_steps: Optional[int] = setting(None, "mid-epoch checkpoint interval; null: none", minimum=1)
    keep_last_n_checkpoints: Optional[int] = setting(None, "checkpoints kept in output_dir; null: all", minimum=1)
    resume_from_checkpoint: bool = setting(False, "continue from output_dir's LATEST checkpoint")
    log_every_n_steps: int = setting(10, "metric logging interval, in optimizer steps", minimum=1)
    eval: Optional[EvalConfig] = setting(None, "held-out evaluation after training; null: none")
    run_val_every_n_steps: Optional[int] = setting(
        None, "also run the eval: evaluation every N optimizer steps during training (torchtune's key); null: none",
        minimum=1,
    )  # fmt: skip
    log_peak_memory_stats: bool = setting(
        False, "log peak memory with the metrics (GPU: allocated and reserved; CPU: the process's peak resident set)"
    )
    enable_activation_offloading: bool = setting(
        False, "torchtune's activation offloading to CPU memory", check=_no_offloading
    )
    profiler: Optional[Component] = component(
        None, "torchtune.training.setup_torch_profiler and its settings (enabled, output_dir, steps...); null: none"
    )
    loss: Optional[Component] = component(
        None, "the training loss (gqa_tune.training.loss); null: float32 cross-entropy"
    )


@dataclass(kw_only=True)
class LoRAConfig(FinetuneConfig):
    """LoRA fine-tuning (``lora_finetune_single_device``): ``model`` is a LoRA builder."""

    base_checkpoint_dir: Optional[str] = setting(
        None, "the base model's checkpoint (a run's output_dir)", check=_not_empty
    )
    base_model: Optional[Component] = component(None, "the base model builder, when the checkpoint does not say")
    init_from_scratch: bool = setting(False, "random base weights when nothing else loads them")
    save_adapter_weights_only: bool = setting(
        False, "torchtune's key: checkpoints of the adapter alone", check=_no_adapter_only
    )


_DERIVED = "derived from uptrain_steps / uptrain_fraction; leave null"


@dataclass(kw_only=True)
class UptrainConfig(FinetuneConfig):
    """MHA -> GQA conversion, then uptraining (``uptrain``)."""

    model: Optional[Dict[str, Any]] = setting(dict(), "builder arguments to override; empty: the source's")
    source_checkpoint_dir: Optional[str] = setting(
        None, "the MHA model's checkpoint (a run's output_dir)", check=_not_empty
    )
    num_kv_heads: int = setting(doc="kv heads of the GQA model", minimum=1)
    method: str = setting("mean", "how kv heads are merged", choices=("mean", "first", "random"))
    conversion_seed: Optional[int] = setting(None, "seed of method=random; null: seed", minimum=0)
    uptrain_fraction: Optional[float] = setting(
        None, "uptraining steps as a fraction of the source's", minimum=0, exclusive=True
    )
    uptrain_steps: Optional[int] = setting(None, "uptraining steps; null: from uptrain_fraction", minimum=1)
    source_global_step: Optional[int] = setting(None, "the source's steps, when it has no recipe_state.pt", minimum=1)
    eval_before_uptrain: bool = setting(False, "evaluate the converted model before training")
    epochs: Optional[int] = setting(None, _DERIVED, choices=(None,))
    max_steps_per_epoch: Optional[int] = setting(None, _DERIVED, choices=(None,))


@dataclass(kw_only=True)
class GenerateConfig:
    """Generation from a checkpoint (``generate``)."""

    tokenizer: Component = component(doc="the tokenizer")
    checkpoint_dir: Optional[str] = setting(
        None, "a run's output_dir (its LATEST) or a checkpoint directory", check=_not_empty
    )
    checkpointer: Optional[Component] = component(None, "a torchtune checkpointer instead; then give model")
    hf_model_dir: Optional[str] = setting(
        None,
        "a Hugging Face model directory to load; replaces checkpoint_dir, checkpointer and model",
        check=_not_empty,
    )
    model: Optional[Dict[str, Any]] = setting(None, "a builder, or builder arguments overriding the checkpoint's")
    prompts: Optional[List[str]] = setting(None, "prompts, generated as one batch")
    prompt: Optional[Any] = setting(None, "a prompt, or a list of them (prompt=TEXT on the command line)")
    prompt_format: str = setting(
        "text", "text: each prompt as it is, after BOS; chat: each as a user message through the tokenizer's chat "
        "template, with its generation prompt", choices=("text", "chat"),
    )  # fmt: skip
    max_new_tokens: int = setting(32, "tokens generated per prompt at most", minimum=1)
    temperature: float = setting(0.0, "sampling temperature; 0: greedy", minimum=0)
    top_k: Optional[int] = setting(None, "sample from the k most likely tokens; null: all", minimum=1)
    seed: Optional[int] = setting(0, "sampling seed; null: random", minimum=0)
    device: str = setting("cpu", "the torch device", check=_torch_device)
    dtype: str = setting("fp32", "parameter and compute precision", choices=DTYPES)
    kv_cache_dtype: Optional[str] = setting(
        None, "KV caches stored quantized, with a float32 scale per token and kv head; null: in dtype",
        choices=(None, "int8", "float8_e4m3fn"),
    )  # fmt: skip
    quantizer: Optional[Component] = component(
        None,
        "a torchao quantization config applied to the linear layers after loading (e.g. "
        "torchao.quantization.Int8WeightOnlyConfig); null: none",
    )
    output_file: Optional[str] = setting(None, "write prompts, ids, texts and timings as JSON here", check=_not_empty)
    compile: bool = setting(False, "compile the decode step once (gqa_tune.generate); the rates leave compiling out")


class Recipe(NamedTuple):
    schema: type
    configs: Tuple[str, ...]
    summary: str


#: The project's recipes (modules of ``gqa_tune.recipes``), their schemas and their configs.
RECIPES: Dict[str, Recipe] = {
    "full_finetune_single_device": Recipe(
        FinetuneConfig,
        ("gqa_tiny/full", "gqa_tiny/full_packed", "gqa_small/mha_pretrain", "smollm2_135m/full"),
        "full fine-tuning on one device",
    ),
    "full_finetune_distributed": Recipe(FinetuneConfig, ("gqa_tiny/full_distributed",), "full fine-tuning, FSDP2"),
    "lora_finetune_single_device": Recipe(
        LoRAConfig,
        ("gqa_tiny/lora", "gqa_tiny/qlora", "smollm2_135m/lora", "smollm2_135m/qlora"),
        "LoRA (and QLoRA: an NF4 base) fine-tuning on one device",
    ),
    "uptrain": Recipe(UptrainConfig, ("gqa_small/uptrain",), "MHA -> GQA conversion and uptraining"),
    "generate": Recipe(GenerateConfig, ("gqa_tiny/generate", "smollm2_135m/generate"), "generation from a checkpoint"),
}


def fields(schema: type) -> Dict[str, dataclasses.Field]:
    """The keys of ``schema``, by name."""
    return {f.name: f for f in dataclasses.fields(schema)}


def schema_named(name: str) -> Optional[type]:
    """The schema dataclass called ``name`` (a recipe of one's own names its schema: ``CONFIG_SCHEMA = LoRAConfig``)."""
    found = globals().get(name)
    return found if isinstance(found, type) and dataclasses.is_dataclass(found) else None
