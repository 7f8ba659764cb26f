"""AdamW parameter groups and the learning-rate schedule.

Weight decay applies to matrices only: norms, biases and embeddings (and the tied output head, which is
the embedding) are exempt — decaying them pulls scales and token vectors toward zero for no benefit.

The schedule is a pure function of the step (linear warmup to ``lr``, cosine decay to ``min_lr`` at
``total_steps``, constant ``min_lr`` after) rather than a stateful scheduler object: nothing to build
without its horizon, nothing to checkpoint, and a resumed run gets the exact same rate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moeforge.train.config import OptimConfig

__all__ = ["build_optimizer", "lr_at", "param_groups", "set_lr"]


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
