"""Atomic writes and hashing: a failed write never leaves a torn or partial target."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from moeforge.io import atomic_directory, atomic_write_json, atomic_write_text, sha256_file


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_atomic_write_json_is_stable_for_equal_objects(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    atomic_write_json(a, {"b": 1, "a": [1, 2]})
    atomic_write_json(b, {"a": [1, 2], "b": 1})
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(a.read_text()) == {"a": [1, 2], "b": 1}


def test_atomic_directory_failure_leaves_existing_target_untouched(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "f").write_text("new")
        raise RuntimeError("crash mid-write")
    assert (target / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_refuses_existing_target_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(FileExistsError, match="overwrite"), atomic_directory(target):
        pass


def test_atomic_directory_overwrite_replaces_whole_directory(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "stale").write_text("x")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "fresh").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]


def test_sha256_file_matches_hashlib(tmp_path):
    f = tmp_path / "blob"
    data = bytes(range(256)) * 10_000
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_sha256_file_reads_an_fsspec_uri_as_the_same_bytes(tmp_path):
    pytest.importorskip("fsspec")
    f = tmp_path / "remote.bin"
    f.write_bytes(bytes(range(256)) * 9000)  # more than one 1 MiB chunk
    assert sha256_file(f"file://{f}") == sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_atomic_directory_gives_weights_the_umask_modes_not_owner_only(tmp_path):
    """safetensors writes 0600; a checkpoint or export must be readable like every other file (0644)."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from moeforge.io import atomic_directory

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "ckpt") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "tokenizer").mkdir(mode=0o700)
            (tmp / "tokenizer" / "a.json").write_text("{}")
    finally:
        os.umask(old)
    out = tmp_path / "ckpt"
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "tokenizer").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "tokenizer" / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_safetensors_with_metadata_have_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """safetensors orders the header's metadata by a per-process hash seed: an export's sha256 changed
    from one run to the next (found by the fault suite's export rerun). save_safetensors sorts it."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from moeforge.io import save_safetensors; "
        "save_safetensors({'w': torch.arange(6.0).reshape(2, 3), 'b': torch.ones(2, dtype=torch.float16)}, "
        "sys.argv[1], metadata={'format': 'pt', 'producer': 'moeforge', 'é': 'ü'})"
    )
    digests = set()
    for i in range(4):  # four processes: the hash map's seed is random in each
        out = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert load_file(out)["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "producer": "moeforge", "é": "ü"}
