"""Decontamination finds benchmark items inside training documents, whatever their formatting, and drops
or cuts them; loaders read the benchmarks' usual files and say exactly what is wrong with a bad one."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from moeforge.data.contract import Message, Provenance, Record, RecordMeta, SourceRef
from moeforge.data.decontam import (
    BenchmarkError,
    BenchmarkItem,
    BenchmarkSpec,
    DecontamConfig,
    DecontamIndex,
    DecontamReport,
    cached_index,
    decontaminate,
    load_benchmark,
    normalize_words,
)
from moeforge.data.decontam.normalize import hash_words

Q1 = (
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
    "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
    "fresh duck egg. How much in dollars does she make every day at the farmers' market?"
)
A1 = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
Q2 = "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?"
A2 = "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts\n#### 3"
FILLER_WORDS = [
    "river",
    "stone",
    "lantern",
    "quiet",
    "harbor",
    "morning",
    "copper",
    "field",
    "window",
    "garden",
    "silver",
    "letter",
    "winter",
    "road",
    "candle",
    "meadow",
    "thunder",
    "pocket",
    "violin",
    "orchard",
    "feather",
    "canyon",
    "marble",
    "shadow",
    "compass",
    "velvet",
    "island",
    "ember",
]


def filler(n_words: int, seed: int) -> str:
    """Unrelated prose: random words from a vocabulary no benchmark item uses, in sentences."""
    rng = random.Random(seed)
    words = [rng.choice(FILLER_WORDS) for _ in range(n_words)]
    for i in range(0, n_words, 11):
        words[i] = words[i].capitalize()
    return " ".join(w + ("." if i % 11 == 10 else "") for i, w in enumerate(words))


def write_gsm8k(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows), encoding="utf-8"
    )
    return path


def record(text: str | None = None, messages: list[Message] | None = None, family: str = "web") -> Record:
    meta = RecordMeta(
        source=SourceRef(uri="corpus.jsonl", line=7),
        family=family,
        domain="prose",
        provenance=Provenance(source_sha256="ab" * 32, steps=["format:text"]),
    )
    return Record.create(meta=meta, text=text, messages=messages)


@pytest.fixture
def gsm8k_file(tmp_path: Path) -> Path:
    return write_gsm8k(tmp_path / "test.jsonl", [(Q1, A1), (Q2, A2)])


def cfg_for(path: Path, **kw) -> DecontamConfig:
    return DecontamConfig(
        enabled=True, benchmarks=[BenchmarkSpec(name="gsm8k", path=str(path), format="gsm8k")], **kw
    )


# --- loaders ------------------------------------------------------------------------------------------


def test_gsm8k_loader_reads_question_and_answer_per_line_also_without_calculator_annotations(gsm8k_file):
    items = load_benchmark(BenchmarkSpec(name="gsm8k", path=str(gsm8k_file), format="gsm8k"))
    assert [it.item_id for it in items] == ["test.jsonl:1", "test.jsonl:2"]
    plain = A1.replace("<<16-3-4=9>>", "").replace("<<9*2=18>>", "")
    assert items[0] == BenchmarkItem("gsm8k", "test.jsonl:1", f"{Q1}\n{A1}\n{Q1}\n{plain}")


def test_an_answer_copied_without_calculator_annotations_is_found(tmp_path):
    answer = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
        "in April and May.\n#### 72"
    )
    path = write_gsm8k(tmp_path / "test.jsonl", [("How many clips did Natalia sell?", answer)])
    index = DecontamIndex.build(cfg_for(path))
    copied = "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May."
    assert [
        m.item_id for m in index.find(filler(50, seed=50) + " " + copied + " " + filler(50, seed=51))
    ] == ["test.jsonl:1"]


def test_gsm8k_fields_can_be_narrowed_to_the_question(gsm8k_file):
    spec = BenchmarkSpec(name="gsm8k", path=str(gsm8k_file), format="gsm8k", fields=["question"])
    assert [it.text for it in load_benchmark(spec)] == [Q1, Q2]  # no annotations: no second copy


def test_humaneval_loader_reads_gzipped_prompt_and_solution_with_task_ids(tmp_path):
    rows = [
        {
            "task_id": "HumanEval/0",
            "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
            "canonical_solution": "    return a + b\n",
            "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
            "entry_point": "add",
        }
    ]
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    items = load_benchmark(BenchmarkSpec(name="humaneval", path=str(path), format="humaneval"))
    assert [(it.item_id, it.text) for it in items] == [
        ("HumanEval/0", rows[0]["prompt"] + "\n    return a + b\n")
    ]


def test_mmlu_loader_reads_headerless_csv_question_and_choices_not_the_answer(tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    with open(folder / "astronomy_test.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(
            ["Which planet, of these, is largest?", "Mars", "Jupiter", "Venus", "Earth", "B"]
        )
    with open(folder / "anatomy_test.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["Where is the femur?", "arm", "leg", "skull", "hand", "B"])
    items = load_benchmark(BenchmarkSpec(name="mmlu", path=str(folder), format="mmlu"))
    assert [it.item_id for it in items] == ["anatomy_test.csv:1", "astronomy_test.csv:1"]
    assert items[1].text == "Which planet, of these, is largest?\nMars\nJupiter\nVenus\nEarth"


def test_mmlu_row_with_wrong_column_count_names_file_and_line(tmp_path):
    path = tmp_path / "x_test.csv"
    path.write_text('"Q one?",a,b,c,d,A\n"Q two?",a,b,c\n', encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"x_test\.csv:2: expected 6 columns .* got 4"):
        load_benchmark(BenchmarkSpec(name="mmlu", path=str(path), format="mmlu"))


def test_math_loader_reads_a_directory_of_json_files_and_a_single_file(tmp_path):
    root = tmp_path / "MATH" / "test"
    for sub, k, problem in [
        ("algebra", 1, "Solve $x+1=2$."),
        ("geometry", 7, "Find the area of a unit square."),
    ]:
        (root / sub).mkdir(parents=True)
        obj = {"problem": problem, "level": "Level 1", "type": sub, "solution": "It is $\\boxed{1}$."}
        (root / sub / f"{k}.json").write_text(json.dumps(obj, indent=4), encoding="utf-8")
    items = load_benchmark(BenchmarkSpec(name="math", path=str(root), format="math"))
    assert [it.item_id for it in items] == ["algebra/1.json", "geometry/7.json"]
    assert items[0].text == "Solve $x+1=2$.\nIt is $\\boxed{1}$."
    one = load_benchmark(BenchmarkSpec(name="math", path=str(root / "geometry" / "7.json"), format="math"))
    assert [it.item_id for it in one] == ["7.json"]


def test_jsonl_loader_joins_named_fields_including_lists(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(
        json.dumps({"q": "Why is the sky blue?", "choices": ["scattering", "paint"], "n": 3}) + "\n"
    )
    spec = BenchmarkSpec(name="arc", path=str(path), format="jsonl", fields=["q", "choices", "n"])
    assert [it.text for it in load_benchmark(spec)] == ["Why is the sky blue?\nscattering\npaint\n3"]


def test_a_utf8_bom_is_ignored_and_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "x_test.csv"
    path.write_bytes("\ufeffWhat is two plus two?,3,4,5,6,B\n".encode() + b"Caf\xe9?,a,b,c,d,A\n")
    spec = BenchmarkSpec(name="mmlu", path=str(path), format="mmlu")
    with pytest.raises(BenchmarkError, match=r"x_test\.csv:2: not UTF-8"):
        load_benchmark(spec)
    path.write_bytes("\ufeffWhat is two plus two?,3,4,5,6,B\n".encode())
    assert load_benchmark(spec)[0].text == "What is two plus two?\n3\n4\n5\n6"


def test_missing_file_is_a_clear_error(tmp_path):
    spec = BenchmarkSpec(name="gsm8k", path=str(tmp_path / "nope.jsonl"), format="gsm8k")
    with pytest.raises(BenchmarkError, match=r"benchmark 'gsm8k': .*nope\.jsonl does not exist"):
        load_benchmark(spec)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": Q1, "answer": A1}) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"test\.jsonl:3: not valid JSON"):
        load_benchmark(BenchmarkSpec(name="gsm8k", path=str(path), format="gsm8k"))


def test_bad_json_in_a_math_file_names_file_and_line(tmp_path):
    path = tmp_path / "3.json"
    path.write_text('{\n  "problem": "x",\n  "solution": oops\n}\n', encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"3\.json:3: not valid JSON"):
        load_benchmark(BenchmarkSpec(name="math", path=str(path), format="math"))


def test_missing_field_names_the_field_file_and_line(tmp_path):
    path = write_gsm8k(tmp_path / "test.jsonl", [(Q1, A1)])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"question": Q2}) + "\n")
    with pytest.raises(
        BenchmarkError, match=r"test\.jsonl:2: field 'answer' is missing \(fields there: question\)"
    ):
        load_benchmark(BenchmarkSpec(name="gsm8k", path=str(path), format="gsm8k"))


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "x", "canonical_solution": "y"}\n' * 50)[:40])
    with pytest.raises(BenchmarkError, match=r"HumanEval\.jsonl\.gz: cannot read it"):
        load_benchmark(BenchmarkSpec(name="humaneval", path=str(path), format="humaneval"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "path": "p", "format": "jsonl"}, "format jsonl needs 'fields'"),
        ({"name": "x", "path": "p", "format": "mmlu", "fields": ["q"]}, "takes no 'fields'"),
        ({"name": "bad name", "path": "p", "format": "gsm8k"}, "name"),
    ],
)
def test_benchmark_spec_errors_say_what_to_do(data, message):
    with pytest.raises(ValidationError, match=message):
        BenchmarkSpec.model_validate(data)


def test_benchmark_paths_expand_environment_variables(monkeypatch):
    monkeypatch.setenv("BENCH_ROOT", "/data/bench")
    assert BenchmarkSpec(name="g", path="${BENCH_ROOT}/gsm8k/test.jsonl", format="gsm8k").path == (
        "/data/bench/gsm8k/test.jsonl"
    )
    monkeypatch.delenv("BENCH_ROOT")
    assert BenchmarkSpec(name="g", path="${BENCH_ROOT:-here}/t.jsonl", format="gsm8k").path == "here/t.jsonl"


def test_config_rejects_duplicate_names_and_enabled_without_benchmarks():
    spec = {"name": "g", "path": "p", "format": "gsm8k"}
    with pytest.raises(ValidationError, match="repeated: g"):
        DecontamConfig.model_validate({"benchmarks": [spec, spec]})
    with pytest.raises(ValidationError, match="lists no benchmarks"):
        DecontamConfig(enabled=True)
    with pytest.raises(ValidationError, match="min_item_words"):
        DecontamConfig(ngram=5, min_item_words=8)


# --- normalization and matching -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Janet’s ducks  lay\n16\teggs!", ["janets", "ducks", "lay", "16", "eggs"]),
        ("JANET'S Ducks, lay... 16 “eggs”", ["janets", "ducks", "lay", "16", "eggs"]),
        ("has_close_elements(numbers: List[float])", ["hascloseelementsnumbers", "listfloat"]),
        ("ﬁne café Straße ΟΔΟΣ ½", ["fine", "cafe", "strasse", "οδοσ", "12"]),
        ("a\u00a0b\u200bc — d", ["a", "bc", "d"]),
        ("3,000.50 $ + = <<>>", ["300050"]),
        ("", []),
    ],
)
def test_normalization_folds_case_punctuation_accents_and_whitespace(text, words):
    assert normalize_words(text) == words


def test_paths_without_positions_hash_like_the_path_with_them():
    text = filler(300, seed=1) + "  " + Q1.replace("’", "'")
    assert text.isascii()
    fast, general = hash_words(text), hash_words(text, spans=True)
    assert fast.origin is None
    assert fast.hashes.tolist() == general.hashes.tolist()
    assert hash_words(text + " é").hashes[:-1].tolist() == fast.hashes.tolist()
    unicode = "Ｆｕｌｌ-width “quotes” café ﬁne " + text
    assert hash_words(unicode).hashes.tolist() == hash_words(unicode, spans=True).hashes.tolist()
    plain = "Строка без лигатур, “кавычки” и ё " + text
    assert hash_words(plain).origin is None
    assert hash_words(plain).hashes.tolist() == hash_words(plain, spans=True).hashes.tolist()


def test_planted_question_is_found_in_a_long_document_with_its_span(gsm8k_file):
    index = DecontamIndex.build(cfg_for(gsm8k_file))
    before, after = filler(400, seed=2), filler(400, seed=3)
    doc = before + " " + Q1 + " " + after
    matches = index.find(doc)
    assert [(m.benchmark, m.item_id) for m in matches] == [("gsm8k", "test.jsonl:1")]
    m = matches[0]
    assert doc[m.start_char : m.end_char] == Q1
    assert m.ngram == "janets ducks lay 16 eggs per day she eats three for breakfast every"
    assert index.contains_any(doc)


def test_matching_survives_case_punctuation_and_whitespace_changes(gsm8k_file):
    index = DecontamIndex.build(cfg_for(gsm8k_file))
    reformatted = Q1.upper().replace("’", "'").replace(". ", ";\n\n   ").replace("?", "!!").replace(",", "")
    doc = filler(200, seed=4) + "\n" + reformatted + "\n" + filler(200, seed=5)
    assert [m.item_id for m in index.find(doc)] == ["test.jsonl:1"]


def test_spans_are_in_original_characters_even_after_expanding_ligatures(gsm8k_file):
    index = DecontamIndex.build(cfg_for(gsm8k_file))
    prefix = "ﬁrst ﬂoor ½ Ǆ ﬃ 𝐀𝐁 😀 " * 20
    doc = prefix + Q2 + " ﬁn"
    (m,) = index.find(doc)
    assert doc[m.start_char : m.end_char] == Q2


def test_no_false_hit_on_unrelated_text_or_a_shared_run_shorter_than_n(gsm8k_file):
    index = DecontamIndex.build(cfg_for(gsm8k_file))
    assert index.find(filler(20_000, seed=6)) == []
    twelve = " ".join(Q1.split()[:12])  # 12 words in a row: one short of an n-gram
    doc = filler(100, seed=7) + " " + twelve + " " + filler(100, seed=8)
    assert index.find(doc) == []
    assert not index.contains_any(doc)


def test_ngrams_shared_by_more_than_k_items_are_ignored(tmp_path):
    boiler = "Let us think step by step and then write the final answer as a number"
    rows = [(f"Question {w}: {boiler}.", f"{w}") for w in ["one", "two", "three", "four"]]
    path = write_gsm8k(tmp_path / "test.jsonl", rows)
    doc = filler(100, seed=9) + " " + boiler + " " + filler(100, seed=10)
    loose = DecontamIndex.build(cfg_for(path, max_item_frequency=4))
    strict = DecontamIndex.build(cfg_for(path, max_item_frequency=3))
    assert {m.item_id for m in loose.find(doc)} == {f"test.jsonl:{k}" for k in range(1, 5)}
    assert strict.find(doc) == []
    assert strict.stats()["ngrams_ignored_frequent"] > 0


def test_items_shorter_than_n_match_only_as_a_whole(tmp_path):
    path = tmp_path / "short.jsonl"
    rows = ["What is the capital city of the old kingdom", "Name two prime numbers"]
    path.write_text("".join(json.dumps({"q": q}) + "\n" for q in rows), encoding="utf-8")
    spec = BenchmarkSpec(name="short", path=str(path), format="jsonl", fields=["q"])
    index = DecontamIndex.build(DecontamConfig(enabled=True, benchmarks=[spec]))
    stats = index.stats()["benchmarks"]["short"]
    assert stats == {"items": 2, "items_too_short": 1, "items_indexed": 1}  # 9 words ≥ 8; 4 words < 8
    whole = filler(50, seed=11) + " what is the CAPITAL city of the old kingdom? " + filler(50, seed=12)
    part = filler(50, seed=11) + " what is the capital city of the old " + filler(50, seed=12)
    assert [m.item_id for m in index.find(whole)] == ["short.jsonl:1"]
    assert index.find(part) == []
    assert index.find("name two prime numbers " + filler(50, seed=13)) == []


# --- policies -----------------------------------------------------------------------------------------


def test_drop_policy_drops_a_document_holding_a_test_question(gsm8k_file):
    cfg = cfg_for(gsm8k_file, policy="drop")
    index = DecontamIndex.build(cfg)
    rec = record(filler(500, seed=14) + "\n\n" + Q2 + "\n\n" + filler(500, seed=15))
    out, reason, matches = decontaminate(rec, index, cfg)
    assert out is None and reason == "decontam:gsm8k"
    assert [m.item_id for m in matches] == ["test.jsonl:2"]


def test_cut_policy_removes_the_span_and_window_keeps_the_rest_and_recomputes_the_id(gsm8k_file):
    cfg = cfg_for(gsm8k_file, policy="cut", window=50, min_piece_chars=100)
    index = DecontamIndex.build(cfg)
    before, after = filler(300, seed=16), filler(300, seed=17)
    text = before + " " + Q1 + " " + after
    rec = record(text)
    out, reason, matches = decontaminate(rec, index, cfg)
    assert reason is None and out is not None and len(matches) == 1
    m = matches[0]
    assert "ducks" not in out.text and "market" not in out.text
    assert text[m.start_char - 50 : m.end_char + 50] not in out.text
    kept_before, kept_after = out.text.split("\n\n")
    assert before.startswith(kept_before) and len(before) - 60 <= len(kept_before) <= len(before) - 50
    assert after.endswith(kept_after) and len(after) - 60 <= len(kept_after) <= len(after) - 50
    kept_words = kept_before.split(), kept_after.split()  # whole words: the cut widens to whitespace
    assert kept_words[0] == before.split()[: len(kept_words[0])]
    assert kept_words[1] == after.split()[-len(kept_words[1]) :]
    assert out.id != rec.id and Record.model_validate(out.model_dump()).id == out.id
    assert out.meta.provenance.steps == ["format:text", "decontam"]
    extra = out.meta.extra["decontam"]
    assert extra["benchmarks"] == ["gsm8k"] and extra["items"] == [["gsm8k", "test.jsonl:1"]]
    assert extra["pieces"] == 2 and extra["removed_chars"] >= len(Q1) + 100


def test_cut_policy_drops_a_document_split_into_too_many_pieces(gsm8k_file):
    cfg = cfg_for(gsm8k_file, policy="cut", window=10, max_pieces=3, min_piece_chars=10)
    index = DecontamIndex.build(cfg)
    parts = [filler(60, seed=20 + k) for k in range(5)]
    text = parts[0] + "".join(f" {Q1 if k % 2 else Q2} {p}" for k, p in enumerate(parts[1:]))
    out, reason, matches = decontaminate(record(text), index, cfg)
    assert out is None and reason == "decontam:too_many_pieces" and len(matches) == 4
    relaxed = cfg.model_copy(update={"max_pieces": 5})
    out, reason, _ = decontaminate(record(text), index, relaxed)
    assert out is not None and out.meta.extra["decontam"]["pieces"] == 5


def test_cut_policy_discards_short_pieces_and_drops_a_document_left_empty(gsm8k_file):
    cfg = cfg_for(gsm8k_file, policy="cut", window=20, min_piece_chars=200)
    index = DecontamIndex.build(cfg)
    short_tail = "Thanks for reading."
    out, _, _ = decontaminate(record(filler(200, seed=30) + " " + Q1 + " " + short_tail), index, cfg)
    assert out is not None and "Thanks" not in out.text and out.meta.extra["decontam"]["pieces"] == 1
    out, reason, _ = decontaminate(record("Homework: " + Q1 + " " + short_tail), index, cfg)
    assert out is None and reason == "decontam:gsm8k"


def test_exempt_families_and_a_disabled_stage_pass_records_untouched(gsm8k_file):
    cfg = cfg_for(gsm8k_file, policy="cut", exempt_families=["gsm8k"])
    index = DecontamIndex.build(cfg)
    rec = record(Q1 + "\n" + A1, family="gsm8k")
    assert decontaminate(rec, index, cfg) == (rec, None, [])
    web = record(Q1 + "\n" + A1)
    assert decontaminate(web, index, cfg)[0] is None
    assert decontaminate(web, index, cfg.model_copy(update={"enabled": False})) == (web, None, [])


def test_clean_documents_are_kept_with_a_provenance_step(gsm8k_file):
    cfg = cfg_for(gsm8k_file)
    index = DecontamIndex.build(cfg)
    rec = record(filler(300, seed=31))
    out, reason, matches = decontaminate(rec, index, cfg)
    assert reason is None and matches == [] and out is not None
    assert out.id == rec.id and out.text == rec.text and "decontam" not in out.meta.extra
    assert out.meta.provenance.steps == ["format:text", "decontam"]


def test_chats_are_checked_per_turn_and_an_emptied_assistant_turn_drops_the_chat(gsm8k_file):
    cfg = cfg_for(gsm8k_file, policy="cut", window=20, min_piece_chars=50)
    index = DecontamIndex.build(cfg)
    user = filler(80, seed=32) + " Here is my question: " + Q1
    chat = record(
        messages=[Message(role="user", content=user), Message(role="assistant", content=filler(40, seed=33))]
    )
    out, reason, matches = decontaminate(chat, index, cfg)
    assert reason is None and out is not None and [m.turn for m in matches] == [0]
    assert out.messages is not None and "ducks" not in out.messages[0].content
    assert out.messages[1] == chat.messages[1] and out.id != chat.id
    leaked = record(
        messages=[Message(role="user", content="Solve it."), Message(role="assistant", content=A1 + " " + Q2)]
    )
    out, reason, matches = decontaminate(leaked, index, cfg)
    assert out is None and reason == "decontam:gsm8k" and {m.turn for m in matches} == {1}


def test_results_are_deterministic_across_builds_and_processes(gsm8k_file):
    cfg = cfg_for(gsm8k_file, policy="cut", min_piece_chars=20)
    a, b = DecontamIndex.build(cfg), DecontamIndex.build(cfg)
    assert a.hashes.tobytes() == b.hashes.tobytes() and a.item_ids.tobytes() == b.item_ids.tobytes()
    rec = record(filler(200, seed=34) + " " + Q1 + " " + filler(200, seed=35) + " " + Q2)
    assert decontaminate(rec, a, cfg) == decontaminate(rec, b, cfg)
    code = (
        "import hashlib, sys; from moeforge.data.decontam import *; "
        f"i = DecontamIndex.build(DecontamConfig.model_validate_json({cfg.model_dump_json()!r})); "
        "print(hashlib.sha256(i.hashes.tobytes()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert digests == {hashlib.sha256(a.hashes.tobytes()).hexdigest()}


def test_index_stats_count_items_ngrams_and_bytes(gsm8k_file):
    index = DecontamIndex.build(cfg_for(gsm8k_file))
    stats = index.stats()
    assert stats["benchmarks"]["gsm8k"] == {"items": 2, "items_too_short": 0, "items_indexed": 2}
    assert stats["ngrams"] > len(normalize_words(f"{Q1} {A1} {Q2} {A2}")) - 2 * 12
    assert 14 <= stats["bytes_per_ngram"] <= 24 and stats["bytes"] == index.nbytes
    assert cached_index(cfg_for(gsm8k_file)) is cached_index(cfg_for(gsm8k_file))


# --- report -------------------------------------------------------------------------------------------


def test_report_counts_per_benchmark_and_merges_in_any_order(gsm8k_file):
    cfg = cfg_for(gsm8k_file, exempt_families=["gsm8k"])
    index = DecontamIndex.build(cfg)
    docs = [
        record(filler(100, seed=40) + " " + Q1),
        record(Q2 + " " + filler(100, seed=41)),
        record(filler(100, seed=42)),
        record(Q1, family="gsm8k"),
        record(filler(50, seed=43) + " " + Q1 + " " + Q2),
    ]
    reports = []
    for chunk in (docs[:2], docs[2:]):
        rep = DecontamReport.for_index(index, max_examples=2)
        for doc in chunk:
            rep.add(doc, *decontaminate(doc, index, cfg))
        reports.append(rep)
    one, two = (
        DecontamReport.from_json(reports[0].to_json(), 2),
        DecontamReport.from_json(reports[1].to_json(), 2),
    )
    one.merge(reports[1])
    two.merge(reports[0])
    assert one.to_json()["benchmarks"] == two.to_json()["benchmarks"]
    out = one.to_json()
    assert out["documents_checked"] == 4 and out["documents_exempt"] == 1
    assert out["documents_dropped"] == {"decontam:gsm8k": 3}
    g = out["benchmarks"]["gsm8k"]
    assert (g["items"], g["items_matched"], g["documents_affected"]) == (2, 2, 3)
    assert len(g["examples"]) == 2 and g["examples"][0]["source"] == "corpus.jsonl:7"
    assert g["examples"][0]["ngram"].count(" ") == 12
    assert json.loads(json.dumps(out)) == out
