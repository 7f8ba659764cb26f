"""Near-duplicate detection with MinHash LSH, in bounded memory.

How the pipeline uses it (map tasks run in separate processes, then one reduce)::

    keys = minhash_band_keys(texts, cfg)                 # map task: (n, bands) uint64
    write_task_keys(task_dir / "minhash.npy", keys)      # inside the task's atomic directory
    result = find_clusters(files, cfg, work_dir, shingles_of=reread)  # reduce, files in source order
    keep = choose_survivors(result, lengths, quality, holdout, cfg.policy)

**Shingles.** Text is lowercased. ``word`` shingles are n-grams of words, a word being a maximal run
of Unicode letters, digits and combining marks: punctuation and whitespace separate words and are
dropped. ``char`` shingles are n-grams of characters after each run of whitespace became one space
and leading/trailing whitespace was dropped (punctuation is kept). A document with at least one but
fewer than ``ngram`` tokens is a single shingle of all its tokens (so two such documents match only
when their tokens are equal); a document without tokens (empty, or only punctuation for ``word``) has
no shingles and no band keys, and is never a near-duplicate (exact dedup still sees it).

**Hashes.** Every hash is 64-bit and computed with numpy over whole batches of documents, with no
Python loop over words. ``fmix64`` is MurmurHash3's 64-bit finalizer, a bijection used as the mixer.
A word hashes to ``fmix64(Σ_i char_i · key_i + length·φ)`` (mod 2^64), ``key_i = fmix64(i + salt)``
for the character at position ``i``: multilinear hashing, universal when the keys are random. A
character hashes to ``fmix64(char + salt)``. An n-gram of token hashes ``t_0 … t_{k-1}`` hashes to
``fmix64(Horner_K(t) + k·φ)``. These do not depend on the seed, so shingle sets are comparable
across configs.

**Permutations.** Permutation ``i`` maps a shingle hash ``x`` to ``(a_i·x + b_i) mod 2^64`` with
``a_i`` odd and ``a_i, b_i`` drawn from ``numpy.random.default_rng(seed)``. With an odd multiplier
this is a bijection of the 64-bit values, i.e. a true permutation of the hash universe, so it adds no
collisions; its order is led by the product's high bits, which depend on every bit of ``x``
(Dietzfelbinger's multiply-shift family, 2-approximately universal). The classic
``(a·x + b) mod (2^61 − 1)`` is 2-universal as well; neither is min-wise independent, and both rely
on the inputs having entropy (Mitzenmacher & Vadhan 2008), which the fmix64-mixed shingle hashes
supply. datasketch 2.0 moved to the same affine-mod-2^w family after an fmix pre-mix (its
``affine32``/``affine64`` schemes). The choice is for speed: numpy multiplies uint64 natively
(wrapping mod 2^64) but has no 128-bit product, so an exact Mersenne reduction costs ~12 array passes
per permutation against 2 here (measured ~13× slower). ``tests/data/test_minhash.py`` checks that
signature agreement estimates Jaccard within the binomial error. The signature of a document is the
minimum per permutation (uint64; ``2^64 − 1`` when it has no shingles), computed as a
permutations × shingles block so each permutation's row is contiguous.

**Bands.** ``num_perm = bands × rows``. A band key is ``fmix64(Horner_K(rows) + band·φ)``, never 0;
0 marks a document without shingles. Two documents with Jaccard ``s`` share at least one band key
with probability ``1 − (1 − s^rows)^bands``; the S-curve's threshold is ``(1/bands)^(1/rows)``
(:func:`lsh_curve`). The defaults, 16 bands × 8 rows = 128 permutations, put the threshold at 0.707
and catch pairs at Jaccard 0.8 with probability 0.947 (0.994 at 0.85), pairs at 0.5 with 0.061:
favouring recall at J ≈ 0.8, with ``verify_jaccard`` available to remove the false positives.

**Clusters.** Each task file holds, per band, the task's ``(key, row)`` pairs sorted by key. The reduce
takes one band at a time and merges the sorted runs of all tasks, a bounded chunk of each at a time,
so a band's buckets are never all in memory (a bucket larger than a chunk is streamed). Each bucket
(docs sharing the band key) links its members to its first member (lowest global index) in a
union-find whose roots are always the lowest index of their component. With ``verify_jaccard``, a
(first member, member) pair not already in one cluster when the band starts is linked only if the
true Jaccard of the two shingle sets reaches the threshold; the sets come from the ``shingles_of``
callback, at most ``verify_batch_docs`` documents per call. A member that fails against its bucket's
first member is not linked through that bucket (another band may still link it): verification
checks ``size − 1`` pairs per bucket, not all ``size²/2``. Results do not depend on the memory
budget (tested with 1-row chunks).

**Which document survives** (:func:`choose_survivors`): one per cluster; a document from a held-out
family first, then by policy — ``keep_first`` (source order), ``keep_longest``, ``keep_best_quality``
— and ties go to the first in source order, as in :mod:`moeforge.data.dedup.exact`.

**Bytes per document.** Map task: 8·bands (band keys, 128 B at the defaults) per document of the
task, plus, for the batch being hashed (~``memory_mb``·4096 characters, 1 M at the defaults), ~50 B
per character (code points, masks, word-character hashes), 8·bands·rows per document (signatures)
and an 8 MB block of permuted values. On disk: 12·bands per document (192 B at 16 bands). Reduce: 8
per document (the union-find array, returned as ``root``) plus the merge buffers, bounded by
``memory_mb`` whatever the number of documents; with verification, spilled candidate pairs go to
``work_dir`` (16 B each). :func:`choose_survivors`: 1 per document (the answer) plus 9 transient, and
~40 per document that is in a cluster.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from moeforge.config import StrictModel
from moeforge.data.dedup.unionfind import find as _find
from moeforge.data.dedup.unionfind import flatten as _flatten
from moeforge.data.dedup.unionfind import union as _union

__all__ = [
    "TASK_KEY_DTYPE",
    "LshCurve",
    "MinHashConfig",
    "NearDupResult",
    "NearDupStats",
    "band_keys",
    "choose_survivors",
    "find_clusters",
    "format_lsh_curve",
    "lsh_curve",
    "minhash_band_keys",
    "shingle_batch",
    "shingles",
    "signatures",
    "write_task_keys",
]

log = logging.getLogger(__name__)

Policy = Literal["keep_first", "keep_longest", "keep_best_quality"]
ShinglesOf = Callable[[list[int]], Mapping[int, np.ndarray]]

# one (key, row) pair of a task file; a file is an array of shape (bands, rows_in_task), each band sorted
TASK_KEY_DTYPE = np.dtype([("key", "<u8"), ("idx", "<u4")])
EMPTY_SIGNATURE = np.uint64(2**64 - 1)
NO_KEY = np.uint64(0)

_M1 = np.uint64(0xFF51AFD7ED558CCD)  # MurmurHash3 fmix64 multipliers
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_PHI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd
_HORNER = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, odd
_CHAR_SALT = np.uint64(0x2545F4914F6CDD1D)
_S33 = np.uint64(33)

_WORD, _SPACE, _KNOWN = 1, 2, 128  # bits of the per-code-point class table
# bytes per row of a merge step besides the rows read: keys, global indices, sort order, sorted copies
# (measured ~48 at the peak)
_MERGE_TEMP_BYTES = 56
SIG_BLOCK_BYTES = 8 << 20  # one block of permutations × shingles values (measured best of 1–32 MB)


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


# -------------------------------------------------------------------------------------- shingling


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place on a uint64 array (a bijection)."""
    x ^= x >> _S33
    x *= _M1
    x ^= x >> _S33
    x *= _M2
    x ^= x >> _S33
    return x


