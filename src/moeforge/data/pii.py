"""PII scrubbing: detect personal data and secrets, replace each with a typed placeholder, count them.

Detectors (placeholder): e-mail (``<|email|>``), phone numbers in international and common national
formats (``<|phone|>``), IPv4 and IPv6 addresses (``<|ip|>``), credit-card numbers that pass the Luhn
check (``<|credit_card|>``), IBANs that pass the ISO 13616 mod-97 check (``<|iban|>``), US social security
numbers (``<|ssn|>``), and secrets — AWS access keys, private-key blocks, bearer tokens, common API-key
shapes (``<|secret|>``). Checksums keep ordinary numbers (prices, dates, ids) from being scrubbed.

A record whose PII density (placeholders per 1,000 characters) exceeds ``review_density`` gets
``pii_status: requires_review`` and is kept out of train by the split stage unless the recipe allows it.
The placeholders are special tokens of the tokenizer, so a scrubbed span costs one token.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

from pydantic import Field

from moeforge.config import StrictModel
from moeforge.data.contract import Message, Record

__all__ = ["PII_TYPES", "PiiConfig", "iban_ok", "luhn_ok", "scrub_record", "scrub_text"]

PII_TYPES = ("secret", "email", "iban", "credit_card", "ssn", "ip", "phone")


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string (credit cards)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters → numbers, mod 97 == 1."""
    s = iban.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not s[:2].isalpha() or not s[2:4].isdigit():
        return False
    moved = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


def _ip_ok(text: str) -> bool:
    # "::", "::1" and "fe80::1"-style short forms are grammar notation or loopback, not personal data
    if sum(1 for g in text.split(":") if g) < 3:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _phone_ok(text: str) -> bool:
    return 7 <= sum(c.isdigit() for c in text) <= 15


