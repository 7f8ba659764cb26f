"""Normalization of benchmark items and documents into words, and the hashing of words and n-grams.

**Normalization** (applied alike to benchmark items and documents, one code point at a time, so every
word keeps the character span it came from):

1. each code point ``c`` that is whitespace (``str.isspace``: space, tab, newline, NBSP, U+2028 …)
   becomes a word separator;
2. any other ``c`` becomes ``NFKD(casefold(NFKD(c)))`` with only its letters and digits kept (Unicode
   categories ``L*`` and ``N*``). So case is folded (``ß`` → ``ss``, ``ς`` → ``σ``), compatibility forms
   unfold (``ﬁ`` → ``fi``, ``²`` → ``2``, full-width ``Ａ`` → ``a``), accents go (``é`` → ``e``, ``й`` → ``и``),
   and punctuation, symbols, combining marks, control and format characters are **deleted without
   splitting the word**: ``Janet’s`` → ``janets``, ``1,000`` → ``1000``, ``has_close_elements`` →
   ``hascloseelements`` without the underscore, ``f(x)`` → ``fx``;
3. words are the maximal runs of what is left between separators.

Changes of case, punctuation, accents or the amount and kind of whitespace therefore never break a
match; joining or splitting words does (``eggs.She`` is one word, ``eggs. She`` two). Scripts written
without spaces (Chinese, Japanese, Thai) have no words to count and are not served by this method.

**Hashing.** A word's hash is a polynomial over its code points, an n-gram's a polynomial over its
words' hashes, each scrambled by an xor-shift-multiply step; all of it runs as array operations over a
document's code points (an ASCII document takes a ``bytes.translate`` shortcut). Hash collisions are
possible in principle (about |index| / 2⁶⁴ per document n-gram); nothing depends on the process, the
clock or Python's hash seed. :func:`hash_words` gives a text's words and their hashes (:class:`Words`),
:class:`Grams` the hashes of its n-grams of any length.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["Grams", "Words", "hash_words", "normalize_words"]

_U64 = np.uint64
_M1 = _U64(0xBF58476D1CE4E5B9)  # an odd multiplier with good avalanche (SplitMix64's first)
_POLY = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
_POLY_INV = pow(_POLY, -1, 1 << 64)
_LEN_TAG = 0xD6E8FEB86659FD93
_SEP = 32  # the separator in normalized text
_MULTI = 0xFFFFFFFF  # ``single`` marker: the code point maps to several characters, or is not mapped yet
_UNMAPPED = 255  # ``length`` marker of a code point not mapped yet (the longest mapping has 18 characters)
_POWERS_CACHED = 1 << 21  # longer texts get their powers computed per call instead of cached


def _mix(x: np.ndarray) -> np.ndarray:
    """Scramble a uint64 array in place (a bijection: xor-shift, odd multiply, xor-shift); returns it."""
    x ^= x >> _U64(31)
    x *= _M1
    x ^= x >> _U64(29)
    return x


def _map_char(c: str) -> str:
    """The normalized form of one code point: " " for whitespace, else its letters and digits (module doc)."""
    if c.isspace():
        return " "
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", c).casefold())
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] in "LN")


class _CharTable:
    """Code point → normalized characters, as arrays: ``single[cp]`` is the one character a code point
    maps to (0: deleted, 32: separator, ``_MULTI``: see ``length[cp]`` characters at ``chars[offset[cp]]``).
    Latin-1 is mapped up front, any other code point when a text first holds it (mapping all 1.1 M code
    points would cost each process seconds)."""

    def __init__(self) -> None:
        self.single = np.full(0x110000, _MULTI, dtype=np.uint32)
        self.length = np.full(0x110000, _UNMAPPED, dtype=np.uint8)
        self.offset = np.zeros(0x110000, dtype=np.int32)
        self._chars: list[int] = []
        self._fill(range(0x100))

    def _fill(self, cps: Any) -> None:
        for cp in cps:
            out = _map_char(chr(cp))
            self.length[cp] = len(out)
            self.offset[cp] = len(self._chars)
            self.single[cp] = 0 if not out else ord(out) if len(out) == 1 else _MULTI
            self._chars.extend(map(ord, out))
        self.chars = np.asarray(self._chars, dtype=np.uint32)

    def normalize(self, cp: np.ndarray, spans: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(normalized code points with separators, the index in ``cp`` each came from — kept only with
        ``spans`` or when some code point expands)."""
        out = self.single[cp]
        if int(out.max()) == _MULTI:
            unmapped = self.length[cp] == _UNMAPPED
            if unmapped.any():
                self._fill(np.unique(cp[unmapped]).tolist())
                out = self.single[cp]
        if int(out.max()) != _MULTI:  # one character or none per code point: the common case
            if not spans:
                return out[out != 0], None
            origin = out.nonzero()[0]
            return out[origin], origin
        counts = self.length[cp].astype(np.int64)  # ligatures, fractions, ß …: expand
        origin = np.repeat(np.arange(cp.size), counts)
        first_out = np.cumsum(counts) - counts
        within = np.arange(origin.size) - first_out[origin]
        return self.chars[self.offset[cp][origin] + within], origin


@lru_cache(maxsize=1)
def _table() -> _CharTable:
    return _CharTable()


