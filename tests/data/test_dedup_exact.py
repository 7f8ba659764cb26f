"""Exact dedup keeps one copy per content hash, by policy, the same at any memory budget."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from moeforge.data.contract import content_hash
from moeforge.data.dedup.exact import KEY_BYTES, find_exact_duplicates, id_words, make_keys


def _digest(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def _task(tmp_path, name, rows):
    """Save one task's keys; ``rows`` are (content, length, quality, holdout) tuples in record order."""
    keys = make_keys(
        [_digest(c) for c, *_ in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [0] * len(rows),
    )
    path = tmp_path / f"{name}.npy"
    np.save(path, keys, allow_pickle=False)
    return path


def _survivor(result):
    """The indices kept, per task."""
    return [np.nonzero(k)[0].tolist() for k in result.keep]


def test_keys_are_46_bytes_and_hold_the_digest_big_endian():
    d = id_words(content_hash(text="hello"))
    keys = make_keys([d], [5], [0.5], [True], [2])
    assert KEY_BYTES == 46 and keys.dtype.itemsize == 46
    assert keys["h"][0].astype(">u8").tobytes() == d
    assert (keys["idx"][0], keys["length"][0], keys["holdout"][0], keys["split"][0]) == (0, 5, 1, 2)
    assert keys["quality"][0] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        # "x" appears as t0[1] (len 10, q 0.2), t1[0] (len 30, q 0.9), t1[2] (len 20, q 0.5), t2[1] (len 30, q 0.1)
        ("keep_first", [[0, 1], [1], [0]]),
        ("keep_longest", [[0], [0, 1], [0]]),
        ("keep_best_quality", [[0], [0, 1], [0]]),
    ],
)
def test_policy_chooses_the_survivor_and_it_counts_the_copies(tmp_path, policy, kept):
    files = [
        _task(tmp_path, "t0", [("a", 1, 1.0, False), ("x", 10, 0.2, False)]),
        _task(tmp_path, "t1", [("x", 30, 0.9, False), ("b", 1, 1.0, False), ("x", 20, 0.5, False)]),
        _task(tmp_path, "t2", [("c", 1, 1.0, False), ("x", 30, 0.1, False)]),
    ]
    r = find_exact_duplicates(files, policy=policy)
    assert _survivor(r) == kept
    assert r.dropped == 3 and r.groups_with_duplicates == 1 and r.buckets == 1
    copies = {(t, i): int(c) for t, cs in enumerate(r.copies) for i, c in enumerate(cs) if c != 1}
    survivor = {"keep_first": (0, 1), "keep_longest": (1, 0), "keep_best_quality": (1, 0)}[policy]
    assert copies == {survivor: 4}


def test_keep_longest_tie_goes_to_the_first_in_task_then_index_order(tmp_path):
    files = [
        _task(tmp_path, "t0", [("a", 5, 0.0, False), ("x", 7, 0.0, False)]),
        _task(tmp_path, "t1", [("x", 9, 0.0, False), ("x", 9, 0.0, False)]),
    ]
    assert _survivor(find_exact_duplicates(files, "keep_longest")) == [[0], [0]]


def test_keep_best_quality_tie_goes_to_the_first(tmp_path):
    files = [
        _task(tmp_path, "t0", [("x", 1, 0.3, False), ("x", 2, 0.7, False)]),
        _task(tmp_path, "t1", [("x", 3, 0.7, False)]),
    ]
    assert _survivor(find_exact_duplicates(files, "keep_best_quality")) == [[1], []]


@pytest.mark.parametrize("policy", ["keep_first", "keep_longest", "keep_best_quality"])
def test_a_holdout_copy_beats_every_other_copy_whatever_the_policy(tmp_path, policy):
    files = [
        _task(tmp_path, "train", [("x", 100, 1.0, False), ("y", 1, 1.0, False)]),
        _task(tmp_path, "test", [("y", 1, 1.0, False), ("x", 1, 0.0, True)]),
    ]
    r = find_exact_duplicates(files, policy=policy)
    assert _survivor(r) == [[1], [1]]  # x: the held-out copy; y: the first
    assert r.copies[1][1] == 2 and r.copies[0][1] == 2


