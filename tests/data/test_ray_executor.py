"""The Ray executor: the same recipe run locally and on Ray (map tasks and the band-sharded near-dup
reduce as Ray tasks) gives byte-identical outputs and manifest, also when a worker is killed mid-task and
Ray runs the task again."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moeforge.data import plan
from moeforge.data.pipeline import run_pipeline
from moeforge.data.recipe import Recipe, load_recipe, recipe_hash

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

VOCAB = [f"w{i}" for i in range(2000)]
RAY_INIT = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False, "configure_logging": False}


def _doc(rng: random.Random, n: int = 120) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _edit(rng: random.Random, text: str) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), 2):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Six files (one task each): exact copies and near copies across files, and one malformed line."""
    monkeypatch.setattr(plan, "MAX_TASK_FILES", 1)
    rng = random.Random(3)
    base = [_doc(rng) for _ in range(360)]
    d = tmp_path / "in"
    d.mkdir()
    for k in range(6):
        texts = base[k * 60 : (k + 1) * 60]
        if k >= 3:
            texts += [base[i] for i in range(k, 60, 9)]  # exact copies of file 0's records
            texts += [_edit(rng, base[60 + i]) for i in range(k, 60, 7)]  # near copies of file 1's
        lines = [json.dumps({"text": t}) for t in texts]
        if k == 4:
            lines.append("{not json")
        (d / f"part{k}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def _recipe(src: Path, executor: str) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "ray",
            "sources": [{"path": str(src), "kind": "text", "family": "f", "domain": "prose"}],
            "langid": {"enabled": False},
            "filters": {"quality_domains": []},
            "near_dedup": {"enabled": True, "bands": 12, "verify_jaccard": 0.5},
            "split": {"min_eval_records": 3},
            "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.12]},
            "executor": executor,
        }
    )


def _snapshot(run: Path) -> dict[str, bytes]:
    files = [p for d in ("records", "review", "quarantine") for p in (run / d).rglob("*") if p.is_file()]
    snap = {p.relative_to(run).as_posix(): p.read_bytes() for p in files}
    snap["manifest.json"] = (run / "manifest.json").read_bytes()
    return dict(sorted(snap.items()))


def _check_identical(local: Path, other: Path) -> None:
    a, b = _snapshot(local), _snapshot(other)
    assert list(a) == list(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs between the local and the Ray run"


def test_executor_is_not_part_of_the_recipe_hash(corpus: Path) -> None:
    assert recipe_hash(_recipe(corpus, "local")) == recipe_hash(_recipe(corpus, "ray"))
    assert "executor" not in _recipe(corpus, "ray").resolved()


def test_local_and_ray_give_identical_outputs_and_manifest(corpus: Path, tmp_path: Path) -> None:
    local = run_pipeline(_recipe(corpus, "local"), tmp_path / "local", workers=2)
    assert local.tasks_run == 6 and local.gates_passed, local.manifest["gates"]
    near = local.manifest["near_dedup"]
    assert near["clusters"] > 0 and near["verified_pairs"] > 0 and local.quarantined == 1
    assert not ray.is_initialized()
    remote = run_pipeline(_recipe(corpus, "ray"), tmp_path / "ray", workers=2)
    assert not ray.is_initialized()  # the command started its own local instance and shut it down
    assert remote.tasks_run == 6
    assert json.loads((tmp_path / "ray" / "timings.json").read_text())["executor"] == "ray"
    _check_identical(tmp_path / "local", tmp_path / "ray")


def test_a_worker_killed_mid_task_is_retried_and_the_result_is_identical(
    corpus: Path, tmp_path: Path
) -> None:
    run_pipeline(_recipe(corpus, "local"), tmp_path / "local", workers=1)
    marker = tmp_path / "killed"
    # the Ray workers (not this driver) SIGKILL themselves at their 2nd fault point — inside a map task,
    # after its outputs are written and before the directory is renamed into place — once in all
    ray.init(**RAY_INIT, runtime_env={"env_vars": {"MOEFORGE_FAULTS": f"killonce@2:{marker}"}})
    try:
        remote = run_pipeline(_recipe(corpus, "ray"), tmp_path / "ray", workers=2)
        assert ray.is_initialized()  # joined the instance it found, left it running
    finally:
        ray.shutdown()
    assert marker.exists(), "no worker was killed"
    assert remote.tasks_run == 6 and remote.gates_passed
    _check_identical(tmp_path / "local", tmp_path / "ray")
    leftovers = [p.name for p in (tmp_path / "ray" / "work" / "map").iterdir() if p.name.startswith(".")]
    assert not leftovers or all(name.endswith(".tmp") for name in leftovers)


@pytest.mark.realdata
def test_gsm8k_recipe_is_identical_on_ray(real_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(real_data))
    recipe = load_recipe(Path(__file__).parents[2] / "configs" / "data" / "gsm8k.yaml")
    run_pipeline(recipe, tmp_path / "local", workers=2)
    run_pipeline(recipe.model_copy(update={"executor": "ray"}), tmp_path / "ray", workers=2)
    _check_identical(tmp_path / "local", tmp_path / "ray")


def test_the_demo_recipe_is_identical_on_ray(tmp_path: Path) -> None:
    """Small output shards, so each split is written as many shard jobs (Ray tasks / local workers),
    each reading only the task files it spans; one process writing them all gives the same bytes."""
    recipe = load_recipe(Path(__file__).parents[2] / "configs" / "data" / "demo.yaml")
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"shard_records": 97})})
    run_pipeline(recipe, tmp_path / "one", workers=1)
    run_pipeline(recipe, tmp_path / "local", workers=2)
    run_pipeline(recipe.model_copy(update={"executor": "ray"}), tmp_path / "ray", workers=2)
    assert len(list((tmp_path / "local" / "records" / "train").glob("part-*.jsonl.zst"))) > 10
    _check_identical(tmp_path / "one", tmp_path / "local")
    _check_identical(tmp_path / "local", tmp_path / "ray")
