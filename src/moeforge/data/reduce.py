"""The global ("reduce") steps over all task outputs: exact dedup → near dedup → split check → mixing →
write.

Every step decides from small per-record arrays that the map tasks wrote (``keys.npy``: content hash,
length, quality, holdout, split; ``facts.json``: approximate tokens and the mixing group), so only the
final write reads the records themselves, once, in task order. Records are then rewritten into
``records/{split}/`` with ``meta.split`` set and the reduce steps appended to their provenance. The
MinHash clustering is itself a distributed reduce, sharded by LSH band
(:mod:`moeforge.data.dedup.minhash`), whose shards run on the run's executor; so does the final write,
one job per output shard (which task rows each shard takes follows from the arrays alone).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.data.dedup.exact import SPLIT_CODES, DedupResult, find_exact_duplicates
from moeforge.data.executors import Executor, TaskFailed
from moeforge.data.mix import MixPlan, plan_mixture
from moeforge.data.plan import Task
from moeforge.data.recipe import Recipe
from moeforge.data.split import SPLITS, check_split_sizes
from moeforge.data.stages import task_dir
from moeforge.data.steps import StageCount
from moeforge.data.store import ShardInfo, ShardWriter, iter_lines
from moeforge.io import atomic_directory, sha256_file

__all__ = ["ReduceResult", "reduce_tasks"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
_NAMES = {v: k for k, v in SPLIT_CODES.items()}


@dataclass
class ReduceResult:
    stages: list[StageCount]
    outputs: dict[str, list[ShardInfo]]
    review: list[ShardInfo]
    quarantine: dict[str, Any]
    table: Counter[tuple[str, str, str, str]]
    tokens: Counter[tuple[str, str, str, str]]
    mixture: dict[str, Any] | None
    split_pool: dict[str, int]
    near: dict[str, dict[str, Any]]


def _load_keys(work: Path, tasks: list[Task]) -> list[np.ndarray]:
    return [np.load(task_dir(work, t) / "keys.npy", mmap_mode="r") for t in tasks]


def _load_facts(work: Path, tasks: list[Task]) -> list[dict[str, Any]]:
    return [json.loads((task_dir(work, t) / "facts.json").read_text(encoding="utf-8")) for t in tasks]


def _exact(recipe: Recipe, work: Path, tasks: list[Task], keys: list[np.ndarray]) -> DedupResult:
    if recipe.dedup.enabled:
        files = [task_dir(work, t) / "keys.npy" for t in tasks]
        return find_exact_duplicates(files, recipe.dedup.policy, recipe.dedup.memory_mb)
    return DedupResult(
        [np.ones(len(k), np.uint8) for k in keys], [np.ones(len(k), np.int32) for k in keys], 1, 0
    )


def _split_sizes(
    recipe: Recipe, keys: list[np.ndarray], keep: list[np.ndarray], splits: list[np.ndarray]
) -> dict[str, int]:
    """Check the split sizes; return the non-held-out pool per split (before mixing)."""
    counts = dict.fromkeys(SPLITS, 0)
    pool = dict.fromkeys(SPLITS, 0)
    for k, m, sp in zip(keys, keep, splits, strict=True):
        mask = m.astype(bool)
        for name, code in SPLIT_CODES.items():
            counts[name] += int(((sp == code) & mask).sum())
            pool[name] += int(((sp == code) & mask & (k["holdout"] == 0)).sum())
    check_split_sizes(counts, sum(pool.values()), recipe.split)
    return pool


def _mix(
    recipe: Recipe,
    keys: list[np.ndarray],
    keep: list[np.ndarray],
    facts: list[dict[str, Any]],
    splits: list[np.ndarray],
) -> tuple[list[np.ndarray], MixPlan | None]:
    """Per task, a weight per record (0 = dropped by mixing); only train records are mixed."""
    weights = [m.astype(np.int32) for m in keep]
    if not recipe.mix.enabled:
        return weights, None
    where: list[tuple[int, int]] = []
    groups: list[str] = []
    sizes: list[int] = []
    ids: list[str] = []
    for t, (k, m, f, sp) in enumerate(zip(keys, keep, facts, splits, strict=True)):
        table = f["groups"]
        for i in np.nonzero(m.astype(bool) & (sp == SPLIT_CODES["train"]))[0].tolist():
            where.append((t, i))
            groups.append(table[f["group"][i]])
            sizes.append(f["tokens"][i] if recipe.mix.unit == "tokens" else 1)
            ids.append(bytes(k["h"][i].astype(">u8").tobytes()).hex())
    plan = plan_mixture(groups, np.asarray(sizes, dtype=np.int64), ids, recipe.mix)
    for (t, i), w in zip(where, plan.weights.tolist(), strict=True):
        weights[t][i] = w
    return weights, plan


def _survivors(
    root: np.ndarray,
    alive: np.ndarray,
    holdout: np.ndarray,
    policy: str,
    length: np.ndarray,
    quality: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One survivor per cluster among the ``alive`` documents: held-out first, then the policy, then source
    order. Returns (keep mask, alive members of each document's cluster)."""
    n = len(root)
    if policy == "keep_longest":
        metric = -length.astype(np.float64)
    elif policy == "keep_best_quality":
        metric = -quality.astype(np.float64)
    else:
        metric = np.zeros(n)
    order = np.lexsort((np.arange(n), metric, -holdout.astype(np.int8), ~alive, root))
    head = np.ones(n, dtype=bool)
    head[1:] = root[order[1:]] != root[order[:-1]]
    keep = np.zeros(n, dtype=bool)
    keep[order[head]] = True
    keep &= alive
    members = np.bincount(root[alive], minlength=n)[root]
    return keep, members


