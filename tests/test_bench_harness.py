"""The benchmark harness (benchmarks/_harness.py) and the report it feeds (benchmarks/report.py): rounds
rotate, ratios pair rounds, outputs are compared before any time counts, and docs/PERFORMANCE.md is exactly
what the committed results render to — never typed by hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _harness as harness  # noqa: E402
import report  # noqa: E402


def test_interleave_rotates_the_order_every_round_and_keeps_every_sample():
    calls: list[str] = []
    contenders = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    timings = harness.interleave(contenders, rounds=3, warmup=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(len(t.samples) == 3 for t in timings.values())
    with pytest.raises(ValueError):
        harness.interleave(contenders, rounds=0)


def test_interleave_shuffled_varies_each_contenders_predecessor_and_repeats_across_runs():
    def run() -> list[str]:
        calls: list[str] = []
        contenders = {n: (lambda n=n: calls.append(n)) for n in "abcde"}
        timings = harness.interleave(contenders, rounds=8, warmup=1, shuffle=True)
        assert all(len(t.samples) == 8 for t in timings.values())
        return calls

    calls = run()
    rounds = [calls[i : i + 5] for i in range(0, len(calls), 5)]
    assert all(sorted(r) == list("abcde") for r in rounds)  # every contender once per round
    assert calls == run()  # seeded: the same orders every run
    # a rotation would give "a" the same predecessor in every round; shuffled it varies
    preds = {r[r.index("a") - 1] for r in rounds if r.index("a") > 0}
    assert len(preds) > 1


def test_paired_ratio_divides_within_rounds_and_timing_reports_median_and_spread():
    ours = harness.Timing("ours", [1.0, 2.0, 1.0])
    theirs = harness.Timing("theirs", [2.0, 4.0, 3.0])
    r = harness.paired_ratio(ours, theirs)
    assert (r.median, r.low, r.high) == (2.0, 2.0, 3.0)
    assert ours.median == 1.0 and ours.best == 1.0 and ours.spread == pytest.approx(1.0)
    assert ours.as_dict()["rounds"] == 3


def test_check_same_raises_on_a_difference_unless_allowed_with_a_reason():
    same = {"ours": torch.ones(3), "peer": torch.ones(3) + 1e-7}
    assert harness.check_same(same, "ours", atol=1e-6) == {"peer": "same"}
    differ = {"ours": [1, 2, 3], "peer": [1, 2, 4], "quant": [1, 9, 3]}
    with pytest.raises(harness.Mismatch, match=r"peer does not produce what ours does: \[2\]"):
        harness.check_same(differ, "ours", allowed={"quant": "4-bit weights"})
    verdict = harness.check_same(differ, "ours", allowed={"quant": "4-bit", "peer": "other rounding"})
    assert verdict["quant"].startswith("differs (4-bit): [1]")
    with pytest.raises(harness.Mismatch, match="shape"):
        harness.check_same({"a": torch.ones(2), "b": torch.ones(3)}, "a")


def test_results_write_json_with_the_machine_state_and_quick_runs_go_elsewhere(tmp_path):
    args = argparse.Namespace(quick=False, busy=0, json=tmp_path / "x.json")
    res = harness.Results("demo", args, title="Demo")
    res.row(system="a", seconds=1.0)
    res.goal("speed-up", 1.6, 1.5, spread=(1.4, 1.8))
    res.table("t", ["a", "b"], [[1, 2.5]])
    res.check("tokens", {"peer": "same"})
    md = res.markdown()
    assert "| a | b |" in md and "- Goal speed-up: 1.6 (target 1.5, met: True)" in md
    assert "- Output check, tokens: peer: same" in md
    path = res.write()
    doc = json.loads(path.read_text())
    assert doc["goals"][0]["met"] is True and doc["machine_start"]["load_avg"]
    assert "machine_end" in doc and doc["quick"] is False
    quick = harness.Results("demo", argparse.Namespace(quick=True, busy=0, json=None))
    assert quick.path() != harness.RESULTS / "demo.json" and "quick" in quick.path().name


def _result(tmp_path: Path, name: str = "demo", **extra) -> Path:
    args = argparse.Namespace(quick=False, busy=0, json=tmp_path / "results" / f"{name}.json")
    res = harness.Results(name, args, title="Demo")
    res.goal("speed-up", 1.2, 1.5)
    res.table("Figures", ["system", "tokens/s"], [["ours", 1234.5]])
    res.note("measured, not typed")
    for k, v in extra.items():
        res.doc[k] = v
    res.write()
    return tmp_path / "results"


def test_report_renders_goals_tables_and_notes_and_refuses_figures_in_hand_notes(tmp_path):
    results = _result(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "demo.md").write_text("What bounds it: the same kernel on both sides.\n")
    text = report.render(results, notes)
    assert "| demo | speed-up | ≥ 1.5× | 1.2× | **no** |" in text
    assert "| ours | 1,234 |" in text and "- measured, not typed" in text
    assert "What bounds it" in text
    (notes / "demo.md").write_text("It reached 1.4× here.\n")
    with pytest.raises(report.ReportError, match=r"line 1: '1\.4×' is a figure"):
        report.render(results, notes)


def test_report_refuses_quick_results(tmp_path):
    results = _result(tmp_path, quick=True)
    with pytest.raises(report.ReportError, match="--quick"):
        report.render(results, tmp_path / "none")


def test_performance_md_is_what_the_committed_results_render_to():
    """docs/PERFORMANCE.md is generated (`make bench-report`); editing it by hand fails here."""
    assert report.main(["--check"]) == 0


@pytest.mark.parametrize(("experts", "per_expert", "spread"), [(8, 64, 0.0), (8, 64, 0.35), (64, 16, 0.75)])
def test_the_dispatch_sweeps_group_sizes_keep_the_mean_and_set_the_padding(experts, per_expert, spread):
    import dispatch_sweep

    counts = dispatch_sweep.group_sizes(experts, per_expert, spread)
    assert len(counts) == experts and min(counts) >= 0
    assert abs(sum(counts) - experts * per_expert) <= experts / 2  # rounding only
    padding = max(counts) * experts / sum(counts)
    assert padding == pytest.approx(1 + spread, abs=0.05)
