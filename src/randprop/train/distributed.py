"""Data-parallel training: the process group from torchrun's environment, each rank's share of a
batch, and DDP that leaves every rank its own estimator state.

What holds per rank and what is shared (the contract randprop keeps under DDP and FSDP2):

- draws: every converted layer seeds its draws from (seed, layer, step, rank), so the ranks
  sketch their shards independently and the averaged gradient is the mean of independent
  unbiased estimates;
- feedback matrices of FA / DFA / MEM-DFA: seeded from (seed, layer) only, identical everywhere;
- estimator state (AOP memory, CRS norm estimates: the non-persistent buffers a layer names in
  ``rp_buffers``): per rank, built from the rank's own shard. DDP broadcasts rank 0's buffers at
  every forward; :func:`keep_state_per_rank` (called by :func:`data_parallel`) takes these
  buffers out of that broadcast, while other buffers (batch-norm statistics) stay synchronised.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from randprop.methods.base import ConvertedLayer, LayerState

#: the variables torchrun sets for every process it starts
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process logs and writes files (rank 0)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's examples of a batch: every ``world_size``-th index from ``rank`` on. With
        equal shards the mean of the ranks' mean losses is the batch's mean loss."""
        if len(indices) % self.world_size:
            raise ValueError(
                f"train: batch {len(indices)} must be a multiple of the number of processes "
                f"({self.world_size}, torchrun --nproc_per_node)"
            )
        return indices[self.rank :: self.world_size]

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks (itself when only one process trains)."""
        if not self.parallel:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device(self.device))
        dist.all_reduce(t)
        return float(t) / self.world_size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank."""
        if not self.parallel:
            return flag
        t = torch.tensor([int(flag)], device=_comm_device(self.device))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def gather(self, obj: object) -> list[object]:
        """``obj`` of every rank, in rank order (on every rank)."""
        if not self.parallel:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _comm_device(device: torch.device) -> torch.device:
    """Where collectives' tensors live: the GPU for nccl, else the CPU (gloo)."""
    return device if device.type == "cuda" else torch.device("cpu")


def launched() -> bool:
    """Whether a launcher (torchrun) started this process: its variables are all set."""
    return all(name in os.environ for name in LAUNCH_ENV)


@contextmanager
def session(device: str | torch.device = "cpu") -> Iterator[Context]:
    """The run's :class:`Context`. Under torchrun, the default process group is created from its
    environment (nccl for a CUDA ``device``, which becomes cuda:LOCAL_RANK; gloo otherwise) and
    destroyed on exit; a group created by the caller is used as it is; otherwise one process."""
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        yield Context(dist.get_rank(), dist.get_world_size(), _local(device))
        return
    if not (dist.is_available() and launched()):
        yield Context(device=device)
        return
    device = _local(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Context(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def _local(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this process's GPU, cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def per_rank_buffers(model: nn.Module) -> list[str]:
    """Qualified names of the estimator-state buffers of ``model``'s layers (``rp_buffers`` of
    every converted layer and state holder), whether or not a forward pass created them yet."""
    return [
        f"{name}.{buffer}" if name else buffer
        for name, module in model.named_modules()
        if isinstance(module, (ConvertedLayer, LayerState))
        for buffer in module.rp_buffers
    ]


def keep_state_per_rank(model: nn.Module) -> list[str]:
    """Exclude ``model``'s estimator state from DDP's buffer broadcast (call it before
    ``DistributedDataParallel(model)``; DDP matches the names on every forward, so buffers
    created later are excluded too); returns the names. Other buffers stay synchronised."""
    names = per_rank_buffers(model)
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    # DDP's own (documented, static) way to exclude named parameters and buffers
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, list(dict.fromkeys([*ignored, *names]))
    )
    return names


def data_parallel(model: nn.Module, ctx: Context, **kwargs) -> DistributedDataParallel:
    """``model`` wrapped in DDP on ``ctx.device`` with its estimator state kept per rank
    (:func:`keep_state_per_rank`); ``kwargs`` go to DistributedDataParallel."""
    keep_state_per_rank(model)
    device_ids = [ctx.device] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def parallel_rule(rule: object, model: nn.Module, ctx: Context, **kwargs) -> None:
    """Make the training rule's backward run ``model`` data-parallel: ``rule.model`` (the module
    its backward calls, which every built-in rule has) becomes :func:`data_parallel`'s wrapper."""
    if not hasattr(rule, "model"):
        raise ValueError(
            f"train: rule {type(rule).__name__} has no .model (the module its backward calls); "
            "data-parallel training needs one"
        )
    rule.model = data_parallel(model, ctx, **kwargs)