# per code point, filled lazily (a few new code points per batch): its lowercase (str.lower when that is
# one character; İ becomes i) and its class bits _KNOWN | _WORD | _SPACE
_lower = np.arange(0x110000, dtype=np.uint32)
_classes = np.zeros(0x110000, dtype=np.uint8)


def _classify(cp: np.ndarray) -> np.ndarray:
    """Class bits of each code point (lowercase with ``_lower[cp]``), learning unseen code points."""
    cls = _classes[cp]
    if len(cls) and cls.min() < _KNOWN:  # _KNOWN is the high bit: set on every classified code point
        for c in np.unique(cp[cls < _KNOWN]).tolist():
            ch = chr(c)
            word = ch.isalnum() or unicodedata.category(ch).startswith("M")
            _classes[c] = _KNOWN | (_WORD if word else 0) | (_SPACE if ch.isspace() else 0)
            _lower[c] = ord(ch.lower()[:1] or ch)
        cls = _classes[cp]
    return cls


@functools.lru_cache(maxsize=8)
def _position_keys(size: int) -> np.ndarray:
    """Pseudo-random 64-bit keys for character positions 0 … size − 1 (a prefix of one fixed sequence)."""
    keys = _fmix64(np.arange(size, dtype=np.uint64) + _CHAR_SALT)
    keys.flags.writeable = False
    return keys


