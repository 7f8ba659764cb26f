"""The data runner: a recipe → map tasks in N processes → a global reduce → records, manifest, gates.

Run directory::

    recipe.json                 the resolved recipe (its sha256 is every record's recipe_hash)
    work/map/<task>/            one finished task each (see moeforge.data.stages); the done markers
    records/{train,valid,test}/part-00000.jsonl.zst
    review/part-00000.jsonl.zst records held for PII review (in no split)
    quarantine/quarantine.jsonl every malformed input with file, line, stage, error and raw text
    manifest.json               written last: inputs, outputs, counts, per-stage accounting, gates
    timings.json                seconds per stage of the last invocation (not part of the dataset)

Resume: tasks whose directory is complete and whose input files are unchanged (size and mtime) are
skipped; the reduce always runs again. Every step is deterministic, so a run killed at any point and
started again ends with the same bytes as a run that was never interrupted.

The reduce (moeforge.data.reduce) is: exact dedup over all task outputs, near-dedup, split sizes
checked, the train split mixed to its targets, then every surviving record rewritten into its split.

The map tasks, the near-dup clustering's band shards, the record write and the gates' per-shard scans
run on the recipe's executor
(moeforge.data.executors: ``local`` processes or ``ray`` tasks); the executor is not part of the recipe,
so either gives the same bytes, and the run directory can be resumed with the other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeforge.data.executors import Executor, TaskFailed, make_executor
from moeforge.data.gates import GateResult, run_gates
from moeforge.data.manifest import build_manifest
from moeforge.data.plan import Task, plan_tasks
from moeforge.data.recipe import Recipe, recipe_hash
from moeforge.data.reduce import reduce_tasks
from moeforge.data.stages import run_map_task, task_dir
from moeforge.data.steps import StageCount, check_steps
from moeforge.io import atomic_write_json
from moeforge.procs import FenceError, RunFence

__all__ = ["PipelineError", "RunResult", "run_pipeline"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


class PipelineError(ValueError):
    """The run cannot proceed as asked (another recipe in the directory, a locked directory …)."""


@dataclass
class RunResult:
    out_dir: Path
    manifest: dict[str, Any]
    stages: list[StageCount]
    gates: list[GateResult]
    tasks_run: int
    tasks_skipped: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def quarantined(self) -> int:
        return sum(s.quarantined for s in self.stages)

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)


_CONTROL_FILES = {".lock", ".holders", ".commit.lock", ".generation"}  # locks and the fence, not data


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    with open(out / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PipelineError(
                f"{out} is in use by another `moeforge data run`; wait for it or use another --out"
            ) from exc
        yield


@contextlib.contextmanager
def _fence(out: Path) -> Iterator[RunFence]:
    """This invocation's generation (after the run lock: refuses while an old run's workers live)."""
    try:
        fence = RunFence.begin(out, "`moeforge data run`")
    except FenceError as exc:
        raise PipelineError(str(exc)) from exc
    try:
        yield fence
    finally:
        fence.release()


def _prepare(recipe: Recipe, out: Path, force: bool) -> str:
    sha = recipe_hash(recipe)
    stored = out / "recipe.json"
    if stored.exists():
        try:
            old = json.loads(stored.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if old != recipe.resolved():
            if not force:
                raise PipelineError(
                    f"{out} holds a run of a different recipe (or different settings); "
                    "use another --out, or --force to discard it and start over"
                )
            for name in ("work", "records", "review", "quarantine", "manifest.json"):
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
    elif any(out.iterdir()) and not (out / "work").exists():
        entries = sorted(p.name for p in out.iterdir() if p.name not in _CONTROL_FILES)
        if entries:
            raise PipelineError(
                f"{out} is not empty and holds no moeforge run ({', '.join(entries[:5])}); use another --out"
            )
    atomic_write_json(stored, recipe.resolved())
    return sha


def _task_done(work: Path, task: Task) -> bool:
    stats_file = task_dir(work, task) / "stats.json"
    if not stats_file.exists():
        return False
    try:
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if [i["uri"] for i in stats.get("inputs", [])] != [i.uri for i in task.inputs]:
        return False  # the plan changed (files added or removed): this task id now means other files
    for info in stats.get("inputs", []):
        mtime = info.get("mtime_ns")
        if mtime is None:
            continue
        path = next((i.path for i in task.inputs if i.uri == info["uri"]), info["uri"])
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size != info["size"] or st.st_mtime_ns != mtime:
            log.info(
                "%s: input %s changed since it was processed; running the task again", task.task_id, path
            )
            return False
    return True


def _task_error(task: Task, exc: BaseException) -> PipelineError:
    log.debug("task %s failed", task.task_id, exc_info=exc)
    first = task.inputs[0].uri if task.inputs else "?"
    more = f" (+{len(task.inputs) - 1} more files)" if len(task.inputs) > 1 else ""
    return PipelineError(
        f"task {task.task_id} reading {first}{more} failed: {type(exc).__name__}: {exc}. "
        "Finished tasks are kept; fix the cause and run the same command again to resume (-v shows the traceback)"
    )


def _run_tasks(
    tasks: list[Task],
    recipe: Recipe,
    work: Path,
    sha: str,
    executor: Executor,
    progress: Progress | None,
    fence: RunFence,
) -> None:
    data = recipe.resolved()
    # a remote task (Ray) is not a child of this process: it checks the generation only (procs.worker_fence)
    token = (str(fence.directory), fence.generation, 0 if executor.remote else fence.parent_pid)
    total = len(tasks)
    if progress:
        progress("map", 0, total)
    try:
        for n, _ in enumerate(
            executor.map(run_map_task, [(t, data, str(work), sha, token) for t in tasks]), 1
        ):
            if progress:
                progress("map", n, total)
    except TaskFailed as exc:
        raise _task_error(tasks[exc.index], exc.cause) from exc.cause


def run_pipeline(
    recipe: Recipe,
    out: str | os.PathLike[str],
    workers: int = 1,
    progress: Progress | None = None,
    force: bool = False,
) -> RunResult:
    """Run (or resume) ``recipe`` into ``out``; see the module docstring.

    Raises :class:`moeforge.data.steps.StepError` (before anything is written) when the recipe's ``steps``
    cannot run, :class:`PipelineError` when the run cannot proceed as asked."""
    map_stages = [cls.name for cls in check_steps(recipe) if cls.accounted]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with _lock(out_dir), _fence(out_dir) as fence:
        sha = _prepare(recipe, out_dir, force)
        work = out_dir / "work"
        tasks = plan_tasks(recipe)
        pending = [t for t in tasks if not _task_done(work, t)]
        log.info("%d tasks (%d already done)", len(tasks), len(tasks) - len(pending))
        executor = make_executor(recipe.executor, workers, recipe.ray.address, recipe.ray.num_cpus)
        with contextlib.closing(executor):
            t0 = time.perf_counter()
            _run_tasks(pending, recipe, work, sha, executor, progress, fence)
            t_map = time.perf_counter() - t0
            stats = [
                json.loads((task_dir(work, t) / "stats.json").read_text(encoding="utf-8")) for t in tasks
            ]
            stages = {s: StageCount(s) for s in map_stages}
            seconds: dict[str, float] = Counter()
            for st in stats:
                for d in st["stages"]:
                    stages[d["stage"]].add(StageCount.from_json(d))
                for k, v in st["seconds"].items():
                    seconds[k] += v
            t1 = time.perf_counter()
            map_out = stages[map_stages[-1]].out  # what the tasks wrote: the reduce's input
            red = reduce_tasks(recipe, out_dir, work, tasks, map_out, progress, executor)
            t2 = time.perf_counter()
            all_stages = [*stages.values(), *red.stages]
            manifest = build_manifest(recipe, sha, stats, all_stages, red, out_dir)
            gates = run_gates(out_dir, manifest, recipe, executor, trust_clean=True)  # a job per shard
        manifest["gates"] = [g.to_json() for g in gates]
        atomic_write_json(out_dir / "manifest.json", manifest)
        t3 = time.perf_counter()
        seconds.update({"map_wall": t_map, "reduce": t2 - t1, "gates": t3 - t2, "total": t3 - t_start})
        atomic_write_json(
            out_dir / "timings.json",
            {
                "seconds": {k: round(v, 4) for k, v in seconds.items()},
                "tasks_run": len(pending),
                "workers": workers,
                "executor": recipe.executor,
            },
        )
        return RunResult(
            out_dir, manifest, all_stages, gates, len(pending), len(tasks) - len(pending), dict(seconds)
        )
