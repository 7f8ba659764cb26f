"""Data parallelism under ``torchrun``: process group, device, model wrapping, reductions.

``torchrun --nproc-per-node N -m moeforge.train CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; each joins one process group (NCCL on GPU, gloo on CPU), reads
its own share of every batch (the loader shards by rank) and DDP averages the gradients. Without those
variables everything runs in one process and these helpers are no-ops.

The MoE balancing loss is made global (``router.set_count_reducer``): expert loads are summed over all
processes before the loss is formed, so N processes with micro-batch B compute the loss one process
computes with micro-batch N·B — the property the two-process test checks. Only rank 0 logs and writes.
FSDP2 (``torch.distributed.fsdp.fully_shard``) is available as ``distributed: fsdp``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moeforge.model import router as router_mod

__all__ = [
    "DistInfo",
    "accumulation_dtype",
    "all_reduce",
    "all_reduce_mean",
    "all_reduce_sum_tensor",
    "barrier",
    "init_distributed",
    "shutdown",
    "wrap_model",
]

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but no CUDA device is available; use device: cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d/%d joined the %s process group on %s", rank, world, backend, dev)
    if world > 1:
        router_mod.set_count_reducer(_count_reducer(dev))
    return DistInfo(rank, world, local, dev)


def _count_reducer(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The router's count reducer: the sum over processes, reduced on ``device`` (the model's), returned
    on the counts' own device (the same one in practice: the counts come from the model's forward)."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t, device).to(t.device)

    return reduce


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """DDP (or FSDP2) around ``model`` when distributed; ``model`` itself otherwise."""
    if not info.enabled:
        return model
    if strategy == "fsdp":  # in place; build the optimizer after this, over the sharded parameters
        from moeforge.train.fsdp import shard_model

        return shard_model(model, device=info.device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    # Experts are stacked tensors, so even an expert (or dormant ghost) that got no tokens has a (zero)
    # gradient: no parameter is ever unused and DDP need not search the graph for them.
    return DDP(model, device_ids=ids, find_unused_parameters=False)


# ---- reductions -----------------------------------------------------------------------------------------
# Every collective of the training code goes through these helpers with the process's device
# (``DistInfo.device``, the model's: CUDA under NCCL, which rejects CPU tensors; CPU under gloo). They
# return device tensors; callers read them on the host only where a number is needed (log, eval, a check).


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums of statistics, float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def all_reduce(
    t: torch.Tensor, device: torch.device, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    """``t`` reduced (``op``, a sum by default) over all processes: a new tensor on ``device``; ``t`` itself
    is left alone. Requires an initialized process group."""
    out = t.detach().to(device=device, copy=True)
    dist.all_reduce(out, op=op)
    return out


def all_reduce_mean(value: float | torch.Tensor, info: DistInfo) -> float:
    """The mean of ``value`` over processes, on the host (for a log line)."""
    if not info.enabled:
        return float(value)
    t = torch.as_tensor(value, dtype=accumulation_dtype(info.device)).reshape(1)
    return float(all_reduce(t, info.device).item()) / info.world_size


def all_reduce_sum_tensor(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``t`` summed over processes, in the accumulation dtype, on ``info.device`` (``t`` itself, on its own
    device, when not distributed)."""
    if not info.enabled:
        return t
    return all_reduce(t.to(accumulation_dtype(info.device)), info.device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    router_mod.set_count_reducer(None)
    if dist.is_initialized():
        dist.destroy_process_group()
