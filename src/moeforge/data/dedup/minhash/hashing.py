"""MinHash hashing: shingles of texts, signatures under seeded permutations, and LSH band keys.

All vectorized with numpy over batches of documents; the scheme is described in
:mod:`moeforge.data.dedup.minhash`. :func:`minhash_band_keys` is what a map task calls: a stream of texts
to their band keys, in batches of bounded memory.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from moeforge.data.dedup.minhash.config import MinHashConfig

__all__ = [
    "EMPTY_SIGNATURE",
    "NO_KEY",
    "SIG_BLOCK_BYTES",
    "band_keys",
    "minhash_band_keys",
    "shingle_batch",
    "shingles",
    "signatures",
]

EMPTY_SIGNATURE = np.uint64(2**64 - 1)
NO_KEY = np.uint64(0)

_M1 = np.uint64(0xFF51AFD7ED558CCD)  # MurmurHash3 fmix64 multipliers
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_PHI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd
_HORNER = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, odd
_CHAR_SALT = np.uint64(0x2545F4914F6CDD1D)
_S33 = np.uint64(33)

_WORD, _SPACE, _KNOWN = 1, 2, 128  # bits of the per-code-point class table
SIG_BLOCK_BYTES = 8 << 20  # one block of permutations × shingles values (measured best of 1–32 MB)


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


# -------------------------------------------------------------------- map task: texts to band keys


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
