"""Where a recipe's weights come from and which builder makes its model: one decision, for every recipe.

:func:`load_weights` ``(cfg) -> (state_dict, builder_cfg, source)`` is what the fine-tune recipes (full,
distributed, LoRA's base), the uptrain recipe (its source) and the generate recipe call. The weights come
from the first of:

1. ``resume_from`` (the fine-tune recipes pass ``output_dir``'s newest checkpoint when resuming);
2. ``hf_model_dir``: a Hugging Face model directory. Its ``config.json`` gives the architecture
   (:func:`builder_from_hf_config`), its weights (one ``model.safetensors``, shards with an index, or
   ``pytorch_model.bin``) are loaded. It takes precedence over ``model``, ``checkpointer``, the recipe's
   checkpoint directory and ``init_from_scratch``, and one log line names what it replaced, so adding
   ``hf_model_dir=DIR`` to any config is enough (``model``'s LoRA settings and ``backend`` are kept);
3. ``checkpointer``: a torchtune checkpointer (with ``model:`` giving the builder);
4. the recipe's checkpoint directory (``checkpoint_key``: ``checkpoint_dir``, ``base_checkpoint_dir``,
   ``source_checkpoint_dir``): a gqa_tune checkpoint, an ``output_dir`` with ``LATEST``, a torchtune
   checkpointer's ``output_dir`` (its highest ``epoch_N``) or any Hugging Face model directory. Its builder
   is ``model:`` with a ``_component_``, else the one ``config.json`` records (``gqa_tune.model``), else
   the one its architecture maps to; a ``model:`` without ``_component_`` overrides single arguments;
5. nothing: an error where the recipe needs weights (``required``), else ``init_from_scratch`` (default
   true; then ``state_dict`` is ``None`` and the recipe initializes) or the builder's own initialization.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config as tt_config
from torchtune import training, utils

from gqa_tune import _checks as checks
from gqa_tune._checks import ConfigError
from gqa_tune.hf.config import CONFIG, builder_from_hf_config, read_config, read_hf_config
from gqa_tune.hf.gguf import resolve_model_dir
from gqa_tune.training.checkpoint import (
    load_checkpoint,
    resolve_checkpoint_dir,
)
from gqa_tune.training.lora import LORA_BUILDER_KEYS, lora_prefix

log = utils.get_logger("INFO")


@dataclass(frozen=True)
class WeightSource:
    """Where :func:`load_weights` took the weights from.

    Attributes:
        kind: ``"resume"``, ``"hf_model_dir"``, ``"checkpointer"``, ``"checkpoint_dir"`` (the recipe's
            checkpoint directory key), ``"init_from_scratch"`` or ``"builder"`` (its own initialization).
        name: for messages: the directory, ``"checkpointer <component>"``, ``"init_from_scratch"``, ``"builder"``.
        path: the directory the weights came from (its ``config.json`` and ``generation_config.json``
            travel to the recipe's checkpoints), or ``None``.
        config: that directory's ``config.json`` (``{}`` without one).
        recipe_state: its ``recipe_state.pt`` (``None`` without one).
    """

    kind: str
    name: str
    path: Optional[Path] = None
    config: Dict[str, Any] = field(default_factory=dict)
    recipe_state: Optional[Dict[str, Any]] = None


# ------------------------------------------------------------ config.json -> builder


# ------------------------------------------------------------ the decision


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _component(model_cfg: Any) -> Optional[str]:
    return model_cfg.get("_component_") if isinstance(model_cfg, dict) else None


def _hf_builder(derived: Dict[str, Any], model_cfg: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``derived`` (from ``hf_model_dir``) adapted to the config's ``model``: a LoRA builder there makes it the
    LoRA builder with those LoRA settings (a QLoRA builder, ``qlora_*``: the LoRA builder with
    ``quantize_base=True``); ``backend`` is kept; a ``model`` without ``_component_`` overrides single
    arguments."""
    builder = dict(derived)
    if not model_cfg:
        return builder
    component = _component(model_cfg)
    if component is None:
        return {**builder, **model_cfg}
    prefix = lora_prefix(component)
    if prefix is not None:
        module, _, name = builder["_component_"].rpartition(".")
        builder["_component_"] = f"{module}.lora_{name}"
        builder.update({k: v for k, v in model_cfg.items() if k in LORA_BUILDER_KEYS})
        if prefix == "qlora_":
            builder["quantize_base"] = True
    if "backend" in model_cfg:
        builder["backend"] = model_cfg["backend"]
    return builder


def checkpoint_builder(config: Dict[str, Any], model_cfg: Optional[Dict[str, Any]], path: Path) -> Dict[str, Any]:
    """The builder for the checkpoint at ``path``: ``model_cfg`` if it names a ``_component_``, else the builder
    its ``config.json`` records (``gqa_tune.model``), else the one its architecture maps to
    (:func:`builder_from_hf_config`), with ``model_cfg``'s arguments merged over it."""
    if _component(model_cfg):
        return dict(model_cfg)
    stored = (config.get("gqa_tune") or {}).get("model") or {}
    if not stored:
        stored = builder_from_hf_config(config, f"checkpoint {str(path)!r}: {CONFIG}")
    return {**stored, **(model_cfg or {})}


def _explicit_builder(model_cfg: Optional[Dict[str, Any]], why: str) -> Dict[str, Any]:
    if not _component(model_cfg):
        raise ValueError(f"{why} needs an explicit `model:` (with a _component_) to build, or set hf_model_dir")
    return dict(model_cfg)


def _describe_set(cfg: DictConfig, key: str) -> Optional[str]:
    """``key=value`` for a config key that is set (not null, not false), ``None`` otherwise."""
    value = cfg.get(key)
    if value is None or value is False:
        return None
    component = value.get("_component_") if OmegaConf.is_dict(value) else None
    if component:
        return f"{key} ({component})"
    if OmegaConf.is_config(value):
        return f"{key} {_plain(value)}" if len(value) else None
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def load_weights(
    cfg: DictConfig,
    *,
    checkpoint_key: Optional[str] = None,
    resume_from: Optional[Path] = None,
    required: bool = False,
    hint: str = "",
) -> Tuple[Optional[Dict[str, torch.Tensor]], DictConfig, WeightSource]:
    """``(state_dict, builder_cfg, source)``: the weights a recipe starts from (torchtune format; ``None`` for
    an initialization), the builder of its model and where the weights came from (see the module docstring
    for the order).

    Args:
        cfg: the recipe config (``hf_model_dir``, ``checkpointer``, ``model``, ``init_from_scratch`` and the
            ``checkpoint_key`` entry are read).
        checkpoint_key: the recipe's key for a checkpoint directory, if it has one.
        resume_from: a checkpoint to resume: its weights win over every other source.
        required: refuse to run without weights (generation, uptraining) instead of initializing.
        hint: appended to errors about a missing checkpoint directory (how to make one).

    Raises:
        ConfigError: (a ``ValueError``) naming the keys: a checkpointer and a checkpoint directory both set,
            a missing or unreadable directory, an unsupported ``config.json`` (:func:`builder_from_hf_config`),
            no builder, or no weights where ``required``; the recipes exit with the message, not a traceback.
    """
    try:
        return _load_weights(cfg, checkpoint_key, resume_from, required, hint)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err), what="the weights to load") from err


