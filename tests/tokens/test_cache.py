"""The pretokenized cache: any changed input gives a new entry, names cannot escape the root,
clean-invalid removes exactly the broken entries, and two writers cannot corrupt an entry."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.tokens import cache
from moeforge.tokens.tokenize import tokenize_run
from moeforge.tokens.tokenizer import TokenizerConfig, train_tokenizer

MOEFORGE = [sys.executable, "-m", "moeforge"]


def test_a_second_call_is_a_hit_and_every_input_change_is_a_new_entry(
    token_run: Path, token_tokenizer: Path, tmp_path: Path, make_token_run
) -> None:
    root = tmp_path / "cache"
    first = tokenize_run(token_run, token_tokenizer, seq_len=64, cache_root=root)
    assert first.built and first.path.parent == root
    assert first.path.name.startswith("mix_tok-") and first.path.name.split("_")[-2] == "64"
    again = tokenize_run(token_run, token_tokenizer, seq_len=64, cache_root=root)
    assert not again.built and again.path == first.path

    other_tok = train_tokenizer(token_run, tmp_path / "tok2", TokenizerConfig(vocab_size=500))
    variants = [
        tokenize_run(token_run, other_tok, seq_len=64, cache_root=root),  # tokenizer content
        tokenize_run(token_run, token_tokenizer, seq_len=32, cache_root=root),  # seq_len
        tokenize_run(token_run, token_tokenizer, seq_len=64, mode="sft", cache_root=root),  # mode
        tokenize_run(token_run, token_tokenizer, seq_len=64, max_records=50, cache_root=root),  # sample count
    ]
    # the same data re-run into another directory with one more record changes the run manifest
    run2 = make_token_run(tmp_path / "r2", n_chats=301)
    variants.append(tokenize_run(run2, token_tokenizer, seq_len=64, cache_root=root))
    paths = {first.path, *(v.path for v in variants)}
    assert len(paths) == 6 and all(v.built for v in variants)
    fps = {json.loads((p / "manifest.json").read_text())["fingerprint"] for p in paths}
    assert len(fps) == 6


def test_same_tokenizer_name_with_changed_content_is_not_served_stale(
    token_run: Path, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    tok = train_tokenizer(token_run, tmp_path / "tok", TokenizerConfig(vocab_size=500))
    a = tokenize_run(token_run, tok, seq_len=64, cache_root=root)
    train_tokenizer(token_run, tmp_path / "tok", TokenizerConfig(vocab_size=700))  # same path, new bytes
    b = tokenize_run(token_run, tok, seq_len=64, cache_root=root)
    assert b.built and b.path != a.path
    assert b.manifest["tokenizer"]["vocab_size"] != a.manifest["tokenizer"]["vocab_size"]


@pytest.mark.parametrize(
    ("dataset", "expect"),
    [
        ("openai/gsm8k_main", "openai_gsm8k_main"),
        ("../../etc/passwd", "etc_passwd"),
        ("..", "x"),
        ("/abs/path", "abs_path"),
        ("name with spaces & ünïcode", "name_with_spaces_n_code"),
        ("-rf", "rf"),
    ],
)
def test_names_are_readable_and_cannot_escape_the_root(dataset: str, expect: str, tmp_path: Path) -> None:
    name = cache.entry_name(dataset, "tok-12345678", 1024, "9e8d7c6b" * 8)
    assert name == f"{expect}_tok-12345678_1024_9e8d7c6b"
    assert "/" not in name and not name.startswith(".")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    with pytest.raises(cache.CacheError):
        cache.entry_name(dataset, "tok", 8, "../../x")


def _entry(token_run: Path, tok: Path, root: Path, seq_len: int) -> Path:
    return tokenize_run(token_run, tok, seq_len=seq_len, cache_root=root).path


def test_clean_invalid_removes_broken_entries_and_nothing_else(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    good = _entry(token_run, token_tokenizer, root, 16)
    corrupt = _entry(token_run, token_tokenizer, root, 24)
    missing = _entry(token_run, token_tokenizer, root, 32)
    no_manifest = _entry(token_run, token_tokenizer, root, 40)
    data = bytearray((corrupt / "train.bin").read_bytes())
    data[10] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    (corrupt / "train.bin").write_bytes(bytes(data))
    (missing / "valid.idx").unlink()
    (no_manifest / "manifest.json").unlink()
    unfinished = root / f".tmp-{good.name}-999999-deadbeef"
    unfinished.mkdir()
    (unfinished / "train.bin").write_bytes(b"partial")

    status = {e.name: e.status for e in cache.list_entries(root, deep=True)}
    assert status[good.name] == "ok" and status[unfinished.name] == "unfinished"
    assert "sha256" in status[corrupt.name] and "missing" in status[missing.name]
    assert "manifest" in status[no_manifest.name]

    removed = cache.clean_invalid(root)
    assert sorted(removed) == sorted([corrupt.name, missing.name, no_manifest.name, unfinished.name])
    assert [e.name for e in cache.list_entries(root)] == [good.name]
    assert cache.check_entry(good) == []
    assert cache.clean_invalid(root) == []


def test_clean_removes_named_entries_and_refuses_unknown_names(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    a = _entry(token_run, token_tokenizer, root, 16)
    b = _entry(token_run, token_tokenizer, root, 24)
    with pytest.raises(cache.CacheError, match="no cache entry named nope"):
        cache.clean(root, names=["nope"])
    assert cache.clean(root, names=[a.name]) == [a.name]
    assert [e.name for e in cache.list_entries(root)] == [b.name]
    assert cache.clean(root, older_than_days=1) == []  # b is fresh
    assert cache.clean(root) == [b.name]


def _build_in_child(args: tuple[str, str, str]) -> str:
    run, tok, root = args
    return str(tokenize_run(run, tok, seq_len=48, cache_root=root).path)


def test_two_processes_writing_the_same_entry_cannot_corrupt_it(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.map(_build_in_child, [(str(token_run), str(token_tokenizer), str(root))] * 2)
    assert paths[0] == paths[1]
    entries = cache.list_entries(root, deep=True)
    assert [e.status for e in entries] == ["ok"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_an_interrupted_build_leaves_no_entry(token_run: Path, token_tokenizer: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"

    def boom(split: str, done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tokenize_run(token_run, token_tokenizer, seq_len=64, cache_root=root, progress=boom)
    assert cache.list_entries(root) == []


def test_cli_tokenize_and_cache_commands(token_run: Path, token_tokenizer: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MOEFORGE_CACHE_DIR": str(tmp_path / "c"), "COLUMNS": "200"}
    r = subprocess.run(
        [*MOEFORGE, "data", "tokenize", str(token_run), "--tokenizer", str(token_tokenizer), "--seq-len", "64", "--sft"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "efficiency" in r.stdout and "built" in r.stdout
    r = subprocess.run(
        [*MOEFORGE, "data", "cache", "list"], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 0 and "ok" in r.stdout and "mix_tok" in r.stdout
    name = cache.list_entries(tmp_path / "c" / "tokens")[0].name
    r = subprocess.run(
        [*MOEFORGE, "data", "cache", "info", name], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 0 and json.loads(r.stdout)["problems"] == []
    r = subprocess.run(
        [*MOEFORGE, "data", "cache", "info", "../etc"], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 2 and "no cache entry" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [*MOEFORGE, "data", "tokenize", str(tmp_path / "nope"), "--tokenizer", str(token_tokenizer), "--seq-len", "8"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr
    r = subprocess.run(
        [*MOEFORGE, "data", "cache", "clean-invalid"], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 0 and "removed 0" in r.stdout


def test_a_record_line_packing_cannot_read_names_its_file_and_line(
    token_run: Path, token_tokenizer: Path, tmp_path: Path
) -> None:
    """tokenize reads only the fields packing needs (a partial decode); a line without them is a clear
    error naming the shard and line, even when the file matches its manifest entry."""
    import hashlib
    import json
    import shutil

    import zstandard

    from moeforge.data.store import iter_line_bytes

    run = Path(shutil.copytree(token_run, tmp_path / "run"))
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    shard = manifest["outputs"]["train"][0]
    lines = list(iter_line_bytes(run / shard["path"]))
    lines[4] = b'{"id":"x","text":"no meta here"}'
    data = zstandard.ZstdCompressor(level=3).compress(b"\n".join(lines) + b"\n")
    (run / shard["path"]).write_bytes(data)
    shard.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(
        ValueError, match=rf"{shard['path']}:5: not a record of the dataset contract .*`meta`"
    ):
        tokenize_run(run, token_tokenizer, seq_len=64, out=tmp_path / "out")
