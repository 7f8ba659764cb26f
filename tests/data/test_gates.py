"""Gates pass on a real small run and each one catches its own kind of tampering, from the files alone."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import zstandard
from typer.testing import CliRunner

from moeforge.cli.main import app, main
from moeforge.data.contract import Message, Record
from moeforge.data.gates import GATES, run_gates
from moeforge.data.manifest import load_manifest
from moeforge.data.pipeline import run_pipeline
from moeforge.data.recipe import Recipe
from moeforge.data.store import iter_lines

WORDS = ("apple", "river", "stone", "cloud", "garden", "silver", "market", "teacher", "window", "forest")


def _recipe(data: Path, **gates) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "gates-test",
            "sources": [
                {"path": str(data), "kind": "qa", "family": "qa", "domain": "math", "license": "MIT"}
            ],
            "langid": {"enabled": False},
            "split": {"min_eval_records": 5},
            "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.1], **gates},
        }
    )


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gates")
    rng = random.Random(0)
    data = root / "qa.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for i in range(400):
            question = f"Question {i}: how many {' '.join(rng.choices(WORDS, k=6))} are there?"
            answer = f"There are {i} of them, because the {' '.join(rng.choices(WORDS, k=8))} said so."
            fh.write(json.dumps({"question": question, "answer": answer}) + "\n")
    result = run_pipeline(_recipe(data), root / "run")
    assert result.gates_passed, [g for g in result.gates if not g.passed]
    return root / "run"


@pytest.fixture
def run(clean_run, tmp_path) -> Path:
    """A private copy of the clean run, free to tamper with."""
    return Path(shutil.copytree(clean_run, tmp_path / "run"))


def _failed(results) -> dict[str, str]:
    return {g.gate: g.evidence for g in results if not g.passed}


def _lines(run: Path, manifest: dict, split: str) -> list[str]:
    return [line for _, line in iter_lines(run / manifest["outputs"][split][0]["path"])]


def _rewrite(run: Path, manifest: dict, split: str, lines: list[str]) -> None:
    """Replace the first shard of ``split`` and fix its manifest entry, so the hash gate stays quiet."""
    shard = manifest["outputs"][split][0]
    data = zstandard.ZstdCompressor(level=3).compress(("\n".join(lines) + "\n").encode("utf-8"))
    (run / shard["path"]).write_bytes(data)
    shard.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), records=len(lines))
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def test_a_clean_run_passes_every_gate(run):
    manifest = load_manifest(run)
    results = run_gates(run, manifest)
    assert [g.gate for g in results] == list(GATES)
    assert _failed(results) == {}
    assert [g.gate for g in results if g.skipped] == ["lang_balance", "mixture", "decontamination"]
    assert [g.to_json() for g in results] == manifest["gates"]  # verify agrees with the run
    assert sum(manifest["records"].values()) == 400


def test_an_edited_record_fails_schema_and_hash(run):
    manifest = load_manifest(run)
    lines = _lines(run, manifest, "train")
    lines[5] = lines[5].replace("Question", "Questiom", 1)
    shard = manifest["outputs"]["train"][0]
    expected_sha = shard["sha256"]
    _rewrite(run, manifest, "train", lines)
    shard["sha256"] = expected_sha  # as the run wrote it: only the file changed
    failed = _failed(run_gates(run, manifest))
    assert set(failed) == {"schema", "hash"}
    assert f"{shard['path']}:6" in failed["schema"] and "id does not match" in failed["schema"]
    assert f"{shard['path']}: sha256 differs" in failed["hash"]


def test_a_corrupt_compressed_shard_is_reported_not_raised(run):
    manifest = load_manifest(run)
    path = run / manifest["outputs"]["train"][0]["path"]
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0x01  # break the zstd frame magic
    path.write_bytes(bytes(raw))
    failed = _failed(run_gates(run, manifest))
    assert {"schema", "hash"} <= set(failed)


def test_invalid_utf8_in_a_shard_is_reported_not_raised(run):
    manifest = load_manifest(run)
    path = run / manifest["outputs"]["train"][0]["path"]
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    path.write_bytes(zstandard.ZstdCompressor().compress(plain + b'\xff\xfe{"not": "utf-8"}\n'))
    failed = _failed(run_gates(run, manifest))
    assert {"schema", "hash"} <= set(failed)


def test_a_test_record_copied_into_train_fails_leakage_only(run):
    manifest = load_manifest(run)
    leaked = json.loads(_lines(run, manifest, "test")[0])
    leaked["meta"]["split"] = "train"
    train = _lines(run, manifest, "train")
    train[0] = json.dumps(leaked, ensure_ascii=False, separators=(",", ":"))  # same record count
    _rewrite(run, manifest, "train", train)
    failed = _failed(run_gates(run, manifest))
    assert set(failed) == {"leakage"}
    assert "1 id(s) occur more than once across splits" in failed["leakage"]


def test_a_record_in_the_wrong_directory_fails_leakage(run):
    manifest = load_manifest(run)
    train = _lines(run, manifest, "train")
    moved = json.loads(train[0])
    moved["meta"]["split"] = "test"
    train[0] = json.dumps(moved, ensure_ascii=False, separators=(",", ":"))
    _rewrite(run, manifest, "train", train)
    failed = _failed(run_gates(run, manifest))
    assert set(failed) == {"leakage"}
    assert (
        "meta.split differs from the directory" in failed["leakage"]
        and "meta.split=test" in failed["leakage"]
    )


def test_unbalanced_stage_counts_fail_accounting(run):
    manifest = load_manifest(run)
    filters = next(st for st in manifest["stages"] if st["stage"] == "filters")
    filters["dropped"] = {"filters:made_up": 1}
    failed = _failed(run_gates(run, manifest))
    assert set(failed) == {"accounting"}
    assert "filters: in 400 != out 400 + dropped 1 + quarantined 0" in failed["accounting"]


def test_a_manifest_record_count_the_files_do_not_hold_fails_accounting(run):
    manifest = load_manifest(run)
    manifest["records"]["valid"] += 1
    failed = _failed(run_gates(run, manifest))
    assert set(failed) == {"accounting"} and "valid: files hold" in failed["accounting"]


def test_an_email_address_in_an_output_fails_pii_residue(run):
    manifest = load_manifest(run)
    train = _lines(run, manifest, "train")
    rec = Record.model_validate_json(train[3])
    msgs = [
        rec.messages[0],
        Message(role="assistant", content="Write to jane.doe@example.com for the answer."),
    ]
    train[3] = rec.with_content(messages=msgs).model_dump_json()
    _rewrite(run, manifest, "train", train)
    failed = _failed(run_gates(run, manifest))
    assert set(failed) == {"pii_residue"}
    assert failed["pii_residue"].startswith("1 hit(s)") and "email" in failed["pii_residue"]


def test_a_stray_file_among_the_outputs_fails_hash(run):
    manifest = load_manifest(run)
    (run / "records" / "train" / "part-00001.jsonl.zst").write_bytes(b"")
    failed = _failed(run_gates(run, manifest))
    assert set(failed) == {"hash"}
    assert "records/train/part-00001.jsonl.zst: not in the manifest" in failed["hash"]


def test_a_missing_shard_fails_hash_and_accounting(run):
    manifest = load_manifest(run)
    (run / manifest["outputs"]["valid"][0]["path"]).unlink()
    failed = _failed(run_gates(run, manifest))
    assert {"hash", "accounting"} <= set(failed)
    assert f"{manifest['outputs']['valid'][0]['path']}: missing" in failed["hash"]


def test_a_recipe_hash_that_is_not_the_manifests_fails_provenance(run):
    manifest = load_manifest(run)
    manifest["recipe_sha256"] = "0" * 64
    failed = _failed(run_gates(run, manifest))
    assert set(failed) == {"provenance"} and "recipe hash differs" in failed["provenance"]


def test_language_shares_that_cannot_hold_fail_lang_balance(run):
    manifest = load_manifest(run)
    recipe = Recipe.model_validate(manifest["recipe"])
    strict = recipe.model_copy(
        update={"gates": recipe.gates.model_copy(update={"language_shares": {"en": (0.5, 1.0)}})}
    )
    results = run_gates(run, manifest, strict)
    failed = _failed(results)
    assert set(failed) == {"lang_balance"}
    assert "en 0.000 outside [0.5, 1.0]" in failed["lang_balance"]  # langid was off: every record is und
    loose = recipe.model_copy(
        update={"gates": recipe.gates.model_copy(update={"language_shares": {"und": (0.9, 1.0)}})}
    )
    (lang,) = [g for g in run_gates(run, manifest, loose) if g.gate == "lang_balance"]
    assert lang.passed and not lang.skipped


def test_require_lang_fails_a_run_whose_records_have_no_language(run):
    manifest = load_manifest(run)
    recipe = Recipe.model_validate(manifest["recipe"])
    strict = recipe.model_copy(update={"gates": recipe.gates.model_copy(update={"require_lang": True})})
    assert _failed(run_gates(run, manifest, strict)) != {}  # langid was off: no record has a language


def test_split_ratio_bounds_that_cannot_hold_fail_split_ratios(run):
    manifest = load_manifest(run)
    recipe = Recipe.model_validate(manifest["recipe"])
    tight = recipe.model_copy(update={"gates": recipe.gates.model_copy(update={"train_ratio": (0.99, 1.0)})})
    failed = _failed(run_gates(run, manifest, tight))
    assert set(failed) == {"split_ratios"} and "outside [0.99, 1.0]" in failed["split_ratios"]


def test_cli_verify_exits_0_on_a_clean_run_and_1_after_tampering(run):
    runner = CliRunner()
    clean = runner.invoke(app, ["data", "verify", str(run)])
    assert clean.exit_code == 0, clean.output
    assert "all gates pass" in clean.output
    out = runner.invoke(app, ["data", "verify", str(run), "--json"])
    assert out.exit_code == 0
    report = json.loads(out.stdout)
    assert report["passed"] is True and [g["gate"] for g in report["gates"]] == list(GATES)

    (run / "records" / "test" / "extra.jsonl.zst").write_bytes(b"x")
    bad = runner.invoke(app, ["data", "verify", str(run), "--json"])
    assert bad.exit_code == 1, bad.output
    report = json.loads(bad.stdout)
    verdicts = {g["gate"]: g["verdict"] for g in report["gates"]}
    assert report["passed"] is False and verdicts["hash"] == "FAIL"
    assert [g for g, v in verdicts.items() if v == "FAIL"] == ["hash"]
    assert runner.invoke(app, ["data", "verify", str(run)]).exit_code == 1


def test_cli_verify_of_a_directory_without_manifest_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    # through main(), which maps user errors to exit code 2 (CliRunner would bypass it)
    monkeypatch.setattr(sys, "argv", ["moeforge", "data", "verify", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "manifest.json: missing" in lines[0] and "Traceback" not in err


def test_gates_read_shards_in_parallel_with_the_same_evidence_as_one_process(run):
    """The per-shard scans run as executor jobs; merged in shard order, the evidence (first examples,
    counts beyond them) is the same as one process reading every shard, problems spread over shards."""
    from moeforge.data.executors import LocalExecutor

    manifest = load_manifest(run)
    for split in ("train", "test"):
        lines = _lines(run, manifest, split)
        lines[0] = lines[0].replace('"id":"', '"id":"x', 1)  # schema: the id is not the content hash
        lines[1] = "{not json"
        rec = Record.model_validate_json(lines[2])
        msgs = [rec.messages[0], Message(role="assistant", content=f"Mail {split}@example.com now.")]
        lines[2] = rec.with_content(messages=msgs).model_dump_json()
        _rewrite(run, manifest, split, lines)
    inline = [g.to_json() for g in run_gates(run, manifest)]
    executor = LocalExecutor(2)
    try:
        parallel = [g.to_json() for g in run_gates(run, manifest, executor=executor)]
    finally:
        executor.close()
    assert parallel == inline
    failed = {g["gate"]: g["evidence"] for g in inline if not g["passed"]}
    assert "(+1 more)" in failed["schema"] and failed["schema"].count("records/train/") == 2
    assert failed["pii_residue"].startswith("2 hit(s)")


def test_the_runs_own_pii_gate_rescans_only_what_the_pii_step_changed_and_verify_rescans_all(run, tmp_path):
    from moeforge.data import gates

    manifest = load_manifest(run)
    calls: list[str] = []
    real = gates.scrub_text

    def counting(text, types):
        calls.append(text)
        return real(text, types)

    gates.scrub_text = counting
    try:
        trusted = next(g for g in run_gates(run, manifest, trust_clean=True) if g.gate == "pii_residue")
        assert trusted.passed and trusted.evidence == "no PII of the scrubbed types" and not calls
        verify = next(g for g in run_gates(run, manifest) if g.gate == "pii_residue")
        assert verify.passed and verify.evidence == trusted.evidence and len(calls) >= 400
    finally:
        gates.scrub_text = real
    # a record the pii step changed is rescanned in the run's own gates too
    data = tmp_path / "pii.jsonl"
    rng = random.Random(1)
    rows = [
        {
            "question": f"Who is {i}? Mail bob{i}@example.com. " + " ".join(rng.choices(WORDS, k=40)),
            "answer": f"Person {i}, " + " ".join(rng.choices(WORDS, k=30)),
        }
        for i in range(200)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = run_pipeline(_recipe(data, train_ratio=[0.5, 1.0], eval_ratio=[0.0, 0.5]), tmp_path / "pii-run")
    gate = next(g for g in res.gates if g.gate == "pii_residue")
    assert gate.passed and gate.evidence == "no PII of the scrubbed types", gate.evidence
