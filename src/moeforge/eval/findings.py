"""Results of the emergence experiment (:mod:`moeforge.eval.experiments`): the study's reference numbers,
routing statistics from a run's metrics, per-variant aggregates over seeds (:func:`aggregate_runs`), the
study's three findings judged on ``results.json`` (:func:`derive_findings`) and ``report.md``
(:func:`render_report`). Pure functions of the numbers.

Seeds and noise: a variant's runs differ only in their seed. MoE vs dense compares the means over seeds;
the noise band is twice the larger of the two arms' sample standard deviations, in % of the dense mean
(:func:`noise_band_pct`, the rule of :mod:`moeforge.eval.upcycled_report` too). A difference inside the
band is "inconclusive", MoE lower beyond it "held", higher beyond it "did not hold"; with one seed per arm
there is no noise estimate, the sign decides and the evidence says so."""

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
    "aggregate_runs",
    "band_verdict",
    "derive_findings",
    "mean_std",
    "moe_dense_noise",
    "noise_band_pct",
    "pct_change",
    "render_report",
    "routing_stats",
    "run_test_loss",
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
    """One of the study's claims, judged on this experiment's numbers (``held`` None: not measurable, or
    ``inconclusive``: the difference is inside the seeds' noise band)."""

    key: str
    claim: str
    held: bool | None
    evidence: str
    inconclusive: bool = False

    @property
    def verdict(self) -> str:
        if self.inconclusive:
            return "inconclusive"
        return {True: "held", False: "did not hold", None: "not measured"}[self.held]