def _horner(tokens: np.ndarray, starts: np.ndarray, k: int) -> np.ndarray:
    """``fmix64(Horner(tokens[s : s + k]) + k·φ)`` for each start ``s``: the hash of a k-token n-gram."""
    acc = tokens[starts]
    for j in range(1, k):
        acc *= _HORNER
        acc += tokens[starts + j]
    acc += np.uint64((k * int(_PHI)) % 2**64)  # Python ints: numpy scalars warn on the wrap
    return _fmix64(acc)


def _tokens(cp: np.ndarray, doc_starts: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Token hashes and each token's document, for the concatenated code points of documents starting
    at ``doc_starts`` (``len(docs) + 1`` entries, the last one ``len(cp)``)."""
    n_chars = len(cp)
    cls = _classify(cp)
    at_start = np.zeros(n_chars + 1, dtype=bool)
    at_start[doc_starts] = True
    if kind == "word":
        # a word hashes to fmix64(Σ_i char_i · key[i] + length·φ): multilinear hashing over position keys
        is_word = (cls & _WORD) != 0
        first = is_word.copy()
        first[1:] &= ~is_word[:-1]
        first[at_start[:-1] & is_word] = True  # a word never spans two documents
        word_chars = np.flatnonzero(is_word)
        first_rank = np.flatnonzero(first[word_chars])  # where each word starts among the word chars
        lengths = np.diff(np.append(first_rank, len(word_chars)))
        if not len(first_rank):
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        pos = np.arange(len(word_chars)) - np.repeat(first_rank, lengths)
        values = _lower[cp[word_chars]].astype(np.uint64)
        values *= _position_keys(1 << int(lengths.max() - 1).bit_length())[pos]
        sums = np.add.reduceat(values, first_rank)
        sums += lengths.astype(np.uint64) * _PHI
        token_pos = word_chars[first_rank]
        return _fmix64(sums), np.searchsorted(doc_starts, token_pos, side="right") - 1
    # characters: a run of whitespace is one space, and none at a document's start or end
    is_space = (cls & _SPACE) != 0
    run_head = is_space.copy()
    run_head[1:] &= ~is_space[:-1]
    run_head[at_start[:-1]] = False
    pos = np.flatnonzero(~is_space | run_head)
    doc = np.searchsorted(doc_starts, pos, side="right") - 1
    space = is_space[pos]
    trailing = np.zeros(len(pos), dtype=bool)
    trailing[:-1] = doc[1:] != doc[:-1]
    trailing[-1:] = True
    keep = ~(space & trailing)
    pos, doc, space = pos[keep], doc[keep], space[keep]
    values = np.where(space, np.uint32(32), _lower[cp[pos]]).astype(np.uint64) + _CHAR_SALT
    return _fmix64(values), doc


def shingle_batch(texts: Sequence[str], cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of many documents at once: ``(hashes, offsets)`` with document ``i``'s shingles in
    ``hashes[offsets[i]:offsets[i + 1]]`` (uint64, in text order, repeats kept: a signature does not
    care). Memory is ~40 bytes per character of the batch."""
    n_docs = len(texts)
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n_docs)
    doc_starts = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lens, out=doc_starts[1:])
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    if doc_starts[-1] == 0:
        return np.zeros(0, dtype=np.uint64), offsets
    cp = np.frombuffer("".join(texts).encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
    tokens, token_doc = _tokens(cp, doc_starts, cfg.shingle)
    n = cfg.ngram
    counts = np.bincount(token_doc, minlength=n_docs)
    token_off = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(counts, out=token_off[1:])
    per_doc = np.where(counts >= n, counts - n + 1, np.minimum(counts, 1))
    np.cumsum(per_doc, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.uint64)
    if len(tokens) >= n:
        starts = np.arange(len(tokens) - n + 1)
        starts = starts[token_doc[starts] == token_doc[starts + n - 1]]
        d = token_doc[starts]
        out[offsets[d] + starts - token_off[d]] = _horner(tokens, starts, n)
    for k in range(1, n):  # documents with k < n tokens: one shingle of all of them
        short = np.flatnonzero(counts == k)
        if len(short):
            out[offsets[short]] = _horner(tokens, token_off[short], k)
    return out, offsets


def shingles(text: str, cfg: MinHashConfig) -> np.ndarray:
    """The sorted unique uint64 shingle hashes of one document (empty when it has no tokens)."""
    hashes, _ = shingle_batch([text], cfg)
    return np.unique(hashes)


# ------------------------------------------------------------------------------ signatures, bands


@functools.lru_cache(maxsize=16)
def _permutations(seed: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64 - 1, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    b = rng.integers(0, 2**64 - 1, size=num_perm, dtype=np.uint64, endpoint=True)
    a.flags.writeable = b.flags.writeable = False
    return a, b


def _signatures_flat(hashes: np.ndarray, offsets: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """MinHash signatures ``(n, num_perm)`` of documents given as flat hashes + offsets."""
    a, b = _permutations(cfg.seed, cfg.num_perm)
    a_col, b_col = a[:, None], b[:, None]
    n_docs = len(offsets) - 1
    sig = np.full((n_docs, cfg.num_perm), EMPTY_SIGNATURE, dtype=np.uint64)
    total = len(hashes)
    block = max(64, SIG_BLOCK_BYTES // (8 * cfg.num_perm))
    # permutations × shingles, so each permutation's row is contiguous for the multiply and the
    # per-document minimum (numpy's reduceat along the last axis is several times faster than along
    # the first)
    buf = np.empty((cfg.num_perm, block), dtype=np.uint64)
    for s in range(0, total, block):
        e = min(s + block, total)
        d0 = int(np.searchsorted(offsets, s, side="right")) - 1
        d1 = int(np.searchsorted(offsets, e - 1, side="right")) - 1
        docs = np.arange(d0, d1 + 1)
        seg_start = np.maximum(offsets[docs], s)
        nonempty = offsets[docs + 1] > seg_start  # reduceat cannot take an empty segment
        docs, seg = docs[nonempty], seg_start[nonempty] - s
        vals = buf[:, : e - s]
        np.multiply(a_col, hashes[None, s:e], out=vals)
        vals += b_col
        mins = np.minimum.reduceat(vals, seg, axis=1)
        sig[docs] = np.minimum(sig[docs], mins.T)
    return sig


def signatures(shingle_sets: Sequence[np.ndarray], cfg: MinHashConfig) -> np.ndarray:
    """MinHash signatures, ``(len(shingle_sets), bands × rows)`` uint64: per permutation, the minimum of
    ``(a·x + b) mod 2^64`` over the document's shingles (all ``2^64 − 1`` for an empty set)."""
    lens = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=len(shingle_sets))
    offsets = np.zeros(len(shingle_sets) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.concatenate([np.zeros(0, np.uint64), *(np.asarray(s, dtype=np.uint64) for s in shingle_sets)])
    return _signatures_flat(flat, offsets, cfg)


def band_keys(sigs: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """One uint64 key per band, ``(n, bands)``: equal keys mean (up to a 2^-64 collision) equal rows.
    Never 0, except for documents without shingles, whose keys are all 0."""
    n = len(sigs)
    if sigs.shape != (n, cfg.num_perm):
        raise ValueError(f"signatures have shape {sigs.shape}, expected (n, {cfg.num_perm}) for this config")
    rows = sigs.reshape(n, cfg.bands, cfg.rows)
    acc = rows[:, :, 0].copy()
    for j in range(1, cfg.rows):
        acc *= _HORNER
        acc += rows[:, :, j]
    acc += np.arange(1, cfg.bands + 1, dtype=np.uint64) * _PHI
    keys = _fmix64(acc)
    keys[keys == NO_KEY] = 1
    keys[np.all(sigs == EMPTY_SIGNATURE, axis=1)] = NO_KEY
    return keys


def minhash_band_keys(texts: Iterable[str], cfg: MinHashConfig) -> np.ndarray:
    """Band keys ``(n, bands)`` of a stream of documents, hashed in batches of about
    ``memory_mb × 4096`` characters (a longer document is a batch of its own)."""
    budget_chars = max(1 << 14, cfg.memory_mb * 4096)
    parts: list[np.ndarray] = []
    batch: list[str] = []
    chars = 0

    def flush() -> None:
        hashes, offsets = shingle_batch(batch, cfg)
        parts.append(band_keys(_signatures_flat(hashes, offsets, cfg), cfg))
        batch.clear()

    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= budget_chars:
            flush()
            chars = 0
    if batch or not parts:
        flush()
    return np.concatenate(parts)


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


class _Edges:
    """Candidate pairs of one band: linked at once, or kept (spilling to disk) for verification."""

    def __init__(
        self,
        parent: np.ndarray,
        cfg: MinHashConfig,
        work_dir: Path,
        band: int,
        spill_pairs: int,
        shingles_of: ShinglesOf | None,
        verify_batch_docs: int,
    ):
        self.parent, self.cfg, self.band = parent, cfg, band
        self.work_dir, self.spill_pairs = work_dir, spill_pairs
        self.shingles_of, self.verify_batch_docs = shingles_of, verify_batch_docs
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.files: list[Path] = []
        self.candidates = self.verified = self.rejected = 0
        self.peak_bytes = 0

    def add(self, u: np.ndarray, v: np.ndarray) -> None:
        self.candidates += len(u)
        if self.cfg.verify_jaccard is None:
            _union(self.parent, u, v)
            return
        # nothing is linked while a band is merged, so "apart" is the state at the band's start
        apart = _find(self.parent, u) != _find(self.parent, v)
        if not apart.any():
            return
        self.pending.append(np.stack([u[apart], v[apart]], axis=1))
        self.pending_n += int(apart.sum())
        self.peak_bytes = max(self.peak_bytes, 16 * self.pending_n)
        if self.pending_n >= self.spill_pairs:
            path = self.work_dir / f"band{self.band:04d}-pairs{len(self.files):06d}.npy"
            np.save(path, np.concatenate(self.pending), allow_pickle=False)
            self.files.append(path)
            self.pending, self.pending_n = [], 0

    def finish(self) -> None:
        """Verify the kept pairs (spilled files first, in order) and link those that pass."""
        if self.cfg.verify_jaccard is None:
            return
        for path in self.files:
            self._verify(np.load(path, allow_pickle=False))
            path.unlink()
        if self.pending:
            self._verify(np.concatenate(self.pending))

    def _verify(self, pairs: np.ndarray) -> None:
        assert self.shingles_of is not None and self.cfg.verify_jaccard is not None
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # a bucket's pairs share their first doc
        listed = pairs.tolist()
        start = 0
        while start < len(pairs):
            docs: set[int] = set()
            end = start
            while end < len(listed):  # greedy: as many pairs as fit the docs-per-call bound
                u, v = listed[end]
                new = (u not in docs) + (v not in docs)
                if docs and len(docs) + new > self.verify_batch_docs:
                    break
                docs.update((u, v))
                end += 1
            wanted = sorted(docs)
            sets = self.shingles_of(wanted)
            missing = [d for d in wanted if d not in sets]
            if missing:
                raise KeyError(f"shingles_of returned no shingle set for documents {missing[:5]}")
            self.peak_bytes = max(self.peak_bytes, sum(int(np.asarray(sets[d]).nbytes) for d in wanted))
            batch = pairs[start:end]
            ok = np.fromiter(
                (_jaccard(sets[u], sets[v]) >= self.cfg.verify_jaccard for u, v in listed[start:end]),
                dtype=bool,
                count=len(batch),
            )
            self.verified += len(batch)
            self.rejected += int((~ok).sum())
            _union(self.parent, batch[ok, 0], batch[ok, 1])
            start = end


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


def find_clusters(
    band_key_files: Sequence[Path],
    cfg: MinHashConfig,
    work_dir: Path,
    shingles_of: ShinglesOf | None = None,
    *,
    chunk_rows: int | None = None,
    verify_batch_docs: int = 1024,
) -> NearDupResult:
    """Cluster near-duplicates over all tasks' key files (see the module docstring).

    A document's global index is its row in the concatenation of the files, in the order given.
    ``shingles_of(indices)`` (needed with ``cfg.verify_jaccard``) returns the shingle sets of those
    global indices (:func:`shingles` of their texts); it is asked for at most ``verify_batch_docs``
    documents per call. ``chunk_rows`` (rows read per task file per merge step) defaults to what fits
    ``cfg.memory_mb``. Temporary files go to ``work_dir`` and are removed.
    """
    if cfg.verify_jaccard is not None and shingles_of is None:
        raise ValueError("near_dedup.verify_jaccard is set but no shingles_of callback was given")
    if verify_batch_docs < 2:
        raise ValueError(f"verify_batch_docs must be at least 2 (got {verify_batch_docs})")
    runs = [_TaskFile(Path(f), cfg.bands) for f in band_key_files]
    sizes = np.array([r.n for r in runs], dtype=np.int64)
    starts = np.zeros(len(runs) + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    total = int(starts[-1])
    budget = cfg.memory_mb * 2**20
    live = max(1, int((sizes > 0).sum()))
    chunk = chunk_rows or max(256, budget // (live * (TASK_KEY_DTYPE.itemsize + _MERGE_TEMP_BYTES)))
    work_dir.mkdir(parents=True, exist_ok=True)
    parent = np.arange(total, dtype=np.int64)
    peak = 0
    stats = NearDupStats(
        docs=total,
        docs_without_shingles=sum(r.empty for r in runs),
        bands=cfg.bands,
        buckets=0,
        candidate_pairs=0,
        verified_pairs=0,
        rejected_pairs=0,
        clusters=0,
        docs_in_clusters=0,
    )
    for band in range(cfg.bands):
        cols = [_BandRun(r, band) for r in runs]
        pos = [r.empty for r in runs]  # documents without shingles are never near-duplicates
        edges = _Edges(parent, cfg, work_dir, band, chunk * live, shingles_of, verify_batch_docs)
        while True:
            step_peak = _merge_step(cols, pos, starts, chunk, edges, stats)
            if step_peak < 0:
                break
            peak = max(peak, step_peak)
        edges.finish()
        stats.candidate_pairs += edges.candidates
        stats.verified_pairs += edges.verified
        stats.rejected_pairs += edges.rejected
        peak = max(peak, edges.peak_bytes)
    _flatten(parent, max(1 << 16, budget // 16))
    _cluster_stats(parent, stats, max(1 << 16, budget // 16))
    stats.peak_bytes = 8 * total + peak
    log.info(
        "near dedup: %d docs, %d bands, %d buckets, %d candidate pairs (%d verified, %d rejected), "
        "%d clusters holding %d docs",
        total, cfg.bands, stats.buckets, stats.candidate_pairs, stats.verified_pairs,
        stats.rejected_pairs, stats.clusters, stats.docs_in_clusters,
    )  # fmt: skip
    return NearDupResult(root=parent, stats=stats)


def _merge_step(
    cols: list[_BandRun], pos: list[int], starts: np.ndarray, chunk: int, edges: _Edges, stats: NearDupStats
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
    edges: _Edges,
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


# ---------------------------------------------------------------------------------------- survivors


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
