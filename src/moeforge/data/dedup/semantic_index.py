"""Semantic dedup, reduce side (numpy only): memory-mapped embeddings, spherical k-means and results.

Split out of :mod:`moeforge.data.dedup.semantic`, which re-exports every name here and drives the
bucketed search with these pieces.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.data.dedup.semantic_config import CHUNK_CELLS, DIM, KMEANS_ITERS, SemanticDedupError


@dataclass
class SemanticResult:
    """Clusters over the concatenation of the embedding files (file order, then row order).

    ``root[i]`` is the smallest global index in document ``i``'s cluster (``i`` itself when it has no
    near-duplicate); ``offsets[t]`` is where file ``t`` starts, ``offsets[-1]`` the total.
    """

    root: np.ndarray
    offsets: np.ndarray
    pairs: int  # distinct pairs with cosine ≥ threshold that the search found
    buckets: int
    largest_bucket: int
    sizes: dict[int, int] = field(default_factory=dict)  # cluster size (≥ 2) → number of such clusters

    @property
    def docs(self) -> int:
        return len(self.root)

    @property
    def clusters(self) -> int:
        """Clusters of two or more documents."""
        return sum(self.sizes.values())

    @property
    def duplicates(self) -> int:
        """Documents a keep-one-per-cluster policy drops."""
        return sum((size - 1) * count for size, count in self.sizes.items())

    def keep(
        self,
        policy: str = "keep_first",
        length: np.ndarray | None = None,
        quality: np.ndarray | None = None,
        prefer: np.ndarray | None = None,
    ) -> np.ndarray:
        """One survivor per cluster as a boolean mask over all documents.

        ``prefer`` (e.g. held-out families, as in exact dedup) wins first, then the policy
        (``keep_longest`` needs ``length``, ``keep_best_quality`` needs ``quality``), then source order.
        """
        n = self.docs
        if policy == "keep_first":
            metric = np.zeros(n)
        elif policy == "keep_longest" and length is not None:
            metric = -np.asarray(length, dtype=np.float64)
        elif policy == "keep_best_quality" and quality is not None:
            metric = -np.asarray(quality, dtype=np.float64)
        else:
            raise ValueError(
                f"policy {policy!r} needs its column: keep_first, keep_longest (length=) or "
                "keep_best_quality (quality=)"
            )
        first = np.zeros(n) if prefer is None else -np.asarray(prefer, dtype=np.float64)
        order = np.lexsort((np.arange(n), metric, first, self.root))
        head = np.ones(n, dtype=bool)
        head[1:] = self.root[order[1:]] != self.root[order[:-1]]
        keep = np.zeros(n, dtype=bool)
        keep[order[head]] = True
        return keep

    def per_file(self, values: np.ndarray) -> list[np.ndarray]:
        """Split a per-document array (e.g. :meth:`keep`) back into one array per embedding file."""
        return [values[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]

    def stats(self) -> dict[str, Any]:
        """JSON-ready summary for the manifest or a report."""
        return {
            "docs": self.docs,
            "clusters": self.clusters,
            "duplicates": self.duplicates,
            "pairs": self.pairs,
            "buckets": self.buckets,
            "largest_bucket": self.largest_bucket,
            "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


class _Embeddings:
    """Several ``(n_t, d)`` float32 ``.npy`` files, memory-mapped, addressed by global row index."""

    def __init__(self, files: list[Path]) -> None:
        self.arrays: list[np.ndarray] = []
        dim: int | None = None
        for f in files:
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
            except ValueError:  # numpy cannot memory-map a file without rows
                a = np.load(f, allow_pickle=False)
            if a.ndim != 2 or a.dtype != np.float32 or (dim is not None and a.shape[1] != dim):
                want = f"(n, {dim})" if dim is not None else "(n, d)"
                raise SemanticDedupError(
                    f"{f}: expected a float32 array of shape {want}, got {a.dtype} of shape {a.shape}"
                )
            dim = a.shape[1]
            head = np.asarray(a[:256], dtype=np.float64)
            if len(head) and np.abs(np.linalg.norm(head, axis=1) - 1.0).max() > 1e-3:
                raise SemanticDedupError(f"{f}: embeddings are not L2-normalized (write them with embed())")
            self.arrays.append(a)
        self.dim = dim or DIM
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])]).astype(np.int64)
        self.n = int(self.offsets[-1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows at ascending global indices ``ids`` as one in-memory float32 array."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        cuts = np.searchsorted(ids, self.offsets)
        for t, a in enumerate(self.arrays):
            lo, hi = cuts[t], cuts[t + 1]
            if hi > lo:
                out[lo:hi] = a[ids[lo:hi] - self.offsets[t]]
        return out

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(global start, rows)`` in order, at most ``size`` rows at a time."""
        for t, a in enumerate(self.arrays):
            for s in range(0, len(a), size):
                yield int(self.offsets[t]) + s, np.asarray(a[s : s + size])


def _nearest(x: np.ndarray, centroids: np.ndarray, p: int) -> np.ndarray:
    """Indices of the ``p`` most similar centroids per row, most similar first: ``(len(x), p)`` int32."""
    out = np.empty((len(x), p), dtype=np.int32)
    step = max(1, CHUNK_CELLS // len(centroids))
    for s in range(0, len(x), step):
        sims = x[s : s + step] @ centroids.T
        if p == 1:
            out[s : s + step, 0] = sims.argmax(axis=1)
            continue
        top = np.argpartition(-sims, p - 1, axis=1)[:, :p] if p < sims.shape[1] else np.argsort(-sims, axis=1)
        top_sims = np.take_along_axis(sims, top, axis=1)
        out[s : s + step] = np.take_along_axis(top, np.argsort(-top_sims, axis=1, kind="stable"), axis=1)
    return out


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = KMEANS_ITERS) -> np.ndarray:
    """``k`` unit-norm centroids of the unit rows of ``x`` (cosine k-means, seeded random init).

    A centroid left without members keeps its previous position. Returns ``(k, d)`` float32.
    """
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(len(x), size=k, replace=False))].astype(np.float32)
    labels = np.full(len(x), -1, dtype=np.int32)
    for _ in range(iters):
        new = _nearest(x, centroids, 1)[:, 0]
        if np.array_equal(new, labels):
            break
        labels = new
        order = np.argsort(labels, kind="stable")
        used, starts = np.unique(labels[order], return_index=True)
        sums = np.add.reduceat(x[order], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids[used] = sums / np.maximum(norms, 1e-12)
    return centroids
