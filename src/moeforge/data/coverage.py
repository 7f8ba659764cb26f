"""Dataset families and their coverage: which of the data a curriculum needs is actually under a root.

A families file (YAML) names each dataset family, the stage that needs it (pretrain, sft, dpo … free
text) and the globs over object keys that belong to it; optional expectations (``required`` globs that
must each match an object, ``min_objects``, ``min_bytes``) tell a complete family from a partial one::

    families:
      - name: gsm8k
        stage: sft
        patterns: ["gsm8k/**"]          # ** crosses '/', * and ? do not
        required: ["gsm8k/train*.jsonl"]
        min_objects: 2
        min_bytes: 1000

:class:`Tally` counts objects into families one at a time (an object goes to the first family in file
order that matches it; the others are counted as overlaps), so a listing of millions of keys is never
held; it serialises to JSON so an interrupted inventory resumes with the counts it had.
:func:`coverage_report` turns a tally into each family's status — missing (nothing matched), partial (an
expectation failed, with the reasons) or present — and :func:`coverage_html` into a standalone page in
the look of the data report. Both are pure functions of their inputs (no clock), so a resumed inventory
writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from moeforge.config import StrictModel, load_yaml_config
from moeforge.data.report.html import CSP, STYLE, escape, fmt_int, hbar_chart, html_table, section

__all__ = [
    "MISSING",
    "PARTIAL",
    "PRESENT",
    "FamiliesFile",
    "FamilyMatcher",
    "FamilySpec",
    "Tally",
    "coverage_html",
    "coverage_report",
    "glob_regex",
    "load_families",
]

PRESENT, PARTIAL, MISSING = "present", "partial", "missing"
_STATUS_CLASS = {PRESENT: "pass", PARTIAL: "skip", MISSING: "FAIL"}  # the data report's verdict colours


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over ``/``-separated keys as a full-match regex: ``**`` crosses ``/`` (``a/**/b`` also
    matches ``a/b``), ``*`` and ``?`` stay within one path segment, ``[abc]`` / ``[!abc]`` are classes.

    Written out rather than ``fnmatch`` because fnmatch's ``*`` crosses ``/``, which would make
    ``gsm8k/*.jsonl`` swallow every subdirectory. Raises ValueError for an empty or absolute pattern."""
    if not pattern or pattern.startswith("/"):
        raise ValueError(
            f"pattern {pattern!r}: must be a non-empty key glob relative to ROOT (no leading '/')"
        )
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            if j - i >= 2:
                if (i == 0 or pattern[i - 1] == "/") and j < n and pattern[j] == "/":
                    out.append("(?:.*/)?")  # "**/": zero or more whole directories
                    j += 1
                else:
                    out.append(".*")
            else:
                out.append("[^/]*")
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            close = pattern.find("]", j)
            if close < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1 : close]
            negate = body[:1] in ("!", "^")
            body = (body[1:] if negate else body).replace("\\", "\\\\")
            out.append(f"[^/{body}]" if negate else f"[{body}]")
            i = close + 1
        else:
            out.append(re.escape(c))
            i += 1
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r}: not a valid glob ({exc})") from None


class FamilySpec(StrictModel):
    """One dataset family: the keys that belong to it and what a complete copy of it looks like."""

    name: str = Field(min_length=1, description="Family name, unique in the file.")
    stage: str = Field(min_length=1, description="The phase/stage that needs it: pretrain, sft, dpo …")
    patterns: list[str] = Field(min_length=1, description="Globs over keys relative to ROOT.")
    required: list[str] = Field(default_factory=list, description="Globs that must each match >= 1 object.")
    min_objects: int = Field(0, ge=0)
    min_bytes: int = Field(0, ge=0)
    description: str = ""

    @field_validator("patterns", "required")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        for p in value:
            glob_regex(p)
        return value