# Order matters: secrets and e-mails first (they contain digits and dots the later patterns would nibble).
# Each pattern has a cheap trigger: a substring the text must contain for the pattern to match at all,
# so most texts skip most regexes. Patterns whose every match contains a digit and is shorter than
# _WINDOW_REACH characters (IBAN ≤ 43, cards ≤ 37, phones ≤ 36, IPv4, SSN) run only on windows around
# the text's digits — each digit ± _WINDOW_REACH characters, widened to whitespace so that word
# boundaries and look-behinds see what they would see in the whole text — which gives the same result
# as running them on the whole text at a fraction of the cost for prose.
_WINDOW = ("window",)
# an IPv6 address has ":" followed by a hex digit or another ":": one search with a literal first character
# (fast in re) instead of 23 substring scans
_IP6_TRIGGER = re.compile(r":[0-9A-Fa-f:]")
_WINDOW_REACH = 64
_PATTERNS: list[tuple[str, re.Pattern[str], Callable[[str], bool] | None, tuple[str | re.Pattern[str], ...]]] = [
    ("secret", re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z]+ )*PRIVATE KEY-----", re.S), None, ("PRIVATE KEY",)),
    ("secret", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), None, ("AKIA", "ASIA")),
    ("secret", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]{16,}=*"), None, ("lower:bearer",)),
    ("secret", re.compile(r"\b(?:sk|pk|rk)[-_](?:live|test|proj)?[-_]?[A-Za-z0-9]{20,}\b"), None, ("sk-", "sk_", "pk-", "pk_", "rk-", "rk_")),
    ("secret", re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b"), None, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    ("secret", re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}\b"), None, ("xox",)),
    ("secret", re.compile(r"\bAIza[0-9A-Za-z\-_]{35}\b"), None, ("AIza",)),
    ("email", re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"), None, ("@",)),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), iban_ok, _WINDOW),
    ("credit_card", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), lambda m: luhn_ok(re.sub(r"\D", "", m)), _WINDOW),
    ("ssn", re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"), None, _WINDOW),
    ("ip", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"), None, _WINDOW),
    ("ip", re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"), _ip_ok, (_IP6_TRIGGER,)),
    ("phone", re.compile(r"(?<![\w+])\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}(?![\w=])"), _phone_ok, _WINDOW),
    ("phone", re.compile(r"(?<![\w$=<-])(?:\(\d{3}\)\s?|\d{3}[-.\s])\d{3}[-.\s]\d{4}(?![\w=>-])"), _phone_ok, _WINDOW),
]  # fmt: skip
_DIGITS = re.compile(r"\d+")


def _digit_windows(text: str) -> list[tuple[int, int]]:
    """Merged [start, end) windows: every digit ± _WINDOW_REACH, widened to the surrounding whitespace."""
    n = len(text)
    spans: list[tuple[int, int]] = []
    for m in _DIGITS.finditer(text):
        lo, hi = max(0, m.start() - _WINDOW_REACH), min(n, m.end() + _WINDOW_REACH)
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        while lo > 0 and not text[lo - 1].isspace():
            lo -= 1
        while hi < n and not text[hi].isspace():
            hi += 1
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class PiiConfig(StrictModel):
    """Which PII types to scrub and when a record needs a human look."""

    enabled: bool = True
    types: list[str] = Field(default_factory=lambda: list(PII_TYPES), description=f"subset of {PII_TYPES}")
    review_density: float = Field(
        default=5.0,
        ge=0.0,
        description="placeholders per 1,000 characters above which pii_status=requires_review",
    )
    hold_for_review: bool = Field(
        default=True,
        description="keep requires_review records out of every split (they go to DIR/review/ for a human)",
    )


def scrub_text(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> tuple[str, Counter[str]]:
    """Replace every detected span with ``<|type|>``; return the new text and counts per type.

    Patterns run in order, each on the text as the previous ones left it."""
    counts: Counter[str] = Counter()
    lowered: str | None = None
    windows: list[tuple[int, int]] | None = None
    for kind, pattern, check, triggers in _PATTERNS:
        if kind not in types:
            continue

        def repl(m: re.Match[str], kind: str = kind, check: Callable[[str], bool] | None = check) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return f"<|{kind}|>"

        if triggers is _WINDOW:
            if windows is None:
                windows = _digit_windows(text)
            if not windows:
                continue
            before = sum(counts.values())
            pieces, last = [], 0
            for lo, hi in windows:
                pieces.append(text[last:lo])
                pieces.append(pattern.sub(repl, text[lo:hi]))
                last = hi
            pieces.append(text[last:])
            if sum(counts.values()) != before:  # text changed: positions moved
                text = "".join(pieces)
                windows = None
            continue
        hit = False
        for t in triggers:
            if isinstance(t, re.Pattern):
                hit = t.search(text) is not None
            elif t.startswith("lower:"):
                lowered = text.lower() if lowered is None else lowered
                hit = t[6:] in lowered
            else:
                hit = t in text
            if hit:
                break
        if hit:
            new = pattern.sub(repl, text)
            if new != text:
                text, windows, lowered = new, None, None
    return text, counts


def scrub_record(record: Record, cfg: PiiConfig) -> Record:
    """Scrub a record's text or every turn; set ``meta.pii`` counts and ``meta.pii_status``."""
    total: Counter[str] = Counter()
    if record.text is not None:
        text, total = scrub_text(record.text, cfg.types)
        messages = None
        length = len(record.text)
    else:
        assert record.messages is not None
        messages = []
        for m in record.messages:
            content, c = scrub_text(m.content, cfg.types)
            total.update(c)
            messages.append(Message(role=m.role, content=content))
        text = None
        length = sum(len(m.content) for m in record.messages)
    n = sum(total.values())
    status = "clean" if n == 0 else "scrubbed"
    if n and n * 1000 / max(length, 1) > cfg.review_density:
        status = "requires_review"
    meta = record.meta.model_copy(
        update={
            "pii": {**record.meta.pii, **dict(total)},
            "pii_status": status,
            "provenance": record.meta.provenance.model_copy(
                update={"steps": [*record.meta.provenance.steps, "pii"]}
            ),
        }
    )
    if n == 0:  # nothing replaced: the content, so the id, is the record's own
        return record.model_copy(update={"meta": meta})
    return Record.create(meta=meta, text=text, messages=messages)
