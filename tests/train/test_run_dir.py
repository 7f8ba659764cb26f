"""One training run per directory: a second trainer on the same directory is refused while the first
holds it, starting over on an earlier run's checkpoints needs --overwrite (or --resume to continue), and
its metrics are never truncated by a run that does not resume them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeforge.io import DirectoryLockedError
from moeforge.train.checkpoint import CheckpointError, list_checkpoints
from moeforge.train.config import load_train_config
from moeforge.train.distributed import DistInfo
from moeforge.train.run import run_training
from moeforge.train.trainer import Trainer

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _lines(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


def test_a_second_trainer_on_a_directory_in_use_is_refused(make_config, tmp_path: Path) -> None:
    cfg = load_train_config(make_config.write(tmp_path / "c.yaml", make_config(tmp_path / "run", steps=4)))
    first = Trainer.from_config(cfg, CPU)
    try:
        with pytest.raises(DirectoryLockedError, match=r"in use by another process \(pid \d+\)"):
            Trainer.from_config(cfg, CPU)
    finally:
        first.close()
    Trainer.from_config(cfg, CPU).close()  # released: the directory is free again


def test_the_lock_is_held_across_processes(make_config, tmp_path: Path) -> None:
    cfg = load_train_config(make_config.write(tmp_path / "c.yaml", make_config(tmp_path / "run", steps=4)))
    first = Trainer.from_config(cfg, CPU)
    try:
        code = (
            "import sys; from moeforge.io import DirectoryLock, DirectoryLockedError\n"
            f"try:\n    DirectoryLock({str(tmp_path / 'run')!r})\nexcept DirectoryLockedError as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    finally:
        first.close()
    assert r.returncode == 3 and "in use by another process" in r.stdout


def test_starting_over_on_an_earlier_runs_checkpoints_needs_overwrite(make_config, tmp_path: Path) -> None:
    path = make_config.write(tmp_path / "c.yaml", make_config(tmp_path / "run", steps=4, checkpoint_every=2))
    run_training(path)
    before = _lines(tmp_path / "run")
    with pytest.raises(
        CheckpointError, match=r"earlier run's checkpoints \(latest step 4\).*--resume.*--overwrite"
    ):
        run_training(path, ["steps=8"])
    assert _lines(tmp_path / "run") == before  # nothing truncated, nothing pruned
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    res = run_training(path, ["steps=8"], resume=True)  # continuing keeps every logged step once
    assert res.steps == 8
    steps = [json.loads(x)["step"] for x in _lines(tmp_path / "run") if json.loads(x)["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    res = run_training(path, ["steps=2"], overwrite=True)  # replacing starts a fresh log
    assert res.steps == 2
    assert max(json.loads(x)["step"] for x in _lines(tmp_path / "run")) == 2
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]


def test_cli_refusal_is_a_clear_error(make_config, tmp_path: Path) -> None:
    path = make_config.write(tmp_path / "c.yaml", make_config(tmp_path / "run", steps=2, checkpoint_every=2))
    run_training(path)
    r = subprocess.run(
        [sys.executable, "-m", "moeforge", "train", str(path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


def test_two_fresh_runs_with_one_seed_save_the_same_rng_state(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run on a machine measures the peak FLOP/s (and caches it), the second reads the cache:
    their saved RNG states must still be equal."""
    monkeypatch.setenv("MOEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    states = []
    for name in ("a", "b"):
        c = make_config(tmp_path / name, steps=2, checkpoint_every=2)
        c.pop("peak_flops", None)  # measured (first run) or read from the cache (second run)
        run_training(make_config.write(tmp_path / f"{name}.yaml", c))
        (ck,) = [p for _, p in list_checkpoints(tmp_path / name)]
        states.append((ck / "rng.safetensors").read_bytes())
    assert (tmp_path / "cache" / "peak_flops.json").is_file()
    assert states[0] == states[1]
