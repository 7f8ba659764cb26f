"""Leakage-free train/valid/test assignment, decided per document before any packing.

The rule, exactly:

- A record of a held-out family (``split.holdout_families``) goes to **test**, always.
- Any other record is placed by its *unit*: its duplicate-cluster id when it has one, else its id.
  ``u = int(sha256(f"{seed}:{unit}")[:8 bytes], big-endian) / 2**64`` is uniform in [0, 1); the record
  goes to train when ``u < train``, to valid when ``u < train + valid``, else to test.

Because the placement is a function of the unit alone, every member of a duplicate group lands in the
same split, in every run and in any order of processing; nothing crosses splits.

An eval split is never silently empty or tiny: when a split has a non-zero ratio but gets fewer than
``min_eval_records`` records, :func:`check_split_sizes` raises :class:`SplitError` naming the split, the
counts and the ways out (more data, a larger ratio, a ratio of 0 to have no such split on purpose, or a
lower minimum).
"""

from __future__ import annotations

import hashlib

from moeforge.data.recipe import SplitConfig

__all__ = ["SPLITS", "SplitError", "assign_split", "check_split_sizes"]

SPLITS = ("train", "valid", "test")


class SplitError(ValueError):
    """The data cannot satisfy the split rule; the message says why and what to change."""


def assign_split(unit: str, cfg: SplitConfig, holdout: bool = False) -> str:
    """The split of one record by the rule in the module docstring."""
    if holdout:
        return "test"
    digest = hashlib.sha256(f"{cfg.seed}:{unit}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.train:
        return "train"
    if u < cfg.train + cfg.valid:
        return "valid"
    return "test"


def check_split_sizes(counts: dict[str, int], pool: int, cfg: SplitConfig) -> None:
    """Raise :class:`SplitError` when a split with a non-zero ratio got fewer than the minimum."""
    for name in ("valid", "test"):
        ratio = getattr(cfg, name)
        got = counts.get(name, 0)
        if ratio > 0 and got < cfg.min_eval_records:
            raise SplitError(
                f"split: {name} would get {got} record(s) ({ratio:g} of a pool of {pool} after dedup); "
                f"at least split.min_eval_records={cfg.min_eval_records} are required. Add data, raise "
                f"split.{name}, set split.{name}: 0 to have no {name} split on purpose, or lower "
                "split.min_eval_records"
            )
    if cfg.train > 0 and counts.get("train", 0) == 0:
        raise SplitError(f"split: train would be empty (pool of {pool} records after dedup and filters)")