class _Powers:
    """``_POLY_INV**i`` and ``_POLY**i`` mod 2**64 for i < m, cached up to ``_POWERS_CACHED``."""

    def __init__(self) -> None:
        self.inv = np.ones(1, dtype=np.uint64)
        self.fwd = np.ones(1, dtype=np.uint64)

    @staticmethod
    def _make(size: int) -> tuple[np.ndarray, np.ndarray]:
        inv, fwd = np.ones(size, dtype=np.uint64), np.ones(size, dtype=np.uint64)
        np.cumprod(np.full(size - 1, _POLY_INV, dtype=np.uint64), out=inv[1:])
        np.cumprod(np.full(size - 1, _POLY, dtype=np.uint64), out=fwd[1:])
        return inv, fwd

    def get(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        if m > self.inv.size:
            if m > _POWERS_CACHED:
                return self._make(m)
            self.inv, self.fwd = self._make(min(_POWERS_CACHED, max(m, 2 * self.inv.size)))
        return self.inv[:m], self.fwd[:m]


_POWERS = _Powers()


def _prefix(values: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """``S[t] = Σ_{k<t} values[k]·P⁻ᵏ`` (mod 2⁶⁴), so ``(S[b] − S[a])·Pᵃ = Σ_{k<b−a} values[a+k]·P⁻ᵏ``:
    the polynomial hash of any slice, independent of where the slice starts."""
    s = np.zeros(values.size + 1, dtype=np.uint64)
    np.cumsum(values * inv, out=s[1:])
    return s


@dataclass
class Words:
    """A text's normalized words: the normalized code points ``chars`` (separators included), each word's
    ``[wstart, wend)`` in them, the index in the original text of every char (``origin``) and the word
    hashes: ``mix(Σ_k char[wstart+k]·P⁻ᵏ)`` (polynomial over code points, so the ASCII path agrees)."""

    chars: np.ndarray
    origin: np.ndarray | None  # None: positions not kept (see hash_words)
    wstart: np.ndarray
    wend: np.ndarray
    hashes: np.ndarray

    def __len__(self) -> int:
        return len(self.hashes)

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Characters of the original text covered by words ``first`` … ``last`` (inclusive)."""
        assert self.origin is not None, "positions were not kept: hash_words(text, spans=True)"
        return int(self.origin[self.wstart[first]]), int(self.origin[self.wend[last] - 1]) + 1

    def word(self, i: int) -> str:
        return "".join(map(chr, self.chars[self.wstart[i] : self.wend[i]].tolist()))

    def text(self, i: int, length: int) -> str:
        return " ".join(self.word(k) for k in range(i, i + length))


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_WORDS = Words(np.zeros(0, np.uint32), _EMPTY_I, _EMPTY_I, _EMPTY_I, np.zeros(0, np.uint64))


@lru_cache(maxsize=1)
def _ascii_tables() -> tuple[bytes, bytes]:
    """``bytes.translate`` arguments doing :func:`_map_char` on ASCII (which maps it to ASCII or nothing)."""
    mapped = [_map_char(chr(b)) for b in range(128)]
    table = bytes(ord(m) if m else b for b, m in enumerate(mapped)) + bytes(range(128, 256))
    return table, bytes(b for b, m in enumerate(mapped) if not m)


def hash_words(text: str, spans: bool = False) -> Words:
    """Normalize ``text`` and hash its words, in array operations over its characters (no Python loop).
    Character positions (``origin``) are kept only when ``spans`` asks for them; pure-ASCII text then
    takes a ``bytes.translate`` shortcut."""
    origin: np.ndarray | None = None
    if text.isascii() and not spans:
        table, delete = _ascii_tables()
        chars = np.frombuffer(text.encode("ascii").translate(table, delete), dtype=np.uint8)
    else:
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        if cp.size == 0:
            return _EMPTY_WORDS
        chars, origin = _table().normalize(cp, spans)
    n = chars.size
    sep = np.empty(n + 2, dtype=bool)  # padded with separators at both ends
    sep[0] = sep[-1] = True
    np.equal(chars, _SEP, out=sep[1:-1])
    flips = (sep[1:] != sep[:-1]).nonzero()[0]  # alternately a word's start and its end
    if flips.size == 0:
        return _EMPTY_WORDS
    wstart, wend = flips[0::2], flips[1::2]
    inv, fwd = _POWERS.get(n)
    # the sums over [start, end) of each word and [end, next start) of each gap; keep the words'
    cuts = flips if flips[-1] < n else flips[:-1]  # reduceat takes no index past the end
    sums = np.add.reduceat(chars * inv, cuts)[0::2]  # (uint64: chars are widened in the multiply)
    hashes = _mix(sums * fwd[wstart])
    return Words(chars, origin, wstart, wend, hashes)


def normalize_words(text: str) -> list[str]:
    """The normalized words of ``text`` (the module docstring gives the rule)."""
    w = hash_words(text)
    return [w.word(i) for i in range(len(w))]


class Grams:
    """Hashes of every run of ``length`` consecutive words, for any length, from one prefix sum:
    ``h(i, L) = mix(Σ_j word[i+j]·P⁻ʲ ⊕ L·T)``."""

    def __init__(self, word_hashes: np.ndarray) -> None:
        inv, self._fwd = _POWERS.get(word_hashes.size)
        self._s = _prefix(word_hashes, inv)

    def of_length(self, length: int) -> np.ndarray:
        k = self._s.size - length  # number of runs
        if k <= 0:
            return np.zeros(0, dtype=np.uint64)
        h = (self._s[length:] - self._s[:k]) * self._fwd[:k]
        h ^= _U64((length * _LEN_TAG) & 0xFFFFFFFFFFFFFFFF)
        return _mix(h)