def pct_change(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


# ---- seeds: aggregates and the noise band ------------------------------------------------------------


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def noise_band_pct(std_a: float, std_b: float, ref_mean: float) -> float:
    """The noise band of a difference of two arms' means, in % of ``ref_mean``: twice the larger of their
    seed standard deviations (the rule of the upcycled study's report too)."""
    return 200.0 * max(std_a, std_b) / ref_mean


def band_verdict(diff_pct: float, band_pct: float) -> bool | None:
    """``diff_pct`` (MoE − dense, %) against the noise band: True (held: lower beyond the band), False (not
    held: higher beyond it) or None (inconclusive: inside it)."""
    return None if abs(diff_pct) <= band_pct else diff_pct < 0


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _stat(runs: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    pairs = [(r.get("seed"), _finite((r.get("test") or {}).get(key))) for r in runs]
    pairs = [(k, x) for k, x in pairs if x is not None]
    if not pairs:
        return None
    m, sd = mean_std([x for _, x in pairs])
    return {
        "mean": m,
        "std": sd,
        "n": len(pairs),
        "seeds": [k for k, _ in pairs],
        "values": [x for _, x in pairs],
    }


def _mean_curve(runs: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """The validation curve averaged over seeds, at the steps every seed evaluated."""
    curves = [{int(st): float(x) for st, x in r.get("valid_curve") or []} for r in runs]
    if not curves:
        return []
    common = sorted(set.intersection(*(set(c) for c in curves)))
    return [[st, sum(c[st] for c in curves) / len(curves)] for st in common]


def _runs_of(results: Mapping[str, Any], role: str) -> list[dict[str, Any]]:
    runs = [r for r in results.get("runs", []) if r.get("role") == role]
    return sorted(runs, key=lambda r: (r.get("seed") is None, r.get("seed") or 0))


def aggregate_runs(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per variant (by role, in the study's order) over its seed runs: test loss overall and per
    domain as ``{mean, std, n, seeds, values}``, the seeds, run names, parameters, the mean validation
    curve, the seeds whose routing collapsed, and ``delta_vs_dense_pct`` (mean against the dense mean)."""
    out: list[dict[str, Any]] = []
    for role in ROLES:
        group = _runs_of({"runs": runs}, role)
        if not group:
            continue
        keys = sorted(
            {
                k
                for r in group
                for k in r.get("test") or {}
                if k in ("loss", "heldout_bits_per_byte") or k.startswith("loss/")
            }
        )
        test = {k: st for k in keys if (st := _stat(group, k)) is not None}
        out.append(
            {
                "name": group[0].get("variant", group[0].get("name")),
                "role": role,
                "description": group[0].get("description", ""),
                "seeds": [r.get("seed") for r in group],
                "runs": [r.get("name") for r in group],
                "params_active": group[0].get("params_active", 0),
                "params_total": group[0].get("params_total", 0),
                "test": test,
                "valid_curve": _mean_curve(group),
                "collapsed_seeds": [
                    r.get("seed")
                    for r in group
                    if ((r.get("routing") or {}).get("first_collapse")) is not None
                ],
            }
        )
    dense = next((a for a in out if a["role"] == "dense"), None)
    ld = (dense or {}).get("test", {}).get("loss")
    for a in out:
        lt = a["test"].get("loss")
        a["delta_vs_dense_pct"] = (
            None if lt is None or ld is None else round(pct_change(lt["mean"], ld["mean"]), 3)
        )
    return out


def _by_role(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["role"]: a for a in aggregate_runs(results.get("runs", []))}


def _ms(st: Mapping[str, Any], spec: str = ".4f") -> str:
    """``mean ± std (n seeds)``, or ``value (seed k)`` for one seed."""
    if st["n"] == 1:
        seed = st["seeds"][0]
        return f"{format(st['mean'], spec)}" + ("" if seed is None else f" (seed {seed})")
    return f"{format(st['mean'], spec)} ± {format(st['std'], spec)} ({st['n']} seeds)"


def _seed_list(a: Mapping[str, Any]) -> str:
    return ", ".join("?" if k is None else str(k) for k in a.get("seeds", []))


def run_test_loss(run: Mapping[str, Any] | None) -> float | None:
    if run is None:
        return None
    return _finite((run.get("test") or {}).get("loss"))


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
    means = " (means over seeds)" if len(a.get("seeds", [])) > 1 or len(b.get("seeds", [])) > 1 else ""
    return (
        f" Validation-loss gap {a['name']} − {b['name']}{means}: {g0:+.4f} at step {common[0]} → {g1:+.4f} at "
        f"step {common[-1]} ({trend})."
    )


def moe_dense_noise(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """The MoE-vs-dense comparison: means, stds, seed counts, difference and noise band (% of the dense
    mean; None with one seed per arm: no noise estimate). None when either arm has no test loss."""
    agg = _by_role(results)
    d, m = (agg.get(r, {}).get("test", {}).get("loss") for r in ("dense", "main"))
    if d is None or m is None:
        return None
    one_seed = d["n"] == 1 and m["n"] == 1
    return {
        "dense": d,
        "main": m,
        "diff_pct": pct_change(m["mean"], d["mean"]),
        "band_pct": None if one_seed else noise_band_pct(d["std"], m["std"], d["mean"]),
    }


def derive_findings(results: Mapping[str, Any]) -> list[Finding]:
    """Judge the study's three findings on ``results`` (the ``results.json`` data): the per-seed runs by role
    with test losses and routing statistics, and ``settings`` (``steps``, ``collapse_threshold``,
    ``collapse_patience``, ``similar_pct``). Pure: the same numbers give the same verdicts and text.

    MoE vs dense compares the means over seeds against the noise band (:func:`noise_band_pct`): inside it
    the finding is inconclusive; with one seed per arm there is no noise estimate and the sign decides.
    The no-LB collapse holds when any no-LB seed collapsed and no main seed did; top-2 ≈ top-1 compares
    the means with ``similar_pct``."""
    s = results.get("settings", {})
    steps = int(s.get("steps", 0)) or 1
    thr = float(s.get("collapse_threshold", 0.6))
    patience = int(s.get("collapse_patience", 3))
    tol = float(s.get("similar_pct", 1.0))
    agg = _by_role(results)
    dense, main, top2 = agg.get("dense"), agg.get("main"), agg.get("top2")
    out: list[Finding] = []

    # 1. MoE beats dense at equal active parameters
    claim = (
        f"MoE has lower eval loss than a dense model of equal active parameters "
        f"({STUDY['main_loss']:.3f} vs {STUDY['dense_loss']:.3f}, {STUDY['delta_main_pct']:+.1f}%)"
    )
    cmp = moe_dense_noise(results)
    if cmp is None or main is None or dense is None:
        out.append(Finding("moe_beats_dense", claim, None, "the dense or the main run has no test loss"))
    else:
        sd, sm, d, band = cmp["dense"], cmp["main"], cmp["diff_pct"], cmp["band_pct"]
        mt, dt = main["test"], dense["test"]
        doms = sorted(k.split("/", 1)[1] for k in mt if k.startswith("loss/") and k in dt)
        better = [x for x in doms if mt[f"loss/{x}"]["mean"] < dt[f"loss/{x}"]["mean"]]
        worse = [x for x in doms if x not in better]
        per_dom = ", ".join(
            f"{x} {pct_change(mt[f'loss/{x}']['mean'], dt[f'loss/{x}']['mean']):+.2f}%" for x in doms
        )
        ev = (
            f"test loss {main['name']} (MoE top-1) {_ms(sm)} vs {dense['name']} (dense) {_ms(sd)}: {d:+.2f}% "
            f"(study {STUDY['delta_main_pct']:+.1f}%). "
        )
        if band is None:
            held: bool | None = sm["mean"] < sd["mean"]
            ev += (
                "One seed per arm, no noise estimate: the sign of the difference decides, and a difference of "
                "a percent or so can come from the seed alone."
            )
        else:
            held = band_verdict(d, band)
            single = [a["name"] for a in (dense, main) if a["test"]["loss"]["n"] == 1]
            ev += (
                f"Noise band ±{band:.2f}% (2 × the larger seed std, {max(sd['std'], sm['std']):.4f}, of the dense "
                f"mean{'; ' + ', '.join(single) + ' has one seed' if single else ''}): the difference is "
                + ("inside it" if held is None else "beyond it")
                + "."
            )
        ev += f" Per domain (means): {per_dom or 'n/a'}"
        if better and worse:
            ev += f"; lower on {', '.join(better)}, not on {', '.join(worse)}"
        ev += (
            f". Active parameters {main.get('params_active', 0):,} vs {dense.get('params_active', 0):,}; "
            f"total {main.get('params_total', 0):,} vs {dense.get('params_total', 0):,}."
        )
        if d < 0:
            ev += f" The gain is {abs(d) / abs(STUDY['delta_main_pct']):.2f}× the study's."
        ev += _gap_trend(main, dense)
        out.append(Finding("moe_beats_dense", claim, held, ev, inconclusive=held is None))

    # 2. Without LB one expert takes most of the tokens early
    claim = (
        f"without the load-balancing loss one expert takes most of the tokens early "
        f"({100 * STUDY['no_lb_share']:.1f}% by step {STUDY['no_lb_step']:.0f} of {STUDY['steps']:,.0f}, "
        f"{100 * STUDY['no_lb_step'] / STUDY['steps']:.0f}% of training)"
    )
    no_lb = [r for r in _runs_of(results, "no_lb") if (r.get("routing") or {}).get("load_max_curve")]
    mains = [r for r in _runs_of(results, "main") if (r.get("routing") or {}).get("load_max_curve")]
    if not no_lb:
        out.append(Finding("no_lb_collapses", claim, None, "the no-LB run recorded no routing loads"))
    else:
        collapsed = [r for r in no_lb if r["routing"].get("first_collapse") is not None]
        main_collapsed = [r for r in mains if r["routing"].get("first_collapse") is not None]
        # the run the details are about: the earliest collapse, else the most skewed seed
        run = (
            min(collapsed, key=lambda r: r["routing"]["first_collapse"]["step"])
            if collapsed
            else max(no_lb, key=lambda r: r["routing"]["load_max_peak"])
        )
        r = run["routing"]
        first = r.get("first_collapse")
        peak = f"peak largest-expert share {100 * r['load_max_peak']:.1f}% at step {r['load_max_peak_step']}"
        ev = f"{len(collapsed)} of {len(no_lb)} no-LB seeds collapsed; " if len(no_lb) > 1 else ""
        if first is not None:
            ev += (
                f"{run['name']}: the collapse detector fired at step {first['step']} "
                f"({100 * first['step'] / steps:.0f}% of training) — layer {first['layer']}'s expert "
                f"{first['expert']} held {100 * first['fraction']:.1f}% of the tokens, above "
                f"{100 * thr:.0f}% for {patience} consecutive checks; {peak}; final "
                f"{100 * r['load_max_final']:.1f}%"
            )
        else:
            ev += (
                f"{run['name']}: no collapse (largest share never above {100 * thr:.0f}% for {patience} "
                f"consecutive checks); {peak}; final {100 * r['load_max_final']:.1f}%"
            )
        early = r.get("load_at_study_point")
        if early:
            ev += (
                f"; at step {early['step']} ({100 * early['step'] / steps:.0f}% of training, the study's "
                f"point) {100 * early['value']:.1f}%"
            )
        if mains:
            mr = max(mains, key=lambda x: x["routing"]["load_max_peak"])["routing"]
            label = mains[0].get("variant", mains[0]["name"])
            seeds = f", the highest of {len(mains)} seeds" if len(mains) > 1 else ""
            ev += (
                f". With LB ({label}{seeds}) the largest share peaked at {100 * mr['load_max_peak']:.1f}% "
                f"and ended at {100 * mr['load_max_final']:.1f}%"
            )
            if main_collapsed:
                fc = min(x["routing"]["first_collapse"]["step"] for x in main_collapsed)
                ev += (
                    f" — the main run collapsed too ({len(main_collapsed)} of {len(mains)} seeds, first at "
                    f"step {fc}), so the collapse is not down to removing LB"
                )
            balanced = mr.get("balanced_share")
            if balanced:
                ev += f" (balanced: {100 * balanced:.1f}%)"
            ratio = r["load_max_peak"] / mr["load_max_peak"] if mr["load_max_peak"] > 0 else float("inf")
            ev += f". Without LB the peak share is {ratio:.2f}× the LB run's, so removing LB " + (
                "did skew the routing" if ratio > 1 else "did not skew the routing more"
            )
        out.append(Finding("no_lb_collapses", claim, bool(collapsed) and not main_collapsed, ev + "."))

    # 3. top-2 ≈ top-1
    claim = (
        f"top-2 routing is about as good as top-1 ({STUDY['top2_loss']:.3f} vs {STUDY['main_loss']:.3f}, "
        f"{pct_change(STUDY['top2_loss'], STUDY['main_loss']):+.2f}%)"
    )
    s2 = (top2 or {}).get("test", {}).get("loss")
    sm1 = (main or {}).get("test", {}).get("loss")
    if s2 is None or sm1 is None or top2 is None or main is None:
        out.append(Finding("top2_matches_top1", claim, None, "the top-2 or the main run has no test loss"))
    else:
        d2 = pct_change(s2["mean"], sm1["mean"])
        ev = (
            f"test loss {top2['name']} (top-2) {_ms(s2)} vs {main['name']} (top-1) {_ms(sm1)}: {d2:+.2f}% "
            f'({"within" if abs(d2) <= tol else "outside"} the ±{tol:g}% taken as "about as good"); '
            f"top-2 is {'better' if d2 < 0 else 'worse' if d2 > 0 else 'equal'}, with "
            f"{top2.get('params_active', 0):,} active parameters against {main.get('params_active', 0):,}"
        )
        if s2["n"] > 1 or sm1["n"] > 1:
            band2 = noise_band_pct(s2["std"], sm1["std"], sm1["mean"])
            ev += f"; seed noise band ±{band2:.2f}% (2 × the larger seed std)"
        out.append(Finding("top2_matches_top1", claim, abs(d2) <= tol, ev + "."))
    return out


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _fmt_ms(st: Mapping[str, Any] | None) -> str:
    if st is None:
        return "—"
    return f"{st['mean']:.4f}" if st["n"] == 1 else f"{st['mean']:.4f} ± {st['std']:.4f}"


def render_report(results: Mapping[str, Any]) -> str:
    """``report.md`` from ``results`` (the ``results.json`` data); findings via :func:`derive_findings`."""
    s = results.get("settings", {})
    runs = results.get("runs", [])
    variants = aggregate_runs(runs)
    dense = next((a for a in variants if a["role"] == "dense"), None)
    ld = (dense or {}).get("test", {}).get("loss")
    domains: list[str] = list(results.get("domains", []))
    seeds = "; ".join(f"{a['name']} {_seed_list(a)}" for a in variants)
    lines = [
        f"# Emergence experiment: {results.get('name', '')}",
        "",
        f"Data: {results.get('data', {}).get('recipe', '?')} — domains {', '.join(domains) or '?'}. "
        f"MoE layers {s.get('moe_layers')} of {s.get('n_layers')}, {s.get('num_experts')} experts.",
        "",
        f"Token budget per run: {s.get('steps')} steps × {s.get('micro_batch')} × {s.get('grad_accum', 1)} "
        f"sequences × {s.get('seq_len')} tokens = {_fmt(s.get('tokens_per_run'), ',.0f')} tokens, the same "
        f"for every run (the train split holds {_fmt(results.get('tokens', {}).get('train'), ',.0f')}).",
        "",
        f"Seeds per variant: {seeds} ({len(runs)} runs); a seed sets the model initialization, the data "
        "order and the router noise, so the spread over seeds measures how much of a difference is noise.",
        "",
    ]
    cmp = moe_dense_noise(results)
    if cmp is not None and cmp["band_pct"] is None:
        lines.append(
            "Noise band (MoE vs dense): unknown — one seed per arm, no noise estimate; a difference of a "
            "percent or so can come from the seed alone."
        )
    elif cmp is not None:
        lines.append(
            f"Noise band (MoE vs dense): ±{cmp['band_pct']:.2f}% — twice the larger of the two arms' seed "
            f"standard deviations ({cmp['dense']['std']:.4f} dense, {cmp['main']['std']:.4f} MoE), relative to "
            "the dense mean. A difference of the means inside it is inconclusive; outside it the finding "
            "held (MoE lower) or did not hold (MoE higher)."
        )
    lines += ["", "## Results", ""]
    lines += [
        "Variants (every run the same token budget; a seed sets init, data order and router noise):",
        "",
    ]
    for a in variants:
        r = next(x for x in runs if x.get("role") == a["role"])
        moe = r.get("moe")
        how = (
            f"dense, MLP width {r.get('ffn_hidden')}"
            if not moe
            else f"top-{moe['top_k']} of {moe['num_experts']} experts × {moe['expert_hidden']} in layers "
            f"{r.get('moe_layers')}, lb_coef {moe['lb_coef']:g}, z_coef {moe['z_coef']:g}, router noise "
            f"{moe['router_noise_std']:g} annealed over {moe['noise_anneal_steps']} steps"
            + (", renormalized" if moe.get("renormalize") and moe["top_k"] > 1 else "")
        )
        lines.append(
            f"- **{a['name']}** ({a['role']}, seed{'s' if len(a['seeds']) > 1 else ''} {_seed_list(a)}): "
            f"{a.get('description', '')} — {how}."
        )
    lines += [
        "",
        "Per variant, mean ± sample std over its seeds (held-out bits/byte: lm-eval's rolling log-likelihood "
        "of the data run's first test records, task moeforge_heldout, through the same `moeforge` lm-eval model "
        "as `moeforge eval`; — when lm-eval is not installed):",
        "",
    ]
    head = ["variant", "role", "seeds", "active params", "total params", "test loss"]
    head += [f"test {d}" for d in domains]
    head += ["held-out bits/byte (lm-eval)", "Δ vs dense", "peak load (max)", "collapsed seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in variants:
        lt = a["test"].get("loss")
        peaks = [
            (x.get("routing") or {}).get("load_max_peak")
            for x in runs
            if x.get("role") == a["role"] and (x.get("routing") or {}).get("load_max_curve")
        ]
        row = [
            a["name"],
            a["role"],
            str(len(a["seeds"])),
            f"{a.get('params_active', 0):,}",
            f"{a.get('params_total', 0):,}",
            _fmt_ms(lt),
            *(_fmt_ms(a["test"].get(f"loss/{d}")) for d in domains),
            _fmt_ms(a["test"].get("heldout_bits_per_byte")),
            "—"
            if lt is None or ld is None or a["role"] == "dense"
            else f"{pct_change(lt['mean'], ld['mean']):+.2f}%",
            "—" if not peaks else f"{100 * max(peaks):.1f}%",
            "—"
            if not peaks
            else (
                f"{len(a['collapsed_seeds'])} of {len(peaks)} (seed "
                + ", ".join(str(k) for k in a["collapsed_seeds"])
                + ")"
                if a["collapsed_seeds"]
                else f"none of {len(peaks)}"
            ),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Per run (Δ against the dense mean):", ""]
    head = ["run", "role", "seed", "valid loss", "test loss"]
    head += [f"test {d}" for d in domains]
    head += ["Δ vs dense", "peak load", "final load", "first collapse step"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        test = r.get("test") or {}
        lt1 = run_test_loss(r)
        rt = r.get("routing") or {}
        fc = rt.get("first_collapse")
        row = [
            f"{r['name']}",
            r["role"],
            str(r.get("seed", "—")),
            _fmt((r.get("final_valid") or {}).get("loss")),
            _fmt(lt1),
            *(_fmt(test.get(f"loss/{d}")) for d in domains),
            "—"
            if lt1 is None or ld is None or r["role"] == "dense"
            else f"{pct_change(lt1, ld['mean']):+.2f}%",
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
    multi = [a["name"] for a in variants if len(a["seeds"]) > 1]
    single = [a["name"] for a in variants if len(a["seeds"]) == 1]
    if not multi:
        lines.append(
            f"- One seed per run and {_fmt(s.get('tokens_per_run'), ',.0f')} training tokens each: differences "
            "of a percent or so can come from the seed alone."
        )
    else:
        n = max(len(a["seeds"]) for a in variants)
        lines.append(
            f"- Several seeds for {', '.join(multi)}"
            + (f", one for {', '.join(single)}" if single else "")
            + f": a standard deviation from {n} seeds is itself rough, so the band is a guide, not a test."
            + (" The one-seed variants' verdicts carry no noise estimate of their own." if single else "")
        )
    sizes = ", ".join(f"{a['name']} {a.get('params_total', 0):,}" for a in variants)
    lines.append(
        f"- Tiny models ({sizes} parameters) trained on CPU for {_fmt(s.get('tokens_per_run'), ',.0f')} "
        f"tokens each; the study trained GPT-2 small for {STUDY['steps']:,.0f} steps."
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
