"""torchrun with 2 CPU processes (gloo, DDP) matches one process holding the same global batch."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import torchrun_train
from moeforge.train.checkpoint import latest_checkpoint
from moeforge.train.run import run_training


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _valid(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "valid"]


@pytest.mark.timeout(300)
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(make_config, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    base = make_config(tmp_path / "x", steps=8, grad_accum=1)
    # no router noise: each process would draw its own; aux-free biases stay on (loads are all-reduced)
    base["model_overrides"]["moe"]["router_noise_std"] = 0.0

    single = dict(base, out_dir=str(tmp_path / "one"), micro_batch=4)
    run_training(make_config.write(tmp_path / "one.yaml", single))

    ddp = dict(base, out_dir=str(tmp_path / "two"), micro_batch=2)
    torchrun_train(make_config.write(tmp_path / "two.yaml", ddp))

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    assert _valid(tmp_path / "two") == pytest.approx(_valid(tmp_path / "one"), rel=1e-5)
    a = load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "two") / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    # only rank 0 wrote: one metrics file, one summary, checkpoints once
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["status"] == "completed"
