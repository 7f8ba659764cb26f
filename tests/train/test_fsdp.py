"""FSDP2 on 2 CPU processes (gloo): the same losses as one process holding the same global batch,
sharded checkpoints (torch.distributed.checkpoint) that resume exactly, and a consolidated
model.safetensors a single process can evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import torchrun_train
from moeforge.model.config import ModelConfig
from moeforge.train.build import build_model, open_splits
from moeforge.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from moeforge.train.config import OptimConfig
from moeforge.train.distributed import DistInfo
from moeforge.train.evaluation import eval_batches, evaluate
from moeforge.train.optim import build_optimizer
from moeforge.train.run import run_training
from train.conftest import write_token_dir

pytestmark = pytest.mark.slow


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    """13 valid and test samples: the processes hold unequal numbers of test batches (7 and 6 samples),
    which a sharded model's evaluation must pad with forwards (its all-gathers are collectives)."""
    return write_token_dir(tmp_path / "tokens", n_valid=13)


STEPS = 6


def _rows(run: Path, split: str) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


def _events(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "event"]


def _torchrun(cfg: Path, *args: str) -> str:
    return torchrun_train(cfg, *args, timeout=150)


@pytest.mark.timeout(240)
def test_fsdp_two_processes_match_one_and_resume_from_sharded_checkpoints(
    make_config, tmp_path: Path
) -> None:
    base = make_config(
        tmp_path / "x",
        steps=STEPS,
        grad_accum=2,  # FSDP reduce-scatters each micro-batch; the sum is the same
        checkpoint_every=3,
        keep_last=3,
        eval={"every": 3, "max_batches": 2},
    )
    # no router noise (each process would draw its own); tied head: one tensor under two names
    base["model_overrides"]["moe"]["router_noise_std"] = 0.0
    base["model_overrides"]["tie_embeddings"] = True
    base["optim"]["grad_clip"] = 0.5  # clipping over DTensor gradients: the global norm
    # a ghost expert (5 expert rows: shards of 3 and 2) woken at once, its rows blended by α on their shard
    base["model_overrides"]["moe"]["num_ghost_experts"] = 1
    base["ghost"] = {"enabled": True, "signal": "load", "load_factor": 0.01, "window": 1, "ramp_steps": 3}

    one = tmp_path / "one"
    run_training(make_config.write(tmp_path / "one.yaml", dict(base, out_dir=str(one), micro_batch=4)))
    two = tmp_path / "two"
    two_cfg = dict(base, out_dir=str(two), micro_batch=2, distributed="fsdp")
    _torchrun(make_config.write(tmp_path / "two.yaml", two_cfg))

    # 1. the same per-step losses (and grad norms, validation losses) as one process
    a, b = _rows(one, "train"), _rows(two, "train")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
    va, vb = _rows(one, "valid"), _rows(two, "valid")
    assert sorted(va) == sorted(vb) == [3, 6]
    for step in va:
        assert vb[step]["loss"] == pytest.approx(va[step]["loss"], rel=1e-5), step
    wakes = [r for r in _events(two) if r.get("ghost") == "wake"]
    assert wakes and wakes == [r for r in _events(one) if r.get("ghost") == "wake"]
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert sb["status"] == "completed"
    assert sb["test"]["tokens"] == sa["test"]["tokens"] == 13 * 32
    assert sb["test"]["loss"] == pytest.approx(sa["test"]["loss"], rel=1e-5)

    # the checkpoints: DCP shards of both processes, the consolidated weights, all checksummed
    ckpts = list_checkpoints(two)
    assert [s for s, _ in ckpts] == [3, 6]
    last = ckpts[-1][1]
    verify_checkpoint(last)
    assert {p.name for p in (last / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert not (last / "optimizer.safetensors").exists()
    assert not list((two / "checkpoints").glob(".step-*"))  # no temporary directory left behind
    state = json.loads((last / "state.json").read_text())
    assert state["sharded"] == "dcp" and state["world_size"] == 2
    w1 = load_file(str(latest_checkpoint(one) / "model.safetensors"))
    w2 = load_file(str(last / "model.safetensors"))
    assert sorted(w1) == sorted(w2)  # the tied head stored once, like a single process stores it
    assert "lm_head.weight" not in w2
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), k

    # 2. the consolidated model.safetensors in one process: the validation loss FSDP reported
    mc = ModelConfig.model_validate(json.loads((two / "config.json").read_text())["model"])
    model = build_model(mc, seed=0, device=torch.device("cpu"))
    load_checkpoint(last, model, None, restore_rng_state=False)
    valid = open_splits(Path(base["data"]["tokens"])).valid
    assert valid is not None
    res = evaluate(
        model,
        eval_batches(valid, 4, max_batches=2),  # the same 8 samples as 2 ranks × 2
        valid.domains,
        device=torch.device("cpu"),
        info=DistInfo(0, 1, 0, torch.device("cpu")),
    )
    assert res["loss"] == pytest.approx(vb[STEPS]["loss"], rel=1e-6)

    # a single (or DDP) process cannot continue it: its optimizer state exists as shards only
    with pytest.raises(CheckpointError, match="distributed: fsdp"):
        load_checkpoint(last, model, build_optimizer(model, OptimConfig()), restore_rng_state=False)

    # 3. resumed under FSDP from the step-3 checkpoint: the uninterrupted run's losses and weights
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")
    (resumed / "summary.json").unlink()
    log = _torchrun(
        make_config.write(tmp_path / "resumed.yaml", dict(two_cfg, out_dir=str(resumed))), "--resume"
    )
    assert log.count("resumed from") == 2 and "step-00000003 (step 3)" in log  # both processes loaded it
    c = _rows(resumed, "train")
    assert sorted(c) == list(range(1, STEPS + 1))
    for step in range(4, STEPS + 1):
        assert c[step]["loss"] == b[step]["loss"], step  # bit for bit
    w3 = load_file(str(latest_checkpoint(resumed) / "model.safetensors"))
    for k in w2:
        assert torch.allclose(w3[k], w2[k], rtol=1e-6, atol=1e-7), k
