"""What decontamination found, counted per benchmark: :class:`DecontamReport`.

A map task counts each record's outcome with ``report.add(record, *decontaminate(record, index, cfg))``;
task reports merge with :meth:`DecontamReport.merge` (examples kept are the first by source, so the
result does not depend on the merge order) and travel as :meth:`~DecontamReport.to_json` /
:meth:`~DecontamReport.from_json`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from moeforge.data.contract import Record
from moeforge.data.decontam.index import DecontamIndex, Match


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
