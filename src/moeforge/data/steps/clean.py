"""The record steps between ``format`` and ``write``: language ID, quality filters, decontamination, PII
scrubbing (holding dense records for review) and the identity turns. Each wraps one function of its own
module and counts what it drops, by reason."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from moeforge.data.contract import Record
from moeforge.data.decontam import DecontamReport, cached_index, decontaminate
from moeforge.data.filters import apply_filters
from moeforge.data.formats import apply_identity
from moeforge.data.langid import apply_langid
from moeforge.data.pii import scrub_record
from moeforge.data.steps.base import RecordStep, TaskContext, register, single_shard
from moeforge.data.store import ShardWriter

__all__ = ["DecontamStep", "FiltersStep", "IdentityStep", "LangIdStep", "PiiStep"]


@register
class LangIdStep(RecordStep):
    """Labels lang + confidence; drops records below the confidence or outside ``langid.keep``."""

    name = "langid"
    section = "langid"

    def apply(self, rec: Record) -> Record | None:
        cfg = self.ctx.recipe.langid
        if not cfg.enabled:
            return rec
        labelled, reason = apply_langid(rec, cfg)
        if labelled is None:
            return self.drop(reason or "langid:unknown")
        return labelled


@register
class FiltersStep(RecordStep):
    """Normalization and the quality rules (length, Gopher quality and repetition, C4 lines)."""

    name = "filters"
    section = "filters"

    def apply(self, rec: Record) -> Record | None:
        outcome = apply_filters(rec, self.ctx.recipe.filters)
        if outcome.record is None:
            return self.drop(outcome.reason or "filters:unknown")
        return outcome.record


@register
class DecontamStep(RecordStep):
    """Drops or cuts records that share n-grams with a benchmark; reports the hits per benchmark."""

    name = "decontam"
    section = "decontamination"

    def __init__(self, ctx: TaskContext) -> None:
        super().__init__(ctx)
        self.cfg = ctx.recipe.decontamination
        self.index = cached_index(self.cfg) if self.cfg.enabled else None
        self.report = DecontamReport.for_index(self.index) if self.index is not None else None

    def apply(self, rec: Record) -> Record | None:
        if self.index is None or self.report is None:
            return rec
        result, reason, matches = decontaminate(rec, self.index, self.cfg)
        self.report.add(rec, result, reason, matches)
        if result is None:
            return self.drop(reason or "decontam")
        return result

    def summary(self) -> dict[str, Any]:
        return {"decontamination": self.report.to_json() if self.report is not None else None}


@register
class PiiStep(RecordStep):
    """Scrubs PII into placeholders; holds records dense with PII for review (``review.jsonl.zst``)."""

    name = "pii"
    section = "pii"

    def run(self, items: Iterator[Any]) -> Iterator[Any]:
        ctx = self.ctx
        self.review = ShardWriter(ctx.directory, 1 << 62, ctx.recipe.output.zstd_level, "review")
        with self.review:
            yield from super().run(items)
        single_shard(ctx.directory, "review")

    def apply(self, rec: Record) -> Record | None:
        cfg = self.ctx.recipe.pii
        if cfg.enabled:
            rec = scrub_record(rec, cfg)
        if rec.meta.pii_status == "requires_review" and cfg.hold_for_review:
            self.review.write(rec)
            return self.drop("pii:requires_review")
        return rec


@register
class IdentityStep(RecordStep):
    """Adds the identity system turn (and a seeded intro) to chat records."""

    name = "identity"
    section = "identity"

    def apply(self, rec: Record) -> Record | None:
        identity = self.ctx.recipe.identity
        return rec if identity is None else apply_identity(rec, identity)
