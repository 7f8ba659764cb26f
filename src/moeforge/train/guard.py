"""Refuse a training run that cannot fit, before anything is allocated.

Without this, a too-large run fails late and badly: the OOM killer ends the process with no message, or
CUDA raises out-of-memory after minutes of setup, or a laptop swaps to a standstill. The guard compares
:func:`moeforge.model.sizing.memory_estimate` (weights + grads + optimizer states + activations, ZeRO
accounting) with the memory the device has free now, and raises :class:`ResourceError` with the numbers
and what to change. Presets marked ``cluster_only`` are refused outright unless ``ALLOW_LOCAL_TRAIN=1``.

Only ``USABLE_FRACTION`` (90%) of the free memory counts as usable: the estimate leaves out the allocator's
fragmentation, temporary buffers inside kernels (attention workspace, the loss's fp32 logits copy), the
CUDA context and, on CPU, the rest of the process (Python, data loader, page cache pressure).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from moeforge.model.config import ModelConfig
from moeforge.model.sizing import GIB, MemoryEstimate, memory_estimate

__all__ = ["USABLE_FRACTION", "ResourceError", "available_memory", "check_resources"]

log = logging.getLogger(__name__)

USABLE_FRACTION = 0.90
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16"}  # fp16: same byte accounting


class ResourceError(ValueError):
    """The run does not fit (or is cluster-only); the message has the numbers and what to change."""


def _cgroup_available() -> int | None:
    """Free bytes under the container's memory limit (cgroup v2, then v1); None when unlimited/unknown."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 reports "unlimited" as a huge number
            return None
        return max(int(limit) - usage, 0)
    return None


def _cpu_available() -> int:
    """MemAvailable from /proc/meminfo (free + reclaimable), else free pages; capped by a cgroup limit."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cg = _cgroup_available()
    return avail if cg is None else min(avail, cg)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` now: RAM on CPU, ``cuda.mem_get_info`` on CUDA; None when unknown."""
    if device.type == "cpu":
        return _cpu_available()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return None


def _cluster_message(cfg: ModelConfig, gpus: int) -> str:
    fit = f"at least {gpus} 80 GB GPU{'s' if gpus > 1 else ''}" if gpus > 0 else "more than one 80 GB GPU"
    return (
        f"model {cfg.name!r} is marked cluster_only: training it needs {fit} with FSDP + expert "
        "parallelism, so local training is refused. Run it on a cluster, or set ALLOW_LOCAL_TRAIN=1 to "
        "override this check (the memory check still applies)"
    )


def check_resources(
    cfg: ModelConfig,
    *,
    micro_batch: int,
    seq_len: int,
    device: torch.device | str,
    dtype: str,
    activation_checkpointing: bool = False,
    shard_over: int = 1,
) -> MemoryEstimate:
    """Check that training ``cfg`` fits on ``device``; returns the run's need and the device's memory as
    a :class:`~moeforge.model.sizing.MemoryEstimate`, or raises :class:`ResourceError`.

    Need = weights + grads + optimizer states (divided by ``shard_over``, the ranks FSDP/ZeRO-3 shards
    them over; 1 for single-process or DDP) + one micro-batch's activations (with or without full
    activation checkpointing). Compared with ``USABLE_FRACTION`` of :func:`available_memory`; when that
    is unknown (devices other than CPU, CUDA, MPS) the check logs a warning and passes.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
    if shard_over < 1:
        raise ValueError(f"shard_over must be at least 1 (got {shard_over})")
    device = torch.device(device)
    est = memory_estimate(cfg, micro_batch, seq_len, _DTYPES[dtype])
    if cfg.cluster_only and os.environ.get("ALLOW_LOCAL_TRAIN") != "1":
        raise ResourceError(_cluster_message(cfg, est.min_gpus_80gb))
    weights, grads, optimizer = (x / shard_over for x in (est.weights, est.grads, est.optimizer))
    activations = est.activations_checkpointed if activation_checkpointing else est.activations
    need = weights + grads + optimizer + activations
    available = available_memory(device)
    usable = None if available is None else USABLE_FRACTION * available
    report = replace(
        est,
        dtype=dtype,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        train_total=need,
        device=str(device),
        available=None if available is None else float(available),
        usable=usable,
    )
    if usable is None:
        log.warning(
            "cannot measure free memory on %s; skipping the resource check. %s", device, report.describe()
        )
        return report
    if not report.fits:
        raise ResourceError(_explain(cfg, report, activation_checkpointing))
    log.info("%s: fits (%.0f%% of it usable)", report.describe(), 100 * USABLE_FRACTION)
    return report


def _explain(cfg: ModelConfig, r: MemoryEstimate, checkpointing: bool) -> str:
    """The refusal message: the numbers, then the changes that would make the run fit."""
    assert r.available is not None and r.usable is not None
    act_ckpt = r.activations_checkpointed
    lines = [
        f"training {cfg.name!r} does not fit in {r.device} memory at micro_batch={r.micro_batch}, "
        f"seq_len={r.seq_len}, {r.dtype}: need {r.need / GIB:.2f} GiB (weights {r.weights / GIB:.2f}, "
        f"grads {r.grads / GIB:.2f}, optimizer {r.optimizer / GIB:.2f}, activations {r.activations / GIB:.2f} "
        f"GiB); available {r.available / GIB:.2f} GiB, of which {USABLE_FRACTION:.0%} = "
        f"{r.usable / GIB:.2f} GiB is usable.",
        "To fit:",
    ]
    states = r.weights + r.grads + r.optimizer
    room = r.usable - states
    if room <= 0:
        lines.append(
            f"- the weights, gradients and optimizer states alone need {states / GIB:.2f} GiB: a smaller "
            "micro_batch or seq_len cannot help; use a smaller preset (`moeforge model mini "
            f"{cfg.name} --params ...`, or a smaller config)"
        )
    else:
        per_seq = r.activations / r.micro_batch
        max_mb = math.floor(room / per_seq)
        if max_mb >= 1:
            lines.append(
                f"- micro_batch ≤ {max_mb} (activations take {per_seq / GIB:.2f} GiB per sequence of "
                f"{r.seq_len} tokens); keep the global batch with more gradient-accumulation steps"
            )
        max_seq = math.floor(room / (per_seq / r.seq_len) / r.micro_batch)
        if max_seq >= 1:
            lines.append(f"- or seq_len ≤ {max_seq} at micro_batch={r.micro_batch}")
        if not checkpointing and states + act_ckpt <= r.usable:
            lines.append(f"- or full activation checkpointing (activations {act_ckpt / GIB:.2f} GiB)")
        lines.append(f"- or a smaller preset (`moeforge model mini {cfg.name} --params ...`)")
    if r.min_gpus_80gb > 0:
        lines.append(
            f"- or more GPUs with FSDP (shard_over): this model needs at least {r.min_gpus_80gb} 80 GB "
            f"GPU{'s' if r.min_gpus_80gb > 1 else ''} with FSDP + expert parallelism and activation checkpointing"
        )
    else:
        lines.append("- one micro-batch's checkpointed activations exceed an 80 GB GPU: lower seq_len first")
    return "\n".join(lines)
