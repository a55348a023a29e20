"""The fine-tuning loop shared by the single-device, distributed and LoRA recipes.

:class:`FinetuneRecipe` implements torchtune's ``FTRecipeInterface``
(``setup / train / save_checkpoint / cleanup``). The recipes in ``recipes/``
subclass it and override a few hooks (model wrapping, trainable parameters,
what a checkpoint holds, how numbers are reduced across processes).

Loss normalization: the cross-entropy is summed over the supervised tokens of
all micro-batches of an optimizer step (and of all processes) and divided by
their count, so 1 process with batch ``B`` and ``N`` processes with ``B / N``
log the same losses and take the same steps.
"""

import math
import os
import random
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import training, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.datasets import PackedDataset
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training import DummyProfiler
from tqdm import tqdm

from gqa_tune._checks import ConfigError
from gqa_tune.config_check import build_component, check_writable_dir, parse_config
from gqa_tune.data.packing import packed_collate, packed_labels, packing_stats
from gqa_tune.hf import tokenizer_token_ids
from gqa_tune.models import init_from_scratch
from gqa_tune.schema import FinetuneConfig
from gqa_tune.training.checkpoint import (
    STATE,
    latest_checkpoint,
    prune_checkpoints,
    read_recipe_state,
    save_checkpoint,
)
from gqa_tune.training.curves import CURVES_FILE, curves_dir, plot_training_curves
from gqa_tune.training.evaluate import heldout_loss, shift_labels, task_accuracy
from gqa_tune.training.loss import build_loss, summed_loss, whole_logits
from gqa_tune.training.weights import WeightSource, check_vocab, fit_weights, load_weights, tokenizer_line

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # datasets come from local files only

log = utils.get_logger("INFO")

#: What :meth:`FinetuneRecipe.load_recipe_state` reads from ``recipe_state.pt``.
RECIPE_STATE_KEYS = ("epoch", "global_step", "epoch_step", "seed", "optimizer", "lr_scheduler", "rng")

#: The ``recipe_state.pt`` entry holding :meth:`FinetuneRecipe.resume_settings`.
RESUME_SETTINGS = "resume_settings"

#: Seconds between redraws of the progress bar, and between updates of its loss / tokens-per-second postfix.
PROGRESS_INTERVAL = 0.5


def progress_bar(total: int, initial: int, disable: bool) -> tqdm:
    """The training progress bar: redrawn at most every :data:`PROGRESS_INTERVAL` seconds."""
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable, mininterval=PROGRESS_INTERVAL)