def test_tasks_without_duplicates_keep_everything(tmp_path):
    files = [_task(tmp_path, f"t{i}", [(f"{i}-{j}", j, 1.0, False) for j in range(5)]) for i in range(3)]
    r = find_exact_duplicates(files)
    assert all(k.tolist() == [1] * 5 for k in r.keep)
    assert all(c.tolist() == [1] * 5 for c in r.copies)
    assert r.dropped == 0 and r.groups_with_duplicates == 0


def test_empty_tasks_work(tmp_path):
    files = [
        _task(tmp_path, "e0", []),
        _task(tmp_path, "t", [("x", 1, 1.0, False), ("x", 2, 1.0, False)]),
        _task(tmp_path, "e1", []),
    ]
    r = find_exact_duplicates(files)
    assert [k.tolist() for k in r.keep] == [[], [1, 0], []]
    assert [c.tolist() for c in r.copies] == [[], [2, 1], []]
    r = find_exact_duplicates([_task(tmp_path, "only", [])])
    assert r.keep[0].tolist() == [] and r.dropped == 0 and r.groups_with_duplicates == 0


def _reference(tasks, policy):
    """Plain-Python statement of the survivor rule over (content, length, quality, holdout) rows."""
    groups: dict[int, list[tuple]] = {}
    for t, rows in enumerate(tasks):
        for i, (content, length, quality, holdout) in enumerate(rows):
            metric = {"keep_first": 0, "keep_longest": -length, "keep_best_quality": -quality}[policy]
            groups.setdefault(content, []).append(((-int(holdout), metric, t, i), t, i))
    keep = [[0] * len(rows) for rows in tasks]
    copies = [[1] * len(rows) for rows in tasks]
    for group in groups.values():
        _, t, i = min(group)
        keep[t][i] = 1
        copies[t][i] = len(group)
    return keep, copies


@pytest.mark.parametrize("policy", ["keep_first", "keep_longest", "keep_best_quality"])
def test_a_tiny_memory_budget_uses_many_buckets_and_changes_nothing(tmp_path, policy):
    # 1 MiB holds 22,795 keys; 3 tasks × 9,000 records need 46 × 27,000 B ≈ 1.2 MiB → 2 buckets
    rng = np.random.default_rng(0)
    pool = rng.bytes(32 * 15_000)  # 15,000 distinct digests, drawn with repeats
    tasks, files = [], []
    for t in range(3):
        content = rng.integers(0, 15_000, size=9_000).tolist()
        length = rng.integers(1, 50, size=9_000).tolist()
        quality = (rng.integers(0, 8, size=9_000) / 8).tolist()  # few values, so ties happen
        holdout = (rng.random(9_000) < 0.02).tolist()
        keys = make_keys([pool[32 * c : 32 * c + 32] for c in content], length, quality, holdout, [0] * 9_000)
        files.append(tmp_path / f"t{t}.npy")
        np.save(files[-1], keys, allow_pickle=False)
        tasks.append(list(zip(content, length, quality, holdout, strict=True)))
    small = find_exact_duplicates(files, policy=policy, memory_mb=1)
    large = find_exact_duplicates(files, policy=policy, memory_mb=256)
    assert small.buckets == 2 and large.buckets == 1
    keep, copies = _reference(tasks, policy)
    for r in (small, large):
        assert [k.tolist() for k in r.keep] == keep
        assert [c.tolist() for c in r.copies] == copies
    distinct = len({c for rows in tasks for c, *_ in rows})
    assert small.groups_with_duplicates == large.groups_with_duplicates > 0
    assert small.dropped == large.dropped == 27_000 - distinct
