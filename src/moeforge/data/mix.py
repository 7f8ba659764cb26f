"""Mixing: reach target shares of the training split per language, domain or family.

Shares are measured in tokens by default. Until a tokenizer exists the count is an approximation,
``approx_tokens(text) = ceil(4/3 × whitespace words) + 1`` per turn or text, which is within ~20% of
GPT-2 BPE on English prose and said so wherever it is reported (``"token_unit": "approx_words"``).

Given the train tokens ``T_g`` of each group and the targets ``t_g`` (summing to 1), the largest total
``N`` that every group can supply with at most ``max_repeat`` passes over its data is
``N = min_g(T_g × max_repeat / t_g)``; group ``g`` then contributes ``t_g × N`` tokens, i.e. its sampling
factor is ``f_g = t_g × N / T_g``. A factor below 1 down-samples: the group's records are ordered by
``sha256(seed:id)`` and taken until the budget is reached, so the choice is seeded, stable and exact to
one record. A factor above 1 (only when ``max_repeat > 1``) repeats records: each gets a weight
``meta.extra["mix_repeat"]`` of ``floor(f)`` or ``floor(f) + 1`` (the latter for a seeded fraction
``f − floor(f)`` of them); records are never written twice, so ids stay unique, and the token stage
repeats them by weight.

Only the train split is mixed: valid and test keep their natural distribution so that evaluation
measures the data as it is. A group present in train but missing from the targets is an error naming
it (add it to the targets with a share, or 0 to drop it on purpose).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from moeforge.config import StrictModel

__all__ = ["MixConfig", "MixError", "MixPlan", "approx_tokens", "plan_mixture"]


class MixError(ValueError):
    """The targets cannot be applied to this data; the message says why."""


class MixConfig(StrictModel):
    """Recipe section ``mix:``."""

    enabled: bool = False
    by: Literal["lang", "domain", "family"] = "lang"
    target: dict[str, float] = Field(default_factory=dict, description="group → share of train tokens")
    unit: Literal["tokens", "records"] = "tokens"
    max_repeat: float = Field(default=1.0, ge=1.0, le=100.0, description="at most this many passes per group")
    seed: int = 0

    @model_validator(mode="after")
    def _shares(self) -> MixConfig:
        if self.enabled:
            if not self.target:
                raise ValueError("mix.target is empty; give a share per group, e.g. {ru: 0.4, en: 0.6}")
            bad = {k: v for k, v in self.target.items() if not 0.0 <= v <= 1.0}
            if bad:
                raise ValueError(f"mix.target shares must be within [0, 1] (got {bad})")
            total = sum(self.target.values())
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"mix.target shares must sum to 1 (got {total:g})")
        return self


def approx_tokens(texts: list[str]) -> int:
    """The documented token approximation for one record (its text, or each turn of a chat)."""
    return sum(math.ceil(len(t.split()) * 4 / 3) + 1 for t in texts)


def _order_key(seed: int, record_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "big")


@dataclass
class MixPlan:
    """The decision: per group its factor; per record (by position in the input order) its weight."""

    factors: dict[str, float]
    weights: np.ndarray  # int32 per train record: 0 dropped, 1 kept, k repeated k times
    available: dict[str, int]
    achieved: dict[str, int] = field(default_factory=dict)

    def shares(self, which: Literal["available", "achieved"]) -> dict[str, float]:
        counts = self.available if which == "available" else self.achieved
        total = sum(counts.values()) or 1
        return {k: round(v / total, 6) for k, v in sorted(counts.items())}


def plan_mixture(groups: list[str], sizes: np.ndarray, ids: list[str], cfg: MixConfig) -> MixPlan:
    """Decide the weight of each train record. ``groups[i]``, ``sizes[i]`` (tokens or 1) and ``ids[i]``
    describe record ``i``; see the module docstring for the rule."""
    sizes = np.asarray(sizes, dtype=np.int64)
    available: dict[str, int] = {}
    for g, s in zip(groups, sizes.tolist(), strict=True):
        available[g] = available.get(g, 0) + s
    missing = sorted(set(available) - set(cfg.target))
    if missing:
        raise MixError(
            f"mix: train has {cfg.by} group(s) {missing} that mix.target does not name; add them with a share "
            f"(0 drops them on purpose). Targets: {cfg.target}"
        )
    absent = sorted(g for g, t in cfg.target.items() if t > 0 and available.get(g, 0) == 0)
    if absent:
        raise MixError(f"mix: target share > 0 for {cfg.by} {absent}, but train has no records of it")
    budget = min(available[g] * cfg.max_repeat / t for g, t in cfg.target.items() if t > 0)
    factors = {g: (cfg.target.get(g, 0.0) * budget / available[g]) for g in available}
    weights = np.zeros(len(groups), dtype=np.int32)
    achieved: dict[str, int] = dict.fromkeys(available, 0)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for g, idx in members.items():
        f = factors[g]
        order = sorted(idx, key=lambda i: (_order_key(cfg.seed, ids[i]), i))
        if f <= 1.0 + 1e-12:
            want = f * available[g]
            got = 0
            for i in order:
                if got >= want - 1e-9:
                    break
                weights[i] = 1
                got += int(sizes[i])
            achieved[g] = got
        else:
            base = math.floor(f)
            extra = f - base
            for rank, i in enumerate(order):
                weights[i] = base + (1 if rank < round(extra * len(order)) else 0)
                achieved[g] += int(sizes[i]) * int(weights[i])
    return MixPlan(factors={g: round(v, 6) for g, v in sorted(factors.items())}, weights=weights,
                   available=available, achieved=achieved)  # fmt: skip
