"""Decontamination: find benchmark text inside training documents by word n-gram overlap; drop or cut it.

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

**Matching.** A benchmark item's text is its fields joined by newlines (GSM8K: question and answer, and
the same again without the ``<<16-3-4=9>>`` calculator annotations, as most copies elsewhere print it).
It contributes every run of ``ngram`` consecutive words (default 13, as in GPT-3). An item with fewer
words, but at least ``min_item_words`` (default 8, GPT-3's smallest n), contributes its whole word
sequence, which then matches only as a whole; shorter items are not indexed (counted as
``items_too_short``). An n-gram found in more than ``max_item_frequency`` distinct items (boilerplate
chains such as "… the answer is …") is left out of the index. A document matches an item where one of
the item's n-grams occurs in it; overlapping or adjacent hits on the same item merge into one
:class:`Match` spanning them.

**Index.** One 64-bit hash per distinct n-gram, kept sorted, with a bitmap of 16–32 bits per n-gram in
front of it and the ids of the items holding each n-gram in CSR arrays: about 8 + (2 to 4) + 4 +
4·(items per n-gram) bytes per n-gram (``DecontamIndex.stats()`` gives the figure; GSM8K test +
HumanEval: 118 k n-grams, 2.2 MB). A word's hash is a polynomial over its code points, an n-gram's a
polynomial over its words' hashes, each scrambled by an xor-shift-multiply step; all of it runs as
array operations over a document's code points (an ASCII document takes a ``bytes.translate`` shortcut).
Hash collisions are possible in principle (about |index| / 2⁶⁴ per document n-gram); nothing depends
on the process, the clock or Python's hash seed.

**Use.** A map task gets the index with :func:`cached_index` (built once per process), calls
:func:`decontaminate` per record and counts outcomes in a :class:`DecontamReport`
(``report.add(record, *decontaminate(record, index, cfg))``); task reports merge with
:meth:`DecontamReport.merge`. :meth:`DecontamIndex.contains_any` is the cheap yes/no check for a gate.

**Policies.** ``drop`` removes a document with any match (reason ``decontam:<benchmark>`` of its first
match). ``cut`` (GPT-3 / NeMo Curator style) removes each matched span plus ``window`` characters on
either side (widened to whole words), which splits the text into pieces; more than ``max_pieces`` pieces
drops the document (``decontam:too_many_pieces``), pieces shorter than ``min_piece_chars`` are
discarded, and the kept pieces are joined by a blank line into one record (its id recomputed,
``meta.extra["decontam"]`` saying what was cut). A document left with no piece is dropped as
``decontam:<benchmark>``. Chats are checked turn by turn and cut within each turn; a chat any of whose
turns is emptied is dropped (an answer whose question was the benchmark's is contaminated too).
Records of ``exempt_families`` (e.g. the benchmark's own held-out copy) pass untouched.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import re
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from moeforge.config import StrictModel
from moeforge.data.contract import Message, Record, RecordMeta

__all__ = [
    "BenchmarkError",
    "BenchmarkItem",
    "BenchmarkSpec",
    "DecontamConfig",
    "DecontamIndex",
    "DecontamReport",
    "Match",
    "cached_index",
    "decontaminate",
    "load_benchmark",
    "normalize_words",
]

log = logging.getLogger(__name__)

BenchmarkFormat = Literal["gsm8k", "humaneval", "mmlu", "math", "jsonl"]

# fields read from each format when BenchmarkSpec.fields is empty (mmlu is positional CSV)
_DEFAULT_FIELDS: dict[str, list[str]] = {
    "gsm8k": ["question", "answer"],
    "humaneval": ["prompt", "canonical_solution"],
    "math": ["problem", "solution"],
}
_MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "gsm8k": (".jsonl", ".jsonl.gz"),
    "humaneval": (".jsonl.gz", ".jsonl"),
    "jsonl": (".jsonl", ".jsonl.gz"),
    "mmlu": (".csv",),
    "math": (".json",),
}
TOO_MANY_PIECES = "too_many_pieces"
_GSM8K_CALC = re.compile(r"<<[^<>\n]*>>")  # GSM8K's calculator annotations: "16 - 3 - 4 = <<16-3-4=9>>9"


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read; the message names the benchmark, file, line and field."""


