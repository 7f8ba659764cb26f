"""The step interface: :class:`Step` and :class:`RecordStep`, their :class:`StageCount`, the
:class:`TaskContext` a task's steps share, the registry of step names, and the runner.

See :mod:`moeforge.data.steps` for how steps chain and how to add one.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import IO, Any, ClassVar

from moeforge.config import ConfigError
from moeforge.data.plan import Task
from moeforge.data.recipe import DEFAULT_STEPS, Recipe, SourceConfig
from moeforge.data.sources import Quarantined
from moeforge.data.store import write_jsonl_line

__all__ = [
    "RAW",
    "RECORDS",
    "STEPS",
    "RecordStep",
    "StageCount",
    "Step",
    "StepError",
    "TaskContext",
    "build_steps",
    "check_steps",
    "register",
    "run_steps",
    "single_shard",
]

RAW = "raw items"
RECORDS = "records"


@dataclass
class StageCount:
    """One step's (or reduce stage's) accounting: in, out, dropped by reason, quarantined, seconds."""

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


class StepError(ConfigError):
    """A recipe's ``steps`` cannot run: an unknown name, a repeat, or an order whose items do not fit."""


@dataclass
class TaskContext:
    """What the steps of one task share. ``directory`` is the task's temporary directory (renamed into
    place when the task finishes); ``inputs`` is filled by the source step (uri, size, sha256 per file)."""

    task: Task
    recipe: Recipe
    recipe_sha: str
    directory: Path
    quarantine_file: IO[str]
    inputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def source(self) -> SourceConfig:
        return self.recipe.sources[self.task.source_index]

    def quarantine(self, q: Quarantined, stage: str) -> None:
        line = {"task": self.task.task_id, "source": self.source.label, "stage": stage, **q.to_json()}
        write_jsonl_line(self.quarantine_file, line)


class Step:
    """One step of a task. Subclasses set ``name`` and implement :meth:`run` (or :meth:`RecordStep.apply`).

    ``takes`` / ``gives`` are the kinds of item read and yielded (None: reads nothing, a source; yields
    nothing a later step may read, a sink); :func:`check_steps` orders steps by them. ``section`` is the
    recipe section that configures the step: configuring it while leaving the step out is an error.
    """

    name: ClassVar[str]
    takes: ClassVar[str | None] = RECORDS
    gives: ClassVar[str | None] = RECORDS
    section: ClassVar[str | None] = None
    accounted: ClassVar[bool] = True  # its counts are a row of the dataset's stage table

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        self.stats = StageCount(self.name)

    def run(self, items: Iterator[Any]) -> Iterator[Any]:
        """Yield the items of ``items`` this step keeps; count every one of them in ``self.stats``."""
        raise NotImplementedError

    def drop(self, reason: str) -> None:
        """Count one item dropped for ``reason`` (``step:why``, e.g. ``langid:not_kept``)."""
        self.stats.dropped[reason] += 1

    def quarantine(self, q: Quarantined) -> None:
        """Count one malformed item and write it, with its position and error, to the task's quarantine."""
        self.stats.quarantined += 1
        self.ctx.quarantine(q, self.name)

    def summary(self) -> dict[str, Any]:
        """Fields this step adds to the task's ``stats.json`` (none by default)."""
        return {}


class RecordStep(Step):
    """A step that decides one item at a time: :meth:`apply` returns the item to keep, or None after
    calling :meth:`drop` or :meth:`quarantine`. :meth:`run` counts and times each call."""

    def apply(self, item: Any) -> Any:
        raise NotImplementedError

    def run(self, items: Iterator[Any]) -> Iterator[Any]:
        stats, apply, clock = self.stats, self.apply, time.perf_counter
        for item in items:
            stats.inputs += 1
            t0 = clock()
            kept = apply(item)
            stats.seconds += clock() - t0
            if kept is not None:
                stats.out += 1
                yield kept
        if not stats.balanced:
            raise RuntimeError(
                f"step {self.name!r} lost items: {stats.to_json()}; apply() must call drop() or "
                "quarantine() before it returns None"
            )


STEPS: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step available to recipes under ``cls.name``."""
    if cls.name in STEPS:
        raise ValueError(f"two steps are named {cls.name!r}: {STEPS[cls.name].__name__} and {cls.__name__}")
    STEPS[cls.name] = cls
    return cls


def single_shard(directory: Path, prefix: str) -> None:
    """Rename the one shard a task's ShardWriter wrote (``<prefix>-00000.jsonl.zst``) to ``<prefix>.jsonl.zst``."""
    part = directory / f"{prefix}-00000.jsonl.zst"
    if part.exists():
        part.rename(directory / f"{prefix}.jsonl.zst")


def _configured(recipe: Recipe, section: str) -> bool:
    """Whether a recipe section asks for work: set, changed from its default, and not disabled."""
    value = getattr(recipe, section)
    default = type(recipe).model_fields[section].get_default(call_default_factory=True)
    return value is not None and value != default and getattr(value, "enabled", True)


def check_steps(recipe: Recipe) -> list[type[Step]]:
    """The step classes of ``recipe.steps`` in order; :class:`StepError` (naming the step and what to
    do) when a name is unknown or repeated, the items of one step do not fit the next, the list does
    not start with a source and end with the sink, or a configured section's step is left out."""
    names = recipe.steps
    extra = sorted(set(STEPS) - set(DEFAULT_STEPS))
    known = ", ".join([*DEFAULT_STEPS, *extra])
    for i, name in enumerate(names):
        if name not in STEPS:
            raise StepError(f"recipe steps: unknown step {name!r}; the steps are {known}")
        if name in names[:i]:
            raise StepError(f"recipe steps: {name!r} is listed twice; each step runs once per task")
    classes = [STEPS[n] for n in names]
    if classes[0].takes is not None:
        sources = ", ".join(c.name for c in STEPS.values() if c.takes is None)
        raise StepError(f"recipe steps: the first step must be a source ({sources}), not {names[0]!r}")
    for a, b in pairwise(classes):
        if a.gives is None:
            raise StepError(
                f"recipe steps: {a.name!r} ends a task and must be last, but {b.name!r} follows it"
            )
        if b.takes != a.gives:
            bridge = [c.name for c in STEPS.values() if c.takes == a.gives and c.gives == b.takes]
            hint = f"; put {' or '.join(bridge)} between them" if bridge else ""
            raise StepError(
                f"recipe steps: {b.name!r} takes {b.takes or 'nothing'} but follows {a.name!r}, "
                f"which yields {a.gives}{hint}"
            )
    if classes[-1].gives is not None:
        sinks = ", ".join(c.name for c in STEPS.values() if c.gives is None)
        raise StepError(f"recipe steps: the last step must end the task ({sinks}), not {names[-1]!r}")
    for cls in STEPS.values():
        if cls.name not in names and cls.section is not None and _configured(recipe, cls.section):
            raise StepError(
                f"recipe steps: the {cls.section} section is configured but its step {cls.name!r} is not "
                f"in steps; add {cls.name!r} or remove the section"
            )
    return classes


def build_steps(ctx: TaskContext) -> list[Step]:
    """One instance of each step of ``ctx.recipe.steps``, checked by :func:`check_steps`."""
    return [cls(ctx) for cls in check_steps(ctx.recipe)]


def run_steps(steps: Sequence[Step]) -> None:
    """Run a task's steps in one streaming pass: each reads what the one before it yields, the first
    reads nothing, and the last is drained."""
    items: Iterator[Any] = iter(())
    for step in steps:
        items = step.run(items)
    deque(items, maxlen=0)
