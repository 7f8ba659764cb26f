"""The sink, ``write``: a task's surviving records and the small per-record arrays the reduce decides from.

Per record, in input order: the record (stamped with the recipe hash) into ``records.jsonl.zst``, its
dedup key (content hash, length, quality, held-out flag, split; see :mod:`moeforge.data.dedup.exact`),
approximate tokens and mixing group. When its input ends: ``keys.npy``, ``facts.json`` and, when
near-dedup is on, the MinHash band keys and/or embeddings of the records' texts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.data.contract import Record
from moeforge.data.dedup.exact import SPLIT_CODES, id_words, make_keys
from moeforge.data.mix import approx_tokens
from moeforge.data.recipe import Recipe
from moeforge.data.split import assign_split
from moeforge.data.steps.base import RecordStep, TaskContext, register, single_shard
from moeforge.data.store import ShardWriter

__all__ = ["WriteStep"]


def _group(record: Record, by: str) -> str:
    if by == "lang":
        return record.meta.lang or "und"
    return record.meta.domain if by == "domain" else record.meta.family


def _quality(record: Record) -> float:
    return float(record.meta.lang_confidence or 1.0) * float(
        record.meta.quality.get("alpha_words_ratio", 1.0)
    )


def _near_signatures(recipe: Recipe, texts: list[str], directory: Path) -> None:
    """Per-record MinHash band keys and/or sentence embeddings of this task, for the reduce."""
    if recipe.near_dedup.enabled:
        from moeforge.data.dedup.minhash import minhash_band_keys, write_task_keys

        write_task_keys(directory / "minhash.npy", minhash_band_keys(texts, recipe.near_dedup))
    if recipe.semantic_dedup.enabled:
        from moeforge.data.dedup.semantic import embed, write_task_embeddings

        write_task_embeddings(directory / "embeddings.npy", embed(texts, recipe.semantic_dedup))


@register
class WriteStep(RecordStep):
    """Writes every record it gets and, at the end, the task's keys, facts and near-dedup signatures."""

    name = "write"
    gives = None
    accounted = False  # it drops nothing: the stage table ends with the last step that can

    def __init__(self, ctx: TaskContext) -> None:
        super().__init__(ctx)
        recipe = ctx.recipe
        self.holdout = ctx.source.family in recipe.split.holdout_families
        self.near = recipe.near_dedup.enabled or recipe.semantic_dedup.enabled
        self.digests: list[bytes] = []
        self.lengths: list[int] = []
        self.quality: list[float] = []
        self.splits: list[int] = []
        self.tokens: list[int] = []
        self.group_codes: list[int] = []
        self.group_table: dict[str, int] = {}
        self.near_texts: list[str] = []  # final texts, for the near-duplicate signatures

    def run(self, items: Iterator[Any]) -> Iterator[Any]:
        ctx = self.ctx
        self.writer = ShardWriter(ctx.directory, 1 << 62, ctx.recipe.output.zstd_level, "records")
        with self.writer:
            yield from super().run(items)
        t0 = time.perf_counter()
        single_shard(ctx.directory, "records")
        n = len(self.digests)
        keys = make_keys(self.digests, self.lengths, self.quality, [self.holdout] * n, self.splits)
        np.save(ctx.directory / "keys.npy", keys, allow_pickle=False)
        _near_signatures(ctx.recipe, self.near_texts, ctx.directory)
        facts = {
            "tokens": self.tokens,
            "group_by": ctx.recipe.mix.by,
            "groups": list(self.group_table),
            "group": self.group_codes,
        }
        (ctx.directory / "facts.json").write_text(json.dumps(facts, separators=(",", ":")), encoding="utf-8")
        self.stats.seconds += time.perf_counter() - t0

    def apply(self, rec: Record) -> Record:
        recipe = self.ctx.recipe
        meta = rec.meta
        provenance = meta.provenance.model_copy(update={"recipe_hash": self.ctx.recipe_sha})
        rec = rec.model_copy(update={"meta": meta.model_copy(update={"provenance": provenance})})
        self.writer.write(rec)
        self.digests.append(id_words(rec.id))
        texts = rec.contents()
        self.lengths.append(sum(map(len, texts)))
        self.quality.append(_quality(rec))
        unit = rec.meta.cluster or rec.id
        self.splits.append(SPLIT_CODES[assign_split(unit, recipe.split, self.holdout)])
        self.tokens.append(approx_tokens(texts))
        group = _group(rec, recipe.mix.by)
        self.group_codes.append(self.group_table.setdefault(group, len(self.group_table)))
        if self.near:
            self.near_texts.append("\n".join(texts))
        return rec