class BenchmarkSpec(StrictModel):
    """One benchmark to decontaminate against: a file (or a directory of files) in a known format."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="label used in drop reasons (decontam:<name>) and the report",
    )
    path: str = Field(
        min_length=1,
        description="a file, or a directory searched (recursively) for the format's files; ${VAR:-default} "
        "expands as in other recipe paths",
    )
    format: BenchmarkFormat
    fields: list[str] = Field(
        default_factory=list,
        description="fields joined (by newlines) into an item's text; required for jsonl, optional override "
        "for gsm8k (question, answer), humaneval (prompt, canonical_solution) and math (problem, solution)",
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        from moeforge.data.recipe import expand_vars  # imported here: the recipe module imports this one

        return expand_vars(v)

    @model_validator(mode="after")
    def _fields_fit_format(self) -> BenchmarkSpec:
        if self.name == TOO_MANY_PIECES:
            raise ValueError(f"benchmark name {TOO_MANY_PIECES!r} is reserved for the drop reason")
        if self.format == "jsonl" and not self.fields:
            raise ValueError(
                f"benchmark {self.name!r}: format jsonl needs 'fields', the JSON fields that make an item "
                "(e.g. fields: [question, answer])"
            )
        if self.format == "mmlu" and self.fields:
            raise ValueError(
                f"benchmark {self.name!r}: format mmlu reads the header-less columns "
                f"{', '.join(_MMLU_COLUMNS)} and takes no 'fields'; remove them"
            )
        return self


class DecontamConfig(StrictModel):
    """The recipe's ``decontamination:`` section."""

    enabled: bool = False
    benchmarks: list[BenchmarkSpec] = Field(default_factory=list)
    ngram: int = Field(default=13, ge=1, le=64, description="n-gram length in normalized words")
    min_item_words: int = Field(
        default=8,
        ge=1,
        description="items shorter than ngram words match as a whole if they have at least this many words; "
        "shorter ones are not indexed",
    )
    policy: Literal["drop", "cut"] = "drop"
    window: int = Field(default=200, ge=0, description="cut: characters removed on each side of a match")
    max_pieces: int = Field(default=10, ge=1, description="cut: drop a document split into more pieces")
    min_piece_chars: int = Field(default=200, ge=0, description="cut: discard pieces shorter than this")
    max_item_frequency: int = Field(
        default=10, ge=1, description="ignore n-grams found in more than this many benchmark items"
    )
    exempt_families: list[str] = Field(
        default_factory=list, description="families never checked (e.g. the benchmark's held-out copy)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DecontamConfig:
        if self.min_item_words > self.ngram:
            raise ValueError(f"min_item_words ({self.min_item_words}) must be at most ngram ({self.ngram})")
        names = [b.name for b in self.benchmarks]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"benchmark names must be unique; repeated: {', '.join(dups)}")
        if self.enabled and not self.benchmarks:
            raise ValueError(
                "decontamination is enabled but lists no benchmarks; add one or set enabled: false"
            )
        return self


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark item: which benchmark, a stable id within it (``task_id`` or ``file:line``), its text."""

    benchmark: str
    item_id: str
    text: str


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


# --- normalization ------------------------------------------------------------------------------------

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
class _Words:
    """A text's normalized words: the normalized code points ``chars`` (separators included), each word's
    ``[wstart, wend)`` in them, the index in the original text of every char (``origin``) and the word
    hashes: ``mix(Σ_k char[wstart+k]·P⁻ᵏ)`` (polynomial over code points, so the ASCII path agrees)."""

    chars: np.ndarray
    origin: np.ndarray | None  # None: positions not kept (see _words)
    wstart: np.ndarray
    wend: np.ndarray
    hashes: np.ndarray

    def __len__(self) -> int:
        return len(self.hashes)

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Characters of the original text covered by words ``first`` … ``last`` (inclusive)."""
        assert self.origin is not None, "positions were not kept: _words(text, spans=True)"
        return int(self.origin[self.wstart[first]]), int(self.origin[self.wend[last] - 1]) + 1

    def word(self, i: int) -> str:
        return "".join(map(chr, self.chars[self.wstart[i] : self.wend[i]].tolist()))

    def text(self, i: int, length: int) -> str:
        return " ".join(self.word(k) for k in range(i, i + length))


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_WORDS = _Words(np.zeros(0, np.uint32), _EMPTY_I, _EMPTY_I, _EMPTY_I, np.zeros(0, np.uint64))


