"""The statistics behind :mod:`moeforge.data.report`: one streaming pass over a run's output shards.

:func:`scan_run` reads every shard ``manifest.json`` lists, in split and shard order, and counts into a
:class:`Scan` whose size depends on categories and fixed bins, never on the number of records. Shards
that are missing or unreadable and lines that are not contract records are noted as problems, not raised.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from moeforge.data.mix import approx_tokens
from moeforge.data.split import SPLITS
from moeforge.data.store import iter_lines

__all__ = ["CONF_BINS", "EXAMPLES", "LENGTH_BINS", "SAMPLES", "SAMPLE_CHARS", "Key", "Scan", "scan_run"]

# the package's logger, whatever the module (the name it has always had)
log = logging.getLogger("moeforge.data.report")

# Characters per record: bin 0 is [0, 16), bin i is [2^(i+3), 2^(i+4)), the last bin is ≥ 2^20.
LENGTH_BINS = 18
CONF_BINS = 20
SAMPLES = 6  # families shown per split: the first record of each
SAMPLE_CHARS = 400
EXAMPLES = 5  # problems and decontamination examples listed

Key = tuple[str, str, str, str]  # split, family, lang, domain


# ---------------------------------------------------------------------------------------------- the scan


@dataclass
class Scan:
    """Everything the report needs from the records; sized by categories and bins, not by records."""

    records: Counter[Key] = field(default_factory=Counter)
    tokens: Counter[Key] = field(default_factory=Counter)
    words: Counter[Key] = field(default_factory=Counter)
    chars: Counter[Key] = field(default_factory=Counter)
    lengths: dict[str, list[int]] = field(default_factory=lambda: {s: [0] * LENGTH_BINS for s in SPLITS})
    longest: Counter[str] = field(default_factory=Counter)
    confidence: dict[str, list[int]] = field(default_factory=lambda: {s: [0] * CONF_BINS for s in SPLITS})
    unlabelled: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    pii_status: Counter[str] = field(default_factory=Counter)
    exact_copies: Counter[int] = field(default_factory=Counter)
    repeated: int = 0  # records with meta.extra.mix_repeat > 1
    extra_passes: int = 0  # Σ (mix_repeat − 1)
    samples: dict[str, dict[str, str]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    problems: list[str] = field(default_factory=list)
    n_problems: int = 0

    def problem(self, message: str) -> None:
        self.n_problems += 1
        if len(self.problems) < EXAMPLES:
            self.problems.append(message)


def _length_bin(n: int) -> int:
    return 0 if n < 16 else min(n.bit_length() - 4, LENGTH_BINS - 1)


def _contents(obj: Mapping[str, Any]) -> list[str]:
    if obj.get("text") is not None:
        return [str(obj["text"])]
    return [str(m.get("content", "")) for m in obj.get("messages") or [] if isinstance(m, dict)]


def _sample(obj: Mapping[str, Any]) -> str:
    if obj.get("text") is not None:
        s = str(obj["text"])
    else:
        s = "\n".join(
            f"{m.get('role', '?')}: {m.get('content', '')}"
            for m in obj.get("messages") or []
            if isinstance(m, dict)
        )
    return s if len(s) <= SAMPLE_CHARS else s[:SAMPLE_CHARS] + " …"


def _add(scan: Scan, split: str, obj: Mapping[str, Any]) -> None:
    meta = obj["meta"]
    key = (split, str(meta["family"]), str(meta.get("lang") or "und"), str(meta["domain"]))
    contents = _contents(obj)
    n_chars = sum(len(c) for c in contents)
    scan.records[key] += 1
    extra = meta.get("extra") or {}
    repeat = int(extra.get("mix_repeat", 1))
    scan.tokens[key] += approx_tokens(contents) * repeat
    scan.words[key] += sum(len(c.split()) for c in contents)
    if repeat > 1:
        scan.repeated += 1
        scan.extra_passes += repeat - 1
    scan.chars[key] += n_chars
    scan.lengths[split][_length_bin(n_chars)] += 1
    scan.longest[split] = max(scan.longest[split], n_chars)
    conf = meta.get("lang_confidence")
    if conf is None:
        scan.unlabelled[split] += 1
    else:
        scan.confidence[split][min(max(int(float(conf) * CONF_BINS), 0), CONF_BINS - 1)] += 1
    for kind, n in (meta.get("pii") or {}).items():
        scan.pii[str(kind)] += int(n)
    scan.pii_status[str(meta.get("pii_status") or "none")] += 1
    copies = extra.get("exact_copies")
    if copies is not None and int(copies) > 1:
        scan.exact_copies[int(copies)] += 1
    if key[1] not in scan.samples[split] and len(scan.samples[split]) < SAMPLES:
        scan.samples[split][key[1]] = _sample(obj)


def _lines(path: Path, rel: str, scan: Scan) -> Iterator[tuple[int, str]]:
    try:
        yield from iter_lines(path)
    except (zstandard.ZstdError, UnicodeDecodeError, OSError, EOFError) as exc:
        scan.problem(f"{rel}: unreadable ({type(exc).__name__}: {exc})")


def scan_run(run_dir: Path, manifest: Mapping[str, Any]) -> Scan:
    """One streaming pass over every output shard the manifest lists, in split and shard order."""
    scan = Scan()
    outputs = manifest.get("outputs") or {}
    for split in SPLITS:
        for shard in outputs.get(split, []):
            rel = str(shard["path"])
            path = run_dir / rel
            if not path.is_file():
                scan.problem(f"{rel}: missing (listed in the manifest)")
                continue
            for line_no, line in _lines(path, rel, scan):
                try:
                    _add(scan, split, json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                    scan.problem(f"{rel}:{line_no}: not a contract record ({type(exc).__name__}: {exc})")
    log.info("report: scanned %d records in %s", sum(scan.records.values()), run_dir)
    return scan
