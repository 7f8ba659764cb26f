"""Pair sets: split by prompt (and by near-identical prompt), duplicates and contradictions dropped with
reasons, PII scrubbed, decontamination, the gates, the read-back check, and `moeforge data pairs import`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeforge.cli.main import app, main
from moeforge.data.contract import Message, Provenance, RecordMeta, SourceRef
from moeforge.data.decontam.config import BenchmarkSpec, DecontamConfig
from moeforge.data.dedup.minhash.config import MinHashConfig
from moeforge.data.pairset import PairSetConfig, PairSetError, read_pairs, write_pair_set
from moeforge.data.preference import PreferencePair, SideProvenance
from moeforge.data.recipe import SplitConfig
from moeforge.data.split import assign_split

SHA = "ab" * 32
QUESTIONS = [
    "How many legs does a spider have?",
    "What is the capital of France?",
    "Name a prime number larger than ten.",
    "Why is the sky blue during the day?",
    "How do you boil an egg properly?",
    "What does a compiler do with source code?",
    "Which planet is closest to the sun?",
    "How many days are there in a leap year?",
    "What colour do you get mixing blue and yellow?",
    "Who wrote the play Romeo and Juliet?",
    "What is the boiling point of water at sea level?",
    "How many strings does a violin have?",
]


def _pair(prompt: str, chosen: str, rejected: str, system: str | None = None) -> PreferencePair:
    turns = [Message(role="system", content=system)] if system else []
    return PreferencePair.create(
        prompt=[*turns, Message(role="user", content=prompt)],
        chosen=[Message(role="assistant", content=chosen)],
        rejected=[Message(role="assistant", content=rejected)],
        meta=RecordMeta(
            source=SourceRef(uri="prefs.jsonl", line=1),
            family="prefs",
            domain="chat",
            provenance=Provenance(source_sha256=SHA, steps=["test"]),
        ),
        chosen_source=SideProvenance(kind="human"),
        rejected_source=SideProvenance(kind="human"),
    )


def _cfg(train: float = 0.5, valid: float = 0.5, seed: int = 0, **kw) -> PairSetConfig:
    split = SplitConfig(
        train=train, valid=valid, test=round(1 - train - valid, 6), seed=seed, min_eval_records=1
    )
    return PairSetConfig(split=split, **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _split_of(root: Path) -> dict[str, str]:
    """prompt text → split, checking every pair of one prompt is in one split."""
    where: dict[str, set[str]] = {}
    for split in ("train", "valid", "test"):
        for p in read_pairs(root, split):
            assert p.meta.split == split
            where.setdefault(p.prompt[-1].content, set()).add(split)
    assert all(len(s) == 1 for s in where.values()), where
    return {k: next(iter(v)) for k, v in where.items()}


def test_every_pair_of_one_prompt_lands_in_one_split(tmp_path):
    pairs = [_pair(q, f"good answer {k}", f"bad answer {k}") for q in QUESTIONS for k in range(3)]
    manifest = write_pair_set(pairs, tmp_path / "set", _cfg())
    where = _split_of(tmp_path / "set")
    assert len(where) == len(QUESTIONS) and set(where.values()) == {"train", "valid"}
    assert (
        manifest["counts"]["pairs"] == 36 and manifest["counts"]["train"] + manifest["counts"]["valid"] == 36
    )
    assert {g["gate"]: g["passed"] for g in manifest["gates"]}["pairs:leakage"]


def test_near_identical_prompts_share_a_split_even_when_their_hashes_would_part_them(tmp_path):
    a = "Anna has five red apples and buys seven green apples at the market. How many apples has she now?"
    b = "Anna has five red apples and buys seven yellow apples at the market. How many apples has she now?"
    ha, hb = _pair(a, "x1", "y1").prompt_hash, _pair(b, "x2", "y2").prompt_hash
    others = QUESTIONS[:8]

    def apart(seed: int) -> bool:
        cfg = _cfg(seed=seed).split
        fill = {assign_split(_pair(q, "x", "y").prompt_hash, cfg) for q in others}
        return assign_split(ha, cfg) != assign_split(hb, cfg) and fill == {"train", "valid"}

    seed = next(s for s in range(100) if apart(s))
    pairs = [_pair(a, "twelve", "eleven"), _pair(b, "twelve apples", "ten apples")]
    pairs += [_pair(q, "right", "wrong") for q in others]
    off = MinHashConfig(enabled=False)
    write_pair_set(pairs, tmp_path / "exact", _cfg(seed=seed, near_dup=off))
    exact = _split_of(tmp_path / "exact")
    assert exact[a] != exact[b]  # by their own hashes the two would land apart ...
    write_pair_set(pairs, tmp_path / "near", _cfg(seed=seed))
    near = _split_of(tmp_path / "near")
    assert near[a] == near[b]  # ... near_dup keeps them together


def test_a_shared_system_prompt_does_not_make_every_prompt_near_identical(tmp_path):
    system = (
        "You are Oracle, a careful and friendly assistant made by moeforge. Answer briefly, cite no sources, "
        "and say so plainly when you do not know the answer to a question."
    )
    pairs = [_pair(q, "right", "wrong", system=system) for q in QUESTIONS]
    write_pair_set(pairs, tmp_path / "set", _cfg())
    assert set(_split_of(tmp_path / "set").values()) == {"train", "valid"}


def test_duplicates_and_contradictions_are_dropped_with_reasons(tmp_path):
    keep = [_pair(q, "right", "wrong") for q in QUESTIONS]
    dup = _pair(QUESTIONS[0], "right", "wrong")
    forth, back = _pair("Is water wet?", "yes", "no"), _pair("Is water wet?", "no", "yes")
    manifest = write_pair_set([*keep, dup, forth, back], tmp_path / "set", _cfg())
    dropped = _lines(tmp_path / "set" / "dropped.jsonl")
    assert [(d["id"], d["reason"]) for d in dropped] == [
        (dup.id, "pair:duplicate"),
        *sorted([(forth.id, "pair:contradiction"), (back.id, "pair:contradiction")]),
    ]
    assert manifest["counts"]["reasons"] == {"pair:contradiction": 2, "pair:duplicate": 1}
    assert manifest["counts"]["pairs"] == len(QUESTIONS)
    gates = {g["gate"]: g for g in manifest["gates"]}
    assert gates["pairs:duplicates"]["passed"]


def test_an_email_in_a_chosen_side_is_scrubbed_and_the_id_recomputed(tmp_path):
    leaky = _pair(QUESTIONS[0], "Write to jane.doe@example.com for the answer.", "No idea.")
    rest = [_pair(q, "right", "wrong") for q in QUESTIONS[1:]]
    write_pair_set([leaky, *rest], tmp_path / "set", _cfg())
    got = next(
        p
        for s in ("train", "valid")
        for p in read_pairs(tmp_path / "set", s)
        if p.prompt[-1].content == QUESTIONS[0]
    )
    assert got.chosen[0].content == "Write to <|email|> for the answer."
    assert got.id != leaky.id and got.meta.pii == {"email": 1} and got.meta.pii_status == "scrubbed"
    assert leaky.meta.split is None  # the caller's pairs are not changed


def test_sides_that_differ_only_in_pii_are_dropped_not_raised(tmp_path):
    same = _pair(QUESTIONS[0], "Mail ann@example.com", "Mail bob@example.org")
    rest = [_pair(q, "right", "wrong") for q in QUESTIONS[1:]]
    manifest = write_pair_set([same, *rest], tmp_path / "set", _cfg())
    assert manifest["counts"]["reasons"] == {"pair:identical_after_pii": 1}


def test_a_pair_holding_benchmark_text_is_dropped_by_decontamination(tmp_path):
    item = "A farmer has seventeen sheep and all but nine run away through a hole in the old fence"
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": item}) + "\n", encoding="utf-8")
    decontam = DecontamConfig(
        enabled=True,
        benchmarks=[BenchmarkSpec(name="riddles", path=str(bench), format="jsonl", fields=["question"])],
    )
    dirty = _pair(QUESTIONS[0], f"As in the riddle: {item.lower()}, so nine are left.", "Seventeen.")
    rest = [_pair(q, "right", "wrong") for q in QUESTIONS[1:]]
    manifest = write_pair_set([dirty, *rest], tmp_path / "set", _cfg(decontamination=decontam))
    assert _lines(tmp_path / "set" / "dropped.jsonl") == [
        {"id": dirty.id, "reason": "decontam:riddles", "prompt_hash": dirty.prompt_hash}
    ]
    assert manifest["counts"]["pairs"] == len(rest)


def test_balance_fails_above_max_pairs_per_prompt_and_length_bias_reports_the_ratio(tmp_path):
    crowded = [_pair(QUESTIONS[0], f"a long and careful answer number {k}", f"short {k}") for k in range(5)]
    rest = [_pair(q, "right", "wrong") for q in QUESTIONS[1:]]
    manifest = write_pair_set([*crowded, *rest], tmp_path / "set", _cfg(max_pairs_per_prompt=4))
    gates = {g["gate"]: g for g in manifest["gates"]}
    assert not gates["pairs:balance"]["passed"]
    assert "at most 5 pair(s) per prompt (limit 4)" in gates["pairs:balance"]["evidence"]
    ratios = [len(p.chosen[0].content) / len(p.rejected[0].content) for p in [*crowded, *rest]]
    mean = sum(ratios) / len(ratios)
    assert f"mean chosen/rejected length ratio {round(mean, 3)}" in gates["pairs:length_bias"]["evidence"]
    assert gates["pairs:length_bias"]["passed"] == (0.5 <= mean <= 2.0)


def test_read_pairs_round_trips_and_a_flipped_byte_names_the_file(tmp_path):
    pairs = [_pair(q, "right", "wrong") for q in QUESTIONS]
    write_pair_set(pairs, tmp_path / "set", _cfg(train=1.0, valid=0.0))
    got = read_pairs(tmp_path / "set", "train")
    assert sorted(p.id for p in got) == sorted(p.id for p in pairs)
    assert [p.model_dump(exclude={"meta"}) for p in sorted(got, key=lambda p: p.id)] == [
        p.model_dump(exclude={"meta"}) for p in sorted(pairs, key=lambda p: p.id)
    ]
    path = tmp_path / "set" / "train.jsonl"
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PairSetError, match=r"train\.jsonl: sha256 .* does not match the manifest"):
        read_pairs(tmp_path / "set", "train")


def test_an_eval_split_too_small_is_a_pair_set_error_naming_the_setting(tmp_path):
    pairs = [_pair(q, "right", "wrong") for q in QUESTIONS[:3]]
    cfg = PairSetConfig(split=SplitConfig(train=0.5, valid=0.5, test=0.0, min_eval_records=10))
    with pytest.raises(PairSetError, match=r"valid would get \d+ pair\(s\).*split\.min_eval_records=10"):
        write_pair_set(pairs, tmp_path / "set", cfg)
    assert not (tmp_path / "set").exists()


# ---- moeforge data pairs import ------------------------------------------------------------------------


def test_cli_import_quarantines_a_malformed_line_and_prints_the_summary(tmp_path):
    src = tmp_path / "prefs.jsonl"
    rows = [
        json.dumps({"prompt": q, "chosen": "A clear answer.", "rejected": "A vague answer."})
        for q in QUESTIONS
    ]
    rows.insert(3, json.dumps({"prompt": "Half a pair", "chosen": "only this"}))
    rows.insert(5, "{not json")
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = tmp_path / "pairs.yaml"
    config.write_text("split: {train: 0.5, valid: 0.5, test: 0.0, min_eval_records: 1}\n", encoding="utf-8")
    out = tmp_path / "set"
    result = CliRunner().invoke(
        app, ["data", "pairs", "import", str(src), "--out", str(out), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert (
        f"read {len(QUESTIONS) + 1} item(s) from 1 file(s): {len(QUESTIONS)} pair(s), 2 quarantined"
        in result.output
    )
    assert "pairs:leakage" in result.output and "pair:unknown_layout" in result.output
    quarantined = _lines(out / "quarantine.jsonl")
    assert [q["line"] for q in quarantined] == [4, 6]
    assert quarantined[0]["error"].startswith("pair:unknown_layout: missing field(s) ['rejected']")
    pair = read_pairs(out, "train")[0]
    assert pair.meta.family == "prefs" and pair.meta.provenance.steps == [
        "pairs:import",
        "format:pair:standard",
    ]
    # `data verify` re-checks a pair set from its files: a pair moved from valid to train fails it
    ok = CliRunner().invoke(app, ["data", "verify", str(out), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["passed"], ok.output
    moved = (out / "valid.jsonl").read_text().splitlines(keepends=True)
    (out / "valid.jsonl").write_text("".join(moved[1:]))
    with (out / "train.jsonl").open("a") as fh:
        fh.write(moved[0])
    bad = CliRunner().invoke(app, ["data", "verify", str(out), "--json"])
    gates = {g["gate"]: g for g in json.loads(bad.output)["gates"]}
    assert bad.exit_code == 1 and "does not match the manifest" in gates["pairs:hash"]["evidence"]


def test_cli_import_of_a_missing_path_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    # through main(), which maps user errors to exit code 2 (CliRunner would bypass it)
    missing = tmp_path / "nope.jsonl"
    monkeypatch.setattr(
        sys, "argv", ["moeforge", "data", "pairs", "import", str(missing), "--out", str(tmp_path / "o")]
    )
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.jsonl" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
