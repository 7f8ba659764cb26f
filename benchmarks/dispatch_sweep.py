"""The grouped SwiGLU's backends over group sizes and padding, and what ``dispatch: auto`` picks from them:
``grouped_swiglu`` forward + backward (weight gradients into persistent buffers, as the trainer runs it
on one CPU process) at d_model 256, expert hidden 512, fp32, for 8 and 64 experts, rows per expert from
8 to 512, and group sizes spread evenly around that mean so the padding the ``padded`` backend adds
(the largest group × experts ÷ rows) runs from none to about 1.75×. Then routed points, 1 to 64 rows
per expert, each row sent to a random expert as an untrained router does: uneven groups, and at few
rows per expert idle experts, whose padded rows the ``padded`` backend computes too.

Before any timing, each point checks that every backend produces the ``loop`` backend's output, input
gradient and weight gradients on the same input (``atol 1e-5, rtol 1e-4``; a difference stops the run).
The backends then run interleaved round by round, each round in a fresh seeded order; a point's figure
is the median round. The table says
which backend was fastest, which one ``auto`` (:func:`moeforge.model.dispatch.choose_backend`) resolves
to for those group sizes, and the fastest backend's median ÷ the picked one's: how much ``auto`` leaves
on the table at that point. This is the evidence behind ``auto``'s thresholds, and the run to repeat on
another CPU before trusting them there.

Run: ``python benchmarks/dispatch_sweep.py [--quick] [--rounds 3] [--budget 0.6]``; ``--quick`` runs five
points with two rounds (its JSON goes to a temp directory).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Mismatch, Results, check_same, cpu_hog
from moe_layer import D_MODEL, HIDDEN, _reps, _timed, _warm_times
from moeforge.model import grad_buffers
from moeforge.model.dispatch import choose_backend, grouped_swiglu

ATOL, RTOL = 1e-5, 1e-4
BACKENDS = ("grouped_mm", "loop", "padded")
EXPERTS = (8, 64)
PER_EXPERT = (8, 16, 32, 64, 128, 256, 512)
SPREADS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75)  # group sizes from (1 - s) to (1 + s) × the mean
ROUTED = (1, 2, 4, 8, 16, 32, 64)  # rows per expert of the routed points: each row to a random expert


def group_sizes(experts: int, per_expert: int, spread: float) -> list[int]:
    """``experts`` group sizes spread evenly from ``(1 - spread)`` to ``(1 + spread)`` × ``per_expert``."""
    if experts == 1:
        return [per_expert]
    return [round(per_expert * (1 + spread * (2 * i / (experts - 1) - 1))) for i in range(experts)]


def routed_sizes(experts: int, per_expert: int, seed: int = 0) -> list[int]:
    """Group sizes of ``experts × per_expert`` rows each sent to a uniformly random expert, as an untrained
    router spreads them: uneven, and with few rows per expert some experts idle."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(experts, (experts * per_expert,), generator=g)
    return torch.bincount(picks, minlength=experts).tolist()


