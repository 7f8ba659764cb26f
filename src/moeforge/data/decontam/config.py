"""The recipe's ``decontamination:`` section: :class:`DecontamConfig`, one :class:`BenchmarkSpec` per
benchmark file, and :class:`BenchmarkError` for a benchmark that cannot be read.

The settings are explained where they act: n-gram length, ``min_item_words`` and ``max_item_frequency``
in :mod:`moeforge.data.decontam.index`, ``policy``, ``window``, ``max_pieces``, ``min_piece_chars`` and
``exempt_families`` in :mod:`moeforge.data.decontam.apply`, the formats in
:mod:`moeforge.data.decontam.loaders`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from moeforge.config import StrictModel
from moeforge.data.vars import expand_vars

BenchmarkFormat = Literal["gsm8k", "humaneval", "mmlu", "math", "jsonl"]

MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")  # the header-less CSV columns of format mmlu
TOO_MANY_PIECES = "too_many_pieces"


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read; the message names the benchmark, file, line and field."""


class BenchmarkSpec(StrictModel):
    """One benchmark to decontaminate against: a file (or a directory of files) in a known format."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="label used in drop reasons (decontam:<name>) and the report",
    )
    path: str = Field(
        min_length=1,
        description="a file, or a directory searched (recursively) for the format's files; ${VAR:-default} "
        "expands as in other recipe paths",
    )
    format: BenchmarkFormat
    fields: list[str] = Field(
        default_factory=list,
        description="fields joined (by newlines) into an item's text; required for jsonl, optional override "
        "for gsm8k (question, answer), humaneval (prompt, canonical_solution) and math (problem, solution)",
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_vars(v)

    @model_validator(mode="after")
    def _fields_fit_format(self) -> BenchmarkSpec:
        if self.name == TOO_MANY_PIECES:
            raise ValueError(f"benchmark name {TOO_MANY_PIECES!r} is reserved for the drop reason")
        if self.format == "jsonl" and not self.fields:
            raise ValueError(
                f"benchmark {self.name!r}: format jsonl needs 'fields', the JSON fields that make an item "
                "(e.g. fields: [question, answer])"
            )
        if self.format == "mmlu" and self.fields:
            raise ValueError(
                f"benchmark {self.name!r}: format mmlu reads the header-less columns "
                f"{', '.join(MMLU_COLUMNS)} and takes no 'fields'; remove them"
            )
        return self


class DecontamConfig(StrictModel):
    """The recipe's ``decontamination:`` section."""

    enabled: bool = False
    benchmarks: list[BenchmarkSpec] = Field(default_factory=list)
    ngram: int = Field(default=13, ge=1, le=64, description="n-gram length in normalized words")
    min_item_words: int = Field(
        default=8,
        ge=1,
        description="items shorter than ngram words match as a whole if they have at least this many words; "
        "shorter ones are not indexed",
    )
    policy: Literal["drop", "cut"] = "drop"
    window: int = Field(default=200, ge=0, description="cut: characters removed on each side of a match")
    max_pieces: int = Field(default=10, ge=1, description="cut: drop a document split into more pieces")
    min_piece_chars: int = Field(default=200, ge=0, description="cut: discard pieces shorter than this")
    max_item_frequency: int = Field(
        default=10, ge=1, description="ignore n-grams found in more than this many benchmark items"
    )
    exempt_families: list[str] = Field(
        default_factory=list, description="families never checked (e.g. the benchmark's held-out copy)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DecontamConfig:
        if self.min_item_words > self.ngram:
            raise ValueError(f"min_item_words ({self.min_item_words}) must be at most ngram ({self.ngram})")
        names = [b.name for b in self.benchmarks]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"benchmark names must be unique; repeated: {', '.join(dups)}")
        if self.enabled and not self.benchmarks:
            raise ValueError(
                "decontamination is enabled but lists no benchmarks; add one or set enabled: false"
            )
        return self
