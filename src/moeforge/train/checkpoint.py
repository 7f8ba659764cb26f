"""Checkpoints: everything a run needs to continue bit for bit, in files nothing has to unpickle.

``RUN/checkpoints/step-00000100/`` holds

- ``model.safetensors``: weights and buffers (router biases, noise step counters, ghost α);
- ``optimizer.safetensors`` + the optimizer's param groups in ``state.json``;
- ``rng.safetensors``: the torch CPU (and CUDA) generator states;
- ``state.json``: step, tokens seen, python and numpy RNG states, loader state, collapse-detector and
  ghost-controller states, the best validation loss so far, and the resolved config.

A checkpoint directory is built under a temporary name and renamed into place (``atomic_directory``),
so a run killed mid-save leaves the previous checkpoints intact and no half-written one. After each
save the oldest are removed, keeping the last ``keep_last`` and the best by validation loss, and so are
the temporary directories of saves that were killed.

Under ``distributed: fsdp`` every process writes its shards of model and optimizer into ``dcp/``
(``torch.distributed.checkpoint``) instead of ``optimizer.safetensors``, and ``model.safetensors`` holds
the consolidated weights: see :mod:`moeforge.train.fsdp`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moeforge.io import CHECKSUMS, atomic_directory, atomic_write_json, verify_checksums, write_checksums
from moeforge.train import fsdp

__all__ = [
    "CheckpointError",
    "TensorsTransform",
    "best_checkpoint",
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "model_state",
    "optimizer_tensors",
    "restore_rng",
    "save_checkpoint",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the model; the message says which."""


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(json_part, tensor_part)`` of the python, numpy and torch generator states."""
    py = random.getstate()
    np_state = np.random.get_state()
    js = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return js, tensors


def restore_rng(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"state.{pid}.{k}"] = t.detach().contiguous().cpu()
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, groups


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors as a checkpoint stores them (``state.<param index>.<name>``)."""
    return _optimizer_parts(opt)[0]


def _restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    fixed = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    try:
        opt.load_state_dict({"state": state, "param_groups": fixed})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"optimizer state does not match this model's parameters: {exc}") from exc


