"""The per-task ("map") stages: read → format → langid → filters → decontam → pii → identity.

Language ID runs before the quality filters because some of their rules depend on the language (the
Gopher stop-word rule uses English stop words and is skipped for other languages).

Each stage counts what came in, what went out, what it dropped (by named reason) and what it
quarantined, so that ``in = out + sum(dropped) + quarantined`` holds per stage and the next stage's
``in`` is the previous stage's ``out``. A task writes into a temporary directory that is renamed into
place when the task finishes; the directory's ``stats.json`` is the task's done marker.

Task directory layout::

    records.jsonl.zst   surviving records, in input order
    review.jsonl.zst    records held for PII review (pii_status=requires_review)
    quarantine.jsonl    malformed input: uri, line/offset, stage, error, raw
    keys.npy            one dedup key per surviving record (see moeforge.data.dedup.exact)
    facts.json          per surviving record: approximate tokens and the mixing group
    stats.json          inputs (uri, size, sha256), stage counts, timings
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.data.contract import Record
from moeforge.data.decontam import DecontamReport, cached_index, decontaminate
from moeforge.data.dedup.exact import SPLIT_CODES, id_words, make_keys
from moeforge.data.filters import apply_filters
from moeforge.data.formats import apply_identity, to_record
from moeforge.data.langid import apply_langid
from moeforge.data.mix import approx_tokens
from moeforge.data.pii import scrub_record
from moeforge.data.plan import InputFile, Task, iter_task_items, word_problem_items
from moeforge.data.recipe import Recipe
from moeforge.data.sources import Quarantined
from moeforge.data.split import assign_split
from moeforge.data.store import ShardWriter, write_jsonl_line
from moeforge.io import atomic_directory, atomic_write_json, sha256_file
from moeforge.procs import worker_fence

__all__ = ["MAP_STAGES", "StageCount", "run_map_task", "task_dir"]

log = logging.getLogger(__name__)

MAP_STAGES = ("read", "format", "langid", "filters", "decontam", "pii", "identity")


@dataclass
class StageCount:
    """One stage's accounting."""

    stage: str
    inputs: int = 0
    out: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    quarantined: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "in": self.inputs,
            "out": self.out,
            "dropped": dict(sorted(self.dropped.items())),
            "quarantined": self.quarantined,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StageCount:
        return cls(d["stage"], d["in"], d["out"], Counter(d["dropped"]), d["quarantined"])

    def add(self, other: StageCount) -> None:
        self.inputs += other.inputs
        self.out += other.out
        self.dropped.update(other.dropped)
        self.quarantined += other.quarantined
        self.seconds += other.seconds

    @property
    def balanced(self) -> bool:
        return self.inputs == self.out + sum(self.dropped.values()) + self.quarantined


def task_dir(work: Path, task: Task) -> Path:
    return work / "map" / task.task_id