class FamiliesFile(StrictModel):
    """A families file: the dataset families, in priority order (an object goes to the first match)."""

    families: list[FamilySpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> FamiliesFile:
        seen: set[str] = set()
        for f in self.families:
            if f.name in seen:
                raise ValueError(f"families: the name {f.name!r} is used twice; family names must be unique")
            seen.add(f.name)
        return self


def load_families(path: Path) -> FamiliesFile:
    """Read and validate a families file; :class:`~moeforge.config.ConfigError` names the file and field."""
    return load_yaml_config(FamiliesFile, Path(path))


class FamilyMatcher:
    """The compiled globs of a families file: which families a key belongs to, which required globs it
    satisfies."""

    def __init__(self, spec: FamiliesFile) -> None:
        self.spec = spec
        self._patterns = [[glob_regex(p) for p in f.patterns] for f in spec.families]
        self._required = [[glob_regex(p) for p in f.required] for f in spec.families]

    def families_of(self, key: str) -> list[int]:
        """Indices of every family whose patterns match ``key``, in file order."""
        return [i for i, pats in enumerate(self._patterns) if any(p.fullmatch(key) for p in pats)]

    def required_hits(self, key: str) -> list[tuple[int, int]]:
        """``(family, required glob)`` index pairs that ``key`` satisfies."""
        return [
            (i, j) for i, pats in enumerate(self._required) for j, p in enumerate(pats) if p.fullmatch(key)
        ]


@dataclass
class Tally:
    """Running counts of an inventory, by family index; small (families × globs), JSON round-trippable.

    A required glob counts any object under the root, whichever family the object was counted in: it
    asks "does this file exist", not "who claimed it"."""

    families: int
    objects: int = 0
    bytes: int = 0
    unmatched: int = 0
    unmatched_bytes: int = 0
    family_objects: list[int] = field(default_factory=list)
    family_bytes: list[int] = field(default_factory=list)
    family_empty: list[int] = field(default_factory=list)
    required: list[list[int]] = field(default_factory=list)
    overlaps: dict[str, int] = field(default_factory=dict)  # "first\tother" family names → objects

    @classmethod
    def new(cls, spec: FamiliesFile) -> Tally:
        n = len(spec.families)
        return cls(
            n,
            family_objects=[0] * n,
            family_bytes=[0] * n,
            family_empty=[0] * n,
            required=[[0] * len(f.required) for f in spec.families],
        )

    def add(self, matcher: FamilyMatcher, key: str, size: int) -> int | None:
        """Count one object; returns the index of the family it belongs to, None when unmatched."""
        self.objects += 1
        self.bytes += size
        for i, j in matcher.required_hits(key):
            self.required[i][j] += 1
        hits = matcher.families_of(key)
        if not hits:
            self.unmatched += 1
            self.unmatched_bytes += size
            return None
        first = hits[0]
        self.family_objects[first] += 1
        self.family_bytes[first] += size
        if size == 0:
            self.family_empty[first] += 1
        names = matcher.spec.families
        for other in hits[1:]:
            pair = f"{names[first].name}\t{names[other].name}"
            self.overlaps[pair] = self.overlaps.get(pair, 0) + 1
        return first

    def to_json(self) -> dict[str, Any]:
        return {
            "objects": self.objects,
            "bytes": self.bytes,
            "unmatched": self.unmatched,
            "unmatched_bytes": self.unmatched_bytes,
            "family_objects": self.family_objects,
            "family_bytes": self.family_bytes,
            "family_empty": self.family_empty,
            "required": self.required,
            "overlaps": dict(sorted(self.overlaps.items())),
        }

    @classmethod
    def from_json(cls, spec: FamiliesFile, data: dict[str, Any]) -> Tally:
        """The tally a state file recorded; ValueError when it does not fit ``spec``."""
        t = cls(len(spec.families), **{k: data[k] for k in cls.new(spec).to_json()})
        if len(t.family_objects) != t.families or [len(r) for r in t.required] != [
            len(f.required) for f in spec.families
        ]:
            raise ValueError("the recorded counts do not fit the families file")
        return t


def _reasons(spec: FamilySpec, tally: Tally, i: int) -> list[str]:
    objects, size, empty = tally.family_objects[i], tally.family_bytes[i], tally.family_empty[i]
    if objects == 0:
        return [f"no object matches {', '.join(spec.patterns)}"]
    reasons = [
        f"required {pattern!r} matches no object"
        for pattern, hits in zip(spec.required, tally.required[i], strict=True)
        if hits == 0
    ]
    if objects < spec.min_objects:
        reasons.append(f"{objects} object(s), fewer than min_objects {spec.min_objects}")
    if size < spec.min_bytes:
        reasons.append(f"{size} bytes, fewer than min_bytes {spec.min_bytes}")
    if empty:
        reasons.append(f"{empty} zero-byte object(s)")
    return reasons


def coverage_report(
    spec: FamiliesFile, tally: Tally, *, header: dict[str, Any], unmatched_keys: list[str]
) -> dict[str, Any]:
    """The coverage document (``coverage.json``): per family its status, stage, counts and reasons, the
    per-stage summary, totals, overlaps and the first ``unmatched_keys``; ``header`` (root, families
    file …) is copied in as it is."""
    families, stages = [], {}
    for i, f in enumerate(spec.families):
        reasons = _reasons(f, tally, i)
        status = MISSING if tally.family_objects[i] == 0 else PARTIAL if reasons else PRESENT
        families.append(
            {
                "name": f.name,
                "stage": f.stage,
                "status": status,
                "objects": tally.family_objects[i],
                "bytes": tally.family_bytes[i],
                "zero_byte_objects": tally.family_empty[i],
                "patterns": f.patterns,
                "required": [
                    {"pattern": p, "objects": n} for p, n in zip(f.required, tally.required[i], strict=True)
                ],
                "reasons": reasons,
            }
        )
        per = stages.setdefault(f.stage, {PRESENT: 0, PARTIAL: 0, MISSING: 0, "objects": 0, "bytes": 0})
        per[status] += 1
        per["objects"] += tally.family_objects[i]
        per["bytes"] += tally.family_bytes[i]
    statuses = [f["status"] for f in families]
    overlaps = [
        {"family": a, "also_matched": b, "objects": n}
        for (a, b), n in ((k.split("\t"), v) for k, v in sorted(tally.overlaps.items()))
    ]
    return {
        **header,
        "families": families,
        "stages": stages,
        "totals": {
            "objects": tally.objects,
            "bytes": tally.bytes,
            "matched_objects": tally.objects - tally.unmatched,
            "matched_bytes": tally.bytes - tally.unmatched_bytes,
            **{s: statuses.count(s) for s in (PRESENT, PARTIAL, MISSING)},
        },
        "overlaps": overlaps,
        "unmatched": {
            "objects": tally.unmatched,
            "bytes": tally.unmatched_bytes,
            "keys": unmatched_keys,
            "keys_truncated": tally.unmatched > len(unmatched_keys),
        },
    }


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def coverage_html(report: dict[str, Any]) -> str:
    """``coverage.html``: one self-contained page (inline CSS and SVG, no script, nothing loaded from
    elsewhere) in the data report's style; every string from the data is escaped."""
    fams, totals, unmatched = report["families"], report["totals"], report["unmatched"]

    def status(s: str) -> str:
        return f'<span class="{_STATUS_CLASS[s]}">{escape(s)}</span>'

    overview = (
        "<dl>"
        + "".join(
            f"<dt>{escape(k)}</dt><dd>{v}</dd>"
            for k, v in (
                ("root", f"<code>{escape(report['root'])}</code>"),
                ("families file", f"<code>{escape(report['families_file'])}</code>"),
                ("objects", f"{fmt_int(totals['objects'])} ({_bytes(totals['bytes'])})"),
                ("matched", f"{fmt_int(totals['matched_objects'])} ({_bytes(totals['matched_bytes'])})"),
                ("unmatched", f"{fmt_int(unmatched['objects'])} ({_bytes(unmatched['bytes'])})"),
                ("families", ", ".join(f"{totals[s]} {status(s)}" for s in (PRESENT, PARTIAL, MISSING))),
            )
        )
        + "</dl>"
    )
    rows = [
        [
            escape(f["name"]),
            escape(f["stage"]),
            status(f["status"]),
            fmt_int(f["objects"]),
            _bytes(f["bytes"]),
            "<ul>" + "".join(f"<li>{escape(r)}</li>" for r in f["reasons"]) + "</ul>" if f["reasons"] else "",
        ]
        for f in fams
    ]
    chart = hbar_chart([(f["name"], [f["bytes"]]) for f in fams], ["bytes"], "bytes per family", fmt=_bytes)
    table = html_table(["family", "stage", "status", "objects", "bytes", "reasons"], rows, numeric=(3, 4))
    stage_rows = [
        [escape(name), *(fmt_int(s[k]) for k in (PRESENT, PARTIAL, MISSING, "objects")), _bytes(s["bytes"])]
        for name, s in report["stages"].items()
    ]
    stages = html_table(
        ["stage", PRESENT, PARTIAL, MISSING, "objects", "bytes"], stage_rows, numeric=(1, 2, 3, 4, 5)
    )
    overlaps = (
        html_table(
            ["counted in", "also matched by", "objects"],
            [
                [escape(o["family"]), escape(o["also_matched"]), fmt_int(o["objects"])]
                for o in report["overlaps"]
            ],
            numeric=(2,),
        )
        if report["overlaps"]
        else '<p class="note">no object matches more than one family</p>'
    )
    keys = "".join(f"<li><code>{escape(k)}</code></li>" for k in unmatched["keys"])
    more = unmatched["objects"] - len(unmatched["keys"])
    unmatched_body = (
        f"<ul>{keys}</ul>" if keys else '<p class="note">every object belongs to a family</p>'
    ) + (f'<p class="note">… and {fmt_int(more)} more in unmatched.jsonl</p>' if more > 0 else "")
    sections = [
        section("overview", "Overview", overview),
        section("families", "Families", table + chart),
        section("stages", "Stages", stages),
        section("overlaps", "Overlaps", overlaps),
        section("unmatched", "Unmatched objects", unmatched_body),
    ]
    nav = "".join(
        f'<a href="#{a}">{escape(t)}</a>'
        for a, t in (
            ("overview", "overview"),
            ("families", "families"),
            ("stages", "stages"),
            ("overlaps", "overlaps"),
            ("unmatched", "unmatched"),
        )
    )
    root = escape(report["root"])
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>moeforge data coverage: {root}</title><style>{STYLE}</style></head>\n"
        f"<body><h1>Data coverage: {root}</h1><nav>{nav}</nav>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
