"""MinHash LSH clusters: the tasks' band-key files (:func:`write_task_keys`), merged one band at a time,
the members of each bucket linked in a union-find (optionally only after a true-Jaccard check)
(:func:`find_clusters`), and one survivor chosen per cluster (:func:`choose_survivors`).

See :mod:`moeforge.data.dedup.minhash` for the design.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moeforge.data.dedup.minhash.config import MinHashConfig, Policy
from moeforge.data.dedup.minhash.hashing import NO_KEY
from moeforge.data.dedup.unionfind import flatten as _flatten
from moeforge.data.dedup.unionfind import union as _union
from moeforge.data.executors import TaskFailed

if TYPE_CHECKING:
    from moeforge.data.executors import Executor

__all__ = [
    "MAX_BAND_SHARDS",
    "TASK_KEY_DTYPE",
    "NearDupResult",
    "NearDupStats",
    "ShinglesOf",
    "band_shards",
    "choose_survivors",
    "cluster_band_shard",
    "find_clusters",
    "verify_part",
    "write_task_keys",
]

# the package's logger, whatever the module (log names and filters stay the same)
log = logging.getLogger("moeforge.data.dedup.minhash")

ShinglesOf = Callable[[list[int]], Mapping[int, np.ndarray]]

# one (key, row) pair of a task file; a file is an array of shape (bands, rows_in_task), each band sorted
TASK_KEY_DTYPE = np.dtype([("key", "<u8"), ("idx", "<u4")])
# bytes per row of a merge step besides the rows read: keys, global indices, sort order, sorted copies
# (measured ~48 at the peak)
_MERGE_TEMP_BYTES = 56


# ------------------------------------------------------------------------------------- clustering


@dataclass
class NearDupStats:
    """What the cluster search saw. Pairs are (bucket's first member, member), summed over bands."""

    docs: int
    docs_without_shingles: int
    bands: int
    buckets: int  # band buckets holding at least two documents, over all bands
    candidate_pairs: int
    verified_pairs: int  # candidate pairs whose true Jaccard was computed
    rejected_pairs: int  # … and found below verify_jaccard
    clusters: int
    docs_in_clusters: int
    cluster_sizes: dict[str, int] = field(default_factory=dict)  # "2", "3", "4-7", "8-15", …
    merge_steps: int = 0
    peak_bytes: int = 0  # estimate: union-find array + the largest merge / verification buffers

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class NearDupResult:
    """``root[i]``: the global index of document ``i``'s cluster representative (its lowest index), or
    ``i`` itself for a document in no cluster."""

    root: np.ndarray
    stats: NearDupStats

    @property
    def in_cluster(self) -> np.ndarray:
        """True for every document that has a near-duplicate."""
        idx = np.arange(len(self.root))
        member = self.root != idx
        member[self.root[member]] = True
        return member


def _size_bin(size: int) -> str:
    if size < 4:
        return str(size)
    lo = 1 << (size.bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"


class _PairSink:
    """One band shard's candidate pairs: joined in the shard's own union-find at once (written out as a
    spanning forest), or, with ``verify_jaccard``, collected without repeats for the verification shards."""

    def __init__(self, total: int, verify: bool, compact_pairs: int):
        self.verify = verify
        self.parent = None if verify else np.arange(total, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.compact_pairs = compact_pairs
        self.candidates = 0
        self.peak_bytes = 0 if verify else 8 * total

    def add(self, u: np.ndarray, v: np.ndarray) -> None:
        self.candidates += len(u)
        if self.parent is not None:
            _union(self.parent, u, v)
            return
        self.pending.append(np.stack([u, v], axis=1))
        self.pending_n += len(u)
        self.peak_bytes = max(self.peak_bytes, 16 * self.pending_n)
        if self.pending_n >= self.compact_pairs:  # the same pair comes from many bands: keep it once
            self.pending = [_unique_pairs(self.pending)]
            self.pending_n = len(self.pending[0])
            self.compact_pairs = max(self.compact_pairs, 2 * self.pending_n)

    def write(self, prefix: Path, parts: int) -> list[str]:
        """Save the shard's edges: ``<prefix>.npy`` (the forest), or one file of unique candidate pairs
        per verification part (pairs whose first document ``% parts`` is the part)."""
        if self.parent is not None:
            _flatten(self.parent)
            nodes = np.flatnonzero(self.parent != np.arange(len(self.parent)))
            path = prefix.with_name(prefix.name + ".npy")
            _save(path, np.stack([self.parent[nodes], nodes], axis=1))
            return [str(path)]
        pairs = _unique_pairs(self.pending)
        self.pending = []
        part = pairs[:, 0] % parts
        out = []
        for p in range(parts):
            path = prefix.with_name(f"{prefix.name}-part{p:04d}.npy")
            _save(path, pairs[part == p])
            out.append(str(path))
        return out


def _unique_pairs(chunks: list[np.ndarray]) -> np.ndarray:
    """The distinct rows of ``chunks``, sorted by first then second document."""
    if not chunks:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(chunks), axis=0)


def _save(path: Path, arr: np.ndarray) -> None:
    """``np.save`` under a temporary name renamed into place (a retried shard rewrites it whole)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr, dtype=np.int64), allow_pickle=False)
    os.replace(tmp, path)


def _verify(
    pairs: np.ndarray, cfg: MinHashConfig, shingles_of: ShinglesOf, verify_batch_docs: int
) -> tuple[np.ndarray, int, int]:
    """The pairs (sorted, distinct) whose true Jaccard reaches ``cfg.verify_jaccard``; (passed, verified,
    peak bytes of shingle sets held)."""
    assert cfg.verify_jaccard is not None
    listed = pairs.tolist()
    passed = np.zeros(len(pairs), dtype=bool)
    peak = 0
    start = 0
    while start < len(pairs):
        docs: set[int] = set()
        end = start
        while end < len(listed):  # greedy: as many pairs as fit the docs-per-call bound
            u, v = listed[end]
            new = (u not in docs) + (v not in docs)
            if docs and len(docs) + new > verify_batch_docs:
                break
            docs.update((u, v))
            end += 1
        wanted = sorted(docs)
        sets = shingles_of(wanted)
        missing = [d for d in wanted if d not in sets]
        if missing:
            raise KeyError(f"shingles_of returned no shingle set for documents {missing[:5]}")
        peak = max(peak, sum(int(np.asarray(sets[d]).nbytes) for d in wanted))
        passed[start:end] = np.fromiter(
            (_jaccard(sets[u], sets[v]) >= cfg.verify_jaccard for u, v in listed[start:end]),
            dtype=bool,
            count=end - start,
        )
        start = end
    return pairs[passed], len(pairs), peak


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two shingle sets (arrays; repeats ignored); two empty sets score 0."""
    a, b = np.unique(a), np.unique(b)
    union = len(a) + len(b)
    if union == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (union - inter)


class _TaskFile:
    """One task's key file, read a slice at a time with plain reads: a memory map would leave every page
    the merge touched counted in the process's resident memory."""

    def __init__(self, path: Path, bands: int):
        with open(path, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            except ValueError as exc:
                raise ValueError(f"{path}: not a .npy file ({exc}); rerun its map task") from exc
            self.offset = fh.tell()
        if dtype != TASK_KEY_DTYPE or len(shape) != 2 or shape[0] != bands or fortran:
            raise ValueError(
                f"{path}: not a MinHash key file for {bands} bands (dtype {dtype}, shape {shape}); "
                "it was written with another near_dedup.bands or by something else — rerun its map task"
            )
        self.path, self.n = path, int(shape[1])
        # documents without shingles have key 0 in every band, so they open every band's sorted run
        self.empty = 0
        while self.empty < self.n:
            keys = self.read(0, self.empty, 4096)["key"]
            zeros = int(np.searchsorted(keys, NO_KEY, side="right"))
            self.empty += zeros
            if zeros < len(keys):
                break

    def read(self, band: int, start: int, count: int) -> np.ndarray:
        count = max(0, min(count, self.n - start))
        at = self.offset + (band * self.n + start) * TASK_KEY_DTYPE.itemsize
        return np.fromfile(self.path, dtype=TASK_KEY_DTYPE, count=count, offset=at)


class _BandRun:
    """One band's sorted run in one task file."""

    def __init__(self, task: _TaskFile, band: int):
        self.task, self.band = task, band

    def __len__(self) -> int:
        return self.task.n

    def read(self, start: int, count: int) -> np.ndarray:
        return self.task.read(self.band, start, count)


# The clustering's unit of distribution: bands are split into at most this many contiguous shards. A
# constant (not the number of workers), so the results and every statistic are the same on any executor.
MAX_BAND_SHARDS = 8


def band_shards(bands: int) -> list[list[int]]:
    """The bands of each shard: ``min(bands, MAX_BAND_SHARDS)`` contiguous groups."""
    return [g.tolist() for g in np.array_split(np.arange(bands), min(bands, MAX_BAND_SHARDS))]


def _starts(runs: Sequence[_TaskFile]) -> np.ndarray:
    starts = np.zeros(len(runs) + 1, dtype=np.int64)
    np.cumsum([r.n for r in runs], out=starts[1:])
    return starts


def cluster_band_shard(
    band_key_files: Sequence[str],
    cfg: MinHashConfig,
    bands: Sequence[int],
    chunk: int,
    parts: int,
    prefix: str,
) -> dict[str, Any]:
    """One band shard (a task of :func:`find_clusters`): merge each of ``bands`` over every task file and
    write the shard's edges under ``prefix`` (see :meth:`_PairSink.write`); return its counts."""
    runs = [_TaskFile(Path(f), cfg.bands) for f in band_key_files]
    starts = _starts(runs)
    total = int(starts[-1])
    live = max(1, sum(r.n > 0 for r in runs))
    counts = NearDupStats(total, 0, len(bands), 0, 0, 0, 0, 0, 0)
    sink = _PairSink(total, cfg.verify_jaccard is not None, chunk * live)
    peak = 0
    for band in bands:
        cols = [_BandRun(r, band) for r in runs]
        pos = [r.empty for r in runs]  # documents without shingles are never near-duplicates
        while True:
            step_peak = _merge_step(cols, pos, starts, chunk, sink, counts)
            if step_peak < 0:
                break
            peak = max(peak, step_peak)
    files = sink.write(Path(prefix), parts)
    return {
        "buckets": counts.buckets,
        "candidates": sink.candidates,
        "merge_steps": counts.merge_steps,
        "peak": peak + sink.peak_bytes,
        "files": files,
    }


def verify_part(
    part_files: Sequence[str],
    cfg: MinHashConfig,
    shingles_of: ShinglesOf,
    verify_batch_docs: int,
    out: str,
) -> dict[str, Any]:
    """One verification part (a task of :func:`find_clusters`): the distinct candidate pairs of every band
    shard's file for this part, checked by true Jaccard; the passing pairs are written to ``out``."""
    pairs = _unique_pairs([np.load(f, allow_pickle=False) for f in part_files])
    ok, verified, peak = _verify(pairs, cfg, shingles_of, verify_batch_docs)
    _save(Path(out), ok)
    return {"verified": verified, "rejected": verified - len(ok), "peak": peak + 16 * len(pairs), "file": out}


def _collect(executor: Executor, fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
    """Run the shards; results in shard order (whatever order they finished in)."""
    out: list[Any] = [None] * len(args)
    try:
        for i, res in executor.map(fn, args):
            out[i] = res
    except TaskFailed as exc:
        raise exc.cause from None
    return out


def find_clusters(
    band_key_files: Sequence[Path],
    cfg: MinHashConfig,
    work_dir: Path,
    shingles_of: ShinglesOf | None = None,
    *,
    chunk_rows: int | None = None,
    verify_batch_docs: int = 1024,
    executor: Executor | None = None,
) -> NearDupResult:
    """Cluster near-duplicates over all tasks' key files (see the module docstring).

    A document's global index is its row in the concatenation of the files, in the order given.
    ``shingles_of(indices)`` (needed with ``cfg.verify_jaccard``) returns the shingle sets of those
    global indices (:func:`shingles` of their texts); it is asked for at most ``verify_batch_docs``
    documents per call (it must pickle to run on another process's executor). ``chunk_rows`` (rows
    read per task file per merge step) defaults to what fits ``cfg.memory_mb``. The band shards and
    verification parts run on ``executor`` (default: one after another in this process); temporary
    files go to ``work_dir`` (which every worker must see) and are removed.
    """
    from moeforge.data.executors import InlineExecutor

    if cfg.verify_jaccard is not None and shingles_of is None:
        raise ValueError("near_dedup.verify_jaccard is set but no shingles_of callback was given")
    if verify_batch_docs < 2:
        raise ValueError(f"verify_batch_docs must be at least 2 (got {verify_batch_docs})")
    executor = executor or InlineExecutor()
    files = [str(Path(f).resolve()) for f in band_key_files]
    runs = [_TaskFile(Path(f), cfg.bands) for f in files]
    total = int(_starts(runs)[-1])
    budget = cfg.memory_mb * 2**20
    live = max(1, sum(r.n > 0 for r in runs))
    chunk = chunk_rows or max(256, budget // (live * (TASK_KEY_DTYPE.itemsize + _MERGE_TEMP_BYTES)))
    work_dir.mkdir(parents=True, exist_ok=True)
    work = work_dir.resolve()
    groups = band_shards(cfg.bands)
    parts = len(groups)
    shards = _collect(
        executor,
        cluster_band_shard,
        [(files, cfg, g, chunk, parts, str(work / f"band-shard{i:04d}")) for i, g in enumerate(groups)],
    )
    stats = NearDupStats(
        docs=total,
        docs_without_shingles=sum(r.empty for r in runs),
        bands=cfg.bands,
        buckets=sum(r["buckets"] for r in shards),
        candidate_pairs=sum(r["candidates"] for r in shards),
        verified_pairs=0,
        rejected_pairs=0,
        clusters=0,
        docs_in_clusters=0,
        merge_steps=sum(r["merge_steps"] for r in shards),
    )
    peak = max((r["peak"] for r in shards), default=0)
    temp = [f for r in shards for f in r["files"]]
    if cfg.verify_jaccard is not None:
        checked = _collect(
            executor,
            verify_part,
            [
                (
                    [r["files"][p] for r in shards],
                    cfg,
                    shingles_of,
                    verify_batch_docs,
                    str(work / f"verified{p:04d}.npy"),
                )
                for p in range(parts)
            ],
        )
        stats.verified_pairs = sum(r["verified"] for r in checked)
        stats.rejected_pairs = sum(r["rejected"] for r in checked)
        peak = max(peak, *(r["peak"] for r in checked))
        edge_files = [r["file"] for r in checked]
        temp += edge_files
    else:
        edge_files = [r["files"][0] for r in shards]
    # the final union-find: every shard's edges (a forest, or the verified pairs), a file at a time
    parent = np.arange(total, dtype=np.int64)
    for f in edge_files:
        e = np.load(f, allow_pickle=False)
        _union(parent, e[:, 0], e[:, 1])
    for f in temp:
        Path(f).unlink(missing_ok=True)
    _flatten(parent, max(1 << 16, budget // 16))
    _cluster_stats(parent, stats, max(1 << 16, budget // 16))
    stats.peak_bytes = 8 * total + peak
    log.info(
        "near dedup: %d docs, %d bands in %d shards, %d buckets, %d candidate pairs (%d verified, "
        "%d rejected), %d clusters holding %d docs",
        total, cfg.bands, parts, stats.buckets, stats.candidate_pairs, stats.verified_pairs,
        stats.rejected_pairs, stats.clusters, stats.docs_in_clusters,
    )  # fmt: skip
    return NearDupResult(root=parent, stats=stats)


def _merge_step(
    cols: list[_BandRun],
    pos: list[int],
    starts: np.ndarray,
    chunk: int,
    edges: _PairSink,
    stats: NearDupStats,
) -> int:
    """Take every complete bucket with key below the chunks' common bound from all runs and link it;
    return the bytes held, or -1 when every run is exhausted."""
    loaded: list[tuple[int, np.ndarray]] = []
    bound: np.uint64 | None = None  # None: every chunk reaches its run's end, take everything
    for t, col in enumerate(cols):
        if pos[t] >= len(col):
            continue
        part = col.read(pos[t], chunk)
        loaded.append((t, part))
        if pos[t] + len(part) < len(col):
            last = part["key"][-1]
            bound = last if bound is None or last < bound else bound
    if not loaded:
        return -1
    stats.merge_steps += 1
    keys, gidx = [], []
    for t, part in loaded:
        take = len(part) if bound is None else int(np.searchsorted(part["key"], bound, side="left"))
        keys.append(part["key"][:take])
        gidx.append(part["idx"][:take].astype(np.int64) + starts[t])
        pos[t] += take
    k = np.concatenate(keys)
    held = sum(p.nbytes for _, p in loaded) + _MERGE_TEMP_BYTES * len(k)
    if not len(k):
        assert bound is not None
        _stream_bucket(cols, pos, starts, chunk, bound, edges, stats)
        return held
    g = np.concatenate(gidx)
    del keys, gidx
    order = np.argsort(k, kind="stable")  # runs are in global order, so ties stay in index order
    k = k[order]
    g = g[order]
    del order
    # keep only the rows of buckets with two or more documents (a small share)
    same = k[1:] == k[:-1]
    multi = np.zeros(len(k), dtype=bool)
    multi[1:] |= same
    multi[:-1] |= same
    k, g = k[multi], g[multi]
    if not len(k):
        return held
    first = np.empty(len(k), dtype=bool)
    first[0] = True
    first[1:] = k[1:] != k[:-1]
    heads = np.flatnonzero(first)
    sizes = np.diff(np.append(heads, len(k)))
    stats.buckets += int((sizes > 1).sum())
    anchor = np.repeat(g[heads], sizes)
    member = ~first
    edges.add(anchor[member], g[member])
    return held


def _stream_bucket(
    cols: list[_BandRun],
    pos: list[int],
    starts: np.ndarray,
    chunk: int,
    key: np.uint64,
    edges: _PairSink,
    stats: NearDupStats,
) -> None:
    """A bucket larger than a chunk: link its members to its first one, a chunk at a time."""
    anchor, members = -1, 0
    for t, col in enumerate(cols):
        while pos[t] < len(col):
            part = col.read(pos[t], chunk)
            n = int(np.searchsorted(part["key"], key, side="right"))
            if n == 0 or part["key"][0] != key:
                break
            g = part["idx"][:n].astype(np.int64) + starts[t]
            if anchor < 0:
                anchor, g = int(g[0]), g[1:]
            if len(g):
                edges.add(np.full(len(g), anchor, dtype=np.int64), g)
            members += n
            pos[t] += n
            if n < len(part):
                break
    stats.buckets += members > 1


def _cluster_stats(root: np.ndarray, stats: NearDupStats, chunk: int) -> None:
    """Clusters and their size histogram, holding only clustered documents' roots."""
    member_roots = []
    for s in range(0, len(root), chunk):
        part = root[s : s + chunk]
        member_roots.append(part[part != np.arange(s, s + len(part))])
    roots = np.concatenate(member_roots) if member_roots else np.zeros(0, dtype=np.int64)
    ids, counts = np.unique(roots, return_counts=True)
    stats.clusters = len(ids)
    stats.docs_in_clusters = int(counts.sum()) + len(ids)
    hist: dict[str, int] = {}
    for size, n in zip(*np.unique(counts + 1, return_counts=True), strict=True):
        b = _size_bin(int(size))
        hist[b] = hist.get(b, 0) + int(n)
    stats.cluster_sizes = hist


# ------------------------------------------------------------------------------------ task files


def write_task_keys(path: Path, keys: np.ndarray) -> None:
    """Save one task's band keys ``(n, bands)`` as a ``(bands, n)`` array of :data:`TASK_KEY_DTYPE`,
    each band sorted by key (then row). Not atomic by itself: write inside the task's atomic directory."""
    n, bands = keys.shape
    if n >= 2**32:
        raise ValueError(f"a task holds {n} documents; at most 2^32 − 1 fit its 32-bit row numbers")
    out = np.empty((bands, n), dtype=TASK_KEY_DTYPE)
    for band in range(bands):
        col = keys[:, band]
        order = np.argsort(col, kind="stable")
        out[band]["key"] = col[order]
        out[band]["idx"] = order
    np.save(path, out, allow_pickle=False)


# ------------------------------------------------------------------------------------- survivors


def choose_survivors(
    result: NearDupResult, lengths: np.ndarray, quality: np.ndarray, holdout: np.ndarray, policy: Policy
) -> np.ndarray:
    """``keep[i]``: True for documents in no cluster and for one member per cluster — from a held-out
    family first, then by ``policy``, ties to the lowest global index (source order)."""
    if policy not in ("keep_first", "keep_longest", "keep_best_quality"):
        raise ValueError(
            f"unknown near_dedup policy {policy!r}; use keep_first, keep_longest or keep_best_quality"
        )
    n = len(result.root)
    for name, arr in (("lengths", lengths), ("quality", quality), ("holdout", holdout)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} entries for {n} documents")
    keep = np.ones(n, dtype=bool)
    docs = np.flatnonzero(result.in_cluster)
    if not len(docs):
        return keep
    root = result.root[docs]
    if policy == "keep_longest":
        metric = -np.asarray(lengths)[docs].astype(np.float64)
    elif policy == "keep_best_quality":
        metric = -np.asarray(quality)[docs].astype(np.float64)
    else:
        metric = np.zeros(len(docs))
    order = np.lexsort((docs, metric, ~np.asarray(holdout, dtype=bool)[docs], root))
    root_sorted = root[order]
    first = np.empty(len(order), dtype=bool)
    first[0] = True
    first[1:] = root_sorted[1:] != root_sorted[:-1]
    keep[docs] = False
    keep[docs[order[first]]] = True
    return keep
