"""`parallel.expert: 2` under torchrun (2 gloo processes): training matches one process holding the same
global batch, and checkpoints move between layouts — one written under expert parallelism resumes without
it, and one written without it resumes under it, continuing the same losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from launch import torchrun_train
from moeforge.train.checkpoint import latest_checkpoint
from moeforge.train.run import run_training

pytestmark = pytest.mark.slow


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _torchrun(cfg: Path, *extra: str) -> None:
    torchrun_train(cfg, *extra)


def _resume_copy(src: Path, dst: Path, keep_step: int) -> None:
    """``src``'s run directory as it was at checkpoint ``keep_step`` (later checkpoints removed)."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name.startswith("step-") and int(d.name.split("-")[1]) > keep_step:
            shutil.rmtree(d)


@pytest.mark.timeout(600)
def test_expert_parallel_training_matches_one_process_and_checkpoints_cross_layouts(
    make_config, tmp_path: Path
) -> None:
    base: dict[str, Any] = make_config(
        tmp_path / "x", steps=8, grad_accum=1, checkpoint_every=2, keep_last=10
    )
    base["model_overrides"]["moe"]["router_noise_std"] = 0.0  # each process would draw its own noise
    single = dict(base, out_dir=str(tmp_path / "one"), micro_batch=4)
    run_training(make_config.write(tmp_path / "one.yaml", single))

    ep = dict(base, out_dir=str(tmp_path / "ep"), micro_batch=2, parallel={"expert": 2})
    _torchrun(make_config.write(tmp_path / "ep.yaml", ep))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "ep")
    assert sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    # the checkpoint holds whole expert tensors: the same file one process writes
    a = load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ep") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k

    # written under EP, resumed with DDP only (same 2 processes)
    _resume_copy(tmp_path / "ep", tmp_path / "ddp", keep_step=4)
    ddp = dict(base, out_dir=str(tmp_path / "ddp"), micro_batch=2)
    _torchrun(make_config.write(tmp_path / "ddp.yaml", ddp), "--resume")
    resumed = _losses(tmp_path / "ddp")
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(two[step], rel=1e-5, abs=1e-6), step

    # written without EP (the DDP run's step 6), resumed under EP
    _resume_copy(tmp_path / "ddp", tmp_path / "ep2", keep_step=6)
    ep2 = dict(ep, out_dir=str(tmp_path / "ep2"))
    _torchrun(make_config.write(tmp_path / "ep2.yaml", ep2), "--resume")
    again = _losses(tmp_path / "ep2")
    for step in (7, 8):
        assert again[step] == pytest.approx(two[step], rel=1e-5, abs=1e-6), step


def test_expert_parallel_needs_as_many_processes_as_its_degree(make_config, tmp_path: Path) -> None:
    from moeforge.config import ConfigError

    cfg = dict(make_config(tmp_path / "x", steps=2), parallel={"expert": 2})
    with pytest.raises(ConfigError, match=r"parallel\.expert=2 needs exactly that many processes"):
        run_training(make_config.write(tmp_path / "x.yaml", cfg))
