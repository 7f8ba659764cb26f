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

The reduce is: exact dedup over all task outputs (moeforge.data.dedup.exact), split sizes checked
(moeforge.data.split), then every surviving record rewritten into its split with ``meta.split`` set.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.data.dedup.exact import SPLIT_CODES, DedupResult, find_exact_duplicates
from moeforge.data.gates import GateResult, run_gates
from moeforge.data.manifest import build_manifest
from moeforge.data.plan import Task, plan_tasks
from moeforge.data.recipe import Recipe, recipe_hash
from moeforge.data.split import SPLITS, check_split_sizes
from moeforge.data.stages import MAP_STAGES, StageCount, run_map_task, task_dir
from moeforge.data.store import ShardInfo, ShardWriter, iter_lines
from moeforge.io import atomic_directory, atomic_write_json

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
        entries = sorted(p.name for p in out.iterdir() if p.name != ".lock")
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
    tasks: list[Task], recipe: Recipe, work: Path, sha: str, workers: int, progress: Progress | None
) -> None:
    data = recipe.resolved()
    total = len(tasks)
    if progress:
        progress("map", 0, total)
    if workers <= 1 or total <= 1:
        for n, t in enumerate(tasks, 1):
            try:
                run_map_task(t, data, str(work), sha)
            except Exception as exc:
                raise _task_error(t, exc) from exc
            if progress:
                progress("map", n, total)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=ctx) as pool:
        futures: dict[Future[dict[str, Any]], Task] = {
            pool.submit(run_map_task, t, data, str(work), sha): t for t in tasks
        }
        done_count = 0
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                exc = f.exception()
                if exc is not None:
                    for p in pending:
                        p.cancel()
                    raise _task_error(futures[f], exc) from exc
                done_count += 1
                if progress:
                    progress("map", done_count, total)


