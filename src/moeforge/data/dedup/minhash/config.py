"""MinHash LSH configuration (recipe section ``near_dedup:``) and the S-curve its bands × rows imply."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from moeforge.config import StrictModel

__all__ = ["LshCurve", "MinHashConfig", "Policy", "format_lsh_curve", "lsh_curve"]

Policy = Literal["keep_first", "keep_longest", "keep_best_quality"]


class MinHashConfig(StrictModel):
    """Near-duplicate detection (recipe section ``near_dedup:``)."""

    enabled: bool = False
    shingle: Literal["word", "char"] = Field(
        default="word", description="n-grams of words (letters and digits) or of characters"
    )
    ngram: int = Field(default=5, ge=1, le=64, description="tokens per shingle")
    bands: int = Field(default=16, ge=1, le=1024, description="LSH bands (b)")
    rows: int = Field(default=8, ge=1, le=64, description="permutations per band (r)")
    seed: int = Field(default=0, ge=0, description="draws the permutations")
    verify_jaccard: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="if set, a candidate pair is kept only if the true Jaccard of its shingle sets "
        "reaches this (removes LSH false positives; re-reads the candidates' texts)",
    )
    policy: Policy = Field(
        default="keep_first",
        description="which member of a cluster survives: the first in source order, the longest "
        "text, or the best quality score; a held-out family's member first; ties go to the first",
    )
    memory_mb: int = Field(default=256, ge=1, description="memory budget of hashing and clustering buffers")

    @model_validator(mode="after")
    def _check_num_perm(self) -> MinHashConfig:
        if self.bands * self.rows > 4096:
            raise ValueError(
                f"bands × rows = {self.bands * self.rows} permutations is too many (at most 4096); "
                "lower near_dedup.bands or near_dedup.rows"
            )
        return self

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


# ----------------------------------------------------------------------------------------- S-curve


@dataclass(frozen=True)
class LshCurve:
    """The LSH S-curve: ``probability[i]`` that a pair at Jaccard ``jaccard[i]`` becomes a candidate."""

    bands: int
    rows: int
    threshold: float
    jaccard: tuple[float, ...]
    probability: tuple[float, ...]


def lsh_curve(bands: int, rows: int, jaccard: Sequence[float] | None = None) -> LshCurve:
    """Threshold ``(1/bands)^(1/rows)`` and ``P(candidate | J) = 1 − (1 − J^rows)^bands`` at each ``J``
    (default 0.1, 0.2, …, 1.0 plus 0.75, 0.85, 0.95)."""
    if bands < 1 or rows < 1:
        raise ValueError(f"bands and rows must be at least 1 (got bands={bands}, rows={rows})")
    js = sorted(jaccard if jaccard is not None else [*(i / 10 for i in range(1, 11)), 0.75, 0.85, 0.95])
    probs = tuple(1.0 - (1.0 - j**rows) ** bands for j in js)
    return LshCurve(bands, rows, (1.0 / bands) ** (1.0 / rows), tuple(js), probs)


def format_lsh_curve(curve: LshCurve) -> str:
    """A two-column text table of the curve, headed by its threshold."""
    lines = [
        f"MinHash LSH: {curve.bands} bands × {curve.rows} rows = {curve.bands * curve.rows} permutations, "
        f"threshold (1/b)^(1/r) = {curve.threshold:.3f}",
        "  Jaccard  P(candidate)",
    ]
    lines += [f"  {j:7.2f}  {p:12.4f}" for j, p in zip(curve.jaccard, curve.probability, strict=True)]
    return "\n".join(lines)
