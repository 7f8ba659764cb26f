"""Fuzzing the readers: whatever bytes a file holds — random bytes, a valid file cut at a random point,
nesting deeper than the parser's recursion limit, numbers longer than Python converts — reading never
raises, and for JSON Lines every line comes out as exactly one item or one quarantine record."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moeforge.data.sources import Quarantined, RawItem, read_source

SEEDS = range(25)


def _valid_jsonl(rng: random.Random, n: int) -> bytes:
    rows = [
        json.dumps({"text": "x" * rng.randint(0, 40), "id": i, "tags": ["a", {"b": i}]}) for i in range(n)
    ]
    return ("\n".join(rows) + "\n").encode()


def _mutations(rng: random.Random, valid: bytes) -> list[bytes]:
    deep = rng.randint(3000, 30000)
    return [
        rng.randbytes(rng.randint(0, 400)),  # random bytes
        valid[: rng.randint(0, len(valid))],  # truncated at a random point
        valid[: len(valid) // 2] + rng.randbytes(50) + valid[len(valid) // 2 :],  # garbage spliced in
        b"[" * deep + b"]" * deep,  # nesting past the recursion limit
        b'{"a": ' * deep + b"1" + b"}" * deep,
        b'{"n": ' + b"9" * 6000 + b"}",  # past Python's int-string digit limit
    ]


def _read(path: Path, fmt: str) -> list[RawItem | Quarantined]:
    return list(read_source(str(path), fmt=fmt))  # must not raise, whatever the content


@pytest.mark.parametrize("seed", SEEDS)
def test_jsonl_every_line_is_one_item_or_one_quarantine(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    valid = _valid_jsonl(rng, 8)
    for k, bad in enumerate(_mutations(rng, valid)):
        lines = valid.splitlines(keepends=True)
        lines.insert(rng.randint(0, len(lines)), bad.replace(b"\n", b" ") + b"\n")
        path = tmp_path / f"{k}.jsonl"
        path.write_bytes(b"".join(lines))
        out = _read(path, "jsonl")
        assert len(out) == len(lines), (seed, k)
        assert [o.line for o in out] == list(range(1, len(lines) + 1))
        assert sum(isinstance(o, RawItem) for o in out) >= 8  # the valid rows all survive
        for q in (o for o in out if isinstance(o, Quarantined)):
            assert q.error and q.line is not None


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fmt", ["json", "txt", "csv", "parquet"])
def test_no_format_raises_on_any_content(seed: int, fmt: str, tmp_path: Path) -> None:
    rng = random.Random(seed)
    valid = {
        "json": json.dumps([{"text": f"row {i}", "v": [i, {"w": i}]} for i in range(6)]).encode(),
        "txt": b"first paragraph\n\nsecond one\n\nthird\n",
        "csv": b'question,answer\nwhat,that\n"quoted, comma",x\n',
        "parquet": b"PAR1" + rng.randbytes(64) + b"PAR1",
    }[fmt]
    for k, bad in enumerate(_mutations(rng, valid)):
        path = tmp_path / f"{k}.{fmt}"
        path.write_bytes(bad)
        out = _read(path, fmt)
        assert all(isinstance(o, (RawItem, Quarantined)) for o in out)
        for q in (o for o in out if isinstance(o, Quarantined)):
            assert q.error and q.uri == str(path)


def test_deep_nesting_in_a_json_array_is_quarantined_naming_the_element(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"ok": 1}, ' + b"[" * 50000 + b"]" * 50000 + b"]")
    out = _read(path, "json")
    assert isinstance(out[0], RawItem)
    assert isinstance(out[1], Quarantined) and "array element 1" in out[1].error
    assert "RecursionError" in out[1].error
