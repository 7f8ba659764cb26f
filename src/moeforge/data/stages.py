"""One map task: the recipe's steps (:mod:`moeforge.data.steps`) over a task's input files.

The default steps are read → format → langid → filters → decontam → pii → identity → write. Language ID
runs before the quality filters because some of their rules depend on the language (the Gopher stop-word
rule uses English stop words and is skipped for other languages).

Each step counts what came in, what went out, what it dropped (by named reason) and what it
quarantined, so that ``in = out + sum(dropped) + quarantined`` holds per step and the next step's
``in`` is the previous step's ``out``. A task writes into a temporary directory that is renamed into
place when the task finishes; the directory's ``stats.json`` is the task's done marker.

Task directory layout::

    records.jsonl.zst   surviving records, in input order (the write step)
    review.jsonl.zst    records held for PII review (pii_status=requires_review; the pii step)
    quarantine.jsonl    malformed input: uri, line/offset, step, error, raw
    keys.npy            one dedup key per surviving record (see moeforge.data.dedup.exact)
    facts.json          per surviving record: approximate tokens and the mixing group
    minhash.npy, embeddings.npy   near-dedup signatures, when near_dedup / semantic_dedup is on
    stats.json          inputs (uri, size, sha256), step counts, timings
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeforge.data.plan import Task
from moeforge.data.recipe import Recipe
from moeforge.data.steps import TaskContext, build_steps, run_steps
from moeforge.io import atomic_directory, atomic_write_json
from moeforge.procs import worker_fence

__all__ = ["run_map_task", "task_dir"]


def task_dir(work: Path, task: Task) -> Path:
    return work / "map" / task.task_id


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
    out = task_dir(Path(work), task)
    guard = worker_fence(*fence).commit if fence is not None else None
    with atomic_directory(out, overwrite=True, guard=guard) as tmp:
        with open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
            ctx = TaskContext(task, recipe, recipe_sha, tmp, quarantine)
            steps = build_steps(ctx)
            run_steps(steps)
        stats: dict[str, Any] = {
            "task": task.task_id,
            "source": ctx.source.label,
            "source_index": task.source_index,
            "inputs": ctx.inputs,
            "records": steps[-1].stats.out,
            "stages": [s.stats.to_json() for s in steps if s.accounted],
        }
        for s in steps:
            stats.update(s.summary())
        stats["seconds"] = {s.name: round(s.stats.seconds, 6) for s in steps}
        atomic_write_json(tmp / "stats.json", stats)
    return stats