def run_point(
    experts: int, per_expert: int, spread: float | None, rounds: int, budget_s: float
) -> dict[str, Any]:
    """One point: group sizes spread evenly by ``spread``, or routed (:func:`routed_sizes`) when it is None."""
    torch.manual_seed(0)
    counts = routed_sizes(experts, per_expert) if spread is None else group_sizes(experts, per_expert, spread)
    n = sum(counts)
    counts_E = torch.tensor(counts)
    w13 = torch.nn.Parameter(torch.randn(experts, D_MODEL, 2 * HIDDEN) * 0.02)
    w2 = torch.nn.Parameter(torch.randn(experts, HIDDEN, D_MODEL) * 0.02)
    grad_buffers.attach([w13, w2])
    x = torch.randn(n, D_MODEL)
    gy = torch.randn(n, D_MODEL)

    def step(backend: str) -> dict[str, torch.Tensor]:
        grad_buffers.begin_step([w13, w2])
        xi = x.clone().requires_grad_()
        y = grouped_swiglu(xi, w13, w2, counts_E, backend)  # type: ignore[arg-type]
        y.backward(gy)
        grad_buffers.publish([w13, w2])
        assert xi.grad is not None and w13.grad is not None and w2.grad is not None
        out = {"output": y.detach(), "grad_input": xi.grad, "grad_w13": w13.grad, "grad_w2": w2.grad}
        w13.grad = w2.grad = None
        return out

    outputs = {b: {k: v.clone() for k, v in step(b).items()} for b in BACKENDS}
    verdict = check_same(outputs, "loop", atol=ATOL, rtol=RTOL)
    fns: dict[str, Callable[[], None]] = {}
    for b in BACKENDS:

        def run(b: str = b) -> None:
            step(b)

        fns[b] = run
    t = _timed(fns, _reps(_warm_times(fns, budget_s / rounds), budget_s / rounds), rounds)
    med = {b: t[b].median for b in BACKENDS}
    fastest = min(med, key=med.__getitem__)
    picks = choose_backend("auto", x, counts, HIDDEN)
    return {
        "experts": experts,
        "per_expert": per_expert,
        "spread": "routed" if spread is None else spread,
        "rows": n,
        "active": sum(1 for c in counts if c),
        "padding": round(max(counts) * experts / n, 3),
        "gflops": {b: round(18.0 * n * D_MODEL * HIDDEN / med[b] / 1e9, 1) for b in BACKENDS},
        "spreads": {b: t[b].spread for b in BACKENDS},
        "fastest": fastest,
        "auto_picks": picks,
        "picked_vs_fastest": round(med[fastest] / med[picks], 3),
        "check": verdict,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_common_args(ap, rounds=3)
    ap.add_argument(
        "--budget", type=float, default=0.6, help="seconds of timing per backend and point, over all rounds"
    )
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    grid: list[tuple[int, int, float | None]] = [
        (e, p, s) for e in EXPERTS for p in PER_EXPERT for s in SPREADS
    ]
    grid += [(e, p, None) for e in EXPERTS for p in ROUTED]
    if args.quick:
        grid = [(8, 16, 0.0), (8, 64, 0.35), (64, 32, 0.1), (64, 256, 0.5), (64, 2, None)]
        args.rounds = min(args.rounds, 2)
        args.budget = min(args.budget, 0.1)
    results = Results(
        "dispatch_sweep", args, title="MoE dispatch backends over group sizes and padding, and auto's pick"
    )
    rows = []
    try:
        with cpu_hog(args.busy):
            for e, p, s in grid:
                rows.append(results.row(**run_point(e, p, s, args.rounds, args.budget)))
    except Mismatch as exc:
        print(f"error: {exc}; no time is reported", file=sys.stderr)
        return 1
    results.check(
        f"output, input gradient and weight gradients against the loop backend on the same input (atol "
        f"{ATOL:g}, rtol {RTOL:g}), at each of the {len(rows)} points",
        {b: "same at every point" for b in BACKENDS if b != "loop"},
    )
    results.table(
        f"GFLOP/s of the grouped SwiGLU, forward + backward (median of {args.rounds} rounds), d_model "
        f"{D_MODEL}, expert hidden {HIDDEN}, fp32, {torch.get_num_threads()} threads; padding is what the "
        "padded backend multiplies the rows by; the last column is the fastest backend's median ÷ the "
        "picked one's.",
        ["E", "rows/expert", "groups", "padding", *BACKENDS, "fastest", "auto picks", "picked ÷ fastest"],
        [
            [
                r["experts"],
                r["per_expert"],
                "even" if r["spread"] != "routed" else f"routed, {r['active']} active",
                r["padding"],
                *(r["gflops"][b] for b in BACKENDS),
                r["fastest"],
                r["auto_picks"],
                r["picked_vs_fastest"],
            ]
            for r in rows
        ],
    )
    ratios = [r["picked_vs_fastest"] for r in rows]
    worst = min(rows, key=lambda r: r["picked_vs_fastest"])
    results.note(
        f"auto picks the fastest backend at {sum(r['fastest'] == r['auto_picks'] for r in rows)} of "
        f"{len(rows)} points and one within a tenth of it at {sum(x >= 0.9 for x in ratios)}; median "
        f"{statistics.median(ratios):.3g} of the fastest, lowest {worst['picked_vs_fastest']:.3g} "
        f"({worst['experts']} experts, {worst['per_expert']} rows per expert, padding {worst['padding']:g}: "
        f"{worst['auto_picks']} where {worst['fastest']} was fastest)."
    )
    spread = max(max(r["spreads"].values()) for r in rows)
    results.note(
        f"The largest spread of a backend's rounds at any point was {spread:.0%} of its median: "
        "differences between backends smaller than that at a single point are noise."
    )
    results.note(f"torch {torch.__version__}.")
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
