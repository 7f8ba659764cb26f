"""The shipped data recipes on the real data sets: GSM8K fully accounted for and verified, RU/EN prose
labelled by language and balanced by its gate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.data.langid import detect
from moeforge.data.pipeline import run_pipeline
from moeforge.data.recipe import load_recipe

pytestmark = pytest.mark.realdata
ROOT = Path(__file__).resolve().parents[2]


def test_gsm8k_recipe_accounts_for_all_8792_records_and_verifies(
    real_data: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(real_data))
    out = tmp_path / "gsm8k"
    run = subprocess.run(
        [sys.executable, "-m", "moeforge", "data", "run", str(ROOT / "configs/data/gsm8k.yaml"), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    verify = subprocess.run(
        [sys.executable, "-m", "moeforge", "data", "verify", str(out), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    read = manifest["stages"][0]
    assert read["stage"] == "read" and read["in"] == 8792
    last = manifest["stages"][-1]
    assert sum(manifest["records"].values()) == last["out"]
    dropped = sum(sum(s["dropped"].values()) + s["quarantined"] for s in manifest["stages"])
    assert last["out"] + dropped == 8792
    test_counts = {c["family"]: c["records"] for c in manifest["counts"] if c["split"] == "test"}
    assert test_counts["gsm8k-test"] == 1319  # the held-out family, all of it, in test only


def _paragraphs(real_data: Path) -> tuple[list[str], list[str]]:
    ru = [
        line.strip()
        for f in sorted((real_data / "ruslit").rglob("*.txt"))
        for line in f.read_text(encoding="utf-8").splitlines()
        if len(line.strip()) > 200
    ]
    text = (real_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    en = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    return ru, en


def test_ru_en_recipe_labels_99_percent_of_long_paragraphs(real_data: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(real_data))
    cfg = load_recipe(ROOT / "configs/data/ru-en-prose.yaml").langid
    ru, en = _paragraphs(real_data)
    assert len(ru) > 5000 and len(en) > 1000
    ru_ok = sum(detect(p, tuple(cfg.candidates), cfg.max_chars)[0] == "ru" for p in ru) / len(ru)
    en_ok = sum(detect(p, tuple(cfg.candidates), cfg.max_chars)[0] == "en" for p in en) / len(en)
    # the RusLit misses are real: a few paragraphs are quoted French or German letters
    assert ru_ok >= 0.99, ru_ok
    assert en_ok >= 0.99, en_ok


def test_ru_en_recipe_runs_and_meets_its_language_balance_gate(
    real_data: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(real_data))
    result = run_pipeline(load_recipe(ROOT / "configs/data/ru-en-prose.yaml"), tmp_path / "ru-en", workers=2)
    gates = {g.gate: g for g in result.gates}
    assert gates["lang_balance"].passed and not gates["lang_balance"].skipped, gates["lang_balance"].evidence
    assert result.gates_passed, [g.to_json() for g in result.gates if not g.passed]
    langs = {c["lang"] for c in result.manifest["counts"]}
    assert langs == {"en", "ru"}


def test_gsm8k_recipe_removes_test_items_planted_into_train(
    real_data: Path, tmp_path: Path, monkeypatch
) -> None:
    import json
    import random

    from moeforge.data.store import read_records

    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(real_data))
    test_items = [json.loads(x) for x in (real_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    planted = rng.sample(test_items, 40)
    lines = (real_data / "gsm8k" / "train.jsonl").read_text().splitlines()
    for item in planted:  # re-formatted copies: upper case, doubled spaces, answer without annotations
        q = item["question"].upper().replace(" ", "  ")
        a = item["answer"].split("####")[0]
        lines.insert(rng.randrange(len(lines)), json.dumps({"question": q, "answer": a}))
    train = tmp_path / "train-with-leaks.jsonl"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = load_recipe(ROOT / "configs/data/gsm8k.yaml", [f"sources.0.path={train}"])
    result = run_pipeline(recipe, tmp_path / "run", workers=2)
    assert result.gates_passed, [g.to_json() for g in result.gates if not g.passed]
    decon = result.manifest["decontamination"]["benchmarks"]["gsm8k-test"]
    assert decon["documents_dropped"] >= 40
    leaked = {" ".join(p["question"].lower().split()) for p in planted}
    for split in ("train", "valid"):
        for shard in result.manifest["outputs"][split]:
            for rec in read_records(tmp_path / "run" / shard["path"]):
                assert rec.meta.family == "gsm8k"
                assert " ".join(rec.messages[0].content.lower().split()) not in leaked
    test_counts = {c["family"]: c["records"] for c in result.manifest["counts"] if c["split"] == "test"}
    assert test_counts["gsm8k-test"] == 1319  # the benchmark itself is exempt and complete