def peak_memory_stats(device: torch.device) -> Dict[str, float]:
    """Peak memory so far, in GiB: torchtune's allocated / reserved / active figures on a GPU, and the process's
    peak resident set on a CPU (torchtune's own ``get_memory_stats`` reads CUDA only)."""
    if device.type == "cuda":
        return training.get_memory_stats(device)
    import resource

    return {"peak_memory_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def check_recipe_state(state: Any, path: Path) -> None:
    """Raise unless ``state`` (read from ``path``) holds everything resuming reads.

    Raises:
        ConfigError: naming the file and the missing keys.
    """
    if not isinstance(state, dict):
        problem = f"resume_from_checkpoint: {str(path)!r} holds a {type(state).__name__}, not a recipe state"
        raise ConfigError(problem, what="resume_from_checkpoint")
    missing = [key for key in RECIPE_STATE_KEYS if key not in state]
    rng = state.get("rng")
    if isinstance(rng, dict):
        missing += [f"rng.{key}" for key in ("torch", "python") if key not in rng]
    if missing:
        raise ConfigError(
            f"resume_from_checkpoint: {str(path)!r} lacks {', '.join(repr(k) for k in missing)}, so the run "
            "cannot be resumed from it (resume from an earlier checkpoint, or start a fresh output_dir)",
            what="resume_from_checkpoint",
        )


def check_resume_settings(saved: Optional[Dict[str, Any]], current: Dict[str, Any], path: Path) -> None:
    """Raise unless a resumed run has the settings the checkpoint at ``path`` was trained with.

    ``saved`` is None for checkpoints written before gqa_tune stored the settings: a warning, then.

    Raises:
        ConfigError: one problem per differing key, with the saved and the new value.
    """
    if saved is None:
        warnings.warn(
            f"{str(path / STATE)!r} has no {RESUME_SETTINGS!r} (written by an older gqa_tune): "
            f"not checking that {', '.join(current)} are the ones it was trained with",
            stacklevel=2,
        )
        return
    problems = []
    for key, value in current.items():
        if key in saved and saved[key] != value:
            note = " (counting all processes' examples)" if key == "batch_size" else ""
            problems.append(
                f"{key}: the checkpoint {str(path)!r} was trained with {key}={saved[key]!r}, this run has "
                f"{key}={value!r}{note}; resume with the checkpoint's value, or start a fresh output_dir"
            )
    if problems:
        raise ConfigError(problems, what="resume_from_checkpoint")


class FinetuneRecipe(FTRecipeInterface):
    """Full fine-tuning (or training from scratch) on one device.

    Config keys (see ``configs/gqa_tiny/full.yaml``): ``output_dir``, ``model``,
    ``tokenizer``, ``dataset``, ``hf_model_dir`` (a Hugging Face model to start
    from, replacing ``model``), ``checkpointer`` (optional torchtune
    checkpointer to start from), ``init_from_scratch``, ``optimizer``,
    ``lr_scheduler``, ``batch_size``, ``epochs``, ``max_steps_per_epoch``,
    ``gradient_accumulation_steps``, ``clip_grad_norm``, ``dtype``, ``device``,
    ``seed``, ``shuffle``, ``enable_activation_checkpointing``, ``compile``,
    ``save_every_n_steps``, ``resume_from_checkpoint``, ``metric_logger``,
    ``log_every_n_steps``, ``eval``. Their types, defaults and value rules are the dataclass
    :attr:`SCHEMA` (:mod:`gqa_tune.schema`; a subclass names its own). The constructor is the one check
    (:func:`~gqa_tune.config_check.parse_config`), and :attr:`cfg` is then the typed config: the recipe reads
    its fields, whose defaults the dataclass alone gives.

    :meth:`setup` refuses bad inputs before building anything: an ``output_dir`` it
    cannot create and write, and, when resuming, a ``recipe_state.pt`` lacking
    :data:`RECIPE_STATE_KEYS` or trained with other :meth:`resume_settings`.

    The hooks, in the order the loop calls them (a subclass overrides any; values pass as arguments
    and return values, not through fields one hook sets for another; :meth:`setup` alone stores what they
    return, as ``self.model``, ``self.builder``, ``self.source``, ``self.epochs``, ``self.steps_per_epoch``):

    1. ``__init__(cfg, overrides=())``: checks the config (:func:`~gqa_tune.config_check.parse_config`),
       seeds.
    2. :meth:`setup`: :meth:`resume_settings`; :meth:`read_resume_checkpoint` when resuming; the
       metric logger and tokenizer; :meth:`load_model` (which calls :meth:`build_model`) returns the model
       with its starting weights, its builder and where the weights came from; activation
       checkpointing; :meth:`wrap_model`; ``compile``; the ``loss`` (:func:`~gqa_tune.training.loss.build_loss`);
       the optimizer over :meth:`trainable_parameters`; the data, sampled with :meth:`sampler_args`;
       :meth:`plan_steps` (epochs and optimizer steps per epoch); the scheduler; :meth:`load_recipe_state`
       when resuming.
    3. :meth:`train`: for each optimizer step :meth:`train_step` (which calls :meth:`all_reduce` and
       :meth:`trainable_parameters`); every ``save_every_n_steps`` steps and at the end of each epoch
       :meth:`save_checkpoint`, which calls :meth:`full_state_dict`, :meth:`recipe_state`,
       :meth:`checkpoint_model`, :meth:`checkpoint_builder` and :meth:`extra_checkpoint_files`, then prunes
       to ``keep_last_n_checkpoints``; after the last epoch :meth:`evaluate` (with ``eval``), then the
       training-curves PNG (:mod:`gqa_tune.training.curves`).
    4. :meth:`cleanup`.

    Where the weights come from, and which builder makes the model, is decided by
    :func:`gqa_tune.training.weights.load_weights` (:meth:`load_model`); a subclass names its
    checkpoint-directory key (:attr:`CHECKPOINT_DIR_KEY`) and whether it needs weights.
    """

    #: The config key of a checkpoint directory to start from (LoRA: its base; uptrain: its source).
    CHECKPOINT_DIR_KEY: Optional[str] = None
    #: Refuse to start without weights to load (instead of initializing).
    WEIGHTS_REQUIRED = False

    SCHEMA = FinetuneConfig  # the config's keys, types and defaults

    def __init__(self, cfg: DictConfig, *, overrides: Sequence[str] = ()) -> None:
        """``cfg``: the config as ``tune run`` parsed it; ``overrides``: the command line's ``key=value``
        arguments (:func:`~gqa_tune.config_check.empty_overrides`)."""
        self.cfg = cfg = parse_config(cfg, self.SCHEMA, overrides)  # the one check; the typed config
        self.device, self.world_size, self.rank = self.start_processes(cfg)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.output_dir = Path(cfg.output_dir)
        self.seed = training.set_seed(cfg.seed)  # after start_processes: torchtune seeds with seed + rank
        self.epoch, self.global_step, self.epoch_step = 0, 0, 0
        self.loss_history: list = []  # the training loss of each step
        self.eval_history: list = []  # (global step, results) of each evaluate()

    # ------------------------------------------------------------ hooks

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    def start_processes(self, cfg: DictConfig) -> Tuple[torch.device, int, int]:
        """``(device, world_size, rank)``: one process on ``cfg.device`` (the distributed recipe joins its
        process group here)."""
        return torch.device(cfg.device), 1, 0

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Subclasses shard or adapt the model here (after weights are loaded)."""
        return model

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """torchtune-format weights to save (gathered to rank 0 when sharded)."""
        return {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}

    def checkpoint_model(self) -> torch.nn.Module:
        """The model whose shape ``config.json`` describes (LoRA: the plain model its merge loads into)."""
        return self.model

    def checkpoint_builder(self) -> Dict[str, Any]:
        """The builder config stored in ``config.json`` so the checkpoint can be rebuilt."""
        return OmegaConf.to_container(self.builder, resolve=True)

    def extra_checkpoint_files(self, directory: Path) -> None:
        """Subclasses add files to a checkpoint being written (e.g. a LoRA adapter)."""

    def all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def sampler_args(self) -> Dict[str, int]:
        return {"num_replicas": 1, "rank": 0}

    def build_model(self, builder: DictConfig) -> torch.nn.Module:
        """A fresh model from ``builder``, without its weights."""
        with training.set_default_dtype(self.dtype), self.device:
            return build_component(builder, "model")

    def weights_required(self, cfg: DictConfig) -> bool:
        """Whether the recipe refuses to start without weights to load (instead of initializing)."""
        return self.WEIGHTS_REQUIRED

    def load_model(
        self, cfg: DictConfig, resume_path: Optional[Path]
    ) -> Tuple[torch.nn.Module, DictConfig, WeightSource]:
        """``(model with its starting weights, its builder, where the weights came from)``.
        :func:`~gqa_tune.training.weights.load_weights` decides where they come from (``resume_path`` when
        resuming, else ``hf_model_dir``, ``checkpointer``, the :attr:`CHECKPOINT_DIR_KEY` directory, or an
        initialization) and which builder makes the model."""
        state_dict, builder, source = load_weights(
            cfg, checkpoint_key=self.CHECKPOINT_DIR_KEY, resume_from=resume_path, required=self.weights_required(cfg)
        )
        model = self.build_model(builder)
        if state_dict is not None:
            fit_weights(model, state_dict, source)
        elif source.kind == "init_from_scratch":
            init_from_scratch(model, std=cfg.init_std)
        return model, builder, source

    def plan_steps(self, batches_per_epoch: int, source: WeightSource) -> Tuple[int, int]:
        """``(epochs, optimizer steps per epoch)``: the config's ``epochs``, and the optimizer steps one pass
        over the data holds (at most ``max_steps_per_epoch``)."""
        steps = batches_per_epoch
        if self.cfg.max_steps_per_epoch is not None:
            steps = min(steps, self.cfg.max_steps_per_epoch)
        return self.cfg.epochs, steps

    # ------------------------------------------------------------ setup

    def setup(self, cfg: Optional[DictConfig] = None) -> None:
        """Build everything the loop needs, from :attr:`cfg` (the typed config the recipe was built with; the
        ``cfg`` argument, which torchtune's interface passes, is that config as given)."""
        cfg = self.cfg
        if cfg.run_val_every_n_steps is not None and cfg.eval is None:
            raise ConfigError(
                f"run_val_every_n_steps={cfg.run_val_every_n_steps} needs an evaluation to run: set eval: "
                "{dataset: {...}} (the held-out data), or remove run_val_every_n_steps",
                what="run_val_every_n_steps",
            )
        check_writable_dir(self.output_dir, "output_dir")
        self.settings = self.resume_settings(cfg)  # saved in recipe_state.pt
        resume_path, resume_state = None, None
        if cfg.resume_from_checkpoint:
            resume_path, resume_state = self.read_resume_checkpoint(self.settings)
            self.seed = resume_state["seed"]  # the data order's (the same as cfg.seed, or drawn when that is null)

        self.metric_logger = build_component(cfg.metric_logger, "metric_logger") if self.is_rank_zero else None
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)
        self.tokenizer = build_component(cfg.tokenizer, "tokenizer")

        model, self.builder, self.source = self.load_model(cfg, resume_path)
        check_vocab(model.tok_embeddings.num_embeddings, self.tokenizer, self.source, cfg.tokenizer._component_)
        log.info(tokenizer_line(self.tokenizer, cfg.tokenizer._component_, self.source))
        if cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
        self.model = self.wrap_model(model)
        if cfg.compile:
            training.compile_model(self.model)
        self.loss_fn = build_loss(cfg.loss, self.model)  # None: the default cross-entropy

        self.optimizer = build_component(cfg.optimizer, "optimizer", self.trainable_parameters())
        self.dataset = build_component(cfg.dataset, "dataset", self.tokenizer)
        self.sampler = DistributedSampler(self.dataset, shuffle=cfg.shuffle, seed=self.seed, **self.sampler_args())
        # Packed rows (torchtune's PackedDataset): a BlockMask from the document lengths, positions restarting.
        self.packed = isinstance(self.dataset, PackedDataset)
        collate = partial(padded_collate_sft, padding_idx=self.tokenizer.pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX)
        self.dataloader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            drop_last=True,
            collate_fn=packed_collate if self.packed else collate,
        )
        self.grad_accum = cfg.gradient_accumulation_steps
        batches = len(self.dataloader) // self.grad_accum
        if batches < 1:
            raise ConfigError(
                f"no optimizer step fits in an epoch: {len(self.dataset)} examples, batch_size {cfg.batch_size}, "
                f"gradient_accumulation_steps {self.grad_accum}, {self.world_size} process(es)"
            )
        self.epochs, self.steps_per_epoch = self.plan_steps(batches, self.source)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.lr_scheduler = (
            build_component(cfg.lr_scheduler, "lr_scheduler", self.optimizer, num_training_steps=self.total_steps)
            if cfg.lr_scheduler is not None
            else None
        )
        if resume_state is not None:
            self.load_recipe_state(resume_state)
        self.profiler = build_component(cfg.profiler, "profiler")[0] if cfg.profiler else DummyProfiler()
        if self.is_rank_zero:
            self.log_setup(resume_path)

    def log_setup(self, resume_path: Optional[Path]) -> None:
        """One line each: the parameters (trainable and total; an NF4 base), the resumed step, the packed rows."""
        params = list(self.model.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in self.trainable_parameters())
        nf4 = sum(p.numel() for p in params if isinstance(p, NF4Tensor) or isinstance(p.data, NF4Tensor))
        line = f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%)"
        if nf4:
            line += f"; the frozen base in NF4 (QLoRA): {nf4:,} parameters quantized to 4 bits"
        log.info(line)
        if resume_path is not None:
            log.info(f"resumed from step {self.global_step} of {resume_path}")
        if self.packed:
            stats = packing_stats(self.dataset.packs)
            log.info(
                f"packed data: {stats['rows']} rows of {self.dataset.max_seq_len} tokens, "
                f"{stats['documents_per_row']:.1f} documents per row, "
                f"{100 * stats['padding_fraction']:.1f}% padding"
            )

    def read_resume_checkpoint(self, settings: Dict[str, Any]):
        """``(path, recipe state)`` of ``output_dir``'s newest checkpoint, checked to be resumable by a run
        with :meth:`resume_settings` ``settings`` (its weights are read by :meth:`load_model`).

        Raises:
            ConfigError: no checkpoint, no or an incomplete ``recipe_state.pt``, or other :meth:`resume_settings`.
        """
        path = latest_checkpoint(self.output_dir)
        if path is None:
            raise ConfigError(
                f"resume_from_checkpoint=True but {str(self.output_dir / 'LATEST')!r} does not exist: "
                "nothing to resume in output_dir",
                what="resume_from_checkpoint",
            )
        state = read_recipe_state(path)
        if state is None:
            problem = f"resume_from_checkpoint: checkpoint {str(path)!r} has no {STATE}, so it cannot be resumed"
            raise ConfigError(problem, what="resume_from_checkpoint")
        check_recipe_state(state, path / STATE)
        check_resume_settings(state.get(RESUME_SETTINGS), settings, path)
        return path, state

    def resume_settings(self, cfg: DictConfig) -> Dict[str, Any]:
        """What decides which examples each step sees: a resumed run must have the checkpoint's.

        ``batch_size`` counts all processes' examples (1 process x 8 resumes as 2 x 4).
        """
        return {
            "batch_size": cfg.batch_size * self.world_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "max_steps_per_epoch": cfg.max_steps_per_epoch,
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
            "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True),
        }

    def recipe_state(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "epoch_step": self.epoch_step,
            "seed": self.seed,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "loss_history": list(self.loss_history),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            RESUME_SETTINGS: dict(self.settings),
        }

    def load_recipe_state(self, state: Dict[str, Any]) -> None:
        self.epoch, self.global_step, self.epoch_step = state["epoch"], state["global_step"], state["epoch_step"]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.loss_history = list(state.get("loss_history", []))

    # ------------------------------------------------------------ training

    def _micro_batches(self):
        """This epoch's batches, skipping those already consumed when resuming mid-epoch."""
        self.sampler.set_epoch(self.epoch)
        skip = self.epoch_step * self.grad_accum
        for index, batch in enumerate(self.dataloader):
            if index >= skip:
                yield batch

    def train_step(self, micro_batches) -> Dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns metrics."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        seen = 0
        for batch in micro_batches:
            inputs = batch["tokens"].to(self.device)
            if "input_pos" in batch:  # packed: each document attends within itself, from position 0
                input_pos = batch["input_pos"].to(self.device)
                labels = packed_labels(batch["labels"].to(self.device), input_pos)
                logits = self.model(inputs, mask=batch["mask"].to(self.device), input_pos=input_pos)
            else:
                labels = shift_labels(batch["labels"].to(self.device))
                logits = self.model(inputs)
            count = (labels != CROSS_ENTROPY_IGNORE_IDX).sum()
            loss = summed_loss(self.loss_fn, logits, labels, count)
            loss.backward()
            loss_sum += loss.detach()
            tokens += count
            seen += int((inputs != self.tokenizer.pad_id).sum())
        loss_sum, tokens = self.all_reduce(loss_sum), self.all_reduce(tokens)
        # Gradients hold sum-of-losses (averaged over processes by FSDP): scale to a per-token mean.
        training.scale_grads(self.model, self.world_size / tokens.clamp_min(1))
        grad_norm = None
        if self.cfg.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm=self.cfg.clip_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        metrics = {"loss": float(loss_sum / tokens.clamp_min(1)), "lr": self.optimizer.param_groups[0]["lr"]}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics["_tokens"] = seen
        return metrics

    def train(self) -> None:
        log_every = self.cfg.log_every_n_steps
        save_every = self.cfg.save_every_n_steps
        val_every = self.cfg.run_val_every_n_steps
        peak_memory = self.cfg.log_peak_memory_stats
        bar = progress_bar(self.total_steps, self.global_step, disable=not self.is_rank_zero)
        postfix_at = -math.inf
        self.profiler.start()
        while self.epoch < self.epochs:
            batches = self._micro_batches()
            while self.epoch_step < self.steps_per_epoch:
                group = [next(batches) for _ in range(self.grad_accum)]
                start = time.perf_counter()
                metrics = self.train_step(group)
                seconds = time.perf_counter() - start
                tokens_per_s = metrics.pop("_tokens") / max(seconds, 1e-9)
                self.global_step += 1
                self.epoch_step += 1
                self.loss_history.append(metrics["loss"])
                if time.monotonic() - postfix_at >= PROGRESS_INTERVAL:  # shown at the bar's next redraw
                    postfix = {"loss": f"{metrics['loss']:.4f}", "tok_s": f"{tokens_per_s * self.world_size:.0f}"}
                    bar.set_postfix(postfix, refresh=False)
                    postfix_at = time.monotonic()
                bar.update(1)
                self.profiler.step()
                if self.metric_logger is not None and self.global_step % log_every == 0:
                    extra = peak_memory_stats(self.device) if peak_memory else {}
                    self.metric_logger.log_dict(
                        {**metrics, "tokens_per_second": tokens_per_s, **extra}, step=self.global_step
                    )
                if not math.isfinite(metrics["loss"]):
                    raise RuntimeError(f"loss is {metrics['loss']} at step {self.global_step}; stopping")
                if val_every and self.global_step % val_every == 0 and self.global_step < self.total_steps:
                    with bar.external_write_mode():
                        self.evaluate()  # torchtune's periodic validation (the last step's is the final one)
                if save_every and self.global_step % save_every == 0 and self.epoch_step < self.steps_per_epoch:
                    self.save_checkpoint(self.epoch, name=f"step_{self.global_step}")
            self.epoch += 1
            self.epoch_step = 0
            self.save_checkpoint(self.epoch - 1)
        bar.close()
        self.profiler.stop()
        if self.cfg.eval is not None:
            self.evaluate()
        if self.is_rank_zero:
            path = curves_dir(self.cfg.metric_logger, self.output_dir) / CURVES_FILE
            if plot_training_curves(path, self.loss_history, self.eval_history) is not None:
                print(f"wrote {path}")

    def evaluate(self) -> Dict[str, float]:
        """Held-out loss and task accuracy (``cfg.eval``), logged and printed on rank 0."""
        cfg = self.cfg.eval
        dataset = build_component(cfg.dataset, "eval.dataset", self.tokenizer)
        with whole_logits(self.model) as model:  # plain cross-entropy and generation, whatever the training loss
            results = {"heldout_loss": heldout_loss(model, dataset, self.tokenizer, device=self.device)}
            if cfg.accuracy_file:
                acc = task_accuracy(model, self.tokenizer, cfg.accuracy_file, cfg.max_examples)
                results.update({f"accuracy_{k}": v for k, v in acc.items()})
        if self.is_rank_zero:
            summary = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
            print(f"eval after {self.global_step} steps: {summary}")
            if self.metric_logger is not None:
                self.metric_logger.log_dict(results, step=self.global_step)
        self.eval_results = results
        self.eval_history.append((self.global_step, dict(results)))
        return results

    def save_checkpoint(self, epoch: int, name: Optional[str] = None) -> Optional[Path]:
        """Write checkpoint ``name`` (default ``epoch_<epoch>``) on rank 0; every rank must call it.

        Returns:
            The checkpoint directory on rank 0, ``None`` on the other ranks.
        """
        state_dict = self.full_state_dict()  # collective where the model is sharded
        recipe_state = self.recipe_state()  # collective too in the distributed recipe (None off rank 0)
        if not self.is_rank_zero:
            return None
        path = save_checkpoint(
            self.output_dir,
            name or f"epoch_{epoch}",
            self.checkpoint_model(),
            state_dict,
            builder=self.checkpoint_builder(),
            recipe_state=recipe_state,
            extra=self.extra_checkpoint_files,
            # Token ids for config.json (transformers' defaults would be wrong for our tokenizers), and the
            # source's generation_config.json carried over.
            token_ids=tokenizer_token_ids(self.tokenizer),
            source_dir=self.source.path,
        )
        tqdm.write(f"saved checkpoint {path}")
        keep = self.cfg.keep_last_n_checkpoints
        if keep is not None:  # after the new checkpoint is complete and LATEST names it
            for removed in prune_checkpoints(self.output_dir, keep):
                tqdm.write(f"removed checkpoint {removed} (keep_last_n_checkpoints={keep})")
        return path

    def cleanup(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close()
