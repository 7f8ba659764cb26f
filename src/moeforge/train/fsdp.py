"""FSDP2 (``distributed: fsdp``): sharding the model, and checkpoints through ``torch.distributed.checkpoint``.

:func:`shard_model` applies ``fully_shard`` to every transformer block, then to the model (the root
group holds the embedding, the final norm and the — possibly tied — LM head). Parameters become
``DTensor`` shards (dim 0 split over the processes); buffers (router biases, ghost α, noise counters)
stay whole on every process and move identically, since routing loads are all-reduced. The optimizer
must be built *after* sharding, over the sharded parameters. ``reshard_after_forward`` is on for every
block but the last (its parameters are needed again at once by the backward); on CUDA a bf16 run
all-gathers bf16 parameters and reduces gradients in fp32 (``MixedPrecisionPolicy``), on CPU nothing is
cast.

A checkpoint of a sharded model (:func:`save_checkpoint`) is the usual step directory, built under a
temporary name by rank 0 and renamed after every process has written, holding

- ``dcp/``: model and optimizer state as ``torch.distributed.checkpoint`` shards (one file per process
  and ``.metadata``), written by every process — what a resume loads (:func:`load_state`);
- ``model.safetensors``: the consolidated weights (gathered to rank 0 on CPU), tied tensors once, as a
  single-process run writes them, so export, serve, eval and ``init_from`` read it unchanged;
- ``rng.safetensors`` and ``state.json`` (the optimizer's param groups and ``"sharded": "dcp"``);
  ``checksums.json`` covers every file, the shards included.

No ``optimizer.safetensors``: the optimizer state lives in ``dcp/`` only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from moeforge.io import atomic_directory, atomic_write_json, write_checksums

__all__ = [
    "DCP_DIR",
    "clip_grad_norm",
    "is_sharded",
    "load_state",
    "local_rows",
    "lockstep",
    "save_checkpoint",
    "shard_model",
]

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
T = TypeVar("T")

# torch.distributed.{fsdp,tensor,checkpoint} are imported where used (together ~0.7 s): nothing can be
# sharded, nor a DTensor, before torch.distributed.fsdp / .tensor were imported


def _is_dtensor(t: object) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (its parameters are DTensor shards)."""
    mod = sys.modules.get("torch.distributed.fsdp")
    return mod is not None and isinstance(model, mod.FSDPModule)