def run_pipeline(
    recipe: Recipe,
    out: str | os.PathLike[str],
    workers: int = 1,
    progress: Progress | None = None,
    force: bool = False,
) -> RunResult:
    """Run (or resume) ``recipe`` into ``out``; see the module docstring."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with _lock(out_dir):
        sha = _prepare(recipe, out_dir, force)
        work = out_dir / "work"
        tasks = plan_tasks(recipe)
        pending = [t for t in tasks if not _task_done(work, t)]
        log.info("%d tasks (%d already done)", len(tasks), len(tasks) - len(pending))
        t0 = time.perf_counter()
        _run_tasks(pending, recipe, work, sha, workers, progress)
        t_map = time.perf_counter() - t0
        stats = [json.loads((task_dir(work, t) / "stats.json").read_text(encoding="utf-8")) for t in tasks]
        stages = {s: StageCount(s) for s in MAP_STAGES}
        seconds: dict[str, float] = Counter()
        for st in stats:
            for d in st["stages"]:
                stages[d["stage"]].add(StageCount.from_json(d))
            for k, v in st["seconds"].items():
                seconds[k] += v
        t1 = time.perf_counter()
        dedup = _dedup(recipe, work, tasks)
        kept = int(sum(k.sum() for k in dedup.keep))
        total_records = sum(st["records"] for st in stats)
        dedup_count = StageCount("dedup", total_records, kept, Counter({"dedup:exact": total_records - kept}))
        if dedup_count.dropped["dedup:exact"] == 0:
            dedup_count.dropped.clear()
        t2 = time.perf_counter()
        split_counts, pool = _split_counts(recipe, work, tasks, dedup)
        check_split_sizes(split_counts, pool, recipe.split)
        outputs, review, quarantine, table = _write(recipe, out_dir, work, tasks, dedup, progress)
        t3 = time.perf_counter()
        split_count = StageCount("split", kept, kept)
        all_stages = [*stages.values(), dedup_count, split_count]
        manifest = build_manifest(recipe, sha, stats, all_stages, outputs, review, quarantine, table, out_dir)
        gates = run_gates(out_dir, manifest, recipe)
        manifest["gates"] = [g.to_json() for g in gates]
        atomic_write_json(out_dir / "manifest.json", manifest)
        t4 = time.perf_counter()
        seconds.update(
            {"map_wall": t_map, "dedup": t2 - t1, "write": t3 - t2, "gates": t4 - t3, "total": t4 - t_start}
        )
        atomic_write_json(
            out_dir / "timings.json",
            {
                "seconds": {k: round(v, 4) for k, v in seconds.items()},
                "tasks_run": len(pending),
                "workers": workers,
            },
        )
        return RunResult(
            out_dir, manifest, all_stages, gates, len(pending), len(tasks) - len(pending), dict(seconds)
        )


def _dedup(recipe: Recipe, work: Path, tasks: list[Task]) -> DedupResult:
    key_files = [task_dir(work, t) / "keys.npy" for t in tasks]
    if recipe.dedup.enabled:
        return find_exact_duplicates(key_files, recipe.dedup.policy, recipe.dedup.memory_mb)
    sizes = [len(np.load(f, mmap_mode="r")) for f in key_files]
    return DedupResult(
        [np.ones(n, dtype=np.uint8) for n in sizes], [np.ones(n, dtype=np.int32) for n in sizes], 1, 0
    )


def _split_counts(
    recipe: Recipe, work: Path, tasks: list[Task], dedup: DedupResult
) -> tuple[dict[str, int], int]:
    counts = dict.fromkeys(SPLITS, 0)
    pool = 0
    for t, keep in zip(tasks, dedup.keep, strict=True):
        keys = np.load(task_dir(work, t) / "keys.npy", mmap_mode="r")
        mask = keep.astype(bool)
        for name, code in SPLIT_CODES.items():
            counts[name] += int(((keys["split"] == code) & mask).sum())
        pool += int((mask & (keys["holdout"] == 0)).sum())
    return counts, pool


def _write(
    recipe: Recipe, out: Path, work: Path, tasks: list[Task], dedup: DedupResult, progress: Progress | None
) -> tuple[dict[str, list[ShardInfo]], list[ShardInfo], dict[str, Any], Counter[tuple[str, str, str, str]]]:
    """Rewrite surviving records into their splits; gather review and quarantine files."""
    names = {v: k for k, v in SPLIT_CODES.items()}
    table: Counter[tuple[str, str, str, str]] = Counter()
    level = recipe.output.zstd_level
    with atomic_directory(out / "records", overwrite=True) as tmp:
        writers = {s: ShardWriter(tmp / s, recipe.output.shard_records, level) for s in SPLITS}
        for n, (t, keep, copies) in enumerate(zip(tasks, dedup.keep, dedup.copies, strict=True), 1):
            tdir = task_dir(work, t)
            keys = np.load(tdir / "keys.npy", mmap_mode="r")
            rec_file = tdir / "records.jsonl.zst"
            if rec_file.exists():
                for i, (_, line) in enumerate(iter_lines(rec_file)):
                    if not keep[i]:
                        continue
                    obj = json.loads(line)
                    split = names[int(keys["split"][i])]
                    meta = obj["meta"]
                    meta["split"] = split
                    meta["provenance"]["steps"] += ["dedup", "split"]
                    if copies[i] > 1:
                        meta["extra"]["exact_copies"] = int(copies[i])
                    table[(split, meta["family"], meta.get("lang") or "und", meta["domain"])] += 1
                    writers[split].write_json(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
            if progress:
                progress("write", n, len(tasks))
        outputs = {s: w.close() for s, w in writers.items()}
    outputs = {s: [_moved(i, tmp, out / "records") for i in infos] for s, infos in outputs.items()}
    with atomic_directory(out / "review", overwrite=True) as tmp:
        rw = ShardWriter(tmp, recipe.output.shard_records, level)
        for t in tasks:
            f = task_dir(work, t) / "review.jsonl.zst"
            if f.exists():
                for _, line in iter_lines(f):
                    rw.write_json(line)
        review = [_moved(i, tmp, out / "review") for i in rw.close()]
    with atomic_directory(out / "quarantine", overwrite=True) as tmp:
        n_q = 0
        with open(tmp / "quarantine.jsonl", "wb") as qout:
            for t in tasks:
                data = (task_dir(work, t) / "quarantine.jsonl").read_bytes()
                n_q += data.count(b"\n")
                qout.write(data)
    qpath = out / "quarantine" / "quarantine.jsonl"
    from moeforge.io import sha256_file

    quarantine = {
        "path": "quarantine/quarantine.jsonl",
        "records": n_q,
        "bytes": qpath.stat().st_size,
        "sha256": sha256_file(qpath),
    }
    return outputs, review, quarantine, table


def _moved(info: ShardInfo, tmp: Path, final: Path) -> ShardInfo:
    return ShardInfo(final / info.path.relative_to(tmp), info.records, info.bytes, info.sha256)
