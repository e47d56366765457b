"""Process-group setup for multi-process training (torchrun) and the data-sharding rule.

Under ``torchrun`` (env ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set) :func:`init_distributed`
initialises ``torch.distributed`` (gloo on CPU, nccl on CUDA) and returns a :class:`DistContext`;
without those variables it returns a single-process context and everything below is a no-op.

Sharding rule (what makes N processes equal one process): every rank draws the SAME global
batch of ``batch_size`` samples and the same random numbers for it, then keeps the contiguous
slice ``shard(batch_size)``. DistributedDataParallel averages the gradients of the per-rank
mean losses, which equals the gradient of the global-batch mean because the slices are equal in
size. ``TrainConfig.parallel = "fsdp"`` shards the module with FSDP2 (``fully_shard`` per DiT
block, then the root) instead; its reduce-scatter averages the gradients the same way. The
loop then gathers full (CPU) state on every checkpoint (see :class:`FSDPState`).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["DistContext", "FSDPState", "init_distributed", "launch_env"]


@dataclass
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # we created the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files."""
        return self.rank == 0

    def shard(self, global_batch: int) -> slice:
        """This rank's contiguous part of a global batch (sizes must divide evenly)."""
        if global_batch % self.world_size:
            raise ValueError(
                f"batch_size {global_batch} must be a multiple of the number of processes "
                f"{self.world_size} (every rank takes an equal shard of each global batch)"
            )
        per = global_batch // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def wrap(
        self, module: nn.Module, parallel: str = "ddp", blocks: list[nn.Module] | None = None
    ) -> nn.Module:
        """DistributedDataParallel around ``module`` when running several processes; with
        ``parallel="fsdp"``, FSDP2 ``fully_shard`` on each of ``blocks`` and then on ``module``
        itself (in place: its parameters become sharded DTensors, so collect them after)."""
        if not self.enabled:
            return module
        if parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in blocks or []:
                fully_shard(block)
            fully_shard(module)
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Frozen weights are identical on every rank (loaded from the same files): skip DDP's
        # start-up broadcast of them, which at 12B would move the whole model once per job.
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in module.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
        return DDP(module, device_ids=ids, broadcast_buffers=False)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean_and_any(self, value: float, flag: bool) -> tuple[float, bool]:
        """The average of ``value`` over the ranks, and whether ``flag`` is set on any rank, in
        one all-reduce: the loop's per-step exchange (the logged loss, and a stop request that
        every rank must act on at the same step or the collectives after it would hang)."""
        if not self.enabled:
            return value, flag
        t = torch.tensor([value, float(flag)], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t[0].item() / self.world_size), bool(t[1].item() > 0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def _comm_device(self) -> torch.device:
        # nccl only moves CUDA tensors; gloo only CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False


class FSDPState:
    """Full-state checkpointing of an FSDP2-sharded module's trainable parameters and its
    optimizer, through ``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True,
    cpu_offload=True``: rank 0 gets full CPU tensors, the other ranks empty dicts).

    ``gather()`` is collective (every rank calls it before rank 0 saves); ``state_dict()`` /
    ``optimizer.state_dict()`` then return what it gathered, so they fit the Checkpointer,
    which saves on rank 0 only. Loading is local: every rank reads the full checkpoint and
    ``set_*_state_dict`` keeps its own shard. Frozen parameters are never gathered.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = module
        self.names = {n for n, p in module.named_parameters() if p.requires_grad}
        self.optimizer = _FSDPOptimizerState(self)
        self._optim = optimizer
        self._model_sd: dict[str, torch.Tensor] = {}
        self._optim_sd: dict[str, Any] = {}

    def _options(self, cpu_offload: bool = True) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(
            full_state_dict=True, cpu_offload=cpu_offload, ignore_frozen_params=True
        )

    def gather(self, with_optimizer: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        sd = get_model_state_dict(self.module, options=self._options())
        self._model_sd = {k: v for k, v in sd.items() if k in self.names}
        if with_optimizer:
            self._optim_sd = get_optimizer_state_dict(
                self.module, self._optim, options=self._options()
            )

    def full_trainable(self) -> dict[str, torch.Tensor]:
        """Collective: the full trainable parameters on every rank (CPU)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.module, options=self._options(cpu_offload=False))
        return {k: v.detach().cpu() for k, v in sd.items() if k in self.names}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._model_sd

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing, unexpected = self.names - set(state), set(state) - self.names
        if strict and (missing or unexpected):
            raise KeyError(
                f"checkpoint does not match the trainable parameters: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        set_model_state_dict(
            self.module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False)
        )


class _FSDPOptimizerState:
    def __init__(self, owner: FSDPState) -> None:
        self.owner = owner

    def state_dict(self) -> dict[str, Any]:
        return self.owner._optim_sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            self.owner.module,
            self.owner._optim,
            self._keyed_by_name(state),
            options=StateDictOptions(full_state_dict=True),
        )

    def _keyed_by_name(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with its parameters named: a one-process run saves the plain optimizer's
        state, keyed by parameter index (the order of the trainable parameters, the same in
        every run of the loop), while FSDP's loader reads parameter names."""
        groups = state.get("param_groups", [])
        ids = [i for g in groups for i in g.get("params", [])]
        if not ids or not all(isinstance(i, int) for i in ids):
            return state  # already by name (an FSDP run's checkpoint)
        names = [n for n, p in self.owner.module.named_parameters() if p.requires_grad]
        if sorted(ids) != list(range(len(names))):
            raise ValueError(
                f"optimizer checkpoint: it holds {len(ids)} parameters, this model trains "
                f"{len(names)}; the checkpoint is of another model or settings"
            )
        return {
            "state": {names[i]: v for i, v in state.get("state", {}).items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups],
        }


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from err


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it. For
    jobs whose processes never talk to each other (sampling a prompt list), no process group."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"torchrun environment: RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, _env_int("LOCAL_RANK", rank if world > 1 else 0)


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Read torchrun's environment, pick the device, and join the process group.

    ``device`` None: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU. A process group that
    already exists (e.g. set up by the caller) is reused and left alone on ``close``.
    """
    rank, world, local = launch_env()
    if device is None:
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, device=dev)
    if world <= 1:
        return ctx
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        ctx.initialized_here = True
        logger.info("joined %s process group: rank %d of %d on %s", backend, rank, world, dev)
    return ctx
