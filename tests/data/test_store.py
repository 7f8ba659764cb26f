"""Shards: zstd JSONL rolled at a record count, reproducible bytes, no half-written file on failure."""

from __future__ import annotations

import hashlib
import json

import pytest
import zstandard
from pydantic import ValidationError

from moeforge.data.contract import Message, Provenance, Record, RecordMeta, SourceRef
from moeforge.data.store import ShardWriter, iter_lines, read_records


def _records(n: int) -> list[Record]:
    out = []
    for i in range(n):
        meta = RecordMeta(
            source=SourceRef(uri="in.jsonl", line=i + 1),
            family="f",
            domain="chat" if i % 2 else "prose",
            provenance=Provenance(source_sha256="ef" * 32, steps=["format"]),
        )
        if i % 2:
            msgs = [
                Message(role="user", content=f"question {i}?"),
                Message(role="assistant", content=f"Ответ {i}."),
            ]
            out.append(Record.create(meta=meta, messages=msgs))
        else:
            out.append(Record.create(meta=meta, text=f"document number {i} — ünïcödé"))
    return out


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_shards_roll_at_shard_records(tmp_path):
    with ShardWriter(tmp_path / "out", shard_records=3) as w:
        for r in _records(7):
            w.write(r)
    assert [(s.path.name, s.records) for s in w.shards] == [
        ("part-00000.jsonl.zst", 3),
        ("part-00001.jsonl.zst", 3),
        ("part-00002.jsonl.zst", 1),
    ]
    assert _leftovers(tmp_path / "out") == [s.path.name for s in w.shards]


def test_an_exact_multiple_leaves_no_empty_last_shard(tmp_path):
    w = ShardWriter(tmp_path, shard_records=3)
    for r in _records(6):
        w.write(r)
    assert [s.records for s in w.close()] == [3, 3]
    assert _leftovers(tmp_path) == ["part-00000.jsonl.zst", "part-00001.jsonl.zst"]


def test_no_records_write_no_shard(tmp_path):
    assert ShardWriter(tmp_path / "none").close() == []
    assert not (tmp_path / "none").exists()


def test_shard_info_matches_the_file(tmp_path):
    w = ShardWriter(tmp_path, shard_records=4, prefix="records")
    for r in _records(6):
        w.write(r)
    for info in w.close():
        data = info.path.read_bytes()
        assert info.bytes == len(data)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert info.path.name.startswith("records-")
        lines = zstandard.ZstdDecompressor().decompressobj().decompress(data).decode().splitlines()
        assert len(lines) == info.records


def test_the_same_records_give_the_same_bytes(tmp_path):
    infos = []
    for name in ("a", "b"):
        w = ShardWriter(tmp_path / name, shard_records=5, level=3)
        for r in _records(12):
            w.write(r)
        infos.append(w.close())
    a, b = infos
    assert [i.sha256 for i in a] == [i.sha256 for i in b]
    assert [i.path.read_bytes() for i in a] == [i.path.read_bytes() for i in b]


def test_records_round_trip_through_a_shard(tmp_path):
    recs = _records(9)
    with ShardWriter(tmp_path, shard_records=100) as w:
        for r in recs:
            w.write(r)
    (shard,) = w.shards
    assert list(read_records(shard.path)) == recs
    lines = list(iter_lines(shard.path))
    assert [n for n, _ in lines] == list(range(1, 10))
    assert [json.loads(line)["id"] for _, line in lines] == [r.id for r in recs]


def test_write_json_writes_the_line_as_given(tmp_path):
    line = _records(1)[0].model_dump_json()
    with ShardWriter(tmp_path) as w:
        w.write_json(line)
    assert list(iter_lines(w.shards[0].path)) == [(1, line)]


def test_iter_lines_reads_plain_jsonl_and_skips_blank_lines_keeping_numbers(tmp_path):
    f = tmp_path / "plain.jsonl"
    f.write_text('{"a": 1}\n\n{"a": "ü"}\n', encoding="utf-8")
    assert list(iter_lines(f)) == [(1, '{"a": 1}'), (3, '{"a": "ü"}')]


def test_read_records_rejects_a_line_whose_id_does_not_match(tmp_path):
    obj = json.loads(_records(1)[0].model_dump_json())
    obj["text"] = "changed after hashing"
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(obj) + "\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="id does not match"):
        list(read_records(f))


def test_an_error_inside_the_writer_leaves_no_partial_shard_or_temp_file(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(out, shard_records=10) as w:
        for r in _records(4):
            w.write(r)
        raise RuntimeError("boom")
    assert _leftovers(out) == []
    assert w.shards == []


def test_an_error_after_a_finished_shard_keeps_only_that_whole_shard(tmp_path):
    out = tmp_path / "out"
    recs = _records(5)
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(out, shard_records=3) as w:
        for r in recs:
            w.write(r)
        raise RuntimeError("boom")
    assert _leftovers(out) == ["part-00000.jsonl.zst"]  # the finished one; part-00001 was never renamed
    assert list(read_records(out / "part-00000.jsonl.zst")) == recs[:3]