def _input_info(src_builtin: str | None, inp: InputFile, recipe: Recipe, si: int) -> dict[str, Any]:
    if src_builtin == "word_problems":
        _, sha = word_problem_items(recipe.sources[si])
        return {"uri": inp.uri, "size": None, "sha256": sha}
    hf = recipe.sources[si].hf
    if hf is not None:
        from moeforge.data.hf_source import hf_sha256

        return {"uri": inp.uri, "size": None, "sha256": hf_sha256(hf)}
    if "://" in inp.path:
        import fsspec

        h = hashlib.sha256()
        with fsspec.open(inp.path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return {"uri": inp.uri, "size": None, "sha256": h.hexdigest()}
    st = os.stat(inp.path)
    return {"uri": inp.uri, "size": st.st_size, "sha256": sha256_file(inp.path), "mtime_ns": st.st_mtime_ns}


def _near_signatures(recipe: Recipe, texts: list[str], tmp: Path) -> None:
    """Per-record MinHash band keys and/or sentence embeddings of this task, for the reduce."""
    if recipe.near_dedup.enabled:
        from moeforge.data.dedup.minhash import minhash_band_keys, write_task_keys

        write_task_keys(tmp / "minhash.npy", minhash_band_keys(texts, recipe.near_dedup))
    if recipe.semantic_dedup.enabled:
        from moeforge.data.dedup.semantic import embed, write_task_embeddings

        write_task_embeddings(tmp / "embeddings.npy", embed(texts, recipe.semantic_dedup))


def _group(record: Record, by: str) -> str:
    if by == "lang":
        return record.meta.lang or "und"
    return record.meta.domain if by == "domain" else record.meta.family


def _quality(record: Record) -> float:
    return float(record.meta.lang_confidence or 1.0) * float(
        record.meta.quality.get("alpha_words_ratio", 1.0)
    )


def _length(record: Record) -> int:
    return sum(map(len, record.contents()))


def run_map_task(
    task: Task,
    recipe_data: dict[str, Any],
    work: str,
    recipe_sha: str,
    fence: tuple[str, str, int] | None = None,
) -> dict[str, Any]:
    """Run one task into ``work/map/<task_id>``; return its stats (also written as ``stats.json``).

    ``fence`` is the invocation's ``(run_dir, generation, parent_pid)``: the task directory is renamed
    into place only under that generation's commit lock, so a worker orphaned by a killed run can
    never commit into the run that resumed it (:class:`moeforge.procs.FenceError` instead).
    """
    recipe = Recipe.model_validate(recipe_data)
    src = recipe.sources[task.source_index]
    holdout = src.family in recipe.split.holdout_families
    counts = {s: StageCount(s) for s in MAP_STAGES}
    digests: list[bytes] = []
    lengths: list[int] = []
    quality: list[float] = []
    splits: list[int] = []
    tokens: list[int] = []
    group_codes: list[int] = []
    group_table: dict[str, int] = {}
    near_texts: list[str] = []  # final texts, for the near-duplicate signatures computed at the end
    inputs = []
    decon = (
        DecontamReport.for_index(cached_index(recipe.decontamination))
        if recipe.decontamination.enabled
        else None
    )
    out = task_dir(Path(work), task)
    guard = worker_fence(*fence).commit if fence is not None else None
    with atomic_directory(out, overwrite=True, guard=guard) as tmp:
        with (
            ShardWriter(tmp, 1 << 62, recipe.output.zstd_level, "records") as rw,
            ShardWriter(tmp, 1 << 62, recipe.output.zstd_level, "review") as review,
            open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as qfh,
        ):

            def quarantine(q: Quarantined, stage: str) -> None:
                counts[stage].quarantined += 1
                write_jsonl_line(
                    qfh, {"task": task.task_id, "source": src.label, "stage": stage, **q.to_json()}
                )

            for inp in task.inputs:
                info = _input_info(src.builtin, inp, recipe, task.source_index)
                inputs.append(info)
                for item in iter_task_items(src, inp):
                    t0 = time.perf_counter()
                    counts["read"].inputs += 1
                    if isinstance(item, Quarantined):
                        quarantine(item, "read")
                        continue
                    counts["read"].out += 1
                    counts["format"].inputs += 1
                    t1 = time.perf_counter()
                    counts["read"].seconds += t1 - t0
                    rec = to_record(item, src, info["sha256"])
                    t2 = time.perf_counter()
                    counts["format"].seconds += t2 - t1
                    if isinstance(rec, Quarantined):
                        quarantine(rec, "format")
                        continue
                    counts["format"].out += 1
                    final = _clean(rec, recipe, counts, review, decon)
                    if final is None:
                        continue
                    rec = final.model_copy(
                        update={
                            "meta": final.meta.model_copy(
                                update={
                                    "provenance": final.meta.provenance.model_copy(
                                        update={"recipe_hash": recipe_sha}
                                    )
                                }
                            )
                        }
                    )
                    rw.write(rec)
                    digests.append(id_words(rec.id))
                    lengths.append(_length(rec))
                    quality.append(_quality(rec))
                    unit = rec.meta.cluster or rec.id
                    splits.append(SPLIT_CODES[assign_split(unit, recipe.split, holdout)])
                    texts = rec.contents()
                    tokens.append(approx_tokens(texts))
                    group = _group(rec, recipe.mix.by)
                    group_codes.append(group_table.setdefault(group, len(group_table)))
                    if recipe.near_dedup.enabled or recipe.semantic_dedup.enabled:
                        near_texts.append("\n".join(texts))
        for name in ("records", "review"):  # ShardWriter names shards <prefix>-00000.jsonl.zst
            part = tmp / f"{name}-00000.jsonl.zst"
            if part.exists():
                part.rename(tmp / f"{name}.jsonl.zst")
        keys = make_keys(digests, lengths, quality, [holdout] * len(digests), splits)
        np.save(tmp / "keys.npy", keys, allow_pickle=False)
        _near_signatures(recipe, near_texts, tmp)
        facts = {
            "tokens": tokens,
            "group_by": recipe.mix.by,
            "groups": list(group_table),
            "group": group_codes,
        }
        (tmp / "facts.json").write_text(json.dumps(facts, separators=(",", ":")), encoding="utf-8")
        stats = {
            "task": task.task_id,
            "source": src.label,
            "source_index": task.source_index,
            "inputs": inputs,
            "records": len(digests),
            "stages": [c.to_json() for c in counts.values()],
            "decontamination": decon.to_json() if decon is not None else None,
            "seconds": {c.stage: round(c.seconds, 6) for c in counts.values()},
        }
        atomic_write_json(tmp / "stats.json", stats)
    return stats


def _clean(
    rec: Record,
    recipe: Recipe,
    counts: dict[str, StageCount],
    review: ShardWriter,
    decon: DecontamReport | None,
) -> Record | None:
    """langid → filters → decontam → pii → identity for one record; ``None`` when dropped or held."""
    t0 = time.perf_counter()
    c = counts["langid"]
    c.inputs += 1
    if recipe.langid.enabled:
        labelled, reason = apply_langid(rec, recipe.langid)
        if labelled is None:
            c.dropped[reason or "langid:unknown"] += 1
            c.seconds += time.perf_counter() - t0
            return None
        rec = labelled
    c.out += 1
    t1 = time.perf_counter()
    c.seconds += t1 - t0
    c = counts["filters"]
    c.inputs += 1
    outcome = apply_filters(rec, recipe.filters)
    t2 = time.perf_counter()
    c.seconds += t2 - t1
    if outcome.record is None:
        c.dropped[outcome.reason or "filters:unknown"] += 1
        return None
    c.out += 1
    rec = outcome.record
    c = counts["decontam"]
    c.inputs += 1
    if decon is not None:
        cfg = recipe.decontamination
        result, reason, matches = decontaminate(rec, cached_index(cfg), cfg)
        decon.add(rec, result, reason, matches)
        if result is None:
            c.dropped[reason or "decontam"] += 1
            c.seconds += time.perf_counter() - t2
            return None
        rec = result
    c.out += 1
    t2b = time.perf_counter()
    c.seconds += t2b - t2
    c = counts["pii"]
    c.inputs += 1
    if recipe.pii.enabled:
        rec = scrub_record(rec, recipe.pii)
    t3 = time.perf_counter()
    c.seconds += t3 - t2b
    if rec.meta.pii_status == "requires_review" and recipe.pii.hold_for_review:
        review.write(rec)
        c.dropped["pii:requires_review"] += 1
        return None
    c.out += 1
    c = counts["identity"]
    c.inputs += 1
    if recipe.identity is not None:
        rec = apply_identity(rec, recipe.identity)
    c.seconds += time.perf_counter() - t3
    c.out += 1
    return rec