@lru_cache(maxsize=1)
def _ascii_tables() -> tuple[bytes, bytes]:
    """``bytes.translate`` arguments doing :func:`_map_char` on ASCII (which maps it to ASCII or nothing)."""
    mapped = [_map_char(chr(b)) for b in range(128)]
    table = bytes(ord(m) if m else b for b, m in enumerate(mapped)) + bytes(range(128, 256))
    return table, bytes(b for b, m in enumerate(mapped) if not m)


def _words(text: str, spans: bool = False) -> _Words:
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
    return _Words(chars, origin, wstart, wend, hashes)


def normalize_words(text: str) -> list[str]:
    """The normalized words of ``text`` (the module docstring gives the rule)."""
    w = _words(text)
    return [w.word(i) for i in range(len(w))]


class _Grams:
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


# --- benchmark loaders --------------------------------------------------------------------------------


def _files(spec: BenchmarkSpec, path: Path) -> list[tuple[Path, str]]:
    """(file, its name for item ids): the file itself, or the directory's files of the format, sorted."""
    if path.is_file():
        return [(path, path.name)]
    suffixes = _SUFFIXES[spec.format]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    if not found:
        raise BenchmarkError(
            f"benchmark {spec.name!r}: directory {path} holds no {' or '.join(suffixes)} files "
            f"for format {spec.format}"
        )
    return [(p, p.relative_to(path).as_posix()) for p in found]


