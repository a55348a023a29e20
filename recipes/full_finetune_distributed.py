"""Full fine-tuning (or training from scratch) of a gqa_tune model on several processes with FSDP2.

    tune run --nproc_per_node 2 gqa_tune/recipes/full_finetune_distributed.py \\
        --config configs/gqa_tiny/full_distributed.yaml

Each process loads (or initializes) the whole model, then every
``TransformerSelfAttentionLayer`` and the root are sharded with
``torch.distributed.fsdp.fully_shard``. ``batch_size`` is per process: ``N``
processes with batch ``B`` take the same steps, and log the same losses, as one
process with batch ``N * B`` (see :class:`gqa_tune.training.finetune.FinetuneRecipe`).

Runs on CUDA (NCCL, one GPU per process: ``device: cuda``) or on CPU (gloo).
Started without ``torchrun`` it runs as a single process.
Checkpoints hold full (gathered) weights and an optimizer state in the
single-device recipe's format, so either recipe can resume the other's checkpoints.
"""

import os
import random
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.device_mesh import init_device_mesh
from torchtune import config, training, utils
from torchtune.modules import TransformerSelfAttentionLayer

from gqa_tune.config_check import ConfigError, exits_on_config_error
from gqa_tune.training.finetune import FinetuneRecipe

#: Prefixes that wrappers (activation checkpointing, torch.compile) add to parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_fqn(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _init_process_group(device_type: str) -> None:
    """Join the process group torchrun describes (env vars), or form a group of one without torchrun.

    Not ``torchtune.training.init_distributed``: 0.6.1 deprecates it for ``init_process_group`` (what its
    own recipes call), and it does nothing without torchrun, where this recipe forms a group of one.
    """
    if dist.is_initialized():
        return
    # "gloo" on CPU; "cuda:nccl,cpu:gloo" on CUDA (gloo serves collectives on CPU tensors)
    backend = training.get_distributed_backend(device_type, offload_ops_to_cpu=device_type != "cpu")
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def _is_layer(name: str, module: torch.nn.Module) -> bool:
    """``training.shard_model``'s condition: shard each ``TransformerSelfAttentionLayer`` on its own."""
    return isinstance(module, TransformerSelfAttentionLayer)


