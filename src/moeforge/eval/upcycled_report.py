"""The upcycled study's verdicts and report: a pure function of ``results.json``, nothing written ahead.

Each of the reference study's three claims is judged from the measured numbers:

1. *MoE beats dense* — the main arm's mean test loss against the dense arm's, over their seeds. The noise
   band is twice the larger of the two arms' seed standard deviations; a difference inside it is
   "inconclusive", a lower MoE loss outside it "held", a higher one outside it "not held".
2. *Without LB one expert takes over* — "held" when the no-LB arm collapsed (one expert above the
   threshold for ``collapse_patience`` consecutive checks) and the main arm (with LB) did not.
3. *Top-2 ≈ top-1* — "held" when the mean test losses differ by at most ``similar_pct`` percent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeforge.eval.findings import band_verdict, mean_std, noise_band_pct

__all__ = ["derive_upcycled_findings", "render_upcycled_report"]

STUDY = {"dense": 2.157, "moe": 2.080, "top2": 2.077, "collapse_share": 73.6, "collapse_at_pct": 5.0}


def _by_role(results: Mapping[str, Any], role: str) -> list[dict[str, Any]]:
    return sorted((r for r in results["runs"].values() if r["role"] == role), key=lambda r: r["seed"])


def _stats(runs: list[dict[str, Any]], key: str = "overall") -> tuple[float, float] | None:
    xs = [r["test"][key] for r in runs if key in r["test"]]
    return mean_std(xs) if xs else None


def derive_upcycled_findings(results: Mapping[str, Any]) -> list[dict[str, str]]:
    """``[{claim, verdict, evidence}]`` for the three claims (see the module docstring)."""
    cfg = results["config"]
    out = []
    dense, main = _stats(_by_role(results, "dense")), _stats(_by_role(results, "main"))
    if dense and main:
        diff = (main[0] - dense[0]) / dense[0] * 100
        band = noise_band_pct(dense[1], main[1], dense[0])
        verdict = {None: "inconclusive", True: "held", False: "not held"}[band_verdict(diff, band)]
        out.append(
            {
                "claim": "MoE (upcycled, top-1) reaches a lower eval loss than dense (study: −3.6%)",
                "verdict": verdict,
                "evidence": f"MoE {main[0]:.4f} ± {main[1]:.4f} vs dense {dense[0]:.4f} ± {dense[1]:.4f} "
                f"(mean ± std over seeds): {diff:+.2f}%, noise band ±{band:.2f}%",
            }
        )
    nolb, mains = _by_role(results, "no_lb"), _by_role(results, "main")
    if nolb and mains:
        collapsed = [r for r in nolb if r.get("collapse_step") is not None]
        main_collapsed = [r for r in mains if r.get("collapse_step") is not None]
        top = max((x["max_share"] for r in nolb for x in r["load"]), default=0.0)
        steps = cfg["steps"]
        if collapsed:
            at = min(r["collapse_step"] for r in collapsed)
            ev = f"no-LB collapsed at step {at} ({at / steps:.0%} of training); peak expert share {top:.1%}"
        else:
            ev = f"no-LB never kept one expert above {cfg['collapse_threshold']:.0%}; peak share {top:.1%}"
        ev += f"; with LB {len(main_collapsed)} of {len(mains)} seeds collapsed"
        verdict = "held" if collapsed and not main_collapsed else "not held"
        out.append(
            {
                "claim": "Without the LB loss one expert takes over (study: 73.6% by 5% of training)",
                "verdict": verdict,
                "evidence": ev,
            }
        )
    top2 = _stats(_by_role(results, "top2"))
    if top2 and main:
        diff = (top2[0] - main[0]) / main[0] * 100
        verdict = "held" if abs(diff) <= cfg["similar_pct"] else "not held"
        out.append(
            {
                "claim": f"Top-2 ≈ top-1 (within {cfg['similar_pct']}%; study: 2.077 vs 2.080)",
                "verdict": verdict,
                "evidence": f"top-2 {top2[0]:.4f} vs top-1 {main[0]:.4f}: {diff:+.2f}%",
            }
        )
    return out


def _affinity_table(run: Mapping[str, Any], domains: list[str]) -> list[str]:
    """Per MoE layer: one row per expert, the share of each domain's tokens it received."""
    out = []
    for layer, mat in sorted(run.get("affinity", {}).items(), key=lambda kv: int(kv[0])):
        spec = run.get("specialization", {}).get(layer, 0.0)
        out += [
            f"Layer {layer} (specialization {spec:.3f}):",
            "",
            "| expert | " + " | ".join(domains) + " |",
            "|---|" + "---|" * len(domains),
        ]
        out += [f"| {e} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for e, row in enumerate(mat)]
        out.append("")
    return out


def render_upcycled_report(results: Mapping[str, Any]) -> str:
    """Markdown: setup, per-arm and per-run tables, validation curves, verdicts, routing."""
    cfg = results["config"]
    domains = results["cache"]["domains"]
    roles = ("dense", "main", "no_lb", "top2")
    lines = [
        f"# {cfg['name']}: the emergence study on a real pretrained model",
        "",
        f"Base: `{cfg['base']}`, its last {cfg['train_layers']} blocks (and the final norm) trained over a frozen, "
        f"cached trunk of {results['cache']['trunk_layers']} blocks; {cfg['steps']} steps × {cfg['micro_batch']} "
        f"sequences × {cfg['seq_len']} tokens = {results['tokens_per_run']:,} tokens per run, the same tokens "
        "for every run (a seed changes their order and, for MoE arms, the router's initialization and noise). "
        f"Validation: {cfg['valid_per_domain']} sequences per domain; test: {cfg['test_per_domain']} per domain. "
        f"Wall time {results['wall_seconds'] / 60:.1f} min on {results['machine']['cpus']} CPUs "
        f"({cfg['parallel']} runs at a time, {cfg['threads']} thread each; trunk cache "
        f"{results['cache']['seconds']:.0f} s).",
        "",
        "## Arms (mean ± std over seeds; test cross-entropy, nats per token)",
        "",
        "| arm | seeds | test | " + " | ".join(domains) + " | step-0 valid | collapse step |",
        "|---|---|---|" + "---|" * len(domains) + "---|---|",
    ]
    for role in roles:
        runs = _by_role(results, role)
        if not runs:
            continue
        s = _stats(runs)
        assert s is not None
        per = []
        for d in domains:
            ds = _stats(runs, d)
            per.append(
                "–" if ds is None else (f"{ds[0]:.4f} ± {ds[1]:.4f}" if len(runs) > 1 else f"{ds[0]:.4f}")
            )
        v0 = sorted({f"{r['valid'][0]['overall']:.4f}" for r in runs})
        col = [str(r["collapse_step"]) for r in runs if r.get("collapse_step") is not None]
        test = f"{s[0]:.4f} ± {s[1]:.4f}" if len(runs) > 1 else f"{s[0]:.4f}"
        lines.append(
            f"| {runs[0]['arm']} | {', '.join(str(r['seed']) for r in runs)} | {test} | "
            + " | ".join(per)
            + f" | {', '.join(v0)} | {', '.join(col) or 'none'} |"
        )
    lines += [
        "",
        "The step-0 column is every run's validation loss before its first step: upcycled arms start exactly "
        "where the dense model starts (step-0 parity), so the differences below are what training made of "
        "the extra capacity.",
        "",
        "## Verdicts (derived from the numbers)",
        "",
    ]
    for f in derive_upcycled_findings(results):
        lines.append(f"- **{f['verdict']}** — {f['claim']}: {f['evidence']}")
    lines += [
        "",
        "## Runs",
        "",
        "| run | seed | test | " + " | ".join(domains) + " | valid by step | peak expert share | seconds |",
        "|---|---|---|" + "---|" * len(domains) + "---|---|---|",
    ]
    for role in roles:
        for r in _by_role(results, role):
            curve = " → ".join(f"{v['overall']:.3f}" for v in r["valid"])
            peak = max((x["max_share"] for x in r.get("load", [])), default=None)
            lines.append(
                f"| {r['arm']} | {r['seed']} | {r['test']['overall']:.4f} | "
                + " | ".join(f"{r['test'].get(d, float('nan')):.4f}" for d in domains)
                + f" | {curve} | {'–' if peak is None else f'{peak:.1%}'} | {r['seconds']:.0f} |"
            )
    lines += [
        "",
        f"Validation at steps {', '.join(str(v['step']) for v in next(iter(results['runs'].values()))['valid'])}.",
        "",
    ]
    lines += ["## Routing at the end: expert × domain shares on the test split", ""]
    for role in ("main", "no_lb", "top2"):
        runs = _by_role(results, role)
        if runs:
            lines += [f"### {runs[0]['arm']}, seed {runs[0]['seed']}", ""]
            lines += _affinity_table(runs[0], domains)
    return "\n".join(lines)