def _open_lines(spec: BenchmarkSpec, file: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file (a leading BOM dropped), gzip-compressed or not
    (told by its magic bytes)."""
    try:
        with open(file, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener: Any = gzip.open if gz else open
        with opener(file, "rb") as fh:
            for no, line in enumerate(fh, start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise BenchmarkError(
                        f"benchmark {spec.name!r}: {file}:{no}: not UTF-8 ({exc.reason} at byte {exc.start})"
                    ) from exc
                yield no, text.removeprefix("\ufeff") if no == 1 else text
    except (OSError, EOFError, zlib.error) as exc:
        raise BenchmarkError(f"benchmark {spec.name!r}: {file}: cannot read it ({exc})") from exc


def _field_text(spec: BenchmarkSpec, obj: Any, fields: list[str], where: str) -> str:
    if not isinstance(obj, dict):
        raise BenchmarkError(
            f"benchmark {spec.name!r}: {where}: expected a JSON object with fields {fields}, "
            f"got {type(obj).__name__}"
        )
    parts = []
    for name in fields:
        if name not in obj:
            have = ", ".join(sorted(obj)) or "none"
            raise BenchmarkError(
                f"benchmark {spec.name!r}: {where}: field {name!r} is missing (fields there: {have}); "
                f"set 'fields' to the ones that hold the item's text"
            )
        value = obj[name]
        if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            value = "\n".join(str(v) for v in value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise BenchmarkError(
                f"benchmark {spec.name!r}: {where}: field {name!r} is {type(value).__name__}, "
                "expected a string (or a list of strings)"
            )
        parts.append(value)
    return "\n".join(parts)


def _load_jsonl(spec: BenchmarkSpec, path: Path) -> Iterator[BenchmarkItem]:
    fields = spec.fields or _DEFAULT_FIELDS.get(spec.format, [])
    for file, label in _files(spec, path):
        for no, line in _open_lines(spec, file):
            if not line.strip():
                continue
            where = f"{file}:{no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkError(
                    f"benchmark {spec.name!r}: {where}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from exc
            text = _field_text(spec, obj, fields, where)
            if spec.format == "gsm8k" and _GSM8K_CALC.search(text):
                # most copies elsewhere drop the calculator annotations: index the text both ways
                text += "\n" + _GSM8K_CALC.sub("", text)
            task_id = obj.get("task_id")
            item_id = task_id if spec.format == "humaneval" and isinstance(task_id, str) else f"{label}:{no}"
            yield BenchmarkItem(spec.name, item_id, text)


def _load_mmlu(spec: BenchmarkSpec, path: Path) -> Iterator[BenchmarkItem]:
    for file, label in _files(spec, path):
        lines = (line for _, line in _open_lines(spec, file))
        reader = csv.reader(lines)
        try:
            for row in reader:
                no = reader.line_num
                if not row or not any(cell.strip() for cell in row):
                    continue
                if no == 1 and [c.strip().lower() for c in row] == [c.lower() for c in _MMLU_COLUMNS]:
                    log.info("benchmark %r: %s: skipping a header row", spec.name, file)
                    continue
                if len(row) != len(_MMLU_COLUMNS):
                    raise BenchmarkError(
                        f"benchmark {spec.name!r}: {file}:{no}: expected {len(_MMLU_COLUMNS)} columns "
                        f"({', '.join(_MMLU_COLUMNS)}; no header), got {len(row)}"
                    )
                yield BenchmarkItem(spec.name, f"{label}:{no}", "\n".join(row[:5]))
        except csv.Error as exc:
            raise BenchmarkError(
                f"benchmark {spec.name!r}: {file}:{reader.line_num}: bad CSV ({exc})"
            ) from exc


def _load_math(spec: BenchmarkSpec, path: Path) -> Iterator[BenchmarkItem]:
    fields = spec.fields or _DEFAULT_FIELDS["math"]
    for file, label in _files(spec, path):
        raw = "".join(line for _, line in _open_lines(spec, file))
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(
                f"benchmark {spec.name!r}: {file}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from exc
        if isinstance(data, list):
            for k, obj in enumerate(data):
                text = _field_text(spec, obj, fields, f"{file} [item {k}]")
                yield BenchmarkItem(spec.name, f"{label}[{k}]", text)
        else:
            yield BenchmarkItem(spec.name, label, _field_text(spec, data, fields, str(file)))


_LOADERS = {
    "gsm8k": _load_jsonl,
    "humaneval": _load_jsonl,
    "jsonl": _load_jsonl,
    "mmlu": _load_mmlu,
    "math": _load_math,
}


def load_benchmark(spec: BenchmarkSpec) -> list[BenchmarkItem]:
    """Read every item of ``spec``. Raises :class:`BenchmarkError` for a missing or unreadable file, a bad
    line (named by file and line) or a missing field."""
    path = Path(spec.path)
    if not path.exists():
        raise BenchmarkError(
            f"benchmark {spec.name!r}: {path} does not exist; fix decontamination.benchmarks[].path "
            f"or fetch the {spec.format} files there"
        )
    items = list(_LOADERS[spec.format](spec, path))
    if not items:
        raise BenchmarkError(f"benchmark {spec.name!r}: {path} holds no items")
    return items


# --- the index ----------------------------------------------------------------------------------------

_BUILD_CHUNK_CHARS = 1 << 20  # items are hashed in batches of about this many characters
_BITMAP_FROM = 64  # n-grams per lookup from which the bitmap pays for its extra operations


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
        words = _words(text)
        if len(words) < self.lengths[-1]:
            return False
        grams = _Grams(words.hashes)
        return any(self._lookup(grams.of_length(length))[0].size for length in self.lengths)

    def find(self, text: str) -> list[Match]:
        """Every stretch of ``text`` matching a benchmark item, ordered by position then item."""
        words = _words(text)
        if len(words) < self.lengths[-1]:
            return []
        grams = _Grams(words.hashes)
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
            words = _words(text, spans=True)
        found = []
        for f, stop in zip(firsts.tolist(), run_end.tolist(), strict=True):
            bench, item_id = self.items[int(item[f])]
            p = int(pos[f])
            start, end = words.span(p, stop - 1)
            start, end = _word_edge(text, start, -1), _word_edge(text, end, +1)  # whole tokens: "market?"
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
    words = _words("\n".join(texts), spans=True)
    if len(words) == 0:
        return np.zeros(0, np.uint64), _EMPTY_I, np.zeros(len(texts), dtype=np.int64)
    bounds = np.cumsum([len(t) + 1 for t in texts])  # the joined text's offset after each item
    assert words.origin is not None
    owner = np.searchsorted(bounds, words.origin[words.wstart], side="right")  # item (relative) of each word
    count = np.bincount(owner, minlength=len(texts))
    first_word = np.cumsum(count) - count
    grams = _Grams(words.hashes)
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


# --- the stage ----------------------------------------------------------------------------------------


def _word_edge(text: str, i: int, step: int) -> int:
    """Move ``i`` outwards (step -1: left, +1: right) until it no longer splits a word."""
    if step < 0:
        while i > 0 and not text[i - 1].isspace():
            i -= 1
    else:
        while i < len(text) and not text[i].isspace():
            i += 1
    return i


def _cut(text: str, matches: list[Match], cfg: DecontamConfig) -> tuple[list[str], int, int]:
    """(kept pieces, pieces before the length filter, characters removed) after cutting every match
    plus ``window`` characters on each side."""
    spans: list[list[int]] = []
    for m in sorted(matches, key=lambda m: m.start_char):
        a = _word_edge(text, max(0, m.start_char - cfg.window), -1)
        b = _word_edge(text, min(len(text), m.end_char + cfg.window), +1)
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    pieces, prev = [], 0
    for a, b in spans:
        pieces.append(text[prev:a])
        prev = b
    pieces.append(text[prev:])
    pieces = [p.strip() for p in pieces if p.strip()]
    kept = [p for p in pieces if len(p) >= cfg.min_piece_chars]
    return kept, len(pieces), sum(b - a for a, b in spans)


def _with_step(record: Record, extra: dict[str, Any] | None = None) -> RecordMeta:
    update: dict[str, Any] = {
        "provenance": record.meta.provenance.model_copy(
            update={"steps": [*record.meta.provenance.steps, "decontam"]}
        )
    }
    if extra is not None:
        update["extra"] = {**record.meta.extra, "decontam": extra}
    return record.meta.model_copy(update=update)


def decontaminate(
    record: Record, index: DecontamIndex, cfg: DecontamConfig
) -> tuple[Record | None, str | None, list[Match]]:
    """Check ``record`` against ``index`` and apply ``cfg.policy``.

    Returns ``(record, None, matches)`` — unchanged but for the provenance step ``decontam`` when nothing
    matched, cut (new content and id, ``meta.extra["decontam"]``) otherwise — or ``(None, reason,
    matches)`` with reason ``decontam:<benchmark>`` or ``decontam:too_many_pieces``. Records of
    ``cfg.exempt_families``, and every record when ``cfg.enabled`` is false, come back untouched with no
    matches."""
    if not cfg.enabled or record.meta.family in cfg.exempt_families:
        return record, None, []
    turns = [record.text] if record.text is not None else [m.content for m in record.messages or []]
    per_turn = [index.find(t) for t in turns]
    if record.messages is not None:
        per_turn = [[replace(m, turn=k) for m in ms] for k, ms in enumerate(per_turn)]
    matches = [m for ms in per_turn for m in ms]
    if not matches:
        return record.model_copy(update={"meta": _with_step(record)}), None, []
    if cfg.policy == "drop":
        return None, f"decontam:{matches[0].benchmark}", matches
    new_turns, pieces, removed = [], 0, 0
    for text, ms in zip(turns, per_turn, strict=True):
        if not ms:
            new_turns.append(text)
            continue
        kept, split_into, cut_chars = _cut(text, ms, cfg)
        if split_into > cfg.max_pieces:
            return None, f"decontam:{TOO_MANY_PIECES}", matches
        if not kept:
            return None, f"decontam:{ms[0].benchmark}", matches
        new_turns.append("\n\n".join(kept))
        pieces += len(kept)
        removed += cut_chars
    pairs = list(dict.fromkeys((m.benchmark, m.item_id) for m in matches))
    extra = {
        "policy": "cut",
        "benchmarks": sorted({b for b, _ in pairs}),
        "items": [list(p) for p in pairs[:20]],
        "matches": len(matches),
        "removed_chars": removed,
        "pieces": pieces,
    }
    meta = _with_step(record, extra)
    if record.text is not None:
        return Record.create(meta=meta, text=new_turns[0]), None, matches
    assert record.messages is not None
    messages = [Message(role=m.role, content=t) for m, t in zip(record.messages, new_turns, strict=True)]
    return Record.create(meta=meta, messages=messages), None, matches


# --- the report ---------------------------------------------------------------------------------------


@dataclass
class _BenchmarkCounts:
    items: int = 0
    items_matched: set[str] = field(default_factory=set)
    documents_affected: int = 0
    documents_dropped: int = 0
    documents_cut: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


def _example_key(e: dict[str, Any]) -> tuple[str, str, str]:
    return (e["source"], e["record_id"], e["item_id"])


@dataclass
class DecontamReport:
    """What decontamination found, per benchmark; per-task reports merge into a run's report.

    Per benchmark: ``items`` (loaded), ``items_matched`` (distinct items found in some document),
    ``documents_affected`` (documents with a match, dropped or cut) and up to ``max_examples`` examples
    (the first by source, so the same whatever the order tasks are merged in)."""

    benchmarks: dict[str, _BenchmarkCounts] = field(default_factory=dict)
    documents_checked: int = 0
    documents_exempt: int = 0
    documents_cut: int = 0
    documents_dropped: Counter[str] = field(default_factory=Counter)
    max_examples: int = 5
    exempt_families: frozenset[str] = frozenset()

    @classmethod
    def for_index(cls, index: DecontamIndex, max_examples: int = 5) -> DecontamReport:
        """An empty report listing the index's benchmarks and their item counts."""
        per = index.stats()["benchmarks"]
        return cls(
            {b: _BenchmarkCounts(items=s["items"]) for b, s in per.items()},
            max_examples=max_examples,
            exempt_families=frozenset(index.cfg.exempt_families),
        )

    def add(self, record: Record, result: Record | None, reason: str | None, matches: list[Match]) -> None:
        """Count one record's outcome: ``report.add(record, *decontaminate(record, index, cfg))``."""
        if record.meta.family in self.exempt_families:
            self.documents_exempt += 1
            return
        self.documents_checked += 1
        if not matches:
            return
        action = "dropped" if result is None else "cut"
        if result is None:
            self.documents_dropped[reason or "decontam"] += 1
        else:
            self.documents_cut += 1
        src = record.meta.source
        source = f"{src.uri}:{src.line}" if src.line is not None else src.uri
        for bench in dict.fromkeys(m.benchmark for m in matches):
            counts = self.benchmarks.setdefault(bench, _BenchmarkCounts())
            counts.documents_affected += 1
            counts.documents_dropped += result is None
            counts.documents_cut += result is not None
            first: dict[str, Match] = {}
            for m in matches:
                if m.benchmark == bench:
                    counts.items_matched.add(m.item_id)
                    first.setdefault(m.item_id, m)
            for m in first.values():
                example = {
                    "source": source,
                    "record_id": record.id,
                    "item_id": m.item_id,
                    "ngram": m.ngram,
                    "action": action,
                }
                self._add_example(counts, example)

    def _add_example(self, counts: _BenchmarkCounts, example: dict[str, Any]) -> None:
        if len(counts.examples) >= self.max_examples and _example_key(example) >= _example_key(
            counts.examples[-1]
        ):
            return
        counts.examples.append(example)
        counts.examples.sort(key=_example_key)
        del counts.examples[self.max_examples :]

    def merge(self, other: DecontamReport) -> None:
        """Add ``other``'s counts into this report."""
        self.documents_checked += other.documents_checked
        self.documents_exempt += other.documents_exempt
        self.documents_cut += other.documents_cut
        self.documents_dropped.update(other.documents_dropped)
        for bench, theirs in other.benchmarks.items():
            mine = self.benchmarks.setdefault(bench, _BenchmarkCounts(items=theirs.items))
            mine.items = max(mine.items, theirs.items)
            mine.items_matched |= theirs.items_matched
            mine.documents_affected += theirs.documents_affected
            mine.documents_dropped += theirs.documents_dropped
            mine.documents_cut += theirs.documents_cut
            for e in theirs.examples:
                self._add_example(mine, e)

    def to_json(self) -> dict[str, Any]:
        return {
            "documents_checked": self.documents_checked,
            "documents_exempt": self.documents_exempt,
            "documents_cut": self.documents_cut,
            "documents_dropped": dict(sorted(self.documents_dropped.items())),
            "benchmarks": {
                b: {
                    "items": c.items,
                    "items_matched": len(c.items_matched),
                    "documents_affected": c.documents_affected,
                    "documents_dropped": c.documents_dropped,
                    "documents_cut": c.documents_cut,
                    "matched_item_ids": sorted(c.items_matched),
                    "examples": c.examples,
                }
                for b, c in sorted(self.benchmarks.items())
            },
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], max_examples: int = 5) -> DecontamReport:
        report = cls(
            documents_checked=d["documents_checked"],
            documents_exempt=d["documents_exempt"],
            documents_cut=d["documents_cut"],
            documents_dropped=Counter(d["documents_dropped"]),
            max_examples=max_examples,
        )
        for b, c in d["benchmarks"].items():
            report.benchmarks[b] = _BenchmarkCounts(
                items=c["items"],
                items_matched=set(c["matched_item_ids"]),
                documents_affected=c["documents_affected"],
                documents_dropped=c["documents_dropped"],
                documents_cut=c["documents_cut"],
                examples=list(c["examples"])[:max_examples],
            )
        return report