class FullFinetuneRecipeDistributed(FinetuneRecipe):
    """The shared loop, data-parallel with FSDP2 (parameters, gradients and optimizer states sharded).

    Built on torchtune 0.6.1's helpers: ``training.shard_model`` (FSDP2 per layer, then the root),
    ``training.gather_cpu_state_dict`` (full weights on rank 0), ``training.get_full_optimizer_state_dict``
    and ``training.load_from_full_optimizer_state_dict`` (the optimizer state, full on disk, sharded in
    memory), ``training.scale_grads`` (in the shared loop) and ``utils.get_world_size_and_rank``.
    """

    def __init__(self, cfg: DictConfig, *, overrides: Sequence[str] = ()) -> None:
        super().__init__(cfg, overrides=overrides)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))

    def start_processes(self, cfg: DictConfig) -> Tuple[torch.device, int, int]:
        """Join the process group (before the seed: torchtune's ``set_seed`` seeds with seed + rank)."""
        device_type = torch.device(cfg.device).type
        if device_type not in ("cpu", "cuda"):
            raise ConfigError(f"device: the distributed recipe runs on cpu or cuda, not {cfg.device!r}", what="device")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        _init_process_group(device_type)
        world_size, rank = utils.get_world_size_and_rank()
        if device_type == "cuda":
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"), world_size, rank
        return torch.device("cpu"), world_size, rank

    # ------------------------------------------------------------ hooks

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # Ranks seed with seed + rank, so weights initialized from scratch differ: use rank 0's
        # everywhere (rank 0's are the single-device recipe's). Loaded weights are already equal.
        if self.world_size > 1:
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(tensor, src=0)
        training.shard_model(model, [_is_layer], cpu_offload=False, dp_mesh=self.mesh)
        return model

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full weights on rank 0 (``{}`` elsewhere). Collective: every rank must call it."""
        return training.gather_cpu_state_dict(self.model, self.is_rank_zero, device=self.device)

    def all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def sampler_args(self) -> Dict[str, int]:
        return {"num_replicas": self.world_size, "rank": self.rank}

    # ------------------------------------------------------------ checkpoints

    def _optimizer_fqns(self) -> List[str]:
        """Clean parameter names in the optimizer's order (the ids of ``optimizer.state_dict()``)."""
        names = {id(p): _clean_fqn(n) for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def _full_optimizer_state(self) -> Dict[str, Any]:
        """The optimizer state unsharded, keyed by parameter index as on one device (rank 0; collective).

        ``training.get_full_optimizer_state_dict`` keys it by parameter name; checkpoints key it by index,
        as ``optimizer.state_dict()`` does on one device, so that either recipe resumes the other's.
        """
        full = training.get_full_optimizer_state_dict(self.model, self.optimizer, self.is_rank_zero, device=self.device)
        if not self.is_rank_zero:
            return {}
        index = {fqn: i for i, fqn in enumerate(self._optimizer_fqns())}
        groups = [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in full["param_groups"]]
        return {"state": {index[fqn]: s for fqn, s in full["state"].items()}, "param_groups": groups}

    def save_checkpoint(self, epoch: int, name: Optional[str] = None):
        path = super().save_checkpoint(epoch, name=name)  # collective: full_state_dict and recipe_state
        dist.barrier()  # the checkpoint is complete before any rank goes on
        return path

    def recipe_state(self) -> Optional[Dict[str, Any]]:
        """The single-device recipe's state with the full optimizer state and every rank's RNG states, on
        rank 0 (``None`` elsewhere). Collective: every rank must call it."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs: List[Any] = [None] * self.world_size
        dist.all_gather_object(rngs, rng)
        optimizer = self._full_optimizer_state()
        if not self.is_rank_zero:
            return None
        return {**super().recipe_state(), "optimizer": optimizer, "rng_per_rank": rngs}

    def _check_optimizer_state(self, saved: Dict[str, Any]) -> None:
        """Raise unless ``saved`` (a checkpoint's full optimizer state) has a state for each of this optimizer's
        parameters, group by group: ``training.load_from_full_optimizer_state_dict`` pairs them by position and
        would silently drop extra ones (``zip``) or fail with a bare KeyError on missing ones."""
        ours = [len(g["params"]) for g in self.optimizer.param_groups]
        theirs = [len(g["params"]) for g in saved["param_groups"]]
        missing = [i for g in saved["param_groups"] for i in g["params"] if i not in saved["state"]]
        if ours != theirs or missing:
            raise ConfigError(
                f"resume_from_checkpoint: the checkpoint's optimizer state has {theirs} parameters per group"
                + (f" and no state for parameters {missing[:5]}" if missing else "")
                + f"; this run's optimizer has {ours}",
                what="resume_from_checkpoint",
            )

    def load_recipe_state(self, state: Dict[str, Any]) -> None:
        saved = state["optimizer"]
        # Counters, scheduler, RNG and losses as usual; the optimizer is loaded below (sharded), so
        # hand the base class this optimizer's own (empty) state to load meanwhile.
        super().load_recipe_state({**state, "optimizer": self.optimizer.state_dict()})
        self._check_optimizer_state(saved)
        # Index-keyed (the single-device format): torchtune's helper pairs saved and sharded states by position.
        training.load_from_full_optimizer_state_dict(self.model, self.optimizer, saved, self.device)
        rngs = state.get("rng_per_rank")
        if rngs is not None and len(rngs) == self.world_size:
            rng = rngs[self.rank]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:  # saved by another number of processes: keep ranks' streams apart
            torch.manual_seed(self.seed + self.global_step * self.world_size + self.rank)

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> Dict[str, float]:
        """Held-out loss and task accuracy of the gathered weights, computed on rank 0.

        All ranks gather the weights; rank 0 evaluates an unsharded copy (exactly what the
        single-device recipe computes) while the others wait; every rank gets the results.
        """
        state_dict = self.full_state_dict()
        results = None
        if self.is_rank_zero:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # building a model draws random numbers
                copy = self.build_model(self.builder)
            copy.load_state_dict(state_dict)
            sharded, self.model = self.model, copy
            try:
                results = super().evaluate()
            finally:
                self.model = sharded
            del copy
        box = [results]
        dist.broadcast_object_list(box, src=0)
        self.eval_results = box[0]
        return box[0]

    def cleanup(self) -> None:
        super().cleanup()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


@config.parse
@exits_on_config_error
def recipe_main(cfg: DictConfig) -> None:
    recipe = FullFinetuneRecipeDistributed(cfg, overrides=sys.argv[1:])  # checks the whole config first
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
