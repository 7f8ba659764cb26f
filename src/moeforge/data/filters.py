"""Cleaning and quality filters: normalization, length, Gopher quality and repetition rules, C4 line rules.

Every rule is switchable and every threshold is a recipe setting; defaults are the papers' values
(Gopher: Rae et al. 2021, appendix A; C4: Raffel et al. 2020, section 2.2). A record is either kept
(possibly with cleaned text and its scores in ``meta.quality``) or dropped with a named reason such as
``gopher_quality:mean_word_length`` — the runner counts drops per reason, nothing disappears silently.

Quality rules judge prose: they apply to records whose domain is in ``quality_domains`` (default
prose and chat); code and math pass through normalization and length checks only. For chats the
rules read the turns' contents joined by blank lines, and cleaning applies to each turn.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from pydantic import Field

from moeforge.config import StrictModel
from moeforge.data.contract import Message, Record

__all__ = [
    "FilterConfig",
    "FilterOutcome",
    "apply_filters",
    "c4_lines",
    "gopher_quality",
    "gopher_repetition",
    "normalize_text",
]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# runs of horizontal space other than a lone " " (replacing every single space would be wasted work)
_SPACES = re.compile(
    r"[\t\u00a0\u2000-\u200b\u3000][ \t\u00a0\u2000-\u200b\u3000]*| [ \t\u00a0\u2000-\u200b\u3000]+"
)
# what the two patterns above can match beyond " ", "\t" and "\n": without any of it in a text, plain
# substring tests decide whether they have work to do
_CONTROL_OR_WIDE_SPACE = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000]"
)
_ASCII_PLAIN = bytes(range(0x20, 0x7F)) + b"\t\n"  # ASCII that is neither control nor to be removed
_BLANKS = re.compile(r"\n{3,}")
_TRAILING = re.compile(r"[^\S\n]+\n")
_WORD = re.compile(r"\S+")
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_STOP_PUNCT = ".,!?;:\"'()"
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·")
_C4_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_TERMINAL = (".", "!", "?", '"', "”", "'", "’")


_STOP_SHIFT = 32  # a word's flags: bit 0 alphabetic, bit 32 stop word; a text's sum holds both counts


def _word_flags(word: str) -> int:
    """Bit 0: the word has an alphabetic character; bit 32: lower-cased and stripped of punctuation, it
    is a stop word."""
    alpha = word.isalpha() or any(map(str.isalpha, word))
    return int(alpha) | int(word.lower().strip(_STOP_PUNCT) in _STOP_WORDS) << _STOP_SHIFT


class _WordFlags(dict[str, int]):
    """:func:`_word_flags` per word, remembered. Words recur across a corpus (Zipf), so a text's words
    are looked up in C (``map`` over ``__getitem__``, summed) instead of tested in a Python loop, which
    was most of the quality filter's time. At most ``limit`` words are remembered per process; past
    that, new words are tested every time (same answers)."""

    def __init__(self, limit: int = 1 << 18) -> None:
        super().__init__()
        self.limit = limit

    def __missing__(self, word: str) -> int:
        value = _word_flags(word)
        if len(self) < self.limit:
            self[word] = value
        return value

    def counts(self, words: list[str]) -> tuple[int, int]:
        """(words with an alphabetic character, stop words) among ``words``."""
        total = sum(map(self.__getitem__, words))
        return total & ((1 << _STOP_SHIFT) - 1), total >> _STOP_SHIFT


_WORD_FLAGS = _WordFlags()


class FilterConfig(StrictModel):
    """Which rules run and their thresholds (defaults from the Gopher and C4 papers)."""

    normalize: bool = True
    min_chars: int = Field(default=1, ge=0)
    max_chars: int = Field(default=1_000_000, ge=1)
    quality_domains: list[str] = Field(default_factory=lambda: ["prose", "chat"])
    gopher_quality: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words_langs: list[str] = Field(
        default_factory=lambda: ["en"],
        description="the stop-word rule uses English stop words: skip it for records whose lang is known and not listed",
    )
    gopher_repetition: bool = True
    max_dup_line_ratio: float = 0.3
    max_dup_para_ratio: float = 0.3
    max_dup_line_char_ratio: float = 0.2
    max_dup_para_char_ratio: float = 0.2
    top_ngram_max_char_ratio: dict[int, float] = Field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    dup_ngram_max_char_ratio: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    c4_lines: bool = False
    c4_min_words_per_line: int = 3
    c4_min_sentences: int = 5


@dataclass
class FilterOutcome:
    """``record`` is the kept (possibly cleaned) record, or None with ``reason`` saying why it was dropped."""

    record: Record | None
    reason: str | None = None
    scores: dict[str, float] = field(default_factory=dict)


def normalize_text(s: str) -> str:
    """NFC; drop control characters except newline and tab; collapse runs of spaces; strip line ends;
    at most one blank line in a row; strip the whole text."""
    if not unicodedata.is_normalized("NFC", s):
        s = unicodedata.normalize("NFC", s)
    if "\r" in s:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    # Whole-text regexes step through every position; a substring test is a memchr-speed scan. Once a
    # text has no control character and no space wider than ASCII's (most texts, ASCII or not), the only
    # horizontal whitespace left is " " and "\t", and substring tests tell whether a regex can match.
    if s.isascii():
        if s.encode("ascii").translate(None, _ASCII_PLAIN):  # something is left: control characters
            s = _CONTROL.sub("", s)
        plain = True
    else:
        plain = _CONTROL_OR_WIDE_SPACE.search(s) is None
        if not plain and _CONTROL.search(s):
            s = _CONTROL.sub("", s)
    if plain:
        if "\t" in s or "  " in s:
            s = _SPACES.sub(" ", s)
        if " \n" in s:
            s = _TRAILING.sub("\n", s)
    else:
        s = _TRAILING.sub("\n", _SPACES.sub(" ", s))
    if "\n\n\n" in s:
        s = _BLANKS.sub("\n\n", s)
    return s.strip()


def gopher_quality(
    text: str, cfg: FilterConfig, lang: str | None = None
) -> tuple[str | None, dict[str, float]]:
    """Gopher quality rules; returns (failed rule or None, scores). ``lang`` gates the stop-word rule."""
    words = text.split()
    n = len(words)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    mean_len = sum(map(len, words)) / n if n else 0.0
    symbols = text.count("#") + text.count("...") + text.count("…")
    alpha, stops = _WORD_FLAGS.counts(words)
    bullets = sum(1 for ln in lines if ln.lstrip().startswith(_BULLETS))
    ellipsis = sum(1 for ln in lines if ln.rstrip().endswith(("...", "…")))
    scores = {
        "words": float(n),
        "mean_word_length": mean_len,
        "symbol_word_ratio": symbols / n if n else 0.0,
        "alpha_words_ratio": alpha / n if n else 0.0,
        "stop_words": float(stops),
        "bullet_lines_ratio": bullets / len(lines) if lines else 0.0,
        "ellipsis_lines_ratio": ellipsis / len(lines) if lines else 0.0,
    }
    checks = [
        ("word_count", not cfg.min_words <= n <= cfg.max_words),
        ("mean_word_length", not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length),
        ("symbol_word_ratio", scores["symbol_word_ratio"] > cfg.max_symbol_word_ratio),
        ("bullet_lines", scores["bullet_lines_ratio"] > cfg.max_bullet_lines_ratio),
        ("ellipsis_lines", scores["ellipsis_lines_ratio"] > cfg.max_ellipsis_lines_ratio),
        ("alpha_words", scores["alpha_words_ratio"] < cfg.min_alpha_words_ratio),
        ("stop_words", stops < cfg.min_stop_words and (lang is None or lang in cfg.stop_words_langs)),
    ]
    failed = next((name for name, bad in checks if bad), None)
    return (f"gopher_quality:{failed}" if failed else None), scores


def _dup_fractions(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier one, fraction of characters in those repeats)."""
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        seen.add(p)
    total = sum(len(p) for p in parts)
    return dup / len(parts), dup_chars / total if total else 0.0


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n)), strict=False))


