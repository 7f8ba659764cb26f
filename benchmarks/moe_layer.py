"""MoE layer forward+backward: moeforge vs transformers' MixtralSparseMoeBlock vs a dense matmul ceiling.

For each point of experts × top-k × tokens (d_model 256, expert hidden 512, fp32, CPU) it times, in
this process and interleaved round by round so they share the machine's noise:

- ``ours``: :class:`moeforge.model.moe.MoELayer` (router + sort + grouped SwiGLU + combine), per backend;
- ``hf_eager`` / ``hf_grouped_mm``: transformers' ``MixtralSparseMoeBlock`` with the same weights and
  each ``experts_implementation``;
- ``dense``: two plain matmuls of the same FLOPs (``[N·k, D]·[D, 2F]`` and ``[N·k, F]·[F, D]``, forward
  and backward) — the machine's ceiling for this work, with no routing and no activation.

GFLOP/s counts the expert matmuls only: ``18 · N · k · D · F`` for forward + backward. Prints one JSON
line per point (rates, ratios) and a summary line; ``--markdown`` also prints the table for
docs/PERFORMANCE.md. Run: ``python benchmarks/moe_layer.py [--quick] [--markdown]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

from moeforge.model.config import MoEConfig
from moeforge.model.moe import MoELayer

D_MODEL, HIDDEN = 256, 512


def _time(fn: Callable[[], None], budget_s: float) -> float:
    """Best-of-n seconds per call; n adapts so the whole measurement takes about ``budget_s``
    (at least one timed call after a warm-up, at most 15)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    n = max(0, min(15, int(budget_s / max(once, 1e-6))))
    best = once
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _hf_block(experts: int, top_k: int, impl: str, ours: MoELayer) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=D_MODEL,
        intermediate_size=HIDDEN,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.w13.transpose(1, 2))  # [E, 2F, D]
        block.experts.down_proj.copy_(ours.w2.transpose(1, 2))  # [E, D, F]
    return block


def run_point(
    experts: int, top_k: int, tokens: int, budget_s: float, backends: list[str]
) -> dict[str, object]:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=HIDDEN)
    ours = MoELayer(D_MODEL, cfg)
    with torch.no_grad():
        ours.router.weight.normal_(std=0.02)
        ours.w13.normal_(std=0.02)
        ours.w2.normal_(std=0.02)
    x = torch.randn(1, tokens, D_MODEL)
    gy = torch.randn(1, tokens, D_MODEL)
    flops = 18.0 * tokens * top_k * D_MODEL * HIDDEN

    fns: dict[str, Callable[[], None]] = {}
    for b in backends:

        def f_ours(b: str = b) -> None:
            ours.cfg.dispatch = b  # type: ignore[assignment]
            xi = x.clone().requires_grad_()
            y, _ = ours(xi)
            y.backward(gy)

        fns[f"ours_{b}"] = f_ours
    for impl in ("eager", "grouped_mm"):
        block = _hf_block(experts, top_k, impl, ours)

        def f_hf(block: torch.nn.Module = block) -> None:
            xi = x.clone().requires_grad_()
            block(xi).backward(gy)

        fns[f"hf_{impl}"] = f_hf

    a = tokens * top_k
    xa = torch.randn(a, D_MODEL, requires_grad=True)
    w1 = torch.randn(D_MODEL, 2 * HIDDEN, requires_grad=True)
    ha = torch.randn(a, HIDDEN, requires_grad=True)
    w2 = torch.randn(HIDDEN, D_MODEL, requires_grad=True)
    g1, g2 = torch.randn(a, 2 * HIDDEN), torch.randn(a, D_MODEL)

    def f_dense() -> None:
        (xa @ w1).backward(g1)
        (ha @ w2).backward(g2)

    fns["dense"] = f_dense

    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):  # interleave so every contender sees the same machine state
        for k, fn in fns.items():
            times[k].append(_time(fn, budget_s / 3))
    gflops = {k: flops / min(v) / 1e9 for k, v in times.items()}
    ours_best = max(gflops[f"ours_{b}"] for b in backends)
    hf_best = max(gflops["hf_eager"], gflops["hf_grouped_mm"])
    return {
        "experts": experts,
        "top_k": top_k,
        "tokens": tokens,
        "tokens_per_expert": tokens * top_k / experts,
        "gflops": {k: round(v, 2) for k, v in gflops.items()},
        "ours_auto": round(gflops.get("ours_auto", ours_best), 2),
        "ratio_vs_hf_best": round(gflops.get("ours_auto", ours_best) / hf_best, 3),
        "fraction_of_dense": round(gflops.get("ours_auto", ours_best) / gflops["dense"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 4-point subset with a short time budget")
    ap.add_argument("--markdown", action="store_true", help="also print the table for docs/PERFORMANCE.md")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of timing per contender and point")
    ap.add_argument(
        "--backends", default="auto,grouped_mm,loop,padded", help="comma-separated moeforge backends to time"
    )
    args = ap.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("benchmarks/moe_layer.py needs transformers: pip install -e '.[hf]'", file=sys.stderr)
        return 2
    torch.set_grad_enabled(True)
    grid = [(e, k, t) for e in (8, 64) for k in (1, 2, 8) for t in (64, 512, 4096)]
    if args.quick:
        grid = [(8, 2, 512), (64, 1, 64), (64, 2, 4096), (64, 8, 512)]
        args.budget = min(args.budget, 0.5)
    backends = [b for b in args.backends.split(",") if b]
    rows = []
    for e, k, t in grid:
        row = run_point(e, k, t, args.budget, backends)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ratios = [r["ratio_vs_hf_best"] for r in rows]
    dense_ok = [r for r in rows if r["tokens_per_expert"] >= 64]
    summary = {
        "summary": "moe_layer",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "geomean_ratio_vs_hf_best": round(math.exp(statistics.fmean(math.log(x) for x in ratios)), 3),
        "min_ratio_vs_hf_best": min(ratios),
        "min_fraction_of_dense_where_tpe_ge_64": min(
            (r["fraction_of_dense"] for r in dense_ok), default=None
        ),
    }
    print(json.dumps(summary), flush=True)
    if args.markdown:
        print()
        print(
            "| E | k | tokens | tok/expert | ours auto | HF eager | HF grouped_mm | dense | vs best HF | of dense |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            g = r["gflops"]
            print(
                f"| {r['experts']} | {r['top_k']} | {r['tokens']} | {r['tokens_per_expert']:g} | {r['ours_auto']} | "
                f"{g['hf_eager']} | {g['hf_grouped_mm']} | {g['dense']} | {r['ratio_vs_hf_best']}× | "
                f"{r['fraction_of_dense']:.0%} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