def shard_model(
    model: nn.Module, *, device: torch.device, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """``fully_shard`` each block of ``model.blocks``, then ``model`` itself (in place; returns ``model``).
    ``param_dtype`` (bf16 on CUDA) is the dtype parameters are all-gathered and computed in, gradients are
    reduced in fp32; it is ignored off CUDA."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if param_dtype is not None and param_dtype != torch.float32 and device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(getattr(model, "blocks", []))
    for i, block in enumerate(blocks):
        # the last block's parameters are the first the backward needs: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp)  # the root: FSDP keeps its parameters gathered after forward
    return model


def clip_grad_norm(params: Any, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over (possibly DTensor) parameters; the global norm, a 0-d tensor on the
    gradients' device (no host sync: the trainer reads it at log steps). The norm of DTensor gradients is
    itself a DTensor: its full value is the norm over all shards."""
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if _is_dtensor(total):
        total = total.full_tensor()  # type: ignore[attr-defined]
    return total.detach()


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(rows, first)``: the rows of ``t`` this process holds — all of them, or of a DTensor sharded on
    dim 0 its local shard (writable in place: it is the parameter's storage) — and the global index of
    the first."""
    if not _is_dtensor(t):
        return t, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)  # type: ignore[attr-defined]
    return t.to_local(), int(offset[0])  # type: ignore[attr-defined]


def lockstep(items: Iterable[T], device: torch.device) -> Iterator[T | None]:
    """``items``, then ``None`` until every process has run out of its own: each process gets as many
    turns as the process with the most items. A sharded model's forward all-gathers (a collective), so
    an evaluation whose processes hold unequal numbers of batches runs a dropped forward on each ``None``.
    One small all-reduce per turn, on ``device`` (the process's: NCCL takes no CPU tensors), read on the
    host (the count cannot be agreed on first: ``items`` may be a generator)."""
    it = iter(items)
    while True:
        item = next(it, None)
        # (dist directly: train.distributed imports this module)
        more = torch.tensor([item is not None], dtype=torch.int64, device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        yield item


def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names of parameters already listed under an earlier name (a tied LM head), which
    :func:`moeforge.train.checkpoint.model_state` leaves out."""
    first: dict[int, str] = {}
    out: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.add(name)
        else:
            first[id(p)] = name
    return out


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated state dict on CPU, tied tensors once — on rank 0; empty on the other ranks.
    A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full, _ = get_state_dict(model, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    skip = _tied_aliases(model)
    return {k: v.detach().contiguous() for k, v in full.items() if k not in skip}


def _groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        for g in optimizer.param_groups
    ]


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    metric: float | None,
    keep_last: int,
    capture_rng: Callable[[], tuple[dict[str, Any], dict[str, torch.Tensor]]],
    prune: Callable[[Path, int], None],
    error_type: type[Exception] = RuntimeError,
) -> Path | None:
    """Write ``run_dir/checkpoints/step-XXXXXXXX`` from every process (see the module docstring); the
    path on rank 0, None on the others. A collective: every process calls it with the same ``step``.
    Rank 0 builds the directory under a temporary name, tells the others where, every process writes its
    DCP shards there, rank 0 writes the rest and renames it into place; then all meet at a barrier, so no
    process goes on before the checkpoint exists. ``capture_rng``, ``prune`` and ``error_type`` are
    checkpoint.py's own (passed in: this module sits below it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpts = run_dir / "checkpoints"
    final = ckpts / f"step-{step:08d}"
    main = dist.get_rank() == 0
    msd, osd = get_state_dict(model, optimizer)
    full = full_model_state(model)
    told = False  # whether rank 0 has told the others where to write
    try:
        if main:
            with atomic_directory(final, overwrite=True) as tmp:
                dist.broadcast_object_list([str(tmp)], src=0)
                told = True
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp / DCP_DIR)
                # dcp.save returns on the coordinator after every process's shards are written
                rng_js, rng_t = capture_rng()
                save_file(full, str(tmp / "model.safetensors"))
                save_file(rng_t, str(tmp / "rng.safetensors"))
                doc = {
                    **state,
                    "step": step,
                    "metric": metric,
                    "rng": rng_js,
                    "optimizer_groups": _groups(optimizer),
                    "sharded": DCP_DIR,
                }
                atomic_write_json(tmp / "state.json", doc)
                write_checksums(tmp)
            prune(ckpts, keep_last)
            log.info("checkpoint %s (sharded over %d processes)", final, dist.get_world_size())
        else:
            where: list[Any] = [None]
            dist.broadcast_object_list(where, src=0)
            if not where[0]:
                raise error_type(f"{final}: rank 0 could not create the checkpoint directory")
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=Path(where[0]) / DCP_DIR)
    finally:
        if main and not told:  # failed before the others learnt where: they must not wait for it
            dist.broadcast_object_list([""], src=0)
        dist.barrier()
    return final if main else None


def load_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    error_type: type[Exception] = RuntimeError,
) -> None:
    """Load ``path/dcp`` into ``model`` (and ``optimizer``): each process reads its own shards. A
    collective under a process group. Raises ``error_type`` (checkpoint.py passes its CheckpointError)
    when the checkpoint has no ``dcp/`` (written without FSDP) or its state does not fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    src = path / DCP_DIR
    if not (src / ".metadata").is_file():
        raise error_type(
            f"{path}: no sharded state ({DCP_DIR}/.metadata); it was written without `distributed: fsdp` — "
            "resume it with the strategy that wrote it"
        )
    optims = [optimizer] if optimizer is not None else []
    msd, osd = get_state_dict(model, optims)
    sd: dict[str, Any] = {"model": msd}
    if optimizer is not None:
        sd["optim"] = osd
    try:
        dcp.load(sd, checkpoint_id=src)
    except (CheckpointException, RuntimeError, ValueError, KeyError) as exc:
        raise error_type(f"{path}: the sharded state does not fit this model/optimizer: {exc}") from exc
    set_state_dict(model, optims, model_state_dict=sd["model"], optim_state_dict=sd.get("optim", {}))