def _near(
    name: str,
    recipe: Recipe,
    work: Path,
    tasks: list[Task],
    keys: list[np.ndarray],
    keep: list[np.ndarray],
    splits: list[np.ndarray],
    executor: Executor | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """MinHash (``near``) or embedding (``semantic``) clusters over all tasks; one survivor per cluster.

    Returns the new keep masks, per-record cluster sizes (0 for a record in no cluster) and stats. A
    surviving record of a cluster gets the cluster id ``<name>:<first 16 hex of its id>`` and its split is
    decided by that id, by the split rule."""
    from moeforge.data.split import assign_split

    offsets = np.cumsum([0, *[len(k) for k in keys]])
    if name == "near":
        from moeforge.data.dedup.minhash import find_clusters

        cfg = recipe.near_dedup
        files = [task_dir(work, t) / "minhash.npy" for t in tasks]
        shingles_of = _ShingleReader(recipe, work, tasks, offsets) if cfg.verify_jaccard is not None else None
        res = find_clusters(files, cfg, work / "near", shingles_of, executor=executor)
        root, stats, policy = res.root, res.stats.to_dict(), cfg.policy
    else:
        from moeforge.data.dedup.semantic import find_semantic_clusters

        cfg_s = recipe.semantic_dedup
        files = [task_dir(work, t) / "embeddings.npy" for t in tasks]
        (work / "semantic").mkdir(exist_ok=True)
        res_s = find_semantic_clusters(files, cfg_s, work / "semantic")
        root, stats, policy = res_s.root, res_s.stats(), cfg_s.policy
    cat = np.concatenate if keys else (lambda _: np.zeros(0))
    alive = cat([m.astype(bool) for m in keep]) if keys else np.zeros(0, bool)
    holdout = cat([k["holdout"] for k in keys])
    length = cat([k["length"] for k in keys])
    quality = cat([k["quality"] for k in keys])
    survive, members = _survivors(np.asarray(root), alive, holdout, policy, length, quality)
    sizes = np.where(survive & (members > 1), members, 0)
    hist = np.bincount(members[survive & (members > 1)]) if survive.any() else np.zeros(0, int)
    stats["cluster_sizes"] = {str(i): int(c) for i, c in enumerate(hist.tolist()) if c}
    stats["dropped"] = int(alive.sum() - survive.sum())
    new_keep, new_sizes = [], []
    for t, (a, b) in enumerate(itertools.pairwise(offsets)):
        new_keep.append(survive[a:b].astype(np.uint8))
        new_sizes.append(sizes[a:b])
        for i in np.nonzero(sizes[a:b])[0].tolist():
            cluster = f"{name}:{bytes(keys[t]['h'][i].astype('>u8').tobytes()).hex()[:16]}"
            splits[t][i] = SPLIT_CODES[assign_split(cluster, recipe.split, bool(keys[t]["holdout"][i]))]
    return new_keep, new_sizes, stats


class _ShingleReader:
    """``shingles_of`` for MinHash verification: re-reads the needed task files (sequentially). A plain
    object (not a closure) so a verification shard can run in another process or on Ray."""

    def __init__(self, recipe: Recipe, work: Path, tasks: list[Task], offsets: np.ndarray) -> None:
        self.cfg = recipe.near_dedup
        self.files = [task_dir(work, t) / "records.jsonl.zst" for t in tasks]
        self.offsets = offsets

    def __call__(self, indices: list[int]) -> dict[int, np.ndarray]:
        from moeforge.data.dedup.minhash import shingles

        offsets = self.offsets
        want = sorted(set(int(i) for i in indices))
        out: dict[int, np.ndarray] = {}
        t = 0
        pos = 0
        while pos < len(want):
            g = want[pos]
            while offsets[t + 1] <= g:
                t += 1
            local = {w - int(offsets[t]) for w in want if offsets[t] <= w < offsets[t + 1]}
            for i, (_, line) in enumerate(iter_lines(self.files[t])):
                if i in local:
                    obj = json.loads(line)
                    text = (
                        obj["text"]
                        if obj.get("text") is not None
                        else "\n".join(m["content"] for m in obj["messages"])
                    )
                    out[int(offsets[t]) + i] = shingles(text, self.cfg)
            pos += len(local)
            t += 1
        return out


def reduce_tasks(
    recipe: Recipe,
    out: Path,
    work: Path,
    tasks: list[Task],
    map_out: int,
    progress: Progress | None,
    executor: Executor | None = None,
) -> ReduceResult:
    """Run the reduce steps and write the dataset files (see the module docstring). The near-dup
    clustering's band shards run on ``executor`` (default: in this process)."""
    keys = _load_keys(work, tasks)
    facts = _load_facts(work, tasks)
    dedup = _exact(recipe, work, tasks, keys)
    keep = dedup.keep
    kept = int(sum(int(k.sum()) for k in keep))
    stages = [
        StageCount("dedup", map_out, kept, Counter({"dedup:exact": map_out - kept} if map_out > kept else {}))
    ]
    splits = [np.array(k["split"]) for k in keys]
    near_stats: dict[str, dict[str, Any]] = {}
    near_sizes: dict[str, list[np.ndarray]] = {}
    for name, enabled in (("near", recipe.near_dedup.enabled), ("semantic", recipe.semantic_dedup.enabled)):
        if not enabled:
            continue
        keep, near_sizes[name], near_stats[name] = _near(
            name, recipe, work, tasks, keys, keep, splits, executor
        )
        now = int(sum(int(k.sum()) for k in keep))
        dropped = Counter({f"dedup:{name}": kept - now} if kept > now else {})
        stages.append(StageCount(f"{name}_dedup", kept, now, dropped))
        kept = now
    pool = _split_sizes(recipe, keys, keep, splits)
    weights, plan = _mix(recipe, keys, keep, facts, splits)
    stages.append(StageCount("split", kept, kept))
    if recipe.mix.enabled:
        mixed = int(sum(int((w > 0).sum()) for w in weights))
        stages.append(
            StageCount("mix", kept, mixed, Counter({"mix:downsampled": kept - mixed} if kept > mixed else {}))
        )
    outputs, table, tokens = _write_records(
        recipe, out, work, tasks, splits, facts, weights, dedup.copies, near_sizes, progress, executor
    )
    review = _write_review(recipe, out, work, tasks)
    quarantine = _write_quarantine(out, work, tasks)
    mixture = None
    if plan is not None:
        mixture = {
            "by": recipe.mix.by,
            "unit": recipe.mix.unit,
            "token_unit": "approx_words",
            "target": dict(sorted(recipe.mix.target.items())),
            "available": plan.shares("available"),
            "achieved": plan.shares("achieved"),
            "factors": plan.factors,
        }
    return ReduceResult(stages, outputs, review, quarantine, table, tokens, mixture, pool, near_stats)


def _write_records(
    recipe: Recipe,
    out: Path,
    work: Path,
    tasks: list[Task],
    splits: list[np.ndarray],
    facts: list[dict[str, Any]],
    weights: list[np.ndarray],
    copies: list[np.ndarray],
    near_sizes: dict[str, list[np.ndarray]],
    progress: Progress | None,
    executor: Executor | None = None,
) -> tuple[
    dict[str, list[ShardInfo]], Counter[tuple[str, str, str, str]], Counter[tuple[str, str, str, str]]
]:
    """Every surviving record rewritten into ``records/{split}/``, one job per output shard on ``executor``.

    A split's records, in task order, fill shards of ``shard_records``; which task rows land in shard k is
    known from the small arrays alone (how many rows of that split each task keeps), so each shard is
    written by its own job reading just the tasks it spans — the same bytes as one writer going through
    every task, on any executor."""
    from moeforge.data.executors import InlineExecutor

    steps = ["dedup", *[f"{n}_dedup" for n in near_sizes], "split", *(["mix"] if recipe.mix.enabled else [])]
    r = recipe.output.shard_records
    with atomic_directory(out / "records", overwrite=True) as tmp:
        jobs: list[tuple[Any, ...]] = []
        for s in SPLITS:
            code = SPLIT_CODES[s]
            kept_N = [int(((w > 0) & (sp == code)).sum()) for w, sp in zip(weights, splits, strict=True)]
            ends = np.cumsum(kept_N)
            total = int(ends[-1]) if len(ends) else 0
            for k in range(-(-total // r)):
                lo, hi = k * r, min((k + 1) * r, total)
                spans = []
                for n, t in enumerate(tasks):
                    start = int(ends[n]) - kept_N[n]
                    if kept_N[n] == 0 or int(ends[n]) <= lo or start >= hi:
                        continue
                    near = {name: sizes[n] for name, sizes in near_sizes.items()}
                    src = str(task_dir(work, t) / "records.jsonl.zst")
                    spans.append(
                        (src, splits[n], weights[n], copies[n], near, facts[n]["tokens"], max(lo - start, 0))
                    )
                jobs.append((str(tmp / s), k, r, recipe.output.zstd_level, code, hi - lo, steps, spans))
        results = []
        done = 0
        runner = executor or InlineExecutor()
        try:
            for i, res in runner.map(_write_shard, jobs):
                results.append((i, res))
                done += 1
                if progress:
                    progress("write", done, len(jobs))
        except TaskFailed as exc:
            raise exc.cause from None
        results.sort(key=lambda ir: ir[0])
        infos: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
        table: Counter[tuple[str, str, str, str]] = Counter()
        tokens: Counter[tuple[str, str, str, str]] = Counter()
        for _, (split, info, tab, tok) in results:
            infos[split].append(info)
            table.update(tab)
            tokens.update(tok)
    return {s: [_moved(i, tmp, out / "records") for i in v] for s, v in infos.items()}, table, tokens


def _write_shard(
    directory: str,
    index: int,
    shard_records: int,
    level: int,
    code: int,
    take: int,
    steps: list[str],
    spans: list[tuple[Any, ...]],
) -> tuple[str, ShardInfo, Counter[tuple[str, str, str, str]], Counter[tuple[str, str, str, str]]]:
    """One output shard: ``take`` rows of split ``code`` from ``spans`` (task files in order, each with its
    arrays and how many of its rows of that split come before this shard)."""
    split = _NAMES[code]
    table: Counter[tuple[str, str, str, str]] = Counter()
    tokens: Counter[tuple[str, str, str, str]] = Counter()
    writer = ShardWriter(Path(directory), shard_records, level, first=index)
    written = 0
    for src, sp, w, c, near, tok, skip in spans:
        if written >= take:
            break
        if not Path(src).exists():
            continue
        seen = 0
        for i, (_, line) in enumerate(iter_lines(src)):
            if not w[i] or int(sp[i]) != code:
                continue
            seen += 1
            if seen <= skip:
                continue
            obj = json.loads(line)
            meta = obj["meta"]
            for name, sizes in near.items():
                if sizes[i]:
                    meta["cluster"] = f"{name}:{obj['id'][7:23]}"
                    meta["extra"][f"{name}_copies"] = int(sizes[i])
            meta["split"] = split
            meta["provenance"]["steps"] += steps
            if c[i] > 1:
                meta["extra"]["exact_copies"] = int(c[i])
            if w[i] > 1:
                meta["extra"]["mix_repeat"] = int(w[i])
            cell = (split, meta["family"], meta.get("lang") or "und", meta["domain"])
            table[cell] += 1
            tokens[cell] += int(tok[i]) * int(w[i])
            writer.write_json(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
            written += 1
            if written >= take:
                break
    shards = writer.close()
    if len(shards) != 1 or written != take:  # the plan and the task files disagree: never write a wrong set
        raise RuntimeError(f"{directory}: shard {index} got {written} of {take} records")
    return split, shards[0], table, tokens


def _write_review(recipe: Recipe, out: Path, work: Path, tasks: list[Task]) -> list[ShardInfo]:
    with atomic_directory(out / "review", overwrite=True) as tmp:
        rw = ShardWriter(tmp, recipe.output.shard_records, recipe.output.zstd_level)
        for t in tasks:
            f = task_dir(work, t) / "review.jsonl.zst"
            if f.exists():
                for _, line in iter_lines(f):
                    rw.write_json(line)
        infos = rw.close()
    return [_moved(i, tmp, out / "review") for i in infos]


def _write_quarantine(out: Path, work: Path, tasks: list[Task]) -> dict[str, Any]:
    n = 0
    with (
        atomic_directory(out / "quarantine", overwrite=True) as tmp,
        open(tmp / "quarantine.jsonl", "wb") as qout,
    ):
        for t in tasks:
            data = (task_dir(work, t) / "quarantine.jsonl").read_bytes()
            n += data.count(b"\n")
            qout.write(data)
    path = out / "quarantine" / "quarantine.jsonl"
    return {
        "path": "quarantine/quarantine.jsonl",
        "records": n,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _moved(info: ShardInfo, tmp: Path, final: Path) -> ShardInfo:
    return ShardInfo(final / info.path.relative_to(tmp), info.records, info.bytes, info.sha256)
