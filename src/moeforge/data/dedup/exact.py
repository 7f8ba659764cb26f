"""Exact deduplication over every source of a run, with bounded memory.

Each map task writes one fixed-size key per record (:data:`KEY_DTYPE`, 46 bytes: the 256-bit content
hash, the record's index in its task, its length, a quality score, whether its family is held out and
its split). The reduce step finds duplicate groups one hash bucket at a time: records are bucketed by
the leading bits of their hash, so with ``B`` buckets at most ``46 × N / B`` bytes of keys are in
memory at once, plus 5 bytes per record for the result (a keep flag and a duplicate count). ``B`` is
the smallest power of two that fits the recipe's ``dedup.memory_mb``.

Which copy survives: a copy from a held-out family first (an eval item that also appears in training
data stays in test and leaves train), then by policy — ``keep_first`` (source order), ``keep_longest``
or ``keep_best_quality`` — and ties go to the first in source order. Every decision depends only on the
keys, so it is the same in every run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["KEY_BYTES", "KEY_DTYPE", "DedupResult", "find_exact_duplicates", "id_words", "make_keys"]

log = logging.getLogger(__name__)

KEY_DTYPE = np.dtype(
    [
        ("h", "<u8", (4,)),
        ("idx", "<u4"),
        ("length", "<u4"),
        ("quality", "<f4"),
        ("holdout", "u1"),
        ("split", "u1"),
    ]
)
KEY_BYTES = KEY_DTYPE.itemsize
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


def id_words(record_id: str) -> bytes:
    """The 32 digest bytes of a ``sha256:…`` id."""
    return bytes.fromhex(record_id[7:])


def make_keys(
    digests: list[bytes], lengths: list[int], quality: list[float], holdout: list[bool], splits: list[int]
) -> np.ndarray:
    """Build the key array of one task from per-record columns (record order = index)."""
    n = len(digests)
    keys = np.zeros(n, dtype=KEY_DTYPE)
    if n:
        keys["h"] = np.frombuffer(b"".join(digests), dtype=">u8").reshape(n, 4)
        keys["idx"] = np.arange(n, dtype=np.uint32)
        keys["length"] = np.minimum(np.asarray(lengths, dtype=np.int64), 2**32 - 1)
        keys["quality"] = np.asarray(quality, dtype=np.float32)
        keys["holdout"] = np.asarray(holdout, dtype=np.uint8)
        keys["split"] = np.asarray(splits, dtype=np.uint8)
    return keys


@dataclass
class DedupResult:
    """Per task: ``keep[i]`` is 1 for a surviving record; ``copies[i]`` counts the copies it stands for."""

    keep: list[np.ndarray]
    copies: list[np.ndarray]
    buckets: int
    groups_with_duplicates: int

    @property
    def dropped(self) -> int:
        return int(sum(len(k) - int(k.sum()) for k in self.keep))


def find_exact_duplicates(
    key_files: list[Path], policy: str = "keep_first", memory_mb: int = 256
) -> DedupResult:
    """Find duplicate groups across tasks; see the module docstring for the rules and memory bound."""
    if policy not in ("keep_first", "keep_longest", "keep_best_quality"):
        raise ValueError(
            f"unknown dedup policy {policy!r}; use keep_first, keep_longest or keep_best_quality"
        )
    arrays = [np.load(f, mmap_mode="r", allow_pickle=False) for f in key_files]
    total = sum(len(a) for a in arrays)
    budget = max(memory_mb, 1) * 2**20
    bits = max(0, math.ceil(math.log2(max(total * KEY_BYTES / budget, 1.0))))
    keep = [np.ones(len(a), dtype=np.uint8) for a in arrays]
    copies = [np.ones(len(a), dtype=np.int32) for a in arrays]
    groups = 0
    for bucket in range(1 << bits):
        parts = []
        for t, a in enumerate(arrays):
            if not len(a):
                continue
            if bits:
                rows = np.nonzero((a["h"][:, 0] >> np.uint64(64 - bits)) == bucket)[0]
                sel = a[rows]
            else:
                sel = np.asarray(a)
            if len(sel):
                part = np.empty(len(sel), dtype=[("t", "<u4"), ("k", KEY_DTYPE)])
                part["t"], part["k"] = t, sel
                parts.append(part)
        if not parts:
            continue
        rows = np.concatenate(parts)
        k = rows["k"]
        if policy == "keep_longest":
            metric = -k["length"].astype(np.int64)
        elif policy == "keep_best_quality":
            metric = -k["quality"].astype(np.float64)
        else:
            metric = np.zeros(len(k))
        h = k["h"]
        order = np.lexsort(
            (k["idx"], rows["t"], metric, -k["holdout"].astype(np.int16), h[:, 3], h[:, 2], h[:, 1], h[:, 0])
        )
        hs = h[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = np.any(hs[1:] != hs[:-1], axis=1)
        starts = np.nonzero(first)[0]
        sizes = np.diff(np.append(starts, len(order)))
        groups += int((sizes > 1).sum())
        tasks, idx = rows["t"], k["idx"]
        losers = order[~first]
        winners = order[starts[sizes > 1]]
        for t in np.unique(tasks[losers]).tolist():
            keep[t][idx[losers][tasks[losers] == t]] = 0
        for t in np.unique(tasks[winners]).tolist():
            sel = tasks[winners] == t
            copies[t][idx[winners][sel]] = sizes[sizes > 1][sel]
    log.info("exact dedup: %d records, %d buckets, %d duplicate groups", total, 1 << bits, groups)
    return DedupResult(keep=keep, copies=copies, buckets=1 << bits, groups_with_duplicates=groups)