def gopher_repetition(text: str, cfg: FilterConfig) -> tuple[str | None, dict[str, float]]:
    """Gopher repetition rules (duplicate lines/paragraphs, top and duplicate n-gram coverage)."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    line_frac, line_chars = _dup_fractions(lines)
    para_frac, para_chars = _dup_fractions(paras)
    scores = {
        "dup_line_ratio": line_frac,
        "dup_line_char_ratio": line_chars,
        "dup_para_ratio": para_frac,
        "dup_para_char_ratio": para_chars,
    }
    if line_frac > cfg.max_dup_line_ratio:
        return "gopher_repetition:dup_lines", scores
    if para_frac > cfg.max_dup_para_ratio:
        return "gopher_repetition:dup_paragraphs", scores
    if line_chars > cfg.max_dup_line_char_ratio:
        return "gopher_repetition:dup_line_chars", scores
    if para_chars > cfg.max_dup_para_char_ratio:
        return "gopher_repetition:dup_paragraph_chars", scores
    words = _WORD.findall(text.lower())
    total_chars = len("".join(words)) or 1
    for n, limit in sorted(cfg.top_ngram_max_char_ratio.items()):
        grams = _ngrams(words, n)
        if not grams:
            continue
        gram, count = Counter(grams).most_common(1)[0]
        ratio = count * sum(len(w) for w in gram) / total_chars
        scores[f"top_{n}gram_char_ratio"] = ratio
        if count > 1 and ratio > limit:
            return f"gopher_repetition:top_{n}gram", scores
    lens = [len(w) for w in words]
    repeats = True
    for n, limit in sorted(cfg.dup_ngram_max_char_ratio.items()):
        grams = _ngrams(words, n) if repeats else []
        if not grams:
            if not repeats:  # no repeated shorter n-gram, so no repeated longer one either
                scores[f"dup_{n}gram_char_ratio"] = 0.0
            continue
        counts = Counter(grams)
        if len(counts) == len(grams):
            repeats = False
            scores[f"dup_{n}gram_char_ratio"] = 0.0
            continue
        covered_chars = 0
        covered_until = 0
        for i, g in enumerate(grams):
            if counts[g] > 1:
                start = max(i, covered_until)
                covered_until = i + n
                covered_chars += sum(lens[start:covered_until])
        ratio = covered_chars / total_chars
        scores[f"dup_{n}gram_char_ratio"] = ratio
        if ratio > limit:
            return f"gopher_repetition:dup_{n}gram", scores
    return None, scores


def c4_lines(text: str, cfg: FilterConfig) -> tuple[str, str | None, int]:
    """C4 rules: keep lines ending in terminal punctuation with ≥ 3 words, drop JavaScript and
    cookie/policy lines; drop the document for "lorem ipsum", a curly bracket, or < 5 sentences.
    Returns (kept text, drop reason or None, lines removed)."""
    low = text.lower()
    if "lorem ipsum" in low:
        return text, "c4:lorem_ipsum", 0
    if "{" in text:
        return text, "c4:curly_bracket", 0
    kept, removed = [], 0
    for line in text.split("\n"):
        s = line.strip()
        if not s:
            kept.append(line)
            continue
        ok = s.endswith(_TERMINAL) and len(s.split()) >= cfg.c4_min_words_per_line
        ok = ok and "javascript" not in s.lower() and not any(p in s.lower() for p in _C4_POLICY)
        if ok:
            kept.append(line)
        else:
            removed += 1
    out = _BLANKS.sub("\n\n", "\n".join(kept)).strip()
    sentences = len(re.findall(r"[.!?](?:\s|$)", out))
    if sentences < cfg.c4_min_sentences:
        return out, "c4:too_few_sentences", removed
    return out, None, removed


def apply_filters(record: Record, cfg: FilterConfig) -> FilterOutcome:
    """Run the configured cleaning and filters on one record."""
    text, messages = record.text, record.messages
    if cfg.normalize:
        if text is not None:
            text = normalize_text(text)
        else:
            assert messages is not None
            messages = [Message(role=m.role, content=c) for m in messages if (c := normalize_text(m.content))]
            if not messages or all(m.role != "assistant" for m in messages):
                return FilterOutcome(None, "normalize:empty_turns")
    body = text if text is not None else "\n\n".join(m.content for m in messages or [])
    if not body:
        return FilterOutcome(None, "length:empty")
    scores: dict[str, float] = {}
    if cfg.c4_lines and text is not None and record.meta.domain in cfg.quality_domains:
        text, reason, removed = c4_lines(text, cfg)
        scores["c4_lines_removed"] = float(removed)
        if reason:
            return FilterOutcome(None, reason, scores)
        body = text
    if len(body) < cfg.min_chars:
        return FilterOutcome(None, "length:too_short", scores)
    if len(body) > cfg.max_chars:
        return FilterOutcome(None, "length:too_long", scores)
    if record.meta.domain in cfg.quality_domains:
        checks = []
        if cfg.gopher_quality:
            checks.append(gopher_quality(body, cfg, record.meta.lang))
        if cfg.gopher_repetition and not (checks and checks[0][0]):
            checks.append(gopher_repetition(body, cfg))
        for reason, s in checks:
            scores.update(s)
            if reason:
                return FilterOutcome(None, reason, scores)
    meta = record.meta.model_copy(
        update={
            "quality": {**record.meta.quality, **{k: round(v, 6) for k, v in scores.items()}},
            "provenance": record.meta.provenance.model_copy(
                update={"steps": [*record.meta.provenance.steps, "filters"]}
            ),
        }
    )
    if text == record.text and messages == record.messages:  # content as it was: the id stands
        return FilterOutcome(record.model_copy(update={"meta": meta}), None, scores)
    return FilterOutcome(Record.create(meta=meta, text=text, messages=messages), None, scores)
