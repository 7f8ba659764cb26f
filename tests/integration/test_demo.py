"""`moeforge demo --quick` on built-in data: every stage runs and leaves its artifacts, no downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(400)
def test_quick_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "moeforge", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "160", "MPLCONFIGDIR": str(tmp_path / "mpl")},
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "next:" in r.stdout and "test loss/math" in r.stdout
    for name in ("loss.png", "routing_load.png", "affinity.png", "summary.json", "data/report.html"):
        p = out / name
        assert p.is_file() and p.stat().st_size > 1000, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["train"]["steps"] == 60
    assert set(s["tokens"]) == {"train", "valid", "test"}
    assert Path(s["checkpoint"]).name == "step-00000060"
    losses = [json.loads(x)["loss"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["split"] == "train"]  # fmt: skip
    assert losses[-1] < losses[0] - 1.0  # it learned something in 60 steps