# (weights, optimizer tensors) → (weights, optimizer tensors): between a parallel layout's shards and the
# whole tensors a checkpoint holds (moeforge.train.expert_parallel)
TensorsTransform = Callable[
    [dict[str, torch.Tensor], dict[str, torch.Tensor]],
    tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
]


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` restored besides the tensors (step, loader state, …)."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    metric: float | None = None,
    whole: TensorsTransform | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step-XXXXXXXX`` atomically, then prune. ``state`` is any JSON-serializable
    trainer state (loader, detector, config …); RNG states are captured here. A model sharded by FSDP2 is
    saved by every process together (:func:`moeforge.train.fsdp.save_checkpoint`; None on ranks > 0).
    ``whole(weights, optimizer_tensors)`` turns a parallel layout's local shards into whole tensors (expert
    parallelism: a collective the caller runs on every process), so a checkpoint is the same whatever the
    layout that wrote it."""
    if fsdp.is_sharded(model):
        return fsdp.save_checkpoint(  # type: ignore[return-value]
            run_dir,
            step=step,
            model=model,
            optimizer=optimizer,
            state=state,
            metric=metric,
            keep_last=keep_last,
            capture_rng=capture_rng,
            prune=_prune,
            error_type=CheckpointError,
        )
    ckpts = run_dir / "checkpoints"
    final = ckpts / f"step-{step:08d}"
    rng_js, rng_t = capture_rng()
    opt_t, groups = _optimizer_parts(optimizer)
    weights = model_state(model)
    if whole is not None:  # a parallel layout's shards, gathered into whole tensors by every process
        weights, opt_t = whole(weights, opt_t)
    with atomic_directory(final, overwrite=True) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        save_file(rng_t, str(tmp / "rng.safetensors"))
        full = {**state, "step": step, "metric": metric, "rng": rng_js, "optimizer_groups": groups}
        atomic_write_json(tmp / "state.json", full)
        write_checksums(tmp)
    _prune(ckpts, keep_last)
    log.info("checkpoint %s", final)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    out = []
    for d in ckpts.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / "state.json").is_file() and (d / "model.safetensors").is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The kept checkpoint with the lowest recorded validation loss (the earliest on ties) — the one
    pruning always keeps — else the latest."""
    scored = [(m, s, p) for s, p in list_checkpoints(run_dir) if (m := _metric(p)) is not None]
    return min(scored)[2] if scored else latest_checkpoint(run_dir)


def _metric(path: Path) -> float | None:
    try:
        v = json.loads((path / "state.json").read_text()).get("metric")
    except (OSError, ValueError):
        return None
    return float(v) if v is not None else None


def _prune(ckpts: Path, keep_last: int) -> None:
    # what a save killed mid-way left (atomic_directory's temporary and replaced directories): the run's
    # lock is held by this process, so no other save is under way
    for stale in [*ckpts.glob(".step-*.tmp"), *ckpts.glob(".step-*.old")]:
        shutil.rmtree(stale, ignore_errors=True)
    found = list_checkpoints(ckpts.parent)
    keep = {p for _, p in found[-keep_last:]}
    scored = [(m, s, p) for s, p in found if (m := _metric(p)) is not None]
    if scored:
        keep.add(min(scored)[2])  # best: lowest validation loss, earliest on ties
    for _, p in found:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng_state: bool = True,
    verify: bool = True,
    local: TensorsTransform | None = None,
) -> Checkpoint:
    """Load weights (strict), optimizer and RNG states from a checkpoint directory, after checking its
    files against ``checksums.json`` (``verify=False`` when the caller just did). ``local(weights,
    optimizer_tensors)`` cuts the whole tensors to this process's shards (expert parallelism)."""
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (needs model.safetensors and state.json)")
    if verify:
        verify_checkpoint(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if fsdp.is_sharded(model):  # every process reads its shards of dcp/ (model and optimizer)
        fsdp.load_state(path, model, optimizer, CheckpointError)
        if restore_rng_state:
            restore_rng(state["rng"], load_file(str(path / "rng.safetensors")))
        return Checkpoint(path, state)
    if optimizer is not None and not (path / "optimizer.safetensors").is_file() and state.get("sharded"):
        raise CheckpointError(
            f"{path} was written with `distributed: fsdp` (its optimizer state is in {state['sharded']}/ "
            "only); resume it with distributed: fsdp"
        )
    weights = load_file(str(path / "model.safetensors"))
    opt_t = load_file(str(path / "optimizer.safetensors")) if optimizer is not None else {}
    if local is not None:  # whole tensors cut to this process's shards
        weights, opt_t = local(weights, opt_t)
    current = model.state_dict()
    missing = [k for k in current if k not in weights and not _tied_alias(k, current, weights)]
    unexpected = [k for k in weights if k not in current]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "was it written with a different model config?"
        )
    for k, v in current.items():
        if k in weights:
            if weights[k].shape != v.shape:
                raise CheckpointError(
                    f"{path}: {k} has shape {tuple(weights[k].shape)}, model has {tuple(v.shape)}"
                )
            with torch.no_grad():
                v.copy_(weights[k])
    if optimizer is not None:
        _restore_optimizer(optimizer, opt_t, state["optimizer_groups"])
    if restore_rng_state:
        restore_rng(state["rng"], load_file(str(path / "rng.safetensors")))
    return Checkpoint(path, state)


def verify_checkpoint(path: Path) -> None:
    """Check every file of a checkpoint against its ``checksums.json``; raise :class:`CheckpointError`
    naming each corrupt file. A checkpoint written before checksums existed is accepted with a warning."""
    if not (path / CHECKSUMS).is_file():
        log.warning("%s: no %s (written by an older moeforge); its bytes cannot be verified", path, CHECKSUMS)
        return
    problems = verify_checksums(path)
    if problems:
        raise CheckpointError(
            f"{path}: corrupt checkpoint — {'; '.join(problems[:5])}. Delete this checkpoint directory to "
            "resume from an earlier one (`moeforge train verify RUN` checks them all)"
        )


def _tied_alias(key: str, current: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> bool:
    """Whether ``key`` shares storage with a tensor that was saved under another name."""
    t = current[key]
    return any(
        k in weights and v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        for k, v in current.items()
        if k != key
    )
