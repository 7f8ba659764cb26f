"""The data runner end to end: accounting, determinism, resume after SIGKILL, bad input, clear errors."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeforge.data.manifest import load_manifest
from moeforge.data.pipeline import PipelineError, run_pipeline
from moeforge.data.recipe import Recipe
from moeforge.data.split import SplitError
from moeforge.data.store import read_records

MOEFORGE = [sys.executable, "-m", "moeforge"]
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "sigma",
    "omega",
    "river",
    "stone",
    "cloud",
]


def _question(i: int) -> str:
    w = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6)]
    return f"Problem {i}: if {' '.join(w)} costs {i} coins and {i % 13} more, what is the total?"


def _write_qa(path: Path, start: int, n: int, extra_lines: list[str] | None = None) -> None:
    lines = [
        json.dumps({"question": _question(i), "answer": f"{i} + {i % 13} = {i + i % 13}"})
        for i in range(start, start + n)
    ]
    lines += extra_lines or []
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _recipe(src: Path, **over: object) -> Recipe:
    data: dict = {
        "name": "t",
        "sources": [{"path": str(src), "kind": "qa", "family": "fam", "domain": "math"}],
        "langid": {"enabled": False},
        "split": {"min_eval_records": 3},
        "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.1]},
    }
    data.update(over)
    return Recipe.model_validate(data)


def _snapshot(run: Path) -> dict[str, bytes]:
    files = ["manifest.json", *[p.relative_to(run).as_posix() for p in run.glob("records/*/*")]]
    files += [p.relative_to(run).as_posix() for p in run.glob("review/*")]
    files += ["quarantine/quarantine.jsonl"]
    return {f: (run / f).read_bytes() for f in sorted(files)}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for k in range(4):
        _write_qa(d / f"part{k}.jsonl", k * 100, 100)
    # cross-file duplicates: file 3 repeats ten questions of file 0
    with open(d / "part3.jsonl", "a", encoding="utf-8") as fh:
        for i in range(10):
            fh.write(
                json.dumps({"question": _question(i), "answer": f"{i} + {i % 13} = {i + i % 13}"}) + "\n"
            )
    return d


def test_run_accounts_for_every_input_and_passes_its_gates(corpus: Path, tmp_path: Path) -> None:
    result = run_pipeline(_recipe(corpus), tmp_path / "run", workers=1)
    assert result.gates_passed, result.manifest["gates"]
    for stage in result.stages:
        assert stage.balanced, stage
    stages = {s.stage: s for s in result.stages}
    assert stages["read"].inputs == 410
    assert stages["dedup"].dropped == {"dedup:exact": 10}
    m = load_manifest(tmp_path / "run")
    assert sum(m["records"].values()) == 400
    assert sum(c["records"] for c in m["counts"]) == 400
    assert [i["uri"] for i in m["inputs"]] == sorted(str(p) for p in corpus.iterdir())
    ids = set()
    for split in ("train", "valid", "test"):
        for shard in m["outputs"][split]:
            for rec in read_records(tmp_path / "run" / shard["path"]):
                assert rec.meta.split == split
                assert rec.meta.provenance.steps[-2:] == ["dedup", "split"]
                assert rec.meta.provenance.recipe_hash == m["recipe_sha256"]
                ids.add(rec.id)
    assert len(ids) == 400


def test_same_recipe_gives_the_same_bytes_with_any_worker_count(corpus: Path, tmp_path: Path) -> None:
    run_pipeline(_recipe(corpus), tmp_path / "a", workers=1)
    run_pipeline(_recipe(corpus), tmp_path / "b", workers=2)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")


def test_rerun_skips_finished_tasks_and_redoes_changed_inputs(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_pipeline(_recipe(corpus), out)
    assert (first.tasks_run, first.tasks_skipped) == (1, 0)  # four small files are one task
    again = run_pipeline(_recipe(corpus), out)
    assert (again.tasks_run, again.tasks_skipped) == (0, 1)
    _write_qa(corpus / "part1.jsonl", 1000, 50)
    changed = run_pipeline(_recipe(corpus), out)
    assert changed.tasks_run == 1
    assert sum(changed.manifest["records"].values()) == 350


def test_a_different_recipe_in_the_same_directory_is_refused_unless_forced(
    corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_pipeline(_recipe(corpus), out)
    other = _recipe(corpus, seed=7)
    with pytest.raises(PipelineError, match="different recipe"):
        run_pipeline(other, out)
    assert run_pipeline(other, out, force=True).gates_passed


def test_tiny_eval_split_is_an_error_not_a_silent_empty_set(tmp_path: Path) -> None:
    src = tmp_path / "few.jsonl"
    _write_qa(src, 0, 12)
    with pytest.raises(SplitError, match=r"valid would get \d+ record"):
        run_pipeline(_recipe(src, split={"min_eval_records": 5}), tmp_path / "run")


def test_split_ratio_zero_means_no_split_on_purpose(tmp_path: Path) -> None:
    src = tmp_path / "few.jsonl"
    _write_qa(src, 0, 60)
    recipe = _recipe(src, split={"train": 0.9, "valid": 0.0, "test": 0.1, "min_eval_records": 1},
                     gates={"train_ratio": [0.75, 0.99], "eval_ratio": [0.01, 0.25]})  # fmt: skip
    result = run_pipeline(recipe, tmp_path / "run")
    assert result.manifest["records"]["valid"] == 0
    assert result.gates_passed


def test_holdout_family_goes_to_test_and_wins_over_its_training_copy(tmp_path: Path) -> None:
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    _write_qa(train, 0, 300)
    _write_qa(test, 290, 40)  # ten of these also appear in train
    recipe = Recipe.model_validate(
        {
            "name": "h",
            "sources": [
                {"path": str(train), "kind": "qa", "family": "train-fam", "domain": "math"},
                {"path": str(test), "kind": "qa", "family": "bench", "domain": "math"},
            ],
            "langid": {"enabled": False},
            "split": {"holdout_families": ["bench"], "min_eval_records": 3},
            "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.1]},
        }
    )
    result = run_pipeline(recipe, tmp_path / "run")
    assert result.gates_passed, result.manifest["gates"]
    fams = {(c["split"], c["family"]): c["records"] for c in result.manifest["counts"]}
    assert fams[("test", "bench")] == 40
    assert sum(n for (s, f), n in fams.items() if f == "train-fam") == 290


def test_locked_directory_is_refused(corpus: Path, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(PipelineError, match="in use"):
            run_pipeline(_recipe(corpus), out)


def _malformed_corpus(d: Path) -> None:
    d.mkdir()
    _write_qa(d / "good.jsonl", 0, 200)
    good = json.dumps({"question": _question(999), "answer": "fine"}) + "\n"
    blob = gzip.compress((good * 20).encode())
    (d / "truncated.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (d / "bad-utf8.jsonl").write_bytes(good.encode() + b'{"question": "caf\xe9", "answer": "x"}\n')
    (d / "huge-line.jsonl").write_bytes(b"a" * (50 * 2**20) + b"\n")
    (d / "array.json").write_text(json.dumps([[1, 2], {"question": "q only"}]), encoding="utf-8")
    (d / "nulls.jsonl").write_text(
        json.dumps({"question": None, "answer": "a"})
        + "\n"
        + json.dumps({"question": "q", "answer": 3})
        + "\n",
        encoding="utf-8",
    )
    (d / "binary.jsonl").write_bytes(bytes(range(256)) * 64)
    (d / "empty-lines.jsonl").write_text("\n\n" + good, encoding="utf-8")


def test_malformed_corpus_completes_quarantines_every_bad_record_and_conserves_counts(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    _malformed_corpus(d)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
        )
        + "\n",
        encoding="utf-8",
    )
    recipe = Recipe.model_validate(
        {
            "name": "bad",
            "sources": [
                {"path": str(d), "kind": "qa", "family": "fam", "domain": "math"},
                {"path": str(chat), "kind": "chat", "family": "chat", "domain": "chat"},
            ],
            "langid": {"enabled": False},
            "split": {"min_eval_records": 3},
            "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.1]},
        }
    )
    out = tmp_path / "run"
    result = run_pipeline(recipe, out)
    for stage in result.stages:
        assert stage.balanced, stage
    q = [json.loads(line) for line in (out / "quarantine" / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == result.quarantined > 0
    by_file = {Path(e["uri"]).name for e in q}
    assert {"truncated.jsonl.gz", "bad-utf8.jsonl", "huge-line.jsonl", "array.json", "nulls.jsonl",
            "binary.jsonl", "empty-lines.jsonl", "chat.jsonl"} <= by_file  # fmt: skip
    for e in q:
        assert e["error"] and e["stage"] in ("read", "format") and len(e["raw"]) <= 2100
    reasons = " | ".join(e["error"] for e in q)
    for expected in ("invalid UTF-8", "invalid JSON", "expected a JSON object", "must be a string",
                     "unknown role", "empty line"):  # fmt: skip
        assert expected in reasons
    coverage = next(g for g in result.gates if g.gate == "coverage")
    assert not coverage.passed and "chat" in coverage.evidence  # the only chat record was malformed


def test_cli_exit_codes_clean_quarantined_and_user_error(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _write_qa(src, 0, 300)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: cli\nsources:\n  - {{path: {src}, kind: qa, family: f, domain: math}}\nlangid: {{enabled: false}}\n"
        "split: {min_eval_records: 3}\ngates: {train_ratio: [0.8, 0.97], eval_ratio: [0.01, 0.1]}\n",
        encoding="utf-8",
    )
    ok = subprocess.run([*MOEFORGE, "data", "run", str(recipe), "--out", str(tmp_path / "a")],
                        capture_output=True, text=True, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "accounting" in ok.stdout
    _write_qa(src, 0, 300, extra_lines=["{not json"])
    bad = subprocess.run([*MOEFORGE, "data", "run", str(recipe), "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode == 3, bad.stderr + bad.stdout
    assert "quarantined" in bad.stdout
    verify = subprocess.run(
        [*MOEFORGE, "data", "verify", str(tmp_path / "b")], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stdout
    user = subprocess.run([*MOEFORGE, "data", "run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert user.returncode == 2 and "Traceback" not in user.stderr and "nope.yaml" in user.stderr


def test_sigkill_mid_run_then_resume_gives_byte_identical_outputs(tmp_path: Path) -> None:
    d = tmp_path / "many"
    d.mkdir()
    for k in range(12):  # 12 sources → 12 tasks, so a kill lands between task completions
        _write_qa(d / f"p{k:02d}.jsonl", k * 60, 60)
    sources = "\n".join(
        f"  - {{path: {d / f'p{k:02d}.jsonl'}, kind: qa, family: f, domain: math}}" for k in range(12)
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: kill\nsources:\n{sources}\nlangid: {{enabled: false}}\nsplit: {{min_eval_records: 3}}\n"
        "gates: {train_ratio: [0.8, 0.97], eval_ratio: [0.01, 0.1]}\n",
        encoding="utf-8",
    )
    ref = tmp_path / "ref"
    subprocess.run([*MOEFORGE, "data", "run", str(recipe), "--out", str(ref), "-w", "1"], check=True,
                   capture_output=True)  # fmt: skip
    out = tmp_path / "killed"
    proc = subprocess.Popen([*MOEFORGE, "data", "run", str(recipe), "--out", str(out), "-w", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = list((out / "work" / "map").glob("*/stats.json")) if (out / "work" / "map").exists() else []
        if len(done) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill; the test proves nothing"
    resumed = subprocess.run([*MOEFORGE, "data", "run", str(recipe), "--out", str(out), "-w", "2"],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed 0" not in resumed.stdout
    assert _snapshot(out) == _snapshot(ref)


def test_a_file_added_to_an_input_directory_is_read_on_the_next_run(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert sum(run_pipeline(_recipe(corpus), out).manifest["records"].values()) == 400
    _write_qa(corpus / "part4.jsonl", 5000, 25)
    again = run_pipeline(_recipe(corpus), out)
    assert sum(again.manifest["records"].values()) == 425
    assert again.gates_passed


def test_an_input_that_vanishes_mid_plan_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "in.jsonl"
    _write_qa(src, 0, 100)
    import moeforge.data.steps.read as read  # the read step hashes each input as it opens it

    def boom(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", str(src))

    monkeypatch.setattr(read, "sha256_file", boom)
    with pytest.raises(PipelineError, match=r"task s00-t00000 reading .*in\.jsonl failed: FileNotFoundError"):
        run_pipeline(_recipe(src), tmp_path / "run")