def _load_weights(
    cfg: DictConfig, checkpoint_key: Optional[str], resume_from: Optional[Path], required: bool, hint: str
) -> Tuple[Optional[Dict[str, torch.Tensor]], DictConfig, WeightSource]:

    model_cfg = _plain(cfg.get("model"))
    checkpoint_dir = cfg.get(checkpoint_key) if checkpoint_key else None
    hf_dir = cfg.get("hf_model_dir")
    checkpointer = cfg.get("checkpointer")
    if not hf_dir and checkpoint_dir and checkpointer is not None:
        raise ValueError(
            f"set only one of {checkpoint_key} and checkpointer as the source of the weights "
            f"(got {checkpoint_key}={checkpoint_dir!r} and checkpointer {checkpointer.get('_component_')})"
        )

    builder: Optional[Dict[str, Any]] = None
    if hf_dir:
        hf_dir = str(resolve_model_dir(hf_dir))  # a .gguf file: its conversion (made once, in the cache)
        path = resolve_checkpoint_dir(hf_dir, "hf_model_dir", "give a Hugging Face model directory or a GGUF file")
        where = f"hf_model_dir {str(path)!r}"
        hf_cfg = read_config(path, where)
        derived = builder_from_hf_config(hf_cfg, f"{where}: {CONFIG}")
        builder = _hf_builder(derived, model_cfg)
        if resume_from is None:
            keys = ("model", "checkpointer", checkpoint_key, "init_from_scratch")
            replaced = [r for r in (_describe_set(cfg, key) for key in keys if key) if r]
            kept = [k for k in (*LORA_BUILDER_KEYS, "backend") if _component(model_cfg) and k in model_cfg]
            log.info(
                f"hf_model_dir={path}: a {hf_cfg['model_type']} model, built by {builder['_component_']} from its "
                f"{CONFIG}, with its weights"
                + (" (its base in NF4: quantize_base=true)" if builder.get("quantize_base") else "")
                + (f"; it replaces {', '.join(replaced)}" if replaced else "")
                + (f" (keeping model's {', '.join(kept)})" if kept else "")
            )
            state_dict, config, state = load_checkpoint(path, where, config=hf_cfg)
            return state_dict, OmegaConf.create(builder), WeightSource("hf_model_dir", str(path), path, config, state)

    if resume_from is not None:
        state_dict, config, state = load_checkpoint(resume_from, where=f"resume_from_checkpoint {str(resume_from)!r}")
        if builder is None:
            builder = checkpoint_builder(config, model_cfg, Path(resume_from))
        source = WeightSource("resume", str(resume_from), Path(resume_from), config, state)
        return state_dict, OmegaConf.create(builder), source

    if checkpointer is not None:
        builder = _explicit_builder(model_cfg, "a `checkpointer:`")
        state_dict = tt_config.instantiate(checkpointer).load_checkpoint()[training.MODEL_KEY]
        directory = checkpointer.get("checkpoint_dir")
        path = Path(directory) if directory else None
        where = f"checkpointer.checkpoint_dir {str(path)!r}"
        config = read_config(path, where) if path and (path / CONFIG).is_file() else {}
        source = WeightSource("checkpointer", f"checkpointer {checkpointer.get('_component_')}", path, config)
        return state_dict, OmegaConf.create(builder), source

    if checkpoint_dir:
        path = resolve_checkpoint_dir(checkpoint_dir, checkpoint_key, hint)
        state_dict, config, state = load_checkpoint(path, where=f"{checkpoint_key} {str(path)!r}")
        builder = checkpoint_builder(config, model_cfg, path)
        source = WeightSource(checkpoint_key, str(path), path, config, state)
        return state_dict, OmegaConf.create(builder), source

    if required:
        keys = [k for k in (checkpoint_key, "hf_model_dir") if k]
        raise ValueError(
            f"no weights to load: set {' or '.join(keys)} (a checkpoint or Hugging Face model directory), "
            "or checkpointer (+ model)" + (f", {hint}" if hint else "")
        )
    builder = _explicit_builder(model_cfg, "initializing the weights")
    kind = "init_from_scratch" if cfg.init_from_scratch else "builder"
    return None, OmegaConf.create(builder), WeightSource(kind, kind)


