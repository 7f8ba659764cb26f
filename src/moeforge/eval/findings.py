"""Results of the emergence experiment (:mod:`moeforge.eval.experiments`): the study's reference numbers,
routing statistics from a run's metrics, the study's three findings judged on ``results.json``
(:func:`derive_findings`) and ``report.md`` (:func:`render_report`). Pure functions of the numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeforge.eval.emergence_config import ROLES

__all__ = [
    "STUDY",
    "ExperimentResult",
    "Finding",
    "derive_findings",
    "render_report",
    "routing_stats",
]

# The study's numbers (GPT-2 small, MoE in its last 4 layers, 10k steps), quoted in the report.
STUDY: dict[str, float] = {
    "dense_loss": 2.157,
    "main_loss": 2.080,
    "top2_loss": 2.077,
    "delta_main_pct": -3.6,
    "no_lb_share": 0.736,
    "no_lb_step": 500,
    "steps": 10_000,
}


# ---- results -------------------------------------------------------------------------------------------


@dataclass
class ExperimentResult:
    out: Path
    report: Path
    results: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    """One of the study's claims, judged on this experiment's numbers (``held`` None: not measurable)."""

    key: str
    claim: str
    held: bool | None
    evidence: str

    @property
    def verdict(self) -> str:
        return {True: "held", False: "did not hold", None: "not measured"}[self.held]


def _pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def _run_by_role(results: Mapping[str, Any], role: str) -> dict[str, Any] | None:
    return next((r for r in results.get("runs", []) if r.get("role") == role), None)


def _test_loss(run: Mapping[str, Any] | None) -> float | None:
    if run is None:
        return None
    v = (run.get("test") or {}).get("loss")
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _gap_trend(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """How the validation-loss gap ``a − b`` moved between their first and last common evaluation."""
    va = {int(st): float(x) for st, x in a.get("valid_curve") or []}
    vb = {int(st): float(x) for st, x in b.get("valid_curve") or []}
    common = sorted(set(va) & set(vb))
    if len(common) < 2:
        return ""
    g0, g1 = va[common[0]] - vb[common[0]], va[common[-1]] - vb[common[-1]]
    trend = "narrowing" if abs(g1) < abs(g0) else "widening" if abs(g1) > abs(g0) else "flat"
    if (g0 < 0) != (g1 < 0) and g0 != 0 and g1 != 0:
        trend = "changing sign"
    return (
        f" Validation-loss gap {a['name']} − {b['name']}: {g0:+.4f} at step {common[0]} → {g1:+.4f} at step "
        f"{common[-1]} ({trend})."
    )


def derive_findings(results: Mapping[str, Any]) -> list[Finding]:
    """Judge the study's three findings on ``results`` (the ``results.json`` data): runs by role with test
    losses and routing statistics, and ``settings`` (``steps``, ``collapse_threshold``,
    ``collapse_patience``, ``similar_pct``). Pure: the same numbers give the same verdicts and text."""
    s = results.get("settings", {})
    steps = int(s.get("steps", 0)) or 1
    thr = float(s.get("collapse_threshold", 0.6))
    patience = int(s.get("collapse_patience", 3))
    tol = float(s.get("similar_pct", 1.0))
    dense, main, no_lb, top2 = (_run_by_role(results, r) for r in ROLES)
    out: list[Finding] = []

    # 1. MoE beats dense at equal active parameters
    claim = (
        f"MoE has lower eval loss than a dense model of equal active parameters "
        f"({STUDY['main_loss']:.3f} vs {STUDY['dense_loss']:.3f}, {STUDY['delta_main_pct']:+.1f}%)"
    )
    ld, lm = _test_loss(dense), _test_loss(main)
    if ld is None or lm is None or main is None or dense is None:
        out.append(Finding("moe_beats_dense", claim, None, "the dense or the main run has no test loss"))
    else:
        d = _pct(lm, ld)
        doms = sorted(k.split("/", 1)[1] for k in main.get("test", {}) if k.startswith("loss/"))
        better = [x for x in doms if main["test"][f"loss/{x}"] < dense.get("test", {}).get(f"loss/{x}", -1)]
        worse = [x for x in doms if x not in better]
        per_dom = ", ".join(
            f"{x} {_pct(main['test'][f'loss/{x}'], dense['test'][f'loss/{x}']):+.2f}%"
            for x in doms
            if f"loss/{x}" in dense.get("test", {})
        )
        ev = (
            f"test loss {main['name']} (MoE top-1) {lm:.4f} vs {dense['name']} (dense) {ld:.4f}: {d:+.2f}% "
            f"(study {STUDY['delta_main_pct']:+.1f}%). Per domain: {per_dom or 'n/a'}"
        )
        if better and worse:
            ev += f"; lower on {', '.join(better)}, not on {', '.join(worse)}"
        ev += (
            f". Active parameters {main.get('params_active', 0):,} vs {dense.get('params_active', 0):,}; "
            f"total {main.get('params_total', 0):,} vs {dense.get('params_total', 0):,}."
        )
        if lm < ld:
            ev += f" The gain is {abs(d) / abs(STUDY['delta_main_pct']):.2f}× the study's."
        ev += _gap_trend(main, dense)
        out.append(Finding("moe_beats_dense", claim, lm < ld, ev))

    # 2. Without LB one expert takes most of the tokens early
    claim = (
        f"without the load-balancing loss one expert takes most of the tokens early "
        f"({100 * STUDY['no_lb_share']:.1f}% by step {STUDY['no_lb_step']:.0f} of {STUDY['steps']:,.0f}, "
        f"{100 * STUDY['no_lb_step'] / STUDY['steps']:.0f}% of training)"
    )
    if no_lb is None or not (no_lb.get("routing") or {}).get("load_max_curve"):
        out.append(Finding("no_lb_collapses", claim, None, "the no-LB run recorded no routing loads"))
    else:
        r = no_lb["routing"]
        first = r.get("first_collapse")
        peak = f"peak largest-expert share {100 * r['load_max_peak']:.1f}% at step {r['load_max_peak_step']}"
        if first is not None:
            ev = (
                f"{no_lb['name']}: the collapse detector fired at step {first['step']} "
                f"({100 * first['step'] / steps:.0f}% of training) — layer {first['layer']}'s expert "
                f"{first['expert']} held {100 * first['fraction']:.1f}% of the tokens, above "
                f"{100 * thr:.0f}% for {patience} consecutive checks; {peak}; final "
                f"{100 * r['load_max_final']:.1f}%"
            )
        else:
            ev = (
                f"{no_lb['name']}: no collapse (largest share never above {100 * thr:.0f}% for {patience} "
                f"consecutive checks); {peak}; final {100 * r['load_max_final']:.1f}%"
            )
        early = r.get("load_at_study_point")
        if early:
            ev += (
                f"; at step {early['step']} ({100 * early['step'] / steps:.0f}% of training, the study's "
                f"point) {100 * early['value']:.1f}%"
            )
        mr = (main or {}).get("routing") or {}
        if mr.get("load_max_curve"):
            ev += (
                f". With LB ({main['name']}) the largest share peaked at {100 * mr['load_max_peak']:.1f}% "
                f"and ended at {100 * mr['load_max_final']:.1f}%"
            )
            if mr.get("first_collapse") is not None:
                ev += f" — the main run collapsed too (step {mr['first_collapse']['step']})"
            balanced = mr.get("balanced_share")
            if balanced:
                ev += f" (balanced: {100 * balanced:.1f}%)"
            ratio = r["load_max_peak"] / mr["load_max_peak"] if mr["load_max_peak"] > 0 else float("inf")
            ev += f". Without LB the peak share is {ratio:.2f}× the LB run's, so removing LB " + (
                "did skew the routing" if ratio > 1 else "did not skew the routing more"
            )
        out.append(Finding("no_lb_collapses", claim, first is not None, ev + "."))

    # 3. top-2 ≈ top-1
    claim = (
        f"top-2 routing is about as good as top-1 ({STUDY['top2_loss']:.3f} vs {STUDY['main_loss']:.3f}, "
        f"{_pct(STUDY['top2_loss'], STUDY['main_loss']):+.2f}%)"
    )
    l2 = _test_loss(top2)
    if l2 is None or lm is None or top2 is None or main is None:
        out.append(Finding("top2_matches_top1", claim, None, "the top-2 or the main run has no test loss"))
    else:
        d2 = _pct(l2, lm)
        ev = (
            f"test loss {top2['name']} (top-2) {l2:.4f} vs {main['name']} (top-1) {lm:.4f}: {d2:+.2f}% "
            f'({"within" if abs(d2) <= tol else "outside"} the ±{tol:g}% taken as "about as good"); '
            f"top-2 is {'better' if d2 < 0 else 'worse' if d2 > 0 else 'equal'}, with "
            f"{top2.get('params_active', 0):,} active parameters against {main.get('params_active', 0):,}"
        )
        out.append(Finding("top2_matches_top1", claim, abs(d2) <= tol, ev + "."))
    return out


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def render_report(results: Mapping[str, Any]) -> str:
    """``report.md`` from ``results`` (the ``results.json`` data); findings via :func:`derive_findings`."""
    s = results.get("settings", {})
    runs = results.get("runs", [])
    dense = _run_by_role(results, "dense")
    ld = _test_loss(dense)
    domains: list[str] = list(results.get("domains", []))
    lines = [
        f"# Emergence experiment: {results.get('name', '')}",
        "",
        f"Data: {results.get('data', {}).get('recipe', '?')} — domains {', '.join(domains) or '?'}; "
        f"{s.get('steps')} steps × {s.get('micro_batch')} × {s.get('grad_accum', 1)} sequences of "
        f"{s.get('seq_len')} tokens per run (the same budget for every run, "
        f"{_fmt(s.get('tokens_per_run'), ',.0f')} tokens; the train split holds "
        f"{_fmt(results.get('tokens', {}).get('train'), ',.0f')}). "
        f"MoE layers {s.get('moe_layers')} of {s.get('n_layers')}, "
        f"{s.get('num_experts')} experts. Seed {s.get('seed')}.",
        "",
        "## Results",
        "",
    ]
    lines += ["Runs (one token budget and data order each):", ""]
    for r in runs:
        moe = r.get("moe")
        how = (
            f"dense, MLP width {r.get('ffn_hidden')}"
            if not moe
            else f"top-{moe['top_k']} of {moe['num_experts']} experts × {moe['expert_hidden']} in layers "
            f"{r.get('moe_layers')}, lb_coef {moe['lb_coef']:g}, z_coef {moe['z_coef']:g}, router noise "
            f"{moe['router_noise_std']:g} annealed over {moe['noise_anneal_steps']} steps"
            + (", renormalized" if moe.get("renormalize") and moe["top_k"] > 1 else "")
        )
        lines.append(f"- **{r['name']}** ({r['role']}): {r.get('description', '')} — {how}.")
    lines.append("")
    head = ["run", "role", "active params", "total params", "valid loss", "test loss"]
    head += [f"test {d}" for d in domains]
    head += ["Δ vs dense", "peak load", "final load", "first collapse step"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        test = r.get("test") or {}
        lt = _test_loss(r)
        rt = r.get("routing") or {}
        fc = rt.get("first_collapse")
        row = [
            f"{r['name']}",
            r["role"],
            f"{r.get('params_active', 0):,}",
            f"{r.get('params_total', 0):,}",
            _fmt((r.get("final_valid") or {}).get("loss")),
            _fmt(lt),
            *(_fmt(test.get(f"loss/{d}")) for d in domains),
            "—" if lt is None or ld is None or r["role"] == "dense" else f"{_pct(lt, ld):+.2f}%",
            "—" if not rt.get("load_max_curve") else f"{100 * rt['load_max_peak']:.1f}%",
            "—" if not rt.get("load_max_curve") else f"{100 * rt['load_max_final']:.1f}%",
            "—"
            if fc is None
            else f"{fc['step']} (L{fc['layer']} e{fc['expert']} {100 * fc['fraction']:.1f}%)",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Losses are cross-entropy in nats per token (test: the whole test split; valid: the last validation "
        "pass). Load: the largest expert's share of a layer's tokens per logging interval, the maximum over "
        "MoE layers (peak over training; final interval). Collapse: that share above "
        f"{100 * float(s.get('collapse_threshold', 0.6)):.0f}% for {s.get('collapse_patience')} consecutive "
        f"checks (every {s.get('log_every')} steps).",
        "",
        "## Findings",
        "",
    ]
    for f in derive_findings(results):
        lines.append(f"- **{f.verdict.upper()}** — study: {f.claim}. Here: {f.evidence}")
    lines += ["", "## Specialization", ""]
    lines.append(
        "Per MoE layer, how far the experts' domain mix departs from uniform (mean total-variation distance "
        "of each domain's expert distribution from the average one; 0 = no specialization):"
    )
    lines.append("")
    for r in runs:
        spec = r.get("specialization") or {}
        if spec:
            lines.append(f"- {r['name']}: " + ", ".join(f"layer {k} {float(v):.3f}" for k, v in spec.items()))
    lines += ["", "## Caveats", ""]
    lines.append(
        f"- One seed per run and {_fmt(s.get('tokens_per_run'), ',.0f')} training tokens each: differences "
        f"of a percent or so can come from the seed alone."
    )
    sizes = ", ".join(f"{r['name']} {r.get('params_total', 0):,}" for r in runs)
    lines.append(
        f"- Tiny models ({sizes} parameters) trained on CPU; the study trained GPT-2 small for "
        f"{STUDY['steps']:,.0f} steps."
    )
    env = results.get("environment", {})
    if env:
        lines.append(
            f"- Wall time {env.get('wall_seconds', 0) / 60:.1f} min on {env.get('cpus')} CPUs "
            f"({env.get('parallel', 1)} run(s) at a time, {env.get('torch_threads')} torch thread(s) each); "
            "load average "
            f"{env.get('loadavg_start')} at the start, {env.get('loadavg_end')} at the end."
        )
        per_run = ", ".join(f"{r['name']} {r.get('train_seconds', 0):.0f} s" for r in runs)
        lines.append(f"- Training time per run (its own process, wall clock): {per_run}.")
        reused = [r["name"] for r in runs if r.get("reused")]
        if reused:
            lines.append(
                f"- Reused from an earlier invocation (identical config, completed): {', '.join(reused)}; "
                "the wall time above excludes their training."
            )
    files = results.get("files", {})
    if files:
        lines += ["", "## Charts", ""]
        for k, p in files.items():
            if str(p).endswith(".png"):
                lines.append(f"- {k}: ![{k}]({Path(p).name})")
    return "\n".join(lines) + "\n"


# ---- routing statistics --------------------------------------------------------------------------------


def routing_stats(
    rows: Sequence[Mapping[str, Any]],
    collapse_events: Sequence[Mapping[str, Any]],
    *,
    steps: int,
    study_fraction: float = STUDY["no_lb_step"] / STUDY["steps"],
) -> dict[str, Any]:
    """From a run's ``metrics.jsonl`` rows: the largest expert share per MoE layer over training, its
    peak and final value (max over layers), the value at ``study_fraction`` of training, and the first
    collapse event."""
    train = [r for r in rows if r.get("split") == "train"]
    curve: dict[str, list[list[float]]] = {}
    for r in train:
        for k, v in r.items():
            if k.startswith("moe/L") and k.endswith("/load_max"):
                curve.setdefault(k.split("/")[1], []).append([int(r["step"]), float(v)])
    if not curve:
        return {}
    per_step: dict[int, float] = {}
    for pts in curve.values():
        for st, v in pts:
            per_step[int(st)] = max(per_step.get(int(st), 0.0), v)
    peak_step = max(per_step, key=lambda k: (per_step[k], -k))
    target = study_fraction * steps
    early = next(((st, v) for st, v in sorted(per_step.items()) if st >= target), None)
    first = min(collapse_events, key=lambda e: (e["step"], e["layer"]), default=None)
    return {
        "load_max_curve": dict(sorted(curve.items())),
        "load_max_peak": per_step[peak_step],
        "load_max_peak_step": peak_step,
        "load_max_final": per_step[max(per_step)],
        "load_at_study_point": None if early is None else {"step": early[0], "value": early[1]},
        "first_collapse": None if first is None else dict(first),
    }
