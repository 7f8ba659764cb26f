"""Benchmark loaders: a benchmark's usual files read into items (:class:`BenchmarkItem`), with errors that
say exactly what is wrong with a bad file.

A spec's ``path`` is a file, or a directory searched recursively for the format's files (sorted). Any
file may be gzip-compressed (told by its magic bytes); text is UTF-8, a leading BOM dropped.

- ``gsm8k``, ``humaneval``, ``jsonl``: one JSON object per line; ``math``: one JSON object, or a list of
  them, per file; ``mmlu``: header-less CSV rows ``question, A, B, C, D, answer``.
- A benchmark item's text is its fields joined by newlines (``BenchmarkSpec.fields``, or the format's
  defaults; for mmlu the question and the four choices). GSM8K items hold question and answer, and the
  same again without the ``<<16-3-4=9>>`` calculator annotations, as most copies elsewhere print it.
- Item ids are HumanEval's ``task_id``, else ``file:line``; for math ``file[k]`` (a list) or ``file``.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.data.decontam.config import MMLU_COLUMNS, BenchmarkError, BenchmarkSpec

log = logging.getLogger("moeforge.data.decontam")  # the package's logger, whatever the module

# fields read from each format when BenchmarkSpec.fields is empty (mmlu is positional CSV)
_DEFAULT_FIELDS: dict[str, list[str]] = {
    "gsm8k": ["question", "answer"],
    "humaneval": ["prompt", "canonical_solution"],
    "math": ["problem", "solution"],
}
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "gsm8k": (".jsonl", ".jsonl.gz"),
    "humaneval": (".jsonl.gz", ".jsonl"),
    "jsonl": (".jsonl", ".jsonl.gz"),
    "mmlu": (".csv",),
    "math": (".json",),
}
_GSM8K_CALC = re.compile(r"<<[^<>\n]*>>")  # GSM8K's calculator annotations: "16 - 3 - 4 = <<16-3-4=9>>9"


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark item: which benchmark, a stable id within it (``task_id`` or ``file:line``), its text."""

    benchmark: str
    item_id: str
    text: str


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
                if no == 1 and [c.strip().lower() for c in row] == [c.lower() for c in MMLU_COLUMNS]:
                    log.info("benchmark %r: %s: skipping a header row", spec.name, file)
                    continue
                if len(row) != len(MMLU_COLUMNS):
                    raise BenchmarkError(
                        f"benchmark {spec.name!r}: {file}:{no}: expected {len(MMLU_COLUMNS)} columns "
                        f"({', '.join(MMLU_COLUMNS)}; no header), got {len(row)}"
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
