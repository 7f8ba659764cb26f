"""Preference losses on sequence log-probabilities: DPO (sigmoid), IPO and the reference-free SimPO.

Every loss works on a batch of pairs, given per pair the summed log-probability of the chosen and of the
rejected completion under the policy (``chosen_logps``, ``rejected_logps``), under the reference model
(``ref_chosen_logps``, ``ref_rejected_logps``: read from a cache computed once, never a second model at
every step) and the number of completion tokens of each side. They return the per-pair loss and the
implicit rewards ``β · (log π − log π_ref)`` that the metrics report (accuracy: chosen reward above
rejected; margin: their difference).

- **DPO** (Rafailov et al., 2023), TRL's ``sigmoid``: ``−log σ(β · ((π_c − ref_c) − (π_r − ref_r)))``, with
  optional label smoothing ε (conservative DPO): ``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)``.
- **IPO** (Azar et al., 2023), as TRL computes it: the log-ratios averaged over each side's completion
  tokens, then ``((c / n_c − r / n_r) − 1 / (2β))²`` — TRL normalizes by length so β is comparable across
  lengths (the paper's results use that form).
- **SimPO** (Meng et al., 2024), reference-free: ``−log σ(β · (π_c / n_c − π_r / n_r) − γ)``; its implicit
  reward is the length-normalized log-probability ``β · π / n``.

``tests/train/test_preference.py`` checks DPO and IPO against TRL 1.16's ``DPOTrainer`` loss code on
identical log-probabilities (1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["PreferenceLoss", "PreferenceOutput", "check_settings", "preference_loss"]

PreferenceLoss = Literal["dpo", "ipo", "simpo"]


@dataclass
class PreferenceOutput:
    """``losses`` per pair (mean it for the step), the implicit rewards per pair, and the metrics of the
    batch (detached floats): ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracy``,
    ``rewards/margin``, ``logps/chosen``, ``logps/rejected``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, float]:
        c, r = self.chosen_rewards.detach(), self.rejected_rewards.detach()
        return {
            "loss": float(self.losses.detach().mean()),
            "rewards/chosen": float(c.mean()),
            "rewards/rejected": float(r.mean()),
            "rewards/accuracy": float((c > r).float().mean()),
            "rewards/margin": float((c - r).mean()),
            "logps/chosen": float(chosen_logps.detach().mean()),
            "logps/rejected": float(rejected_logps.detach().mean()),
        }


def check_settings(kind: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Refuse an unknown loss, a non-positive β or a label smoothing outside [0, 0.5), naming it."""
    if kind not in ("dpo", "ipo", "simpo"):
        raise ValueError(f"preference loss: unknown {kind!r}; the losses are dpo, ipo, simpo")
    if beta <= 0:
        raise ValueError(f"preference loss: beta must be > 0 (got {beta})")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"preference loss: label_smoothing must be in [0, 0.5) (got {label_smoothing})")


def preference_loss(
    kind: PreferenceLoss,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PreferenceOutput:
    """The ``kind`` loss of a batch of pairs (see the module docstring); every tensor is ``[pairs]``.
    The reference log-probs are required by DPO and IPO and ignored by SimPO."""
    check_settings(kind, beta, label_smoothing)
    n_c = chosen_tokens.to(chosen_logps.dtype).clamp(min=1.0)
    n_r = rejected_tokens.to(rejected_logps.dtype).clamp(min=1.0)
    if kind == "simpo":
        c_avg, r_avg = chosen_logps / n_c, rejected_logps / n_r
        losses = -F.logsigmoid(beta * (c_avg - r_avg) - simpo_gamma)
        return PreferenceOutput(losses, beta * c_avg.detach(), beta * r_avg.detach())
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(
            f"preference loss {kind}: needs the reference log-probs (the cache of the reference model)"
        )
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if kind == "dpo":
        delta = chosen_ratio - rejected_ratio
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    else:  # ipo
        delta = chosen_ratio / n_c - rejected_ratio / n_r
        losses = (delta - 1 / (2 * beta)) ** 2
    return PreferenceOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
