"""The emergence experiment: four runs end to end on built-in data (--quick), and findings that follow
the numbers rather than being written in advance."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moeforge.config import ConfigError
from moeforge.eval.experiments import (
    derive_findings,
    load_emergence_config,
    render_report,
    resolve_models,
    routing_stats,
    train_config,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "experiments" / "emergence-tiny.yaml"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moeforge.cli.experiment import app

    out = tmp_path_factory.mktemp("emergence") / "out"
    res = CliRunner().invoke(
        app, ["emergence", str(CONFIG), "--quick", "--out", str(out)], env={"COLUMNS": "200"}
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "report:" in res.output and "Δ vs dense" in res.output
    return out


def _runs(out: Path) -> dict[str, dict[str, Any]]:
    return {r["role"]: r for r in json.loads((out / "results.json").read_text())["runs"]}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_experiment_writes_report_results_and_charts(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    assert [r["role"] for r in results["runs"]] == ["dense", "main", "no_lb", "top2"]
    assert results["domains"] == ["code", "math", "prose"]
    assert len(results["environment"]["loadavg_start"]) == 3
    budget = {r["tokens_seen"] for r in results["runs"]}
    assert budget == {results["settings"]["tokens_per_run"]}  # one token budget for every run
    for r in results["runs"]:
        assert r["status"] == "completed"
        assert (quick_run / r["name"] / "config.yaml").is_file()
        assert {"loss", "loss/code", "loss/math", "loss/prose"} <= set(r["test"])
    report = (quick_run / "report.md").read_text()
    assert "| run | role | active params | total params |" in report and "## Findings" in report
    assert [f["key"] for f in results["findings"]] == [
        "moe_beats_dense",
        "no_lb_collapses",
        "top2_matches_top1",
    ]
    assert all(f["verdict"] in ("held", "did not hold") for f in results["findings"])
    pngs = ["loss.png"] + [
        f"{kind}_{r['name']}.png"
        for r in results["runs"]
        if r["role"] != "dense"
        for kind in ("affinity", "routing_load")
    ]
    for name in pngs:
        assert (quick_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (quick_run / "affinity_dense.png").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dense_baseline_has_no_moe_and_the_main_runs_active_params(quick_run: Path) -> None:
    runs = _runs(quick_run)
    dense, main = runs["dense"], runs["main"]
    assert dense["moe"] is None and dense["moe_layers"] == []
    assert dense["ffn_hidden"] == main["moe"]["top_k"] * main["moe"]["expert_hidden"]
    d_model = json.loads((quick_run / "results.json").read_text())["settings"]["d_model"]
    router = main["moe"]["num_experts"] * d_model * len(main["moe_layers"])
    assert main["params_active"] - dense["params_active"] == router  # only the routers differ
    assert runs["top2"]["params_active"] > main["params_active"]
    assert main["params_total"] > dense["params_total"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_moe_runs_record_routing_loads_and_affinity(quick_run: Path) -> None:
    runs = _runs(quick_run)
    no_lb = runs["no_lb"]
    assert no_lb["moe"]["lb_coef"] == 0.0 and runs["main"]["moe"]["lb_coef"] > 0
    routing = no_lb["routing"]
    assert set(routing["load_max_curve"]) == {f"L{i}" for i in no_lb["moe_layers"]}
    assert 0.0 < routing["load_max_final"] <= 1.0 and routing["load_max_peak"] >= routing["load_max_final"]
    for role in ("main", "no_lb", "top2"):
        aff = runs[role]["affinity"]
        assert set(aff) == {str(i) for i in runs[role]["moe_layers"]}
        for mat in aff.values():
            assert len(mat) == runs[role]["moe"]["num_experts"]
            assert all(abs(sum(col) - 1.0) < 1e-3 for col in zip(*mat, strict=True))  # each domain sums to 1
    assert runs["dense"]["routing"] == {} and runs["dense"]["affinity"] == {}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_flipping_a_loss_in_the_results_flips_the_finding(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    main = next(r for r in results["runs"] if r["role"] == "main")
    dense_loss = next(r for r in results["runs"] if r["role"] == "dense")["test"]["loss"]
    for factor, held in ((0.9, True), (1.1, False)):
        flipped = copy.deepcopy(results)
        next(r for r in flipped["runs"] if r["role"] == "main")["test"]["loss"] = dense_loss * factor
        f = {x.key: x for x in derive_findings(flipped)}["moe_beats_dense"]
        assert f.held is held
        assert f"**{'HELD' if held else 'DID NOT HOLD'}** — study: MoE has lower" in render_report(flipped)
    assert main["test"]["loss"] == results["runs"][1]["test"]["loss"]  # the original is untouched


# ---- findings from synthetic numbers -------------------------------------------------------------------


def _synthetic(
    *, dense: float, main: float, top2: float, collapse_step: int | None, steps: int = 1000
) -> dict[str, Any]:
    def run(name: str, role: str, loss: float, routing: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "name": name,
            "role": role,
            "params_active": 1000,
            "params_total": 4000 if role != "dense" else 1000,
            "test": {"loss": loss, "loss/code": loss, "loss/math": loss},
            "routing": routing or {},
        }

    def routing(peak: float, first: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "load_max_curve": {"L3": [[10, peak]]},
            "load_max_peak": peak,
            "load_max_peak_step": 10,
            "load_max_final": peak,
            "load_at_study_point": {"step": 50, "value": peak},
            "first_collapse": first,
            "balanced_share": 0.125,
        }

    first = (
        None if collapse_step is None else {"step": collapse_step, "layer": 3, "expert": 5, "fraction": 0.9}
    )
    return {
        "settings": {"steps": steps, "collapse_threshold": 0.6, "collapse_patience": 3, "similar_pct": 1.0},
        "domains": ["code", "math"],
        "runs": [
            run("dense", "dense", dense),
            run("top1", "main", main, routing(0.2, None)),
            run("nolb", "no_lb", main, routing(0.9 if first else 0.3, first)),
            run("top2", "top2", top2, routing(0.4, None)),
        ],
    }


def test_findings_held_when_the_numbers_agree_with_the_study() -> None:
    f = {x.key: x for x in derive_findings(_synthetic(dense=2.157, main=2.080, top2=2.077, collapse_step=40))}
    assert all(x.held for x in f.values())
    assert "-3.57%" in f["moe_beats_dense"].evidence
    assert "step 40 (4% of training)" in f["no_lb_collapses"].evidence
    assert "-0.14%" in f["top2_matches_top1"].evidence and "within" in f["top2_matches_top1"].evidence


def test_findings_do_not_hold_when_the_numbers_disagree() -> None:
    f = {x.key: x for x in derive_findings(_synthetic(dense=2.0, main=2.1, top2=2.0, collapse_step=None))}
    assert not any(x.held for x in f.values())
    assert "+5.00%" in f["moe_beats_dense"].evidence
    assert "no collapse" in f["no_lb_collapses"].evidence
    assert "outside" in f["top2_matches_top1"].evidence
    text = render_report(_synthetic(dense=2.0, main=2.1, top2=2.0, collapse_step=None))
    assert text.count("**DID NOT HOLD**") == 3


def test_a_missing_run_is_not_measured_rather_than_judged() -> None:
    results = _synthetic(dense=2.0, main=1.9, top2=1.9, collapse_step=None)
    results["runs"][0]["test"] = {}
    f = {x.key: x for x in derive_findings(results)}
    assert f["moe_beats_dense"].held is None and f["moe_beats_dense"].verdict == "not measured"


def test_routing_stats_take_the_largest_share_over_layers_and_the_first_collapse() -> None:
    rows = [
        {"split": "train", "step": 10, "moe/L2/load_max": 0.3, "moe/L3/load_max": 0.2},
        {"split": "valid", "step": 10, "loss": 5.0},
        {"split": "train", "step": 20, "moe/L2/load_max": 0.5, "moe/L3/load_max": 0.8},
        {"split": "train", "step": 30, "moe/L2/load_max": 0.4, "moe/L3/load_max": 0.7},
    ]
    events = [
        {"layer": 3, "step": 30, "expert": 1, "fraction": 0.7, "consecutive": 2},
        {"layer": 2, "step": 50, "expert": 0, "fraction": 0.9, "consecutive": 2},
    ]
    r = routing_stats(rows, events, steps=100, study_fraction=0.15)
    assert r["load_max_curve"] == {
        "L2": [[10, 0.3], [20, 0.5], [30, 0.4]],
        "L3": [[10, 0.2], [20, 0.8], [30, 0.7]],
    }
    assert (r["load_max_peak"], r["load_max_peak_step"], r["load_max_final"]) == (0.8, 20, 0.7)
    assert r["load_at_study_point"] == {"step": 20, "value": 0.8}  # first logged step at or after 15%
    assert r["first_collapse"]["step"] == 30 and r["first_collapse"]["layer"] == 3
    assert routing_stats([{"split": "train", "step": 10, "loss": 3.0}], [], steps=100) == {}


# ---- config -------------------------------------------------------------------------------------------


def test_the_shipped_config_builds_four_runs_with_one_budget(tmp_path: Path) -> None:
    cfg = load_emergence_config(CONFIG)
    tcs = {v.name: train_config(cfg, v, tokens_dir=tmp_path, run_dir=tmp_path / v.name) for v in cfg.variants}
    models = resolve_models(cfg, tcs, vocab_size=4096)
    dense, main = models[cfg.variant("dense").name], models[cfg.variant("main").name]
    assert dense.moe is None and main.moe is not None and main.moe.top_k == 1
    assert dense.ffn_hidden == main.moe.expert_hidden
    assert models[cfg.variant("no_lb").name].moe.lb_coef == 0.0  # type: ignore[union-attr]
    assert models[cfg.variant("top2").name].moe.top_k == 2  # type: ignore[union-attr]
    assert len({(t["steps"], t["micro_batch"], t["grad_accum"], t["seed"]) for t in tcs.values()}) == 1
    assert all(t["collapse"]["action"] == "warn" for t in tcs.values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("variants.1.role=dense", "exactly one run per role"),
        ("collapse.action=stop", "collapse.action must be warn"),
        ("data=configs/data/demo.yaml", "either data"),
        ("variants.0.moe={top_k: 2}", "takes no moe overrides"),
        ("variants.3.moe={top_k: 99}", "moe.top_k must be between"),
    ],
)
def test_bad_experiment_configs_are_refused_with_the_reason(override: str, message: str) -> None:
    extra = ["real_data=true"] if override.startswith("data=") else []
    with pytest.raises(ConfigError, match=message):
        load_emergence_config(CONFIG, [override, *extra])


def test_partial_moe_needs_dense_layers_as_wide_as_the_active_experts(tmp_path: Path) -> None:
    cfg = load_emergence_config(CONFIG, ["model_overrides.ffn_hidden=128"])
    tcs = {v.name: train_config(cfg, v, tokens_dir=tmp_path, run_dir=tmp_path / v.name) for v in cfg.variants}
    with pytest.raises(ConfigError, match=re.escape("model_overrides.ffn_hidden=256")):
        resolve_models(cfg, tcs, vocab_size=4096)
