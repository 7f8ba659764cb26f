"""The emergence experiment: four variants (two of them over two seeds) end to end on built-in data
(--quick), and findings that follow the numbers — means over seeds against the noise band — rather than
being written in advance."""

from __future__ import annotations

import copy
import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from moeforge.config import ConfigError
from moeforge.eval.emergence_config import load_emergence_config, resolve_models, train_config
from moeforge.eval.findings import aggregate_runs, derive_findings, render_report, routing_stats

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "experiments" / "emergence-tiny.yaml"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moeforge.cli import experiment

    out = tmp_path_factory.mktemp("emergence") / "out"
    # the command's console took its width when the module was first imported, maybe by another test
    # in this process: widen it for the table's columns, then restore it
    width = experiment.console.width
    experiment.console.width = 200
    try:
        res = CliRunner().invoke(experiment.app, ["emergence", str(CONFIG), "--quick", "--out", str(out)])
    finally:
        experiment.console.width = width
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "report:" in res.output and "Δ vs dense" in res.output
    return out


def _runs(out: Path) -> dict[str, dict[str, Any]]:
    return {r["role"]: r for r in json.loads((out / "results.json").read_text())["runs"]}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_experiment_writes_report_results_and_charts(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    assert [r["role"] for r in results["runs"]] == ["dense", "dense", "main", "main", "no_lb", "top2"]
    assert results["domains"] == ["code", "math", "prose"]
    assert len(results["environment"]["loadavg_start"]) == 3
    budget = {r["tokens_seen"] for r in results["runs"]}
    assert budget == {results["settings"]["tokens_per_run"]}  # one token budget for every run
    for r in results["runs"]:
        assert r["status"] == "completed"
        assert (quick_run / r["name"] / "config.yaml").is_file()
        assert {"loss", "loss/code", "loss/math", "loss/prose"} <= set(r["test"])
    report = (quick_run / "report.md").read_text()
    assert "| variant | role | seeds | active params | total params | test loss |" in report
    assert "| run | role | seed |" in report and "## Findings" in report
    assert [f["key"] for f in results["findings"]] == [
        "moe_beats_dense",
        "no_lb_collapses",
        "top2_matches_top1",
    ]
    assert results["findings"][0]["verdict"] in ("held", "did not hold", "inconclusive")
    assert all(f["verdict"] in ("held", "did not hold") for f in results["findings"][1:])
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
def test_quick_experiment_trains_one_run_per_seed_and_aggregates_them(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    # two seeds: <variant>-seed<k>; exactly the default seed: the plain (pre-seeds) directory name
    assert list(runs) == [
        "dense-seed0",
        "dense-seed1",
        "moe-top1-seed0",
        "moe-top1-seed1",
        "moe-top1-nolb",
        "moe-top2",
    ]
    assert [(r["variant"], r["seed"]) for r in runs.values()] == [
        ("dense", 0),
        ("dense", 1),
        ("moe-top1", 0),
        ("moe-top1", 1),
        ("moe-top1-nolb", 0),
        ("moe-top2", 0),
    ]
    for name, r in runs.items():
        tc = yaml.safe_load((quick_run / name / "config.yaml").read_text())
        assert tc["seed"] == r["seed"] and tc["out_dir"] == str(quick_run / name)
    assert results["settings"]["seeds"] == {
        "dense": [0, 1],
        "moe-top1": [0, 1],
        "moe-top1-nolb": [0],
        "moe-top2": [0],
    }
    # the seed changes init, data order and router noise: the two dense runs end at different losses
    assert runs["dense-seed0"]["test"]["loss"] != runs["dense-seed1"]["test"]["loss"]
    assert results["variants"] == aggregate_runs(results["runs"])
    agg = {a["role"]: a for a in results["variants"]}
    assert list(agg) == ["dense", "main", "no_lb", "top2"]
    for role, a in agg.items():
        seed_runs = [r for r in results["runs"] if r["role"] == role]
        assert a["runs"] == [r["name"] for r in seed_runs] and a["seeds"] == [r["seed"] for r in seed_runs]
        for key in ("loss", "loss/code", "loss/math", "loss/prose"):
            st = a["test"][key]
            values = [r["test"][key] for r in seed_runs]
            assert st["n"] == len(seed_runs) and st["values"] == values and st["seeds"] == a["seeds"]
            assert st["mean"] == pytest.approx(statistics.mean(values))
            assert st["std"] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
    dense_mean = agg["dense"]["test"]["loss"]["mean"]
    main_mean = agg["main"]["test"]["loss"]["mean"]
    assert agg["main"]["delta_vs_dense_pct"] == pytest.approx(
        100 * (main_mean - dense_mean) / dense_mean, abs=1e-3
    )
    report = (quick_run / "report.md").read_text()
    assert "Token budget per run: 16 steps × 4 × 1 sequences × 64 tokens = 4,096 tokens" in report
    assert "Seeds per variant: dense 0, 1; moe-top1 0, 1; moe-top1-nolb 0; moe-top2 0 (6 runs)" in report
    assert "Noise band (MoE vs dense): ±" in report
    d, m = agg["dense"]["test"]["loss"], agg["main"]["test"]["loss"]
    assert (
        f"{m['mean']:.4f} ± {m['std']:.4f} (2 seeds) vs dense (dense) {d['mean']:.4f} ± {d['std']:.4f}"
        in report
    )


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
    dense = [r for r in results["runs"] if r["role"] == "dense"]
    dense_mean = statistics.mean(r["test"]["loss"] for r in dense)
    for factor, held in ((0.9, True), (1.1, False)):
        flipped = copy.deepcopy(results)
        for r in flipped["runs"]:
            if r["role"] == "main":  # every seed 10% off the dense mean: far beyond the seeds' noise
                r["test"]["loss"] = dense_mean * factor
        f = {x.key: x for x in derive_findings(flipped)}["moe_beats_dense"]
        assert f.held is held and "beyond it" in f.evidence
        assert f"**{'HELD' if held else 'DID NOT HOLD'}** — study: MoE has lower" in render_report(flipped)
    assert main["test"]["loss"] == results["runs"][2]["test"]["loss"]  # the original is untouched


# ---- findings from synthetic numbers -------------------------------------------------------------------


def _synthetic(
    *,
    dense: float | list[float],
    main: float | list[float],
    top2: float,
    collapse_step: int | None,
    steps: int = 1000,
    main_collapse_step: int | None = None,
) -> dict[str, Any]:
    """Hand-made results: a list of losses makes one run per seed (0, 1, …) of that variant."""

    def run(
        name: str, role: str, loss: float, routing: dict[str, Any] | None = None, seed: int = 0
    ) -> dict[str, Any]:
        return {
            "name": name,
            "variant": name.split("-seed")[0],
            "seed": seed,
            "role": role,
            "params_active": 1000,
            "params_total": 4000 if role != "dense" else 1000,
            "test": {"loss": loss, "loss/code": loss, "loss/math": loss},
            "routing": routing or {},
        }

    def seeds(name: str, role: str, losses: float | list[float], **kw: Any) -> list[dict[str, Any]]:
        if isinstance(losses, float):
            return [run(name, role, losses, **kw)]
        return [run(f"{name}-seed{k}", role, x, seed=k, **kw) for k, x in enumerate(losses)]

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

    def event(step: int | None) -> dict[str, Any] | None:
        return None if step is None else {"step": step, "layer": 3, "expert": 5, "fraction": 0.9}

    first, main_first = event(collapse_step), event(main_collapse_step)
    main_loss = main if isinstance(main, float) else statistics.mean(main)
    return {
        "settings": {
            "steps": steps,
            "micro_batch": 8,
            "grad_accum": 1,
            "seq_len": 32,
            "tokens_per_run": steps * 8 * 32,
            "collapse_threshold": 0.6,
            "collapse_patience": 3,
            "similar_pct": 1.0,
        },
        "domains": ["code", "math"],
        "runs": [
            *seeds("dense", "dense", dense),
            *seeds("top1", "main", main, routing=routing(0.7 if main_first else 0.2, main_first)),
            run("nolb", "no_lb", main_loss, routing(0.9 if first else 0.3, first)),
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


def test_one_seed_per_arm_judges_the_sign_and_says_there_is_no_noise_estimate() -> None:
    results = _synthetic(dense=2.0, main=1.99, top2=1.99, collapse_step=None)
    f = {x.key: x for x in derive_findings(results)}["moe_beats_dense"]
    assert f.held is True and f.verdict == "held"  # -0.5%: today's rule, the sign decides
    assert "One seed per arm, no noise estimate" in f.evidence
    assert "Noise band (MoE vs dense): unknown — one seed per arm, no noise estimate" in render_report(
        results
    )


def test_a_difference_inside_the_noise_band_is_inconclusive() -> None:
    # dense 2.00 ± 0.02, main 1.99 ± 0.01: -0.5%, band 2 × 0.02 / 2.00 = ±2%
    results = _synthetic(dense=[1.98, 2.00, 2.02], main=[1.98, 1.99, 2.00], top2=1.99, collapse_step=None)
    f = {x.key: x for x in derive_findings(results)}["moe_beats_dense"]
    assert f.held is None and f.inconclusive and f.verdict == "inconclusive"
    assert "1.9900 ± 0.0100 (3 seeds) vs dense (dense) 2.0000 ± 0.0200 (3 seeds): -0.50%" in f.evidence
    assert "Noise band ±2.00%" in f.evidence and "inside it" in f.evidence
    report = render_report(results)
    assert "**INCONCLUSIVE** — study: MoE has lower" in report
    assert "Noise band (MoE vs dense): ±2.00%" in report
    assert "| dense | dense | 3 | 1,000 | 1,000 | 2.0000 ± 0.0200 |" in report


@pytest.mark.parametrize(
    ("main", "held", "diff"),
    [([1.89, 1.90, 1.91], True, "-5.00%"), ([2.09, 2.10, 2.11], False, "+5.00%")],
)
def test_a_difference_beyond_the_noise_band_is_judged_by_its_sign(
    main: list[float], held: bool, diff: str
) -> None:
    results = _synthetic(dense=[1.98, 2.00, 2.02], main=main, top2=2.0, collapse_step=None)
    f = {x.key: x for x in derive_findings(results)}["moe_beats_dense"]
    assert f.held is held and not f.inconclusive
    assert f"{diff} (study -3.6%)" in f.evidence and "Noise band ±2.00%" in f.evidence
    assert "beyond it" in f.evidence


def test_the_band_uses_the_larger_std_when_one_arm_has_one_seed() -> None:
    results = _synthetic(dense=[1.98, 2.00, 2.02], main=1.97, top2=2.0, collapse_step=None)
    f = {x.key: x for x in derive_findings(results)}["moe_beats_dense"]
    assert f.inconclusive and "Noise band ±2.00%" in f.evidence and "top1 has one seed" in f.evidence


def test_the_collapse_holds_only_when_no_main_seed_collapsed() -> None:
    ok = _synthetic(dense=[2.0, 2.0], main=[1.9, 1.9], top2=1.9, collapse_step=40)
    f = {x.key: x for x in derive_findings(ok)}["no_lb_collapses"]
    assert f.held is True and "the highest of 2 seeds" in f.evidence
    both = _synthetic(dense=[2.0, 2.0], main=[1.9, 1.9], top2=1.9, collapse_step=40, main_collapse_step=60)
    f = {x.key: x for x in derive_findings(both)}["no_lb_collapses"]
    assert f.held is False and "the main run collapsed too (2 of 2 seeds, first at step 60)" in f.evidence


def test_the_report_states_the_budget_the_seeds_and_the_band() -> None:
    report = render_report(_synthetic(dense=[1.98, 2.02], main=[1.90, 1.90], top2=1.9, collapse_step=None))
    assert "Token budget per run: 1000 steps × 8 × 1 sequences × 32 tokens = 256,000 tokens" in report
    assert "Seeds per variant: dense 0, 1; top1 0, 1; nolb 0; top2 0 (6 runs)" in report
    assert "Noise band (MoE vs dense): ±2.83%" in report  # 2 × 0.0283 / 2.00
    assert "| top1-seed1 | main | 1 |" in report


def test_aggregates_are_mean_and_sample_std_per_variant() -> None:
    agg = aggregate_runs(_synthetic(dense=[1.0, 2.0, 3.0], main=2.0, top2=2.0, collapse_step=None)["runs"])
    dense = agg[0]
    assert (dense["name"], dense["seeds"], dense["runs"]) == (
        "dense",
        [0, 1, 2],
        ["dense-seed0", "dense-seed1", "dense-seed2"],
    )
    assert dense["test"]["loss"] == {
        "mean": 2.0,
        "std": 1.0,
        "n": 3,
        "seeds": [0, 1, 2],
        "values": [1.0, 2.0, 3.0],
    }
    assert agg[1]["test"]["loss"]["std"] == 0.0 and agg[1]["delta_vs_dense_pct"] == 0.0


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


def test_the_shipped_config_builds_four_variants_and_eight_runs_with_one_budget(tmp_path: Path) -> None:
    cfg = load_emergence_config(CONFIG)
    assert {v.name: v.seeds for v in cfg.variants} == {
        "dense": [0, 1, 2],
        "moe-top1": [0, 1, 2],
        "moe-top1-nolb": [0],
        "moe-top2": [0],
    }
    runs = cfg.runs()
    assert [r.name for r in runs] == [
        *(f"dense-seed{k}" for k in range(3)),
        *(f"moe-top1-seed{k}" for k in range(3)),
        "moe-top1-nolb",  # exactly the default seed: the directory of the runs before seeds, reused
        "moe-top2",
    ]
    per_run = [
        train_config(cfg, r.variant, tokens_dir=tmp_path, run_dir=tmp_path / r.name, seed=r.seed)
        for r in runs
    ]
    assert [t["seed"] for t in per_run] == [0, 1, 2, 0, 1, 2, 0, 0]
    assert len({(t["steps"], t["micro_batch"], t["grad_accum"], t["data"]["seq_len"]) for t in per_run}) == 1
    assert (
        per_run[1]["name"] == "emergence-tiny-dense-seed1" and per_run[7]["name"] == "emergence-tiny-moe-top2"
    )
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


def test_variants_default_to_the_top_level_seed_and_quick_merges_seeds_by_name() -> None:
    cfg = load_emergence_config(CONFIG, [f"variants.{i}.seeds=null" for i in range(4)] + ["seed=3"])
    assert [r.name for r in cfg.runs()] == ["dense", "moe-top1", "moe-top1-nolb", "moe-top2"]
    assert {r.seed for r in cfg.runs()} == {3}
    quick = load_emergence_config(CONFIG, quick=True)
    assert [v.seeds for v in quick.variants] == [[0, 1], [0, 1], [0], [0]]
    assert quick.variants[2].moe == {"lb_coef": 0.0}  # the rest of a variant is kept


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("variants.0.seeds=[1, 1]", "seeds must be distinct"),
        ("variants.0.seeds=[]", "at least 1 item"),
        ("variants.2.name=moe-top1-seed0", "clash"),
    ],
)
def test_bad_seeds_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_emergence_config(CONFIG, [override])


def test_quick_settings_for_an_unknown_variant_are_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(CONFIG.read_text())
    data["quick"]["variants"] = {"nope": {"seeds": [1]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(
        ConfigError, match=r"variants \['nope'\] to merge settings into are not in the config"
    ):
        load_emergence_config(path, quick=True)


def test_partial_moe_needs_dense_layers_as_wide_as_the_active_experts(tmp_path: Path) -> None:
    cfg = load_emergence_config(CONFIG, ["model_overrides.ffn_hidden=128"])
    tcs = {v.name: train_config(cfg, v, tokens_dir=tmp_path, run_dir=tmp_path / v.name) for v in cfg.variants}
    with pytest.raises(ConfigError, match=re.escape("model_overrides.ffn_hidden=256")):
        resolve_models(cfg, tcs, vocab_size=4096)


def test_the_routing_load_chart_draws_the_balanced_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moeforge.eval import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    rows = [{"split": "train", "step": s, "moe/L2/load_max": 0.3 + 0.01 * s} for s in range(1, 6)]
    plots.routing_load_curves(rows, tmp_path / "r.png", balanced=0.125)
    ys = [set(line.get_ydata()) for line in figs[0].axes[0].get_lines()]
    assert {0.125} in ys  # the dashed balanced line beside the layer's curve