def check_fits(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Refuse, before anything is copied, weights whose shapes differ from ``model``'s or which are not
    floating-point where the model's are (``load_state_dict`` would raise deep inside, or cast silently).

    Raises:
        ConfigError: naming ``source``, the weights and both shapes (or the dtype).
    """
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    wrong = [
        f"{key} {tuple(value.shape)} where the model has {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if wrong:
        raise ConfigError(
            f"weights from {source} do not fit the model built from its config: {'; '.join(wrong[:3])}",
            what="the weights to load",
        )
    integer = [
        f"{key} ({value.dtype})"
        for key, value in state_dict.items()
        if key in own and own[key].is_floating_point() and not value.is_floating_point()
    ]
    if integer:
        raise ConfigError(
            f"weights from {source} hold integer values where the model has floating-point weights: "
            f"{', '.join(integer[:3])}; quantized or integer checkpoints are not loaded (they would be cast)",
            what="the weights to load",
        )


def fit_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: WeightSource) -> None:
    """Load ``state_dict`` into ``model``; every base weight must fit (LoRA adapters may be absent).

    Checked before anything is copied, so a refused load leaves the model as it was.

    Raises:
        ConfigError: naming the source and the first missing or unexpected keys, or a weight whose shape
            differs from the model's (both shapes), or that is not floating-point where the model's is.
    """
    check_fits(model, state_dict, source.name)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if "lora_" not in k]  # fresh adapters, or merged weights
    if missing or unexpected:
        raise ConfigError(
            f"weights from {source.name} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
            what="the weights to load",
        )


def tokenizer_ids(tokenizer: Any) -> int:
    """How many token ids ``tokenizer`` produces: its ``vocab_size``, or one past its largest special id."""
    ids = [getattr(tokenizer, name, None) for name in ("bos_id", "eos_id", "pad_id")]
    ids += list(getattr(tokenizer, "stop_tokens", None) or [])
    count = max([i + 1 for i in ids if isinstance(i, int) and i >= 0], default=0)
    vocab = getattr(tokenizer, "vocab_size", None)
    return max(count, vocab) if isinstance(vocab, int) else count


def tokenizer_line(tokenizer: Any, component: str, source: WeightSource) -> str:
    """The log line that says which tokenizer a recipe uses, and whether it is ``hf_model_dir``'s own."""
    path = getattr(tokenizer, "path", None)
    line = f"tokenizer: {component}" + (f" from '{path}'" if path is not None else "")
    if source.kind == "hf_model_dir" and source.path is not None:
        own = path is not None and Path(path).resolve() == Path(source.path).resolve()
        line += " (hf_model_dir's own)" if own else " (the config's; not hf_model_dir's own tokenizer)"
    return line


def check_vocab(model_vocab: int, tokenizer: Any, source: WeightSource, tokenizer_name: str = "") -> None:
    """Refuse a model whose embedding has fewer rows than ``tokenizer`` has ids (the first step would index
    past it).

    Raises:
        ConfigError: naming the key that set the model's vocabulary and both sizes.
    """
    needed = tokenizer_ids(tokenizer)
    if model_vocab >= needed:
        return
    if source.kind in ("hf_model_dir", "checkpoint_dir", "resume") and source.path is not None:
        key = f"{'hf_model_dir' if source.kind == 'hf_model_dir' else source.kind} {str(source.path)!r}: {CONFIG}"
    else:
        key = "model"
    named = f" ({tokenizer_name})" if tokenizer_name else ""
    raise ConfigError(
        f"{key}: vocab_size {model_vocab} is smaller than the tokenizer's{named} {needed} ids (up to id "
        f"{needed - 1}); use the model's own tokenizer, or a model with vocab_size >= {needed}",
        what="the model's vocabulary",
    )


def from_pretrained(
    path: Union[str, Path],
    *,
    dtype: Union[torch.dtype, str] = torch.float32,
    device: Union[torch.device, str, None] = None,
    **builder_args: Any,
) -> torch.nn.Module:
    """gqa_tune's model, with its weights, from a directory: the Python twin of ``hf_model_dir``.

    ``path`` is a Hugging Face model directory of an architecture gqa_tune builds (Llama 2/3/3.x,
    Mistral, Qwen2, Gemma, Gemma 2; ``config.json`` with safetensors, shards or ``pytorch_model.bin``), a
    checkpoint a gqa_tune recipe wrote, or a recipe's ``output_dir`` (the checkpoint its ``LATEST`` names;
    a torchtune checkpointer's ``output_dir``: its highest ``epoch_N``). The builder is the one the
    checkpoint's ``config.json`` records, else the one its architecture maps to
    (:func:`builder_from_hf_config`).

    Args:
        path: the directory (or a ``.gguf`` file: converted once into the cache, :mod:`gqa_tune.hf.gguf`).
        dtype: the parameters' dtype (default float32); ``"auto"``: the ``config.json``'s ``torch_dtype``
            (or ``dtype``).
        device: where the model is built (default: torch's default device).
        **builder_args: builder arguments to override, e.g. ``backend="sdpa"`` or ``max_seq_len=512``.

    Returns:
        The model (a torchtune ``TransformerDecoder`` with gqa_tune's attention), in eval mode.

    Raises:
        ValueError: naming the path: a missing directory, an unreadable or unsupported ``config.json``, or
            weights that do not fit the model it describes.

    Example:
        >>> model = gqa_tune.from_pretrained("outputs/gqa_tiny_full")
        >>> tokens, _ = gqa_tune.generate(model, torch.tensor([[256, 51, 55, 43]]), 8)
    """
    hint = "give a Hugging Face model directory, a GGUF file, a gqa_tune checkpoint or a recipe's output_dir"
    directory = resolve_checkpoint_dir(str(resolve_model_dir(path)), "from_pretrained: path", hint)
    state_dict, config, _ = load_checkpoint(directory, where=f"from_pretrained: {str(directory)!r}")
    builder = checkpoint_builder(config, dict(builder_args) or None, directory)
    if dtype == "auto":
        name = config.get("torch_dtype") or config.get("dtype") or "float32"
        dtype = getattr(torch, str(name).replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"from_pretrained: {str(directory)!r}: config.json's dtype {name!r} is not a float dtype")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"from_pretrained: dtype must be a floating torch.dtype or 'auto', got {dtype!r}")
    device = checks.device("from_pretrained: device", device)
    try:
        with training.set_default_dtype(dtype), device:
            model = tt_config.instantiate(OmegaConf.create(builder))
    except Exception as err:  # the builder's refusal of an argument, or a builder that does not exist
        args = {k: v for k, v in builder.items() if k in builder_args}
        raise ValueError(
            f"from_pretrained: cannot build {builder.get('_component_')!r} for {str(directory)!r}"
            + (f" with {args}" if args else "")
            + f": {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        ) from err
    fit_weights(model, state_dict, WeightSource("checkpoint_dir", str(directory), directory, config))
    return model.eval()


__all__: List[str] = [
    "WeightSource",
    "builder_from_hf_config",  # from gqa_tune.hf, where it lives, as read_hf_config
    "check_fits",
    "check_vocab",
    "checkpoint_builder",
    "fit_weights",
    "from_pretrained",
    "load_weights",
    "read_hf_config",
    "tokenizer_ids",
]
