"""Progress of long commands: bars in a terminal, periodic plain lines (step/total, rate, ETA) elsewhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.cli._progress import Bars, clock, train_fields


def test_clock_and_training_fields() -> None:
    assert clock(95.2) == "1:35" and clock(4000) == "1:06:40" and clock(-3) == "0:00"
    assert train_fields({"loss": 3.14159, "tokens_per_s": 4310.0}) == {
        "loss": "3.1416",
        "_rate": "4.31K tok/s",
    }
    assert train_fields({"loss": 1.0, "tokens_per_s": 0.0}) == {"loss": "1.0000"}


def test_without_a_terminal_lines_come_every_interval_and_at_the_end(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Bars(interactive=False, every=3600) as bars:
        for step in range(1, 11):
            bars.update("train", "train", step, 10, **train_fields({"loss": 2.0, "tokens_per_s": 1500.0}))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines  # the first update, then the finished one; nothing in between
    assert lines[0].startswith("train  1/10 (10%)  loss 2.0000 · 1.50K tok/s  elapsed 0:00  ETA 0:00")
    assert lines[1].startswith("train  10/10 (100%)") and "ETA" not in lines[1]


def test_every_zero_prints_each_update_and_unknown_totals_have_no_eta(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Bars(interactive=False, every=0) as bars:
        bars.update("x", "scan", 5, None)
        bars.update("x", "scan", 7, None)
        bars.print("a note")
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["scan  5  elapsed 0:00", "scan  7  elapsed 0:00"] and "a note" in err


def test_train_in_a_pipe_logs_step_total_rate_and_eta(make_config, tmp_path: Path) -> None:
    cfg = make_config.write(tmp_path / "c.yaml", make_config(tmp_path / "run", steps=6))
    r = subprocess.run(
        [sys.executable, "-m", "moeforge", "train", str(cfg)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("train  ")]
    assert lines and lines[0].startswith("train  1/6 (17%)  loss ") and "ETA" in lines[0]
    assert lines[-1].startswith("train  6/6 (100%)") and "tok/s" in lines[-1]
