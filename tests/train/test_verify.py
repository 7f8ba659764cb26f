"""Checkpoints carry the sha256 of every file: `moeforge train verify` and every load find one flipped
byte, naming the file; resume refuses a corrupt checkpoint instead of training on it (issue 14)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.io import verify_checksums, write_checksums
from moeforge.pretrained import ModelImportError, load_model
from moeforge.train.checkpoint import CheckpointError, list_checkpoints
from moeforge.train.run import run_training

MOEFORGE = [sys.executable, "-m", "moeforge"]


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_checksums_name_each_changed_missing_or_resized_file(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"abc" * 100)
    (d / "sub" / "b.txt").write_text("hello")
    (d / "c").write_bytes(b"x")
    write_checksums(d)
    assert verify_checksums(d) == []
    _flip(d / "a.bin")
    (d / "sub" / "b.txt").write_text("hello!")
    (d / "c").unlink()
    (d / "later.json").write_text("{}")  # files added afterwards are not corruption
    problems = verify_checksums(d)
    assert len(problems) == 3, problems
    assert "a.bin: sha256 differs" in problems[0]
    assert "c: missing" in problems[1]
    assert "b.txt: 6 bytes, 5 when written" in problems[2]
    (d / "checksums.json").write_text("{trunc")
    assert "unreadable" in verify_checksums(d)[0]


@pytest.fixture
def trained(make_config, tmp_path: Path) -> Path:
    path = make_config.write(tmp_path / "c.yaml", make_config(tmp_path / "run", steps=4, checkpoint_every=2))
    run_training(path)
    return path


@pytest.mark.parametrize(
    "victim", ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
)
def test_one_flipped_byte_in_any_checkpoint_file_is_found(trained: Path, tmp_path: Path, victim: str) -> None:
    run = tmp_path / "run"
    ok = subprocess.run([*MOEFORGE, "train", "verify", str(run)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("ok ") == 2
    (_, first), (_, last) = list_checkpoints(run)
    _flip(last / victim)
    bad = subprocess.run(
        [*MOEFORGE, "train", "verify", str(run)], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1, bad.stdout
    assert f"{victim}: sha256 differs" in bad.stdout.replace("\n", "")
    assert "1 of 2 checkpoint(s) corrupt" in bad.stdout
    one = subprocess.run(
        [*MOEFORGE, "train", "verify", str(first)], capture_output=True, text=True, timeout=120
    )
    assert one.returncode == 0
    with pytest.raises(CheckpointError, match=rf"corrupt checkpoint.*{victim}"):
        run_training(trained, ["steps=6"], resume=True)
    with pytest.raises(ModelImportError, match="corrupt checkpoint"):
        load_model(last)


def test_verify_is_a_clear_error_for_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    r = subprocess.run(
        [*MOEFORGE, "train", "verify", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "no checkpoint here" in r.stderr and "Traceback" not in r.stderr
