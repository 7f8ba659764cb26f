"""The data recipe: one YAML file naming the sources and configuring every stage.

A recipe is validated strictly (unknown keys are errors). Paths may use ``${VAR}`` and
``${VAR:-default}``; relative paths are taken from the directory the command runs in. The resolved
recipe (variables expanded, defaults filled in) is written into the run directory and its sha256 is
the ``recipe_hash`` that every record's provenance carries.

Sources are one of ``path`` (a file, directory, glob or ``s3://`` / ``https://`` URI), ``hf`` (a
Hugging Face dataset saved with ``save_to_disk`` or a hub name), or ``builtin`` (data that ships with
Python or moeforge, so a fresh machine can run the demo with no downloads).

``steps`` (optional) lists the map steps each task runs, in order; the default is :data:`DEFAULT_STEPS`
(read, format, langid, filters, decontam, pii, identity, write). A step left out does not run; a step
added is one class in :mod:`moeforge.data.steps`. Names and order are checked when a run starts
(:func:`moeforge.data.steps.check_steps`: unknown or repeated names, read not first, write not last, a
record step before format, or a configured section whose step is left out are errors).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moeforge.config import StrictModel, apply_overrides, read_yaml, validate_config
from moeforge.data.decontam import DecontamConfig
from moeforge.data.dedup.minhash import MinHashConfig
from moeforge.data.dedup.semantic import SemanticConfig
from moeforge.data.filters import FilterConfig
from moeforge.data.formats import FormatConfig, IdentityConfig
from moeforge.data.langid import LangIdConfig
from moeforge.data.mix import MixConfig
from moeforge.data.pii import PiiConfig
from moeforge.data.sources import Format, TxtMode
from moeforge.data.vars import expand_vars

__all__ = [
    "BUILTINS",
    "DEFAULT_STEPS",
    "EXECUTION_FIELDS",
    "DedupConfig",
    "GateConfig",
    "HfSource",
    "RayConfig",
    "Recipe",
    "SourceConfig",
    "SplitConfig",
    "load_recipe",
    "recipe_hash",
]

BUILTINS = ("stdlib", "pydoc_topics", "word_problems")
# The map steps every task runs, in order, when a recipe does not list its own (moeforge.data.steps).
DEFAULT_STEPS = ("read", "format", "langid", "filters", "decontam", "pii", "identity", "write")


class HfSource(StrictModel):
    """A Hugging Face dataset: ``path`` saved with ``save_to_disk``, or a hub ``name`` (+config, split)."""

    path: str | None = Field(default=None, description="directory written by Dataset.save_to_disk")
    name: str | None = Field(default=None, description="hub name such as openai/gsm8k")
    config: str | None = None
    split: str | None = Field(default=None, description="split to read (required for hub names)")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return None if v is None else expand_vars(v)

    @model_validator(mode="after")
    def _one(self) -> HfSource:
        if (self.path is None) == (self.name is None):
            raise ValueError("hf source needs exactly one of path (save_to_disk directory) or name (hub)")
        return self


class SourceConfig(FormatConfig):
    """One input of the recipe and how its items become records."""

    name: str | None = Field(default=None, description="label in reports; default: the path or builtin")
    path: str | None = Field(default=None, description="file, directory, glob, s3:// or https:// URI")
    hf: HfSource | None = None
    builtin: Literal["stdlib", "pydoc_topics", "word_problems"] | None = Field(
        default=None,
        description="stdlib: Python's standard library (.py files); pydoc_topics: the help texts that "
        "ship with Python; word_problems: generated GSM8K-style problems",
    )
    include: list[str] = Field(default_factory=list, description="glob patterns a file name must match")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of files to skip")
    format: Format = "auto"
    txt_mode: TxtMode = "paragraphs"
    count: int = Field(default=1000, ge=0, description="word_problems: how many to generate")
    seed: int = Field(default=0, description="word_problems: generator seed")
    max_files: int | None = Field(default=None, ge=1, description="read at most this many files (sorted)")

    @model_validator(mode="after")
    def _one_input(self) -> SourceConfig:
        given = [k for k in ("path", "hf", "builtin") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a source needs exactly one of path, hf or builtin (got {given or 'none'})")
        return self

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return None if v is None else expand_vars(v)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.builtin:
            return f"builtin:{self.builtin}"
        if self.hf is not None:
            return f"hf:{self.hf.name or self.hf.path}"
        return str(self.path)


class DedupConfig(StrictModel):
    """Exact deduplication over all sources together."""

    enabled: bool = True
    policy: Literal["keep_first", "keep_longest", "keep_best_quality"] = Field(
        default="keep_first",
        description="which copy survives: the first in source order, the longest text, or the best "
        "quality score (lang confidence × alpha-word ratio); ties go to the first",
    )
    memory_mb: int = Field(default=256, ge=1, description="memory budget of the duplicate search")


class SplitConfig(StrictModel):
    """Deterministic train/valid/test assignment by hashing (unit id, seed)."""

    train: float = Field(default=0.90, ge=0.0, le=1.0)
    valid: float = Field(default=0.05, ge=0.0, le=1.0)
    test: float = Field(default=0.05, ge=0.0, le=1.0)
    seed: int = 0
    holdout_families: list[str] = Field(default_factory=list, description="families that go to test only")
    min_eval_records: int = Field(
        default=10,
        ge=1,
        description="a valid or test split with a non-zero ratio must get at least this many records",
    )

    @model_validator(mode="after")
    def _sum(self) -> SplitConfig:
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios train+valid+test must sum to 1 (got {total:g})")
        return self


class GateConfig(StrictModel):
    """Bounds the ``verify`` gates check."""

    train_ratio: tuple[float, float] = (0.85, 0.95)
    eval_ratio: tuple[float, float] = (0.03, 0.07)
    language_shares: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="per language, the allowed share of train records, e.g. ru: [0.3, 0.6]",
    )
    language_unit: Literal["tokens", "records"] = Field(
        default="tokens", description="language shares in approximate tokens (× mix weight) or in records"
    )
    mix_tolerance: float = Field(
        default=0.02, ge=0.0, le=1.0, description="allowed |achieved − target| share per mixing group"
    )
    require_lang: bool = Field(default=False, description="fail when a record has no language label")

    @field_validator("train_ratio", "eval_ratio")
    @classmethod
    def _bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"bounds must satisfy 0 <= low <= high <= 1 (got {list(v)})")
        return v

    @field_validator("language_shares")
    @classmethod
    def _share_bounds(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for lang, (lo, hi) in v.items():
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{lang}: bounds must satisfy 0 <= low <= high <= 1 (got {[lo, hi]})")
        return v


class OutputConfig(StrictModel):
    shard_records: int = Field(default=50_000, ge=1, description="records per output shard")
    zstd_level: int = Field(default=3, ge=1, le=19)


class RayConfig(StrictModel):
    """Where ``executor: ray`` runs (not part of the dataset: left out of the recipe hash)."""

    address: str | None = Field(
        default=None,
        description="an existing Ray cluster (ray://… or host:port; default: $RAY_ADDRESS, else a local "
        "instance started by the command). Every node must see the run directory at the same path",
    )
    num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs of a local instance the command starts (default: --workers)"
    )


# Settings that say how a run executes, not what it produces: left out of resolved() and the recipe hash,
# so the same recipe gives the same bytes (and resumes the same run directory) on every executor.
EXECUTION_FIELDS = ("executor", "ray")


class Recipe(StrictModel):
    """A whole data recipe. See configs/data/*.yaml for documented examples."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    seed: int = 0
    sources: list[SourceConfig] = Field(min_length=1)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    decontamination: DecontamConfig = Field(default_factory=DecontamConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    identity: IdentityConfig | None = None
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    near_dedup: MinHashConfig = Field(default_factory=MinHashConfig)
    semantic_dedup: SemanticConfig = Field(default_factory=SemanticConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    gates: GateConfig = Field(default_factory=GateConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    steps: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STEPS),
        min_length=1,
        description="the map steps each task runs, in order: read first, format next, write last; a step "
        "left out does not run (default: " + ", ".join(DEFAULT_STEPS) + "). Names and order are checked "
        "when the run starts (moeforge.data.steps.check_steps)",
    )
    executor: Literal["local", "ray"] = Field(
        default="local",
        description="where tasks run: local worker processes, or Ray tasks (the ray extra; see ray:). "
        "Outputs are byte-identical either way",
    )
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _families(self) -> Recipe:
        families = {s.family for s in self.sources}
        unknown = sorted(set(self.split.holdout_families) - families)
        if unknown:
            raise ValueError(
                f"split.holdout_families names {unknown}, which no source has (families: {sorted(families)})"
            )
        return self

    def families(self) -> list[str]:
        return sorted({s.family for s in self.sources})

    def resolved(self) -> dict[str, Any]:
        """The recipe with defaults filled in, as plain JSON data (what the run directory stores).

        ``steps`` is left out when it is the default order, so a recipe that does not list steps hashes
        (and stamps its records) as it did before the setting existed, and old run directories resume.
        The execution settings (:data:`EXECUTION_FIELDS`) are left out: they do not change the data."""
        data = self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))
        if data["steps"] == list(DEFAULT_STEPS):
            del data["steps"]
        return data


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the resolved recipe's canonical JSON."""
    blob = json.dumps(recipe.resolved(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    """Read, override (``key.path=value``) and validate a recipe; errors name the file and field."""
    p = Path(path)
    data = apply_overrides(read_yaml(p), overrides or [])
    return validate_config(Recipe, data, source=str(p))
