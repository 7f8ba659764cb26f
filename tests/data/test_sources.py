"""Readers stream every input format and quarantine bad content with file, line and reason."""

from __future__ import annotations

import gzip
import json

import pytest

from moeforge.data.sources import Quarantined, RawItem, SourceError, detect_format, expand_inputs, read_source


def _split(items):
    items = list(items)
    return [i for i in items if isinstance(i, RawItem)], [i for i in items if isinstance(i, Quarantined)]


def test_jsonl_quarantines_each_bad_line_with_its_reason_and_keeps_going(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b'{"q": "one"}\n\xff\xfe not utf-8\n{"q": broken\n[1, 2]\nnull\n   \n{"q": "two"}\n')
    ok, bad = _split(read_source(f))
    assert [(i.data["q"], i.line) for i in ok] == [("one", 1), ("two", 7)]
    reasons = {q.line: q.error for q in bad}
    assert reasons[2].startswith("invalid UTF-8 at byte 0")
    assert reasons[3].startswith("invalid JSON")
    assert reasons[4] == "expected a JSON object, got list"
    assert reasons[5] == "expected a JSON object, got null"
    assert reasons[6] == "empty line"
    assert all(q.uri == str(f) for q in bad)
    assert len(ok) + len(bad) == 7  # every line accounted for


def test_jsonl_objects_are_exactly_what_json_loads_gives_even_where_the_fast_parser_refuses(tmp_path):
    lines = [
        '{"n": 123456789012345678901234567890, "f": 0.1, "e": "caf\\u00e9 \\ud83d\\ude00", "z": -0}',
        '{"nan": NaN, "inf": Infinity}',  # json.loads accepts both; the fast parser does not
        '{"big": 1e400}',
        '{"lone": "\\ud800"}',
        '{"k": 1, "k": 2}\r',
        '{"nested": {"a": [1, {"b": null}]}}   ',
    ]
    f = tmp_path / "edge.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ok, bad = _split(read_source(f))
    assert not bad
    got = [i.data for i in ok]
    want = [json.loads(x) for x in lines]
    assert repr(got) == repr(want)  # repr: nan != nan, and the types (int, not float) must match too
    assert [i.line for i in ok] == list(range(1, len(lines) + 1))


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl_is_read_transparently(tmp_path, suffix):
    import zstandard

    payload = b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(100))
    f = tmp_path / f"data{suffix}"
    f.write_bytes(
        gzip.compress(payload) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(payload)
    )
    ok, bad = _split(read_source(f))
    assert [i.data["i"] for i in ok] == list(range(100)) and not bad


def test_truncated_gzip_keeps_complete_lines_and_quarantines_the_rest(tmp_path):
    payload = b"".join(json.dumps({"i": i, "pad": "x" * 50}).encode() + b"\n" for i in range(2000))
    data = gzip.compress(payload)
    f = tmp_path / "cut.jsonl.gz"
    f.write_bytes(data[: len(data) // 2])
    ok, bad = _split(read_source(f))
    assert 0 < len(ok) < 2000
    assert [i.data["i"] for i in ok] == list(range(len(ok)))
    assert len(bad) == 1 and "unreadable stream" in bad[0].error and bad[0].line == len(ok) + 1


def test_json_array_streams_objects_and_flags_non_objects(tmp_path):
    f = tmp_path / "arr.json"
    f.write_text(json.dumps([{"a": 1}, 5, {"a": 2, "nested": {"x": [1, 2]}}]))
    ok, bad = _split(read_source(f))
    assert [i.data["a"] for i in ok] == [1, 2] and [i.offset for i in ok] == [0, 2]
    assert len(bad) == 1 and bad[0].offset == 1 and "expected a JSON object" in bad[0].error


def test_json_array_handles_elements_larger_than_the_read_chunk(tmp_path):
    big = "y" * 300_000
    f = tmp_path / "big.json"
    f.write_text(json.dumps([{"t": big}, {"t": "small"}]))
    ok, bad = _split(read_source(f))
    assert [len(i.data["t"]) for i in ok] == [300_000, 5] and not bad


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"a": 1}', "expected a JSON array"),
        ('[{"a": 1}, {"a": ', "truncated JSON in array element 1"),
        ("", "empty file"),
    ],
)
def test_json_array_problems_are_quarantined(tmp_path, content, error):
    f = tmp_path / "x.json"
    f.write_text(content)
    _, bad = _split(read_source(f))
    assert len(bad) == 1 and error in bad[0].error


