"""Semantic dedup, reduce side (numpy only): the bucketed neighbour search over the tasks' embedding
files and the clusters it links (the method and its costs are in :mod:`moeforge.data.dedup.semantic`).

:func:`find_semantic_clusters` memory-maps every file, buckets the documents with a seeded spherical
k-means (:func:`spherical_kmeans`), compares documents exactly inside each bucket
(:func:`iter_similar_pairs`) and joins the pairs with union-find into a :class:`SemanticResult`.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.data.dedup.semantic.config import (
    CHUNK_CELLS,
    DIM,
    EXACT_BELOW,
    KMEANS_ITERS,
    KMEANS_MAX_SAMPLE,
    KMEANS_PER_CLUSTER,
    SemanticConfig,
    SemanticDedupError,
)
from moeforge.data.dedup.unionfind import flatten_nodes, union
from moeforge.io import atomic_write_bytes, atomic_write_json

__all__ = ["SemanticResult", "find_semantic_clusters", "iter_similar_pairs", "spherical_kmeans"]

log = logging.getLogger("moeforge.data.dedup.semantic")  # the package's logger, whatever the module


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


def _plan_buckets(emb: _Embeddings, cfg: SemanticConfig, work_dir: Path) -> tuple[np.ndarray, int]:
    """Train the centroids on a sample and give every document its ``probe`` nearest buckets.

    Returns ``(n, P)`` int32 bucket ids (column 0 is the home bucket), memory-mapped from
    ``work_dir/buckets.npy``, and the bucket count.
    """
    n = emb.n
    k = min(n, cfg.clusters or (1 if n < EXACT_BELOW else round(math.sqrt(n))))
    rng = np.random.default_rng(cfg.seed)
    size = min(n, max(k * KMEANS_PER_CLUSTER, 1), KMEANS_MAX_SAMPLE)
    sample = np.arange(n) if size == n else np.sort(rng.choice(n, size=size, replace=False))
    centroids = spherical_kmeans(emb.rows(sample), k, seed=cfg.seed)
    buf = io.BytesIO()
    np.save(buf, centroids, allow_pickle=False)
    atomic_write_bytes(work_dir / "centroids.npy", buf.getvalue())
    p = min(cfg.probe, k)
    buckets = np.lib.format.open_memmap(work_dir / "buckets.npy", mode="w+", dtype=np.int32, shape=(n, p))
    for start, rows in emb.chunks(max(1, CHUNK_CELLS // k)):
        buckets[start : start + len(rows)] = _nearest(rows, centroids, p)
    buckets.flush()
    log.info("semantic dedup: %d docs in %d buckets (k-means on %d rows), probe %d", n, k, size, p)
    return buckets, k


def iter_similar_pairs(
    embedding_files: list[Path], cfg: SemanticConfig, work_dir: Path
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair of documents with cosine ≥ ``cfg.threshold`` that the bucketed search finds.

    Yields ``(a, b)`` arrays of global indices with ``a < b``, each pair once over the whole run.
    """
    return _iter_pairs(_Embeddings(embedding_files), cfg, work_dir)


def _iter_pairs(
    emb: _Embeddings, cfg: SemanticConfig, work_dir: Path
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if emb.n < 2:
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    buckets, k = _plan_buckets(emb, cfg, work_dir)
    p = buckets.shape[1]
    home = np.asarray(buckets[:, 0])
    home_order = np.argsort(home, kind="stable")  # docs grouped by home bucket, ascending within
    home_bounds = np.searchsorted(home[home_order], np.arange(k + 1))
    visit_bucket = np.asarray(buckets[:, 1:]).reshape(-1)  # row-major: entry e belongs to doc e // (p-1)
    visit_order = np.argsort(visit_bucket, kind="stable")
    visit_bounds = np.searchsorted(visit_bucket[visit_order], np.arange(k + 1))
    del visit_bucket
    t = cfg.threshold
    for b in range(k):
        members = home_order[home_bounds[b] : home_bounds[b + 1]]
        if not len(members):
            continue
        x_home = emb.rows(members)
        m = len(members)
        step = max(1, CHUNK_CELLS // m)
        for s in range(0, m, step):
            sims = x_home[s : s + step] @ x_home[s:].T
            i, j = np.nonzero(np.triu(sims >= t, k=1))
            if len(i):
                yield members[s + i], members[s + j]
        visitors = visit_order[visit_bounds[b] : visit_bounds[b + 1]] // max(p - 1, 1)
        for s in range(0, len(visitors), step):
            vis = visitors[s : s + step]
            i, j = np.nonzero(emb.rows(vis) @ x_home.T >= t)
            if not len(i):
                continue
            v, h = vis[i], members[j]
            # the pair is also found in the visitor's home bucket when the member visits it: report it
            # only from the lower-numbered of the two buckets
            v_home = home[v]
            twice = (np.asarray(buckets[h, 1:]) == v_home[:, None]).any(axis=1) & (v_home < b)
            v, h = v[~twice], h[~twice]
            yield np.minimum(v, h), np.maximum(v, h)


def find_semantic_clusters(
    embedding_files: list[Path], cfg: SemanticConfig, work_dir: Path
) -> SemanticResult:
    """Cluster near-duplicate documents over all embedding files (see the module docstring).

    ``embedding_files`` are the tasks' ``.npy`` files from :func:`write_task_embeddings`, in the order
    that defines global indices; ``work_dir`` receives ``centroids.npy``, ``buckets.npy`` (each
    document's probed buckets) and ``semantic_stats.json``. Raises :class:`SemanticDedupError` for a
    malformed file.
    """
    emb = _Embeddings(embedding_files)
    parent = np.arange(emb.n, dtype=np.int64)
    pairs = 0
    for a, b in _iter_pairs(emb, cfg, work_dir):
        pairs += len(a)
        union(parent, a, b)
    flatten_nodes(parent, np.arange(emb.n))
    root = parent
    buckets = largest = min(emb.n, 1)
    if emb.n >= 2:
        buckets = len(np.load(work_dir / "centroids.npy", allow_pickle=False))
        largest = int(np.bincount(np.load(work_dir / "buckets.npy", mmap_mode="r")[:, 0]).max())
    members = np.bincount(root, minlength=emb.n)
    sizes = Counter(members[members > 1].tolist())
    result = SemanticResult(
        root=root,
        offsets=emb.offsets,
        pairs=pairs,
        buckets=buckets,
        largest_bucket=largest,
        sizes=dict(sorted(sizes.items())),
    )
    if emb.n:
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(work_dir / "semantic_stats.json", result.stats())
    log.info(
        "semantic dedup: %d docs, %d pairs ≥ %.3f, %d clusters, %d duplicates (largest bucket %d)",
        emb.n,
        pairs,
        cfg.threshold,
        result.clusters,
        result.duplicates,
        largest,
    )
    return result
