"""The trainer: schedule, parameter groups, eval per domain, collapse stop, the resource guard, and a run
killed with SIGKILL and resumed that matches an uninterrupted one bit for bit."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeforge.config import ConfigError
from moeforge.model.config import load_model_config
from moeforge.model.transformer import MoETransformer
from moeforge.train.checkpoint import latest_checkpoint, list_checkpoints
from moeforge.train.config import OptimConfig, TrainConfig
from moeforge.train.guard import ResourceError
from moeforge.train.optim import lr_at, param_groups
from moeforge.train.run import run_training


def _train_losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            out[row["step"]] = row["loss"]
    return out


def test_lr_warms_up_then_decays_to_min_lr_at_the_horizon() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)
    rates = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_no_weight_decay_on_norms_biases_and_embeddings() -> None:
    model = MoETransformer(load_model_config("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert any("norm" in n for n in nd) and any("embed" in n for n in nd)
    assert not any("embed" in names[id(p)] or "norm" in names[id(p)] for p in decay["params"])
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == total


def test_a_run_learns_evaluates_per_domain_and_keeps_last_and_best(make_config, tmp_path: Path) -> None:
    cfg = make_config.write(tmp_path / "c.yaml", make_config(tmp_path / "run", steps=16, keep_last=1))
    res = run_training(cfg)
    assert res.status == "completed" and res.steps == 16
    losses = _train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 0.5  # it learns
    assert {"loss", "ppl", "loss/count", "loss/echo", "ppl/echo"} <= set(res.final_valid)
    assert res.final_valid["ppl"] == pytest.approx(math.exp(res.final_valid["loss"]))
    assert {"loss/count", "loss/echo"} <= set(res.test)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["params_active"] < summary["params_total"]
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    best = min(
        (json.loads((p / "state.json").read_text())["metric"], s)
        for s, p in list_checkpoints(tmp_path / "run")
        if json.loads((p / "state.json").read_text())["metric"] is not None
    )[1]
    assert steps[-1] == 16 and best in steps and len(steps) <= 2  # the last one and the best one
    row = next(json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    for key in (
        "moe/L0/load_max",
        "moe/L0/entropy_token",
        "moe/L0/lb_loss_scaled",
        "tokens_per_s",
        "mfu",
        "lr",
    ):
        assert key in row, key


def test_sigkill_then_resume_gives_bit_identical_losses_and_weights(make_config, tmp_path: Path) -> None:
    steps = 24
    ref_cfg = make_config.write(tmp_path / "ref.yaml", make_config(tmp_path / "ref", steps=steps))
    run_training(ref_cfg)

    cfg = make_config.write(tmp_path / "k.yaml", make_config(tmp_path / "k", steps=steps))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeforge.train", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = list_checkpoints(tmp_path / "k")
        if found and found[-1][0] >= 8:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = list_checkpoints(tmp_path / "k")[-1][0]
    assert 8 <= killed_at < steps, "the run must be killed mid-way"
    assert not (tmp_path / "k" / "summary.json").exists()

    res = run_training(cfg, resume=True)
    assert res.steps == steps
    assert _train_losses(tmp_path / "k") == _train_losses(tmp_path / "ref")  # exact floats
    a = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "k") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_state = json.loads((latest_checkpoint(tmp_path / "ref") / "state.json").read_text())
    k_state = json.loads((latest_checkpoint(tmp_path / "k") / "state.json").read_text())
    assert ref_state["loader"] == k_state["loader"] and ref_state["rng"] == k_state["rng"]


def test_collapse_with_action_stop_ends_the_run_and_records_step_and_layer(
    make_config, tmp_path: Path
) -> None:
    c = make_config(tmp_path / "run", steps=30)
    c["model_overrides"]["moe"].update(lb_coef=0.0, router_noise_std=0.0, aux_free_bias_rate=0.0)
    c["collapse"] = {"threshold": 0.3, "patience": 2, "action": "stop"}  # top-1 of 4: balanced is 0.25
    res = run_training(make_config.write(tmp_path / "c.yaml", c))
    assert res.status == "collapsed" and res.steps < 30
    ev = res.collapse_events[0]
    assert ev["step"] == res.steps and ev["layer"] in (0, 1) and ev["fraction"] > 0.3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "collapsed" and summary["collapse_events"][0]["step"] == ev["step"]
    assert latest_checkpoint(tmp_path / "run") is not None  # stopped with a checkpoint to inspect


def test_the_guard_refuses_cluster_only_and_oversized_runs_before_allocating(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALLOW_LOCAL_TRAIN", raising=False)
    c = make_config(tmp_path / "run")
    c["model"], c["model_overrides"] = "oracle-850b", {}
    with pytest.raises(ResourceError, match="ALLOW_LOCAL_TRAIN"):
        run_training(make_config.write(tmp_path / "a.yaml", c))
    c = make_config(tmp_path / "run")
    c["model"], c["model_overrides"] = (
        "small",
        {"d_model": 8192, "n_heads": 64, "n_kv_heads": 8, "n_layers": 32},
    )
    with pytest.raises(ResourceError, match="GiB"):
        run_training(make_config.write(tmp_path / "b.yaml", c))


def test_bad_configs_are_clear_errors(make_config, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        TrainConfig.model_validate({"data": {}})
    c = make_config(tmp_path / "run")
    c["optim"]["min_lr"] = 1.0
    with pytest.raises(ConfigError, match="min_lr"):
        run_training(make_config.write(tmp_path / "a.yaml", c))
    c = make_config(tmp_path / "run")
    c["stepz"] = 3
    r = subprocess.run(
        [sys.executable, "-m", "moeforge", "train", str(make_config.write(tmp_path / "b.yaml", c))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "stepz" in r.stderr and "Traceback" not in r.stderr


def test_ghost_experts_wake_during_training_and_are_logged(make_config, tmp_path: Path) -> None:
    c = make_config(tmp_path / "run", steps=14)
    c["model"], c["model_overrides"] = "ghost-32d", {"max_seq_len": 32}
    # "load" saturation: both routed experts busy (top-1 of 2 at balance: 0.5 each ≥ 0.3 × 1/2)
    c["ghost"] = {"enabled": True, "signal": "load", "threshold": 0.5, "window": 3,
                  "min_fraction_above": 1.0, "ramp_steps": 4, "cooldown_steps": 100, "load_factor": 0.3}  # fmt: skip
    res = run_training(make_config.write(tmp_path / "g.yaml", c))
    assert res.status == "completed"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    wakes = [e for e in summary["ghost_events"] if e["kind"] == "wake"]
    assert len(wakes) == 2 and {e["layer"] for e in wakes} == {0, 1}  # one ghost per layer (cooldown)
    assert all(e["step"] >= 2 for e in wakes)  # not before the window filled
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "event" and r.get("ghost") == "wake" for r in rows)
    w = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    alphas = [w[k].tolist() for k in sorted(w) if k.endswith("ghost_alpha")]
    assert alphas == [[1.0, 0.0], [1.0, 0.0]]  # the first ghost of each layer ramped fully awake


def test_persistent_expert_grads_train_the_same_as_autograds_own(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expert weight gradients written into persistent buffers (model/grad_buffers.py, on by default on
    one CPU process) give the losses of the plain autograd path, with grad_accum 2."""
    from moeforge.model import grad_buffers

    writes: list[bool] = []
    real_target = grad_buffers.target

    def counting_target(w):
        buf, fresh = real_target(w)
        writes.append(fresh)
        return buf, fresh

    monkeypatch.setattr(grad_buffers, "target", counting_target)
    runs = {}
    for on in (True, False):
        writes.clear()
        out = tmp_path / f"run-{on}"
        cfg = make_config.write(
            tmp_path / f"{on}.yaml", make_config(out, steps=6, persistent_expert_grads=on)
        )
        assert run_training(cfg).status == "completed"
        runs[on] = _train_losses(out)
        # on: per step and expert tensor one fresh write, then the second micro-batch adds
        assert (True in writes and False in writes) if on else not writes
    assert runs[True].keys() == runs[False].keys()
    for step, loss in runs[False].items():
        assert runs[True][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