def test_txt_modes(tmp_path):
    f = tmp_path / "play.txt"
    f.write_text("First:\nSpeak.\n\n\nAll:\nSpeak, speak.\n")
    paras, _ = _split(read_source(f, txt_mode="paragraphs"))
    assert [(p.data, p.line) for p in paras] == [("First:\nSpeak.", 1), ("All:\nSpeak, speak.", 5)]
    lines, _ = _split(read_source(f, txt_mode="lines"))
    assert [line.data for line in lines] == ["First:", "Speak.", "All:", "Speak, speak."]
    whole, _ = _split(read_source(f, txt_mode="file"))
    assert len(whole) == 1 and whole[0].data.startswith("First:")


def test_binary_file_as_txt_is_quarantined_not_crashed(tmp_path):
    f = tmp_path / "blob.txt"
    f.write_bytes(bytes(range(256)) * 10)
    ok, bad = _split(read_source(f, txt_mode="file"))
    assert not ok and len(bad) == 1 and "invalid UTF-8" in bad[0].error


def test_csv_rows_become_dicts_and_ragged_rows_are_quarantined(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text('question,answer\n"What, exactly?",42\nonly-one-field\n1,2,3\n')
    ok, bad = _split(read_source(f))
    assert ok[0].data == {"question": "What, exactly?", "answer": "42"} and ok[0].line == 2
    assert sorted(q.error for q in bad) == ["fewer fields than the header", "more fields than the header"]


def test_parquet_rows_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"
    pq.write_table(
        pa.table({"text": [f"doc {i}" for i in range(2500)], "n": list(range(2500))}), f, row_group_size=1000
    )
    ok, bad = _split(read_source(f))
    assert (
        len(ok) == 2500
        and ok[2499].data == {"text": "doc 2499", "n": 2499}
        and ok[2499].offset == 2499
        and not bad
    )


def test_corrupt_parquet_is_quarantined(tmp_path):
    f = tmp_path / "bad.parquet"
    f.write_bytes(b"PAR1 this is not parquet")
    _, bad = _split(read_source(f))
    assert len(bad) == 1 and "unreadable Parquet" in bad[0].error


def test_directories_and_globs_expand_sorted_and_skip_hidden_files(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.jsonl", "a.jsonl", ".hidden.jsonl"):
        (tmp_path / name).write_text('{"x": 1}\n')
    assert expand_inputs(tmp_path) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b" / "2.jsonl")]
    assert expand_inputs(str(tmp_path / "**" / "*.jsonl")) == [
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "b" / "2.jsonl"),
    ]


def test_request_errors_are_raised_before_reading(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        list(read_source(tmp_path / "missing.jsonl"))
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="set format:"):
        list(read_source(tmp_path / "data.bin"))
    assert detect_format("a/b.JSONL.GZ") == "jsonl"


@pytest.mark.realdata
def test_real_files_read_completely(real_data):
    gsm, bad = _split(read_source(real_data / "gsm8k" / "train.jsonl"))
    assert len(gsm) == 7473 and not bad and {"question", "answer"} <= gsm[0].data.keys()
    he, bad = _split(read_source(real_data / "humaneval" / "HumanEval.jsonl.gz"))
    assert len(he) == 164 and not bad and he[0].data["task_id"] == "HumanEval/0"
    ru, bad = _split(read_source(real_data / "ruslit", fmt="txt", txt_mode="file"))
    assert len([r for r in ru if r.uri.endswith(".txt")]) == 100
