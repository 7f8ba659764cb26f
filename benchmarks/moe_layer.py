"""One MoE layer, forward + backward: moeforge's ``MoELayer`` against transformers' ``MixtralSparseMoeBlock``
(its ``eager`` and ``grouped_mm`` experts) with identical weights, and against two plain matmuls of the same
FLOPs (the machine's ceiling), over experts × top-k × tokens at d_model 256, expert hidden 512, fp32 on CPU.
Before any timing, each point checks that every moeforge backend and transformers' ``grouped_mm`` produce
transformers ``eager``'s output, input gradient and router / expert weight gradients on the same input;
then all contenders run interleaved round by round, each round in a fresh seeded order (what one contender
leaves behind, freed memory and the cache, slows the next: a fixed order would charge it to the same one),
and a point's figure is the median round. GFLOP/s
count the expert matmuls only, ``18 · N · k · D · F`` for forward + backward.

Contenders at each point, in this process:

- ``ours_<backend>``: :class:`moeforge.model.moe.MoELayer` (router + sort + grouped SwiGLU + combine),
  ``dispatch`` forced to each of ``--backends`` (``auto`` is the figure; the rest show what it chose from),
  run as the trainer runs it on one CPU process: expert weight gradients into persistent buffers
  (:mod:`moeforge.model.grad_buffers`; ``--no-grad-buffers`` turns that off);
- ``hf_eager`` / ``hf_grouped_mm``: transformers' ``MixtralSparseMoeBlock`` with the same weights (our
  ``w13 [E, D, 2F]`` is its ``gate_up_proj [E, 2F, D]`` transposed, ``w2 [E, F, D]`` its ``down_proj``
  transposed, our router its ``gate``) and each ``experts_implementation``;
- ``dense``: two plain matmuls of the same FLOPs (``[N·k, D]·[D, 2F]`` and ``[N·k, F]·[F, D]``, forward
  and backward): the ceiling for this work, with no routing and no activation (not compared for output:
  it is a different function).

The output check compares with ``atol 1e-5, rtol 1e-4`` (fp32; the implementations sum in different
orders); a difference beyond that stops the run before any time is reported. A sample is one call, or
the mean of several back-to-back calls when one call is shorter than ``--budget / --rounds`` (calls
repeated per contender, so a slow peer is not repeated as often as the dense matmul; the count comes from
each contender's warm calls, so every sample lasts about as long and carries the same share of the switch
from the previous contender). Ratios are per
round: ``ours_auto`` against the transformers implementation with the faster median at that point, and
against ``dense`` (the share of the ceiling). Goals (issue 20): geometric mean of ours ÷ the best
transformers implementation ≥ 1.5, and ≥ 0.70 of the dense rate wherever tokens per expert ≥ 64.

Run: ``python benchmarks/moe_layer.py [--quick] [--rounds 5] [--budget 1.5] [--busy 2]``; ``--quick`` runs
three points with two rounds (its JSON goes to a temp directory).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import (
    Mismatch,
    Results,
    Timing,
    check_same,
    cpu_hog,
    interleave,
    paired_ratio,
    profile_shares,
)
from moeforge.model import grad_buffers
from moeforge.model.config import MoEConfig
from moeforge.model.dispatch import choose_backend
from moeforge.model.moe import MoELayer

D_MODEL, HIDDEN = 256, 512
ATOL, RTOL = 1e-5, 1e-4  # fp32, different summation orders
GOAL_GEOMEAN = 1.5  # ours ÷ best transformers implementation, geometric mean over the sweep
GOAL_OF_DENSE = 0.70  # ours ÷ dense rate where tokens per expert >= 64
HF_IMPLS = ("eager", "grouped_mm")


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


def _step_ours(
    ours: MoELayer, backend: str, x: torch.Tensor, gy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's work for the layer, as the trainer does it: gradients reset, forward, backward,
    and the expert weight gradients (persistent buffers, when attached) handed over as ``.grad``."""
    ours.zero_grad(set_to_none=True)
    buffers = [p for p in (ours.w13, ours.w2) if grad_buffers.buffered(p)]
    grad_buffers.begin_step(buffers)
    ours.cfg.dispatch = backend  # type: ignore[assignment]
    xi = x.clone().requires_grad_()
    y, _ = ours(xi)
    y.backward(gy)
    grad_buffers.publish(buffers)
    return xi, y


