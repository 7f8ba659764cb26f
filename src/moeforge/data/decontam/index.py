"""The decontamination index: the n-grams of benchmark items, and where a text contains them.

**Matching.** A benchmark item (its text as :mod:`moeforge.data.decontam.loaders` builds it, its words
as :mod:`moeforge.data.decontam.normalize` splits them) contributes every run of ``ngram`` consecutive
words (default 13, as in GPT-3). An item with fewer words, but at least ``min_item_words`` (default 8,
GPT-3's smallest n), contributes its whole word sequence, which then matches only as a whole; shorter
items are not indexed (counted as ``items_too_short``). An n-gram found in more than
``max_item_frequency`` distinct items (boilerplate chains such as "… the answer is …") is left out of
the index. A document matches an item where one of the item's n-grams occurs in it; overlapping or
adjacent hits on the same item merge into one :class:`Match` spanning them.

**Index.** One 64-bit hash per distinct n-gram (computed as :mod:`moeforge.data.decontam.normalize`
describes), kept sorted, with a bitmap of 16–32 bits per n-gram in front of it and the ids of the items
holding each n-gram in CSR arrays: about 8 + (2 to 4) + 4 + 4·(items per n-gram) bytes per n-gram
(``DecontamIndex.stats()`` gives the figure; GSM8K test + HumanEval: 118 k n-grams, 2.2 MB).
:func:`cached_index` builds it once per process; :meth:`DecontamIndex.contains_any` is the cheap yes/no
check for a gate, :meth:`DecontamIndex.find` gives the matches.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from moeforge.data.decontam.config import DecontamConfig
from moeforge.data.decontam.loaders import BenchmarkItem, load_benchmark
from moeforge.data.decontam.normalize import Grams, hash_words

log = logging.getLogger("moeforge.data.decontam")  # the package's logger, whatever the module

_BUILD_CHUNK_CHARS = 1 << 20  # items are hashed in batches of about this many characters
_BITMAP_FROM = 64  # n-grams per lookup from which the bitmap pays for its extra operations
_U64 = np.uint64
_EMPTY_I = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Match:
    """A stretch of a text that shares n-grams with one benchmark item.

    ``start_char``/``end_char`` delimit the matched words in the text given to :meth:`DecontamIndex.find`
    (for chats: in turn ``turn``), widened to whitespace so that punctuation attached to the first and
    last word is included; ``ngram`` is the first matching n-gram, normalized."""

    benchmark: str
    item_id: str
    start_char: int
    end_char: int
    ngram: str
    turn: int | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "benchmark": self.benchmark,
            "item_id": self.item_id,
            "start_char": self.start_char,
            "end_char": self.end_char,
            "ngram": self.ngram,
        }
        if self.turn is not None:
            d["turn"] = self.turn
        return d


def word_edge(text: str, i: int, step: int) -> int:
    """Move ``i`` outwards (step -1: left, +1: right) until it no longer splits a word."""
    if step < 0:
        while i > 0 and not text[i - 1].isspace():
            i -= 1
    else:
        while i < len(text) and not text[i].isspace():
            i += 1
    return i


class DecontamIndex:
    """The n-grams of a set of benchmark items, for fast lookup in documents (see the module docstring).

    Build it once per process with :meth:`build` (or :func:`cached_index`); it is read-only afterwards."""

    def __init__(
        self,
        cfg: DecontamConfig,
        items: list[tuple[str, str]],
        hashes: np.ndarray,
        item_ptr: np.ndarray,
        item_ids: np.ndarray,
        lengths: tuple[int, ...],
        stats: dict[str, Any],
    ) -> None:
        self.cfg = cfg
        self.items = items  # global item index → (benchmark, item_id)
        self.hashes = hashes  # sorted distinct n-gram hashes
        self.item_ptr = item_ptr  # CSR: the items of hashes[r] are item_ids[item_ptr[r]:item_ptr[r+1]]
        self.item_ids = item_ids
        self.lengths = lengths  # n-gram lengths present: ngram, and whole-item lengths of short items
        bits = max(10, int(np.ceil(np.log2(max(1, hashes.size) * 16))))
        self._shift = _U64(64 - bits)
        self._bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
        top = hashes >> self._shift
        np.bitwise_or.at(
            self._bitmap, (top >> _U64(3)).astype(np.intp), (1 << (top & _U64(7))).astype(np.uint8)
        )
        self._stats = stats

    @classmethod
    def build(cls, cfg: DecontamConfig) -> DecontamIndex:
        """Load every benchmark of ``cfg`` and index it. Raises :class:`BenchmarkError` for unreadable input."""
        t0 = time.perf_counter()
        items: list[BenchmarkItem] = []
        for spec in cfg.benchmarks:
            got = load_benchmark(spec)
            log.info("benchmark %s: %d items from %s", spec.name, len(got), spec.path)
            items.extend(got)
        index = cls.from_items(items, cfg, benchmarks=[b.name for b in cfg.benchmarks])
        index._stats["build_seconds"] = round(time.perf_counter() - t0, 3)
        return index

    @classmethod
    def from_items(
        cls, items: list[BenchmarkItem], cfg: DecontamConfig, benchmarks: list[str] | None = None
    ) -> DecontamIndex:
        """Index ``items`` with ``cfg``'s n-gram settings (``cfg.benchmarks`` is not read)."""
        t0 = time.perf_counter()
        n = cfg.ngram
        names = list(dict.fromkeys([*(benchmarks or []), *(it.benchmark for it in items)]))
        per: dict[str, dict[str, int]] = {
            b: {"items": 0, "items_too_short": 0, "items_indexed": 0} for b in names
        }
        hash_parts: list[np.ndarray] = []
        item_parts: list[np.ndarray] = []
        count_parts: list[np.ndarray] = []
        start = 0
        while start < len(items):
            stop, chars = start, 0
            while stop < len(items) and (stop == start or chars + len(items[stop].text) < _BUILD_CHUNK_CHARS):
                chars += len(items[stop].text) + 1
                stop += 1
            h, it, words_per_item = _item_grams(items, start, stop, n, cfg.min_item_words)
            hash_parts.append(h)
            item_parts.append(it)
            count_parts.append(words_per_item)
            start = stop
        all_h = np.concatenate(hash_parts) if hash_parts else np.zeros(0, np.uint64)
        all_i = np.concatenate(item_parts) if item_parts else np.zeros(0, np.int64)
        order = np.lexsort((all_i, all_h))
        all_h, all_i = all_h[order], all_i[order]
        distinct_pair = np.ones(all_h.size, dtype=bool)
        distinct_pair[1:] = (all_h[1:] != all_h[:-1]) | (all_i[1:] != all_i[:-1])
        all_h, all_i = all_h[distinct_pair], all_i[distinct_pair]
        new_hash = np.ones(all_h.size, dtype=bool)
        new_hash[1:] = all_h[1:] != all_h[:-1]
        firsts = np.flatnonzero(new_hash)
        freq = np.diff(np.append(firsts, all_h.size))
        keep_hash = freq <= cfg.max_item_frequency
        keep_pair = np.repeat(keep_hash, freq)
        hashes = all_h[firsts[keep_hash]]
        item_ids = all_i[keep_pair].astype(np.uint32)
        item_ptr = np.zeros(hashes.size + 1, dtype=np.int64)
        np.cumsum(freq[keep_hash], out=item_ptr[1:])
        item_ptr = item_ptr.astype(np.uint32 if item_ids.size < 2**32 else np.int64)

        words = np.concatenate(count_parts) if count_parts else _EMPTY_I
        indexed = np.zeros(len(items), dtype=bool)
        indexed[item_ids.astype(np.int64)] = True
        for k, item in enumerate(items):
            s = per[item.benchmark]
            s["items"] += 1
            s["items_too_short"] += int(words[k] < cfg.min_item_words)
            s["items_indexed"] += int(indexed[k])
        short = words[(words >= cfg.min_item_words) & (words < n)]
        lengths = tuple(sorted({n, *(int(v) for v in np.unique(short))}, reverse=True))
        for b, s in per.items():
            if s["items_too_short"]:
                log.warning(
                    "benchmark %s: %d items have fewer than %d words and are not indexed",
                    b,
                    s["items_too_short"],
                    cfg.min_item_words,
                )
        stats: dict[str, Any] = {
            "benchmarks": per,
            "ngram": n,
            "ngrams": int(hashes.size),
            "ngram_item_pairs": int(item_ids.size),
            "ngrams_ignored_frequent": int((~keep_hash).sum()),
            "lengths": list(lengths),
        }
        index = cls(
            cfg, [(it.benchmark, it.item_id) for it in items], hashes, item_ptr, item_ids, lengths, stats
        )
        stats["index_seconds"] = round(time.perf_counter() - t0, 3)
        stats["bytes"] = index.nbytes
        stats["bytes_per_ngram"] = round(index.nbytes / max(1, hashes.size), 2)
        log.info(
            "decontamination index: %d n-grams of %d items (%d frequent n-grams ignored), %.1f MB",
            hashes.size,
            len(items),
            stats["ngrams_ignored_frequent"],
            index.nbytes / 1e6,
        )
        return index

    @property
    def nbytes(self) -> int:
        """Bytes of the lookup state (hashes, bitmap, item lists); item names not included."""
        return int(self.hashes.nbytes + self._bitmap.nbytes + self.item_ptr.nbytes + self.item_ids.nbytes)

    def stats(self) -> dict[str, Any]:
        """Items per benchmark (total, too short, indexed), n-gram counts, bytes, build time."""
        return json.loads(json.dumps(self._stats))

    def _lookup(self, grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``grams`` found in the index, their rows in ``hashes``)."""
        if self.hashes.size == 0:
            return _EMPTY_I, _EMPTY_I
        if grams.size > _BITMAP_FROM:  # the bitmap (in cache) spares most binary searches (cache misses)
            top = grams >> self._shift
            maybe = ((self._bitmap[top >> _U64(3)] >> (top & _U64(7)).astype(np.uint8)) & 1).nonzero()[0]
            cand = grams[maybe]
        else:
            maybe, cand = None, grams
        rows = np.searchsorted(self.hashes, cand)
        rows[rows == self.hashes.size] = 0
        hit = (self.hashes[rows] == cand).nonzero()[0]
        return (hit if maybe is None else maybe[hit]), rows[hit]

    def contains_any(self, text: str) -> bool:
        """Whether ``text`` shares any indexed n-gram with a benchmark item (no spans computed)."""
        words = hash_words(text)
        if len(words) < self.lengths[-1]:
            return False
        grams = Grams(words.hashes)
        return any(self._lookup(grams.of_length(length))[0].size for length in self.lengths)

    def find(self, text: str) -> list[Match]:
        """Every stretch of ``text`` matching a benchmark item, ordered by position then item."""
        words = hash_words(text)
        if len(words) < self.lengths[-1]:
            return []
        grams = Grams(words.hashes)
        pos_parts, row_parts, len_parts = [], [], []
        for length in self.lengths:
            pos, rows = self._lookup(grams.of_length(length))
            if pos.size:
                pos_parts.append(pos)
                row_parts.append(rows)
                len_parts.append(np.full(pos.size, length, dtype=np.int64))
        if not pos_parts:
            return []
        pos, rows, lens = np.concatenate(pos_parts), np.concatenate(row_parts), np.concatenate(len_parts)
        lo, hi = self.item_ptr[rows].astype(np.int64), self.item_ptr[rows + 1].astype(np.int64)
        per_hit = hi - lo
        at = np.repeat(lo - np.cumsum(per_hit) + per_hit, per_hit) + np.arange(int(per_hit.sum()))
        item = self.item_ids[at].astype(np.int64)
        pos, lens = np.repeat(pos, per_hit), np.repeat(lens, per_hit)
        order = np.lexsort((pos, item))
        item, pos, lens = item[order], pos[order], lens[order]
        # an item's hits all have one length, so a hit starting past the previous one's end opens a run
        opens = np.ones(item.size, dtype=bool)
        opens[1:] = (item[1:] != item[:-1]) | (pos[1:] > pos[:-1] + lens[:-1])
        firsts = np.flatnonzero(opens)
        run_end = np.maximum.reduceat(pos + lens, firsts)
        if words.origin is None:  # the fast path kept no positions: redo this (rare) text with them
            words = hash_words(text, spans=True)
        found = []
        for f, stop in zip(firsts.tolist(), run_end.tolist(), strict=True):
            bench, item_id = self.items[int(item[f])]
            p = int(pos[f])
            start, end = words.span(p, stop - 1)
            start, end = word_edge(text, start, -1), word_edge(text, end, +1)  # whole tokens: "market?"
            found.append(
                (start, int(item[f]), Match(bench, item_id, start, end, words.text(p, int(lens[f]))))
            )
        found.sort(key=lambda t: (t[0], t[1]))
        return [m for _, _, m in found]


def _item_grams(
    items: list[BenchmarkItem], start: int, stop: int, n: int, min_words: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n-gram hashes, their global item indices, words per item) of ``items[start:stop]``, hashed as one
    text: the items are joined by newlines (separators), and an n-gram counts only if its first and last
    word belong to the same item."""
    texts = [it.text for it in items[start:stop]]
    words = hash_words("\n".join(texts), spans=True)
    if len(words) == 0:
        return np.zeros(0, np.uint64), _EMPTY_I, np.zeros(len(texts), dtype=np.int64)
    bounds = np.cumsum([len(t) + 1 for t in texts])  # the joined text's offset after each item
    assert words.origin is not None
    owner = np.searchsorted(bounds, words.origin[words.wstart], side="right")  # item (relative) of each word
    count = np.bincount(owner, minlength=len(texts))
    first_word = np.cumsum(count) - count
    grams = Grams(words.hashes)
    h_parts, i_parts = [], []
    full = grams.of_length(n)
    if full.size:
        same = owner[: full.size] == owner[n - 1 :]
        h_parts.append(full[same])
        i_parts.append(owner[: full.size][same])
    for length in np.unique(count[(count >= min_words) & (count < n)]).tolist():
        who = np.flatnonzero(count == length)
        h_parts.append(grams.of_length(length)[first_word[who]])
        i_parts.append(who)
    if not h_parts:
        return np.zeros(0, np.uint64), _EMPTY_I, count
    return np.concatenate(h_parts), np.concatenate(i_parts).astype(np.int64) + start, count


@lru_cache(maxsize=2)
def _cached(cfg_json: str) -> DecontamIndex:
    return DecontamIndex.build(DecontamConfig.model_validate_json(cfg_json))


def cached_index(cfg: DecontamConfig) -> DecontamIndex:
    """The index of ``cfg``, built on the first call in this process and reused afterwards (map tasks in
    one worker process share it)."""
    return _cached(cfg.model_dump_json())
