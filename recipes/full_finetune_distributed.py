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
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torchtune import config
from torchtune.modules import TransformerSelfAttentionLayer

from gqa_tune.config_check import check_config, exits_on_config_error
from gqa_tune.training.finetune import FinetuneRecipe

#: Prefixes that wrappers (activation checkpointing, torch.compile) add to parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_fqn(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _init_process_group(device_type: str) -> None:
    """Join the process group torchrun describes (env vars), or form a group of one without torchrun."""
    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


class FullFinetuneRecipeDistributed(FinetuneRecipe):
    """The shared loop, data-parallel with FSDP2 (parameters, gradients and optimizer states sharded)."""

    def __init__(self, cfg: DictConfig) -> None:
        device_type = torch.device(cfg.get("device", "cpu")).type
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"the distributed recipe runs on cpu or cuda, not {cfg.get('device')!r}")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        _init_process_group(device_type)
        # Process group first: torchtune's set_seed (in super().__init__) seeds with seed + rank.
        super().__init__(cfg)
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        if device_type == "cuda":
            self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        else:
            self.device = torch.device("cpu")
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self._gathered_state: Dict[str, Any] = {}

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
        for module in reversed(list(model.modules())):
            if isinstance(module, TransformerSelfAttentionLayer):
                fully_shard(module, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        return model

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full weights on rank 0 (``{}`` elsewhere). Collective: every rank must call it."""
        out = {}
        for key, value in self.model.state_dict().items():
            value = value.detach()
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if self.is_rank_zero:
                out[key] = value.to("cpu")
        return out

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
        """The optimizer state unsharded, keyed by parameter index as on one device (rank 0; collective)."""
        full = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.is_rank_zero:
            return {}
        index = {fqn: i for i, fqn in enumerate(self._optimizer_fqns())}
        groups = [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in full["param_groups"]]
        return {"state": {index[fqn]: s for fqn, s in full["state"].items()}, "param_groups": groups}

    def save_checkpoint(self, epoch: int, name=None):
        # Collectives first, on every rank; recipe_state() then runs on rank 0 alone.
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs: List[Any] = [None] * self.world_size
        dist.all_gather_object(rngs, rng)
        self._gathered_state = {"optimizer": self._full_optimizer_state(), "rng_per_rank": rngs}
        try:
            path = super().save_checkpoint(epoch, name=name)
        finally:
            self._gathered_state = {}
        dist.barrier()  # the checkpoint is complete before any rank goes on
        return path

    def recipe_state(self) -> Dict[str, Any]:
        state = super().recipe_state()
        state["optimizer"] = self._gathered_state["optimizer"]
        state["rng_per_rank"] = self._gathered_state["rng_per_rank"]
        return state

    def load_recipe_state(self, state: Dict[str, Any]) -> None:
        saved = state["optimizer"]
        # Counters, scheduler, RNG and losses as usual; the optimizer is loaded below (sharded), so
        # hand the base class this optimizer's own (empty) state to load meanwhile.
        super().load_recipe_state({**state, "optimizer": self.optimizer.state_dict()})
        fqns = self._optimizer_fqns()
        by_name = {
            "state": {fqns[int(i)]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in saved["param_groups"]],
        }
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=StateDictOptions(full_state_dict=True))
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
                copy = self.build_model(self.cfg)
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
    check_config(cfg, recipe=__file__)  # before anything is built
    recipe = FullFinetuneRecipeDistributed(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
