"""The source and the formatter: ``read`` yields the raw items of a task's input files (with each file's
sha256, for provenance) and quarantines malformed input; ``format`` turns raw items into records."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from moeforge.data.contract import Record
from moeforge.data.formats import to_record
from moeforge.data.plan import InputFile, iter_task_items, word_problem_items
from moeforge.data.sources import Quarantined, RawItem
from moeforge.data.steps.base import RAW, RecordStep, Step, TaskContext, register
from moeforge.io import sha256_file

__all__ = ["FormatStep", "ReadStep", "Sourced"]


class Sourced(NamedTuple):
    """A raw item and the sha256 of the input it came from (which the record's provenance names)."""

    item: RawItem
    source_sha256: str


def _input_info(ctx: TaskContext, inp: InputFile) -> dict[str, Any]:
    src = ctx.source
    if src.builtin == "word_problems":
        return {"uri": inp.uri, "size": None, "sha256": word_problem_items(src)[1]}
    if src.hf is not None:
        from moeforge.data.hf_source import hf_sha256

        return {"uri": inp.uri, "size": None, "sha256": hf_sha256(src.hf)}
    if "://" in inp.path:
        return {"uri": inp.uri, "size": None, "sha256": sha256_file(inp.path)}
    st = os.stat(inp.path)
    return {"uri": inp.uri, "size": st.st_size, "sha256": sha256_file(inp.path), "mtime_ns": st.st_mtime_ns}


@register
class ReadStep(Step):
    """The source: every item of the task's input files, in order; malformed input is quarantined."""

    name = "read"
    takes = None
    gives = RAW

    def run(self, items: Iterator[Any]) -> Iterator[Sourced]:
        stats, clock, ctx = self.stats, time.perf_counter, self.ctx
        for inp in ctx.task.inputs:
            t0 = clock()
            info = _input_info(ctx, inp)
            ctx.inputs.append(info)
            for item in iter_task_items(ctx.source, inp):
                stats.seconds += clock() - t0  # the time spent reading, not downstream
                stats.inputs += 1
                if isinstance(item, Quarantined):
                    self.quarantine(item)
                else:
                    stats.out += 1
                    yield Sourced(item, info["sha256"])
                t0 = clock()
            stats.seconds += clock() - t0


@register
class FormatStep(RecordStep):
    """Raw items → records by the source's format settings (kind, fields, meta); bad items are quarantined."""

    name = "format"
    takes = RAW

    def __init__(self, ctx: TaskContext) -> None:
        super().__init__(ctx)
        self.source = ctx.source

    def apply(self, item: Sourced) -> Record | None:
        rec = to_record(item.item, self.source, item.source_sha256)
        if isinstance(rec, Quarantined):
            return self.quarantine(rec)
        return rec
