"""AdamW parameter groups and the learning-rate schedule.

Weight decay applies to matrices only: norms, biases and embeddings (and the tied output head, which is
the embedding) are exempt — decaying them pulls scales and token vectors toward zero for no benefit.

Frozen parameters (``requires_grad=False``, see :func:`freeze_parameters`) are left out of the groups, so
the optimizer holds (and checkpoints) state for the trainable ones only.

The schedule is a pure function of the step (linear warmup to ``lr``, cosine decay to ``min_lr`` at
``total_steps``, constant ``min_lr`` after) rather than a stateful scheduler object: nothing to build
without its horizon, nothing to checkpoint, and a resumed run gets the exact same rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeforge.config import ConfigError
from moeforge.train.config import FreezeConfig, OptimConfig

__all__ = ["FrozenParams", "build_optimizer", "freeze_parameters", "lr_at", "param_groups", "set_lr"]


@dataclass(frozen=True)
class FrozenParams:
    """What :func:`freeze_parameters` did; counts are of distinct tensors' elements (a tied head once)."""

    trainable: int
    total: int
    frozen_names: tuple[str, ...]

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def freeze_parameters(model: nn.Module, cfg: FreezeConfig) -> FrozenParams:
    """Set ``requires_grad=False`` on the parameters ``cfg`` freezes: ``embed.*`` (and so a tied LM head)
    with ``embeddings``, ``lm_head.*`` with ``lm_head``, ``blocks.{i}.*`` for ``i < blocks``. Call it
    before :func:`build_optimizer`. Raises ConfigError naming the ``freeze`` field that cannot apply."""
    n_blocks = len(getattr(model, "blocks", []))
    if cfg.blocks > n_blocks:
        raise ConfigError(
            f"freeze.blocks is {cfg.blocks} but the model has {n_blocks} blocks; use 0..{n_blocks}"
        )
    prefixes: list[str] = [f"blocks.{i}." for i in range(cfg.blocks)]
    if cfg.embeddings:
        prefixes.append("embed.")
    if cfg.lm_head:
        prefixes.append("lm_head.")
    frozen: list[str] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(tuple(prefixes)):
            p.requires_grad_(False)
            frozen.append(name)
    if cfg.lm_head:
        head = getattr(getattr(model, "lm_head", None), "weight", None)
        embed = getattr(getattr(model, "embed", None), "weight", None)
        if head is not None and head is embed and not cfg.embeddings:
            raise ConfigError(
                "freeze.lm_head: the LM head is tied to the token embedding; set freeze.embeddings to freeze both"
            )
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():  # distinct tensors only
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise ConfigError("freeze: every parameter is frozen; nothing would train")
    return FrozenParams(trainable, total, tuple(frozen))


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "embed" in name or "norm" in name or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups, in a fixed order: matrices with decay, everything else without."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if _no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool | None = None) -> torch.optim.AdamW:
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    kwargs: dict[str, Any] = {}
    if fused is not None:
        kwargs["fused"] = fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate, honouring a group's ``lr_scale`` (ghost experts follow their α)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