def _outputs_ours(ours: MoELayer, backend: str, x: torch.Tensor, gy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward output, input gradient and weight gradients (in our layout) of one call, on fresh grads."""
    xi, y = _step_ours(ours, backend, x, gy)
    assert xi.grad is not None and ours.router.weight.grad is not None
    assert ours.w13.grad is not None and ours.w2.grad is not None
    out = {
        "output": y.detach().clone(),
        "grad_input": xi.grad.clone(),
        "grad_router": ours.router.weight.grad.clone(),
        "grad_w13": ours.w13.grad.clone(),
        "grad_w2": ours.w2.grad.clone(),
    }
    ours.zero_grad(set_to_none=True)
    return out


def _outputs_hf(block: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same quantities from transformers' block, its weight gradients mapped to our layout."""
    block.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = block(xi)
    y.backward(gy)
    ex = block.experts
    out = {
        "output": y.detach().clone(),
        "grad_input": xi.grad.clone(),
        "grad_router": block.gate.weight.grad.clone(),
        "grad_w13": ex.gate_up_proj.grad.transpose(1, 2).clone(),  # [E, 2F, D] -> our [E, D, 2F]
        "grad_w2": ex.down_proj.grad.transpose(1, 2).clone(),  # [E, D, F] -> our [E, F, D]
    }
    block.zero_grad(set_to_none=True)
    return out


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --probe-activation: ours with the SwiGLU's elementwise passes (SiLU, the product, their backward) swapped
# for a compiled fused version, or for stand-ins that cost nothing (wrong output: timing only). The
# backends look the two functions up in moeforge.model.dispatch at call time.
FREE_ACT = "ours_auto, activation free"
COMPILED_ACT = "ours_auto, activation compiled"


def _fused_swiglu_2d(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = h.shape[-1] // 2
    s = torch.nn.functional.silu(h[:, :f])
    return s, s * h[:, f:]


def _fused_swiglu_backward_2d(h: torch.Tensor, silu: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    f = h.shape[-1] // 2
    g, u = h[:, :f], h[:, f:]
    s = torch.sigmoid(g)
    return torch.cat([ga * u * (s + silu * (1 - s)), ga * silu], 1)


def _activation_variants() -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
    fwd = torch.compile(_fused_swiglu_2d, dynamic=True)
    bwd = torch.compile(_fused_swiglu_backward_2d, dynamic=True)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])

    def compiled_fwd(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, a = fwd(flat(h))
        shape = (*h.shape[:-1], h.shape[-1] // 2)
        return s.view(shape), a.view(shape)

    def compiled_bwd(h: torch.Tensor, silu: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
        return bwd(flat(h), flat(silu), flat(ga)).view(h.shape)

    def free_fwd(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = h[..., : h.shape[-1] // 2]
        return g, g

    def free_bwd(h: torch.Tensor, silu: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(h)

    return {COMPILED_ACT: (compiled_fwd, compiled_bwd), FREE_ACT: (free_fwd, free_bwd)}


def _with_activation(
    fn: Callable[[], Any], pair: tuple[Callable[..., Any], Callable[..., Any]]
) -> Callable[[], Any]:
    """``fn`` run with the grouped SwiGLU's activation functions swapped for ``pair``."""
    from moeforge.model import dispatch

    def run() -> Any:
        saved = dispatch._swiglu, dispatch._swiglu_backward
        dispatch._swiglu, dispatch._swiglu_backward = pair
        try:
            return fn()
        finally:
            dispatch._swiglu, dispatch._swiglu_backward = saved

    return run


def _reps(once: dict[str, float], sample_s: float, cap: int = 64) -> dict[str, int]:
    """Calls per sample for each contender so one sample lasts about ``sample_s`` (one call if longer),
    from the time of one warm call each."""
    return {k: max(1, min(cap, round(sample_s / max(t, 1e-6)))) for k, t in once.items()}


def _warm_times(fns: dict[str, Callable[[], None]], sample_s: float) -> dict[str, float]:
    """Each contender's time per call once warm: the fastest of up to three calls (one when a call is
    longer than a sample). Sizing samples from a cold first call would give a contender whose first call
    was slow (the first layer call at a point pays its buffers' page faults) fewer calls per sample, so
    the switch from the previous contender would weigh more in each of its samples than in the others'."""
    out: dict[str, float] = {}
    for name, fn in fns.items():
        times = [_time_once(fn)]
        while times[-1] < sample_s and len(times) < 3:
            times.append(_time_once(fn))
        out[name] = min(times)
    return out


def _time_once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed(fns: dict[str, Callable[[], None]], reps: dict[str, int], rounds: int) -> dict[str, Timing]:
    """:func:`_harness.interleave` with a per-contender number of calls per sample (the harness's
    ``inner`` is one number for all contenders); samples are seconds per call."""

    def repeated(fn: Callable[[], None], n: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                fn()

        return run

    timings = interleave({k: repeated(fn, reps[k]) for k, fn in fns.items()}, rounds, warmup=1, shuffle=True)
    for k, t in timings.items():
        t.samples = [s / reps[k] for s in t.samples]
    return timings


def run_point(
    experts: int,
    top_k: int,
    tokens: int,
    backends: list[str],
    rounds: int,
    budget_s: float,
    buffers: bool = True,
    profile_calls: int = 0,
    probe_activation: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=HIDDEN)
    ours = MoELayer(D_MODEL, cfg)
    with torch.no_grad():
        ours.router.weight.normal_(std=0.02)
        ours.w13.normal_(std=0.02)
        ours.w2.normal_(std=0.02)
    if buffers:  # as the trainer runs it on one CPU process (train.persistent_expert_grads)
        grad_buffers.attach([ours.w13, ours.w2])
    x = torch.randn(1, tokens, D_MODEL)
    gy = torch.randn(1, tokens, D_MODEL)
    flops = 18.0 * tokens * top_k * D_MODEL * HIDDEN
    blocks = {f"hf_{impl}": _hf_block(experts, top_k, impl, ours) for impl in HF_IMPLS}

    # The output check: every implementation once on the same input, against transformers eager.
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for b in backends:
        outputs[f"ours_{b}"] = _outputs_ours(ours, b, x, gy)
    for name, block in blocks.items():
        outputs[name] = _outputs_hf(block, x, gy)
    variants = _activation_variants() if probe_activation else {}
    for name, pair in variants.items():  # the first call compiles
        out = _with_activation(lambda: _outputs_ours(ours, "auto", x, gy), pair)()
        if name != FREE_ACT:  # the free stand-ins compute something else: timing only
            outputs[name] = out
    verdict = check_same(outputs, "hf_eager", atol=ATOL, rtol=RTOL)
    max_diff = {k: _max_abs_diff(v, outputs["hf_eager"]) for k, v in outputs.items() if k != "hf_eager"}
    with torch.no_grad():
        _, stats = ours(x)
    assert stats is not None
    auto_picks = choose_backend("auto", x, stats.tokens_per_expert.tolist(), HIDDEN)

    fns: dict[str, Callable[[], None]] = {}
    for b in backends:

        def f_ours(b: str = b) -> None:
            _step_ours(ours, b, x, gy)

        fns[f"ours_{b}"] = f_ours
    for name, pair in variants.items():
        fns[name] = _with_activation(lambda: _step_ours(ours, "auto", x, gy), pair)
    for name, block in blocks.items():

        def f_hf(block: torch.nn.Module = block) -> None:
            block.zero_grad(set_to_none=True)  # a training step's fresh gradients, as ours
            xi = x.clone().requires_grad_()
            block(xi).backward(gy)

        fns[name] = f_hf

    a = tokens * top_k
    xa = torch.randn(a, D_MODEL, requires_grad=True)
    w1 = torch.randn(D_MODEL, 2 * HIDDEN, requires_grad=True)
    ha = torch.randn(a, HIDDEN, requires_grad=True)
    w2 = torch.randn(HIDDEN, D_MODEL, requires_grad=True)
    g1, g2 = torch.randn(a, 2 * HIDDEN), torch.randn(a, D_MODEL)

    def f_dense() -> None:
        xa.grad = w1.grad = ha.grad = w2.grad = None
        (xa @ w1).backward(g1)
        (ha @ w2).backward(g2)

    fns["dense"] = f_dense

    reps = _reps(_warm_times(fns, budget_s / rounds), budget_s / rounds)
    t = _timed(fns, reps, rounds)
    hf_best = min((f"hf_{i}" for i in HF_IMPLS), key=lambda k: t[k].median)
    figure = "ours_auto" if "ours_auto" in t else f"ours_{backends[0]}"
    vs_hf = paired_ratio(t[figure], t[hf_best])
    vs_dense = paired_ratio(t[figure], t["dense"])  # dense time ÷ ours: our share of the dense rate
    vs_eager = paired_ratio(t[figure], t["hf_eager"])
    prof: dict[str, Any] = {}
    if profile_calls:
        for name in (figure, hf_best, "dense"):
            fns[name]()  # warm
            prof[name] = profile_shares(fns[name], profile_calls)
        # ours with every non-matmul op free would take its matmul share of its time: the most it could
        # gain over the peer without faster matmuls
        ceiling = t[hf_best].median / (t[figure].median * max(prof[figure]["gemm_share"], 1e-9))
        prof["ceiling_vs_hf_best"] = round(ceiling, 3)
        # and its share of the dense rate under the same assumption: its matmuls alone against dense's
        prof["ceiling_of_dense"] = round(
            t["dense"].median / (t[figure].median * prof[figure]["gemm_share"]), 3
        )
    probe: dict[str, Any] = {}
    for name in variants:  # ours_auto ÷ the variant: how much faster ours would be with that activation
        r = paired_ratio(t[name], t[figure])
        probe[name] = {"speedup": r.as_dict(), "vs_hf_best": paired_ratio(t[name], t[hf_best]).as_dict()}
    return {
        **({"activation_probe": probe} if probe else {}),
        "experts": experts,
        "top_k": top_k,
        "tokens": tokens,
        "tokens_per_expert": tokens * top_k / experts,
        "auto_picks": auto_picks,
        "figure": figure,
        "calls_per_sample": reps,
        "timings": {k: v.as_dict() for k, v in t.items()},
        "gflops": {k: round(flops / v.median / 1e9, 2) for k, v in t.items()},
        "hf_best": hf_best,
        "vs_hf_best": vs_hf.as_dict(),
        "vs_hf_eager": vs_eager.as_dict(),
        "of_dense": vs_dense.as_dict(),
        "check": verdict,
        "check_max_abs_diff": {k: float(f"{v:.3g}") for k, v in max_diff.items()},
        **({"profile": prof} if prof else {}),
    }


def _range(r: dict[str, float]) -> str:
    return f"{r['ratio']:.3g} ({r['ratio_low']:.3g}–{r['ratio_high']:.3g})"


def _span(xs: list[float], fmt: str = ".3g", unit: str = "") -> str:
    """``lo–hi`` (or one value when they are equal), each followed by ``unit``."""
    lo, hi = min(xs), max(xs)
    return f"{lo:{fmt}}{unit}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}{unit}–{hi:{fmt}}{unit}"


def _geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def _where(r: dict[str, Any]) -> str:
    return f"{r['experts']} experts, top-{r['top_k']}, {r['tokens']} tokens"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_common_args(ap, rounds=5)
    ap.add_argument(
        "--budget",
        type=float,
        default=1.5,
        help="seconds of timing per contender and point, over all rounds: a call shorter than "
        "budget/rounds is repeated within a sample",
    )
    ap.add_argument(
        "--backends", default="auto,grouped_mm,loop,padded", help="comma-separated moeforge backends to time"
    )
    ap.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    ap.add_argument(
        "--no-grad-buffers",
        action="store_true",
        help="ours without persistent expert gradient buffers (the trainer attaches them on one CPU process)",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing each point, profile N calls of ours, the faster transformers implementation and "
        "dense: the share of matrix-multiply kernels in each, and the speed-up over the peer ours could "
        "reach if everything but its matmuls were free",
    )
    ap.add_argument(
        "--probe-activation",
        action="store_true",
        help="also time ours with the SwiGLU's elementwise passes compiled into fused kernels "
        "(torch.compile) and with them costing nothing (stand-ins, timing only): what fusing the "
        "activation gains, and the most it could",
    )
    args = ap.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("benchmarks/moe_layer.py needs transformers: pip install -e '.[hf]'", file=sys.stderr)
        return 2
    torch.set_grad_enabled(True)
    grid = [(e, k, t) for e in (8, 64) for k in (1, 2, 8) for t in (64, 512, 4096)]
    if args.quick:
        grid = [(8, 1, 64), (8, 2, 512), (8, 8, 512)]
        args.rounds = min(args.rounds, 2)
        args.budget = min(args.budget, 0.2)
    backends = [b for b in args.backends.split(",") if b]
    results = Results(
        "moe_layer",
        args,
        title="MoE layer, forward + backward: moeforge vs transformers' MixtralSparseMoeBlock",
    )
    rows = []
    try:
        with cpu_hog(args.busy):
            for e, k, t in grid:
                point = run_point(
                    e,
                    k,
                    t,
                    backends,
                    args.rounds,
                    args.budget,
                    not args.no_grad_buffers,
                    args.profile,
                    args.probe_activation,
                )
                rows.append(results.row(**point))
    except Mismatch as exc:
        print(f"error: {exc}; no time is reported", file=sys.stderr)
        return 1

    contenders = [f"ours_{b}" for b in backends] + [f"hf_{i}" for i in HF_IMPLS]
    results.check(
        f"forward output, input gradient, router and expert weight gradients against hf_eager on the same "
        f"input (atol {ATOL:g}, rtol {RTOL:g}), at each of the {len(rows)} points",
        {
            c: f"same at every point (largest difference {max(r['check_max_abs_diff'][c] for r in rows):.2g})"
            for c in contenders
            if c != "hf_eager"
        }
        | {"dense": "not compared (two plain matmuls of the same FLOPs: a different function)"},
    )

    figure = rows[0]["figure"]
    results.table(
        f"GFLOP/s (expert matmuls, forward + backward; median of {args.rounds} rounds), d_model {D_MODEL}, "
        f"expert hidden {HIDDEN}, fp32, {torch.get_num_threads()} threads. Ratios are the median of the "
        "per-round ratios, the rounds' lowest–highest in brackets; spread is the largest (max − min) / "
        "median of the contenders at that point.",
        [
            "E",
            "k",
            "tokens",
            "tok/expert",
            figure.replace("_", " "),
            "HF eager",
            "HF grouped_mm",
            "dense",
            "÷ best HF",
            "of dense",
            "spread",
        ],
        [
            [
                r["experts"],
                r["top_k"],
                r["tokens"],
                r["tokens_per_expert"],
                r["gflops"][figure],
                r["gflops"]["hf_eager"],
                r["gflops"]["hf_grouped_mm"],
                r["gflops"]["dense"],
                _range(r["vs_hf_best"]),
                _range(r["of_dense"]),
                max(v["spread"] for v in r["timings"].values()),
            ]
            for r in rows
        ],
    )
    if len(backends) > 1:
        results.table(
            "Backends on the same layer and input (GFLOP/s, same rounds); `auto picks` is the backend "
            "`dispatch: auto` resolves to at that point.",
            ["E", "k", "tokens", "auto picks", *[b for b in backends if b != "auto"]],
            [
                [r["experts"], r["top_k"], r["tokens"], r["auto_picks"]]
                + [r["gflops"][f"ours_{b}"] for b in backends if b != "auto"]
                for r in rows
            ],
        )

    # Goal 1: geometric mean of ours ÷ best transformers implementation over the sweep.
    med = [r["vs_hf_best"]["ratio"] for r in rows]
    geo = _geomean(med)
    geo_low = _geomean([r["vs_hf_best"]["ratio_low"] for r in rows])
    geo_high = _geomean([r["vs_hf_best"]["ratio_high"] for r in rows])
    results.goal(
        f"{figure} ÷ best transformers implementation, geometric mean over {len(rows)} points",
        geo,
        GOAL_GEOMEAN,
        spread=(geo_low, geo_high),
    )
    lo = min(rows, key=lambda r: r["vs_hf_best"]["ratio"])
    hi = max(rows, key=lambda r: r["vs_hf_best"]["ratio"])
    results.note(
        f"Against the faster transformers implementation at each point: geometric mean {geo:.3g}× over "
        f"{len(rows)} points; the range beside it in the goals is the geometric mean of each point's "
        f"lowest and of its highest round ({geo_low:.3g}×–{geo_high:.3g}×). Lowest point "
        f"{lo['vs_hf_best']['ratio']:.3g}× ({_where(lo)}), highest {hi['vs_hf_best']['ratio']:.3g}× "
        f"({_where(hi)}); ours is faster at {sum(x > 1 for x in med)} of {len(rows)} points."
    )
    for e in sorted({r["experts"] for r in rows}):
        sub = [r["vs_hf_eager"]["ratio"] for r in rows if r["experts"] == e]
        results.note(
            f"Against transformers' default eager experts at {e} experts: {_span(sub, unit='×')} over "
            f"{len(sub)} point{'s' if len(sub) > 1 else ''}."
        )
    for r in rows:
        fastest = max((k for k in r["gflops"] if k != "dense"), key=lambda k: r["gflops"][k])
        if fastest != "hf_eager":
            continue
        results.note(
            f"At {_where(r)} ({r['tokens_per_expert']:g} tokens per expert) transformers' eager experts are the "
            f"fastest implementation: {r['gflops']['hf_eager']:.3g} GFLOP/s against {r['gflops'][figure]:.3g} "
            f"for {figure}."
        )

    # Goal 2: share of the dense rate where tokens per expert >= 64 (the minimum over those points).
    big = [r for r in rows if r["tokens_per_expert"] >= 64]
    if big:
        worst = min(big, key=lambda r: r["of_dense"]["ratio"])
        results.goal(
            f"{figure} ÷ dense-matmul rate, lowest point with ≥ 64 tokens per expert ({_where(worst)})",
            worst["of_dense"]["ratio"],
            GOAL_OF_DENSE,
            spread=(worst["of_dense"]["ratio_low"], worst["of_dense"]["ratio_high"]),
            unit="",
        )
        shares = [r["of_dense"]["ratio"] for r in big]
        results.note(
            f"Share of the dense-matmul rate over the {len(big)} point{'s' if len(big) > 1 else ''} with ≥ 64 "
            f"tokens per expert: {_span(shares, '.0%')}."
        )
    results.note(
        "Every backward writes a weight gradient for every expert whatever the token count: "
        f"{3 * D_MODEL * HIDDEN * 4 / 1e6:.3g} MB per expert in fp32, "
        + ", ".join(
            f"{e * 3 * D_MODEL * HIDDEN * 4 / 1e6:.0f} MB at {e} experts"
            for e in sorted({r["experts"] for r in rows})
        )
        + "."
    )
    e_max = max(r["experts"] for r in rows)
    t_min = min(r["tokens"] for r in rows if r["experts"] == e_max)
    small = [r for r in rows if r["experts"] == e_max and r["tokens"] == t_min]
    ms = [v["median_s"] * 1e3 for r in small for k, v in r["timings"].items() if k != "dense"]
    results.note(
        f"At {e_max} experts and {t_min} tokens a forward + backward takes {_span(ms)} ms across the "
        "implementations and top-k (medians), where the dense matmuls of the same FLOPs take "
        f"{_span([r['timings']['dense']['median_s'] * 1e3 for r in small])} ms."
    )
    if "loop" in backends and "grouped_mm" in backends:
        large = [r for r in rows if r["tokens_per_expert"] >= 256]
        if large:
            lg = [r["gflops"]["ours_loop"] / r["gflops"]["ours_grouped_mm"] for r in large]
            results.note(
                f"The loop backend against grouped_mm where tokens per expert ≥ 256 ({len(large)} "
                f"point{'s' if len(large) > 1 else ''}): {_span(lg, unit='×')} (ratio of medians)."
            )
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        results.table(
            f"Where the time goes (torch.profiler, {args.profile} calls per contender after the timing): the "
            "share of self CPU time in matrix-multiply kernels, the three largest other ops of ours, and the "
            "ceiling: the faster transformers implementation's median ÷ (ours' median × its matmul share), "
            "the most ours could gain over the peer if everything but its matmuls took no time, and the "
            "share of the dense rate it would then reach.",
            [
                "E",
                "k",
                "tokens",
                "ours matmul",
                "HF best matmul",
                "dense matmul",
                "ours: largest other",
                "ceiling ÷ HF",
                "ceiling of dense",
            ],
            [
                [
                    r["experts"],
                    r["top_k"],
                    r["tokens"],
                    f"{r['profile'][r['figure']]['gemm_share']:.0%}",
                    f"{r['profile'][r['hf_best']]['gemm_share']:.0%}",
                    f"{r['profile']['dense']['gemm_share']:.0%}",
                    r["profile"][r["figure"]]["top_other"],
                    f"{r['profile']['ceiling_vs_hf_best']:.2f}×",
                    f"{r['profile']['ceiling_of_dense']:.0%}",
                ]
                for r in profiled
            ],
        )
        ceilings = [r["profile"]["ceiling_vs_hf_best"] for r in profiled]
        results.note(
            f"Ceiling over the faster transformers implementation with free non-matmul work: geometric mean "
            f"{_geomean(ceilings):.3g}× over {len(ceilings)} points ({_span(ceilings, unit='×')})."
        )
        big_p = [r for r in profiled if r["tokens_per_expert"] >= 64]
        if big_p:
            dense_ceil = [r["profile"]["ceiling_of_dense"] for r in big_p]
            results.note(
                f"With ≥ 64 tokens per expert, ours' matmuls alone run at {_span(dense_ceil, '.0%')} of the "
                "dense rate: the grouped kernels on groups of that size, not the routing around them, set "
                "how close to the dense rate the layer can get."
            )
    probed = [r for r in rows if "activation_probe" in r]
    if probed:
        results.table(
            "The activation probe (same rounds): ours_auto with the SwiGLU's elementwise passes (SiLU, the "
            "product and their backward) compiled into fused kernels by torch.compile (output checked "
            "above), and with them replaced by stand-ins that cost nothing (a different function: timing "
            "only). Speed-up is ours_auto's median ÷ the variant's (median of the per-round ratios); ÷ best "
            "HF is the variant against the faster transformers implementation.",
            [
                "E",
                "k",
                "tokens",
                "compiled: speed-up",
                "compiled ÷ best HF",
                "free: speed-up",
                "free ÷ best HF",
            ],
            [
                [r["experts"], r["top_k"], r["tokens"]]
                + [
                    _range(r["activation_probe"][name][key])
                    for name in (COMPILED_ACT, FREE_ACT)
                    for key in ("speedup", "vs_hf_best")
                ]
                for r in probed
            ],
        )
        for name, what in ((COMPILED_ACT, "compiled into fused kernels"), (FREE_ACT, "costing nothing")):
            g = _geomean([r["activation_probe"][name]["vs_hf_best"]["ratio"] for r in probed])
            up = [r["activation_probe"][name]["speedup"]["ratio"] for r in probed]
            results.note(
                f"With the activation {what}: ours ÷ the faster transformers implementation, geometric mean "
                f"{g:.3g}× over {len(probed)} points; ours_auto's own speed-up {_span(up, unit='×')}."
            )
    results.note(f"torch {torch.__version__}, transformers {transformers.__version__}.")
    results.write()

    if args.markdown:
        for tab in results.doc["tables"]:
            print()
            print("| " + " | ".join(tab["columns"]) + " |")
            print("|" + "---|" * len(tab["columns"]))
            for row in tab["rows"]:
                print("| " + " | ".join(str(x) for x in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
