"""Training step: the ``small`` MoE preset against the dense model of equal active parameters, one optimizer
step as the trainer takes it (forward, ``(loss + aux_loss).backward()``, clipping, AdamW, ``zero_grad``,
``router_step``) on the same random batch, fp32 on CPU. The two models, and the MoE with each forced
dispatch backend, take one step in turn per round (the order rotated each round) in one process; a figure
is the median round, and MoE ÷ dense is the median of the per-round ratios. Achieved FLOP/s count the
model FLOPs of the active parameters, and MFU divides them by the matmul peak measured in the same run
with the same threads. Before timing, the forced backends must reproduce ``auto``'s loss and gradients.

The dense twin is the same config with ``moe: null`` and ``ffn_hidden = top_k × expert_hidden``, so a
token touches the same MLP parameters in both (the MoE adds only its routers; both counts are recorded).
Tokens are random ids, ``--batch × --seq`` per step (bf16 autocast on CUDA). After ``--warmup`` untimed
rounds, ``--rounds`` timed rounds (``--steps`` is the same option). MoE rows: dispatch ``auto`` (the
default) and, with ``--backends``, forced backends on the same model and optimizer.

Output check (before any time is reported, on the first batch, no optimizer step): each forced backend's
loss and every parameter gradient against ``auto``'s (``atol 1e-5, rtol 1e-4`` in fp32; ``1e-2`` under
bf16 autocast), and the dense twin's initial loss beside the MoE's (a different model: the difference is
recorded, not an error). Achieved FLOP/s is ``sizing.flops_per_token(cfg, seq)["training"]`` (3 × forward:
2 × active matmul params + attention scores) × tokens/s — not what the hardware executed (routing,
gathers, the optimizer and elementwise work count as zero). MFU divides it by
:func:`_harness.measure_peak_flops` (square fp32 matmuls, bf16 on CUDA), measured in this run before and
after the timed rounds with the run's threads (the higher of the two is used); the script refuses to
report an MFU above 1 (exit 1): that would mean the peak was not measured under the step's conditions.

``--breakdown`` also times one MoE layer's parts, forward + backward on the same hidden states,
interleaved: whole layer, router alone, expert SwiGLU alone (rows pre-sorted), and the dense twin's MLP;
the layer minus router minus experts is the dispatch overhead (sort, gather, combine, stats); and each
model's grad clipping + AdamW step, which scales with *total* parameters. ``--profile N`` runs N more
steps of MoE (auto) and dense under ``torch.profiler`` and records each one's top ops by self CPU time.

Goal (issue 20): MoE step time ≤ 1.3 × the dense step time. On a shared machine, other processes stall
torch's thread pool at every op: compare ``--threads 1``.
Run: ``python benchmarks/train_step.py [--quick] [--breakdown] [--profile 3] [--threads 1] [--busy 2]``
(``--quick``: batch 4 × 128 tokens, auto and loop, one warm-up and two timed rounds; JSON to a temp dir).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Mismatch, Results, check_same, cpu_hog, interleave, paired_ratio
from moeforge.model.config import ModelConfig, load_model_config
from moeforge.model.dispatch import choose_backend, grouped_swiglu
from moeforge.model.moe import sort_assignments
from moeforge.model.sizing import count_params, flops_per_token
from moeforge.model.transformer import MoETransformer
from moeforge.train.config import OptimConfig
from moeforge.train.metrics import mfu
from moeforge.train.optim import build_optimizer

TARGET = 1.3  # MoE step time at most this × the dense step time
TOL_FP32 = (1e-5, 1e-4)  # (atol, rtol): the backends sum in different orders
TOL_BF16 = (1e-2, 1e-2)


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every MoE MLP replaced by a dense SwiGLU of ``top_k × expert_hidden``: equal active MLP
    parameters and FLOPs per token (the routers are the only difference)."""
    if cfg.moe is None or cfg.moe.layers is not None:
        raise ValueError(f"{cfg.name}: the dense twin needs an MoE config on every layer (moe.layers: null)")
    return cfg.model_copy(
        update={"name": f"{cfg.name}-dense", "moe": None, "ffn_hidden": cfg.moe.top_k * cfg.moe.expert_hidden}
    )


@dataclass
class Contender:
    name: str
    model: MoETransformer
    optimizer: torch.optim.Optimizer
    flops_per_token: float
    dispatch: str | None = None  # MoE backend to force before each step; None for the dense model
    cpu_times: list[float] = field(default_factory=list)  # this process's CPU seconds (all threads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _set_dispatch(model: MoETransformer, backend: str) -> None:
    for layer in model.moe_layers():
        layer.cfg.dispatch = backend  # type: ignore[assignment]


def train_step(
    c: Contender, ids_BT: torch.Tensor, labels_BT: torch.Tensor, clip: float | None
) -> tuple[float, float]:
    """One optimizer step as the trainer takes it; returns its (wall, process CPU) time in seconds."""
    if c.dispatch is not None:
        _set_dispatch(c.model, c.dispatch)
    device = ids_BT.device
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with _autocast(device):
        out = c.model(ids_BT, labels_BT)
    assert out.loss is not None
    total = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
    total.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(c.model.parameters(), clip)
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    c.model.router_step()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def loss_and_grads(c: Contender, ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> dict[str, Any]:
    """The step's loss and every parameter's gradient, without an optimizer step (gradients cleared after)."""
    if c.dispatch is not None:
        _set_dispatch(c.model, c.dispatch)
    c.model.zero_grad(set_to_none=True)
    with _autocast(ids_BT.device):
        out = c.model(ids_BT, labels_BT)
    assert out.loss is not None
    total = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
    total.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in c.model.named_parameters() if p.grad is not None}
    c.model.zero_grad(set_to_none=True)
    return {"loss": out.loss.detach().float().clone(), "grads": grads}


def _max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    d = float((a["loss"] - b["loss"]).abs())
    for k, g in a["grads"].items():
        d = max(d, float((g.double() - b["grads"][k].double()).abs().max()))
    return d


def _auto_resolves_to(model: MoETransformer, ids_BT: torch.Tensor) -> list[str]:
    """The backend ``auto`` picks in each MoE layer for this batch (it depends on the routed group sizes)."""
    with torch.no_grad(), _autocast(ids_BT.device):
        out = model(ids_BT)
    dtype = torch.bfloat16 if ids_BT.is_cuda else model.embed.weight.dtype  # what the experts see
    x = model.embed.weight.new_empty(0, model.cfg.d_model, dtype=dtype)
    hidden = model.cfg.moe.expert_hidden if model.cfg.moe is not None else None
    return [
        choose_backend("auto", x, s.tokens_per_expert.tolist(), hidden)
        for _, s in sorted(out.moe_stats.items())
    ]


def _timed(fns: dict[str, Callable[[], None]], device: torch.device, rounds: int) -> dict[str, Any]:
    """:func:`_harness.interleave` of ``fns`` (one warm-up round), CUDA-synchronized."""
    return interleave(fns, rounds, warmup=1, sync=lambda: _sync(device))


def layer_breakdown(
    moe_model: MoETransformer,
    dense_model: MoETransformer,
    batch: int,
    seq: int,
    device: torch.device,
    rounds: int,
) -> list[dict[str, object]]:
    """Median forward + backward time of one MoE layer and its parts vs the dense twin's MLP, same inputs."""
    layer = moe_model.moe_layers()[0]
    mlp = dense_model.blocks[0].mlp
    d = moe_model.cfg.d_model
    gen = torch.Generator(device="cpu").manual_seed(1)
    x_BTD = torch.randn(batch, seq, d, generator=gen).to(device)
    gy_BTD = torch.randn(batch, seq, d, generator=gen).to(device)
    x_ND = x_BTD.view(-1, d)
    moe_cfg = layer.cfg
    _set_dispatch(moe_model, "auto")

    with torch.no_grad():
        r = layer.router(x_ND, None)
    order_A, counts_E, _ = sort_assignments(r.indices, layer.w13.shape[0], None)
    x_AD = x_ND.index_select(0, order_A % x_ND.shape[0])
    gy_AD = torch.randn(x_AD.shape, generator=gen).to(device)
    backend = choose_backend("auto", x_AD, counts_E.tolist(), moe_cfg.expert_hidden)

    def whole() -> None:
        xi = x_BTD.detach().requires_grad_()
        with _autocast(device):
            y, s = layer(xi)
            aux = moe_cfg.lb_coef * s.lb_loss + moe_cfg.z_coef * s.z_loss
        torch.autograd.backward([y, aux], [gy_BTD, torch.ones_like(aux)])

    def router() -> None:
        xi = x_ND.detach().requires_grad_()
        with _autocast(device):
            ro = layer.router(xi, None)
            aux = moe_cfg.lb_coef * ro.lb_loss + moe_cfg.z_coef * ro.z_loss
        torch.autograd.backward([ro.weights, aux], [torch.ones_like(ro.weights), torch.ones_like(aux)])

    def experts() -> None:
        xi = x_AD.detach().requires_grad_()
        with _autocast(device):
            y = grouped_swiglu(xi, layer.w13, layer.w2, counts_E, "auto")
        y.backward(gy_AD.to(y.dtype))

    def dense() -> None:
        xi = x_BTD.detach().requires_grad_()
        with _autocast(device):
            y = mlp(xi)
        y.backward(gy_BTD.to(y.dtype))

    parts = {"moe_layer": whole, "router": router, "experts": experts, "dense_mlp": dense}
    timings = _timed(parts, device, rounds)
    for m in (moe_model, dense_model):
        m.zero_grad(set_to_none=True)
    times = {k: t.median for k, t in timings.items()}
    spreads = {k: t.spread for k, t in timings.items()}
    times["dispatch_overhead"] = times["moe_layer"] - times["router"] - times["experts"]
    return [
        {
            "breakdown": k,
            "ms_per_layer": round(v * 1e3, 2),
            "ms_per_step": round(v * 1e3 * len(moe_model.moe_layers()), 1),
            "over_dense_mlp": round(v / times["dense_mlp"], 3),
            **({"spread": round(spreads[k], 3)} if k in spreads else {}),
            **({"backend": backend, "tokens_per_expert": counts_E.tolist()} if k == "experts" else {}),
        }
        for k, v in times.items()
    ]


def optimizer_breakdown(
    moe: Contender,
    dense: Contender,
    ids_BT: torch.Tensor,
    labels_BT: torch.Tensor,
    clip: float | None,
    rounds: int,
) -> list[dict[str, object]]:
    """Median time of grad clipping + AdamW ``step()`` per model: it scales with *total* parameters, so the
    MoE pays for all its experts here even though a token touches only ``top_k`` of them."""
    fns: dict[str, Callable[[], None]] = {}
    for c in (moe, dense):
        with _autocast(ids_BT.device):
            out = c.model(ids_BT, labels_BT)
        assert out.loss is not None
        (out.loss + out.aux_loss if out.aux_loss is not None else out.loss).backward()

        def update(c: Contender = c) -> None:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(c.model.parameters(), clip)
            c.optimizer.step()

        fns[f"optimizer_{c.name}"] = update
    timings = _timed(fns, ids_BT.device, rounds)
    for c in (moe, dense):
        c.optimizer.zero_grad(set_to_none=True)
    return [
        {
            "breakdown": k,
            "ms_per_step": round(t.median * 1e3, 1),
            "spread": round(t.spread, 3),
            "params": sum(p.numel() for p in c.model.parameters()),
        }
        for (k, t), c in zip(timings.items(), (moe, dense), strict=True)
    ]


def profile_steps(
    c: Contender, ids_BT: torch.Tensor, labels_BT: torch.Tensor, clip: float | None, steps: int, top: int
) -> list[dict[str, object]]:
    """Top ops by self CPU time over ``steps`` training steps (ms per step and share of the total)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if ids_BT.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(c, ids_BT, labels_BT, clip)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "profile": c.name,
            "op": e.key,
            "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 1),
            "share": round(e.self_cpu_time_total / total, 3),
            "calls_per_step": e.count // steps,
        }
        for e in events[:top]
    ]


def flop_shares(cfg: ModelConfig, seq: int) -> dict[str, float]:
    """Shares of the forward FLOPs per token: the (active) MLPs and the LM head."""
    p = count_params(cfg)
    fwd = flops_per_token(cfg, seq)["forward"]
    head = p.head if p.head else p.embedding  # a tied head multiplies by the embedding matrix
    return {"mlp": 2.0 * (p.experts_active + p.dense_mlp + p.shared_experts) / fwd, "head": 2.0 * head / fwd}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_common_args(ap, rounds=7)
    ap.add_argument(
        "--steps",
        dest="rounds",
        type=int,
        default=argparse.SUPPRESS,
        help="timed steps per contender: the same as --rounds",
    )
    ap.add_argument("--preset", default="small", help="MoE model preset (every layer MoE)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds (one step per contender each)")
    ap.add_argument(
        "--backends",
        default=None,
        help="comma-separated MoE dispatch backends to time (auto is always included; default "
        "auto,loop,grouped_mm,padded, with --quick auto,loop)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--refresh-peak",
        action="store_true",
        help="no effect, kept for old command lines: the peak is always measured in this run",
    )
    ap.add_argument(
        "--breakdown", action="store_true", help="also time one MoE layer's parts vs the dense MLP"
    )
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps of MoE and dense")
    ap.add_argument("--top", type=int, default=12, help="ops to record per profiled model")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.warmup = 4, 128, 1
        args.backends = args.backends or "auto,loop"
        args.rounds = min(args.rounds, 2)
    args.backends = args.backends or "auto,loop,grouped_mm,padded"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak_dtype = "bfloat16" if device.type == "cuda" else "float32"
    clip = OptimConfig().grad_clip

    moe_cfg = load_model_config(args.preset)
    if args.seq > moe_cfg.max_seq_len:
        ap.error(f"--seq {args.seq} exceeds {args.preset}'s max_seq_len={moe_cfg.max_seq_len}")
    dense_cfg = dense_twin(moe_cfg)
    models: dict[str, MoETransformer] = {}
    contenders: list[Contender] = []
    for cfg in (moe_cfg, dense_cfg):
        torch.manual_seed(0)
        model = MoETransformer(cfg).to(device).train()
        models[cfg.name] = model
        opt = build_optimizer(model, OptimConfig())
        fpt = flops_per_token(cfg, args.seq)["training"]
        if cfg.moe is None:
            contenders.append(Contender("dense", model, opt, fpt))
        else:
            backends = ["auto", *[b for b in args.backends.split(",") if b and b != "auto"]]
            contenders += [Contender(f"moe_{b}", model, opt, fpt, dispatch=b) for b in backends]
    moe_model, dense_model = models[moe_cfg.name], models[dense_cfg.name]
    contenders.insert(1, contenders.pop())  # moe_auto, dense, other backends
    by_name = {c.name: c for c in contenders}
    moe, dense = by_name["moe_auto"], by_name["dense"]

    results = Results(
        "train_step",
        args,
        title="Training step: MoE vs dense of equal active parameters",
    )
    pm, pd = count_params(moe_cfg), count_params(dense_cfg)
    setup = results.row(
        setup={
            "moe": {"name": moe_cfg.name, "total_params": pm.total, "active_params": pm.active},
            "dense": {"name": dense_cfg.name, "total_params": pd.total, "active_params": pd.active},
            "active_moe_over_dense": round(pm.active / pd.active, 4),
            "dense_ffn_hidden": dense_cfg.ffn_hidden,
            "batch": args.batch,
            "seq": args.seq,
            "tokens_per_step": args.batch * args.seq,
            "device": str(device),
            "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
            "threads": torch.get_num_threads(),
        }
    )["setup"]

    gen = torch.Generator(device="cpu").manual_seed(0)
    ids_BT = torch.randint(0, moe_cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    ids_BT, labels_BT = ids_BT[:, :-1].contiguous(), ids_BT[:, 1:].contiguous()
    tokens = ids_BT.numel()

    # Output check, on the untrained weights: forced backends against auto (same model), dense beside it.
    atol, rtol = TOL_BF16 if device.type == "cuda" else TOL_FP32
    outs = {c.name: loss_and_grads(c, ids_BT, labels_BT) for c in contenders if c.dispatch is not None}
    try:
        verdict = check_same(outs, "moe_auto", atol=atol, rtol=rtol) if len(outs) > 1 else {}
        init = {"moe_auto": {"loss": float(outs["moe_auto"]["loss"])}}
        init["dense"] = {"loss": float(loss_and_grads(dense, ids_BT, labels_BT)["loss"])}
        dense_verdict = check_same(
            init,
            "moe_auto",
            atol=atol,
            rtol=rtol,
            allowed={"dense": "a different model, the dense twin: its initial loss is its own"},
        )
    except Mismatch as exc:
        print(f"error: {exc}; no time is reported", file=sys.stderr)
        return 1
    diffs = {k: _max_abs_diff(v, outs["moe_auto"]) for k, v in outs.items() if k != "moe_auto"}
    results.check(
        f"loss and every parameter gradient of one step's backward against moe_auto, same weights and "
        f"batch (atol {atol:g}, rtol {rtol:g})",
        {k: f"{v} (largest difference {diffs[k]:.2g})" for k, v in verdict.items()}
        or "only auto timed: nothing to compare",
    )
    results.check("initial loss, MoE vs its dense twin", dense_verdict)

    # The timed rounds, with the peak measured in the same conditions before and after.
    def step_fn(c: Contender) -> Callable[[], None]:
        def run() -> None:
            _, cpu = train_step(c, ids_BT, labels_BT, clip)
            c.cpu_times.append(cpu)

        return run

    with cpu_hog(args.busy):
        peak_before = _harness.measure_peak_flops(dtype=peak_dtype, device=str(device))
        timings = interleave(
            {c.name: step_fn(c) for c in contenders},
            args.rounds,
            warmup=args.warmup,
            sync=lambda: _sync(device),
        )
        peak_after = _harness.measure_peak_flops(dtype=peak_dtype, device=str(device))
    peak = max(peak_before, peak_after)
    auto_backends = _auto_resolves_to(moe_model, ids_BT)
    _set_dispatch(moe_model, "auto")

    rows: dict[str, dict[str, Any]] = {}
    for c in contenders:
        t = timings[c.name]
        tps = t.rate(tokens)
        rows[c.name] = {
            "model": c.name,
            **t.as_dict(),
            "tokens_per_s": round(tps, 1),
            "cpu_s_median": round(statistics.median(c.cpu_times[-args.rounds :]), 4),
            "model_gflops_per_s_active": round(tps * c.flops_per_token / 1e9, 2),
            "mfu": round(mfu(tps, c.flops_per_token, peak), 4),
            "training_flops_per_token": c.flops_per_token,
            **({"auto_resolves_to": auto_backends} if c.name == "moe_auto" else {}),
        }
    over_one = {k: r["mfu"] for k, r in rows.items() if r["mfu"] > 1}
    if over_one:
        print(
            f"error: MFU above 1 ({over_one}) against a peak of {peak / 1e9:.1f} GFLOP/s measured in this run: "
            "the peak does not describe the conditions of the steps; not reporting",
            file=sys.stderr,
        )
        return 1

    # paired_ratio(dense, x) is the median over rounds of x's step time ÷ the dense step time
    per_dense = {
        c.name: paired_ratio(timings["dense"], timings[c.name]) for c in contenders if c is not dense
    }
    ratio = per_dense["moe_auto"]
    for c in contenders:
        if c is not dense:
            rows[c.name]["over_dense_step_time"] = per_dense[c.name].as_dict()
        results.row(**rows[c.name])

    def ratio_text(name: str) -> str:
        if name == "dense":
            return "1"
        r = per_dense[name]
        return f"{r.median:.3g} ({r.low:.3g}–{r.high:.3g})"

    results.table(
        f"{moe_cfg.name} ({pm.total / 1e6:.1f} M total, {pm.active / 1e6:.2f} M active) against its dense twin "
        f"({pd.active / 1e6:.2f} M), batch {args.batch} × {args.seq} tokens, "
        f"{setup['dtype']}, {setup['threads']} threads; median of {args.rounds} rounds. MFU against "
        f"{peak / 1e9:.1f} GFLOP/s measured in this run. ÷ dense is the median of the per-round ratios of "
        "step times (lowest–highest round).",
        ["model", "step s", "spread", "tokens/s", "model GFLOP/s", "MFU", "CPU s", "÷ dense step time"],
        [
            [
                name,
                r["median_s"],
                r["spread"],
                r["tokens_per_s"],
                r["model_gflops_per_s_active"],
                f"{r['mfu']:.1%}",
                r["cpu_s_median"],
                ratio_text(name),
            ]
            for name, r in rows.items()
        ],
    )
    results.goal(
        f"MoE ({moe_cfg.name}, dispatch auto) step time ÷ dense step time",
        ratio.median,
        TARGET,
        higher_is_better=False,
        spread=(ratio.low, ratio.high),
    )
    results.note(
        f"Matmul peak {peak / 1e9:.1f} GFLOP/s ({peak_dtype} 1024 × 1024 products, median), measured in this "
        f"run with {torch.get_num_threads()} threads before ({peak_before / 1e9:.1f}) and after "
        f"({peak_after / 1e9:.1f}) the timed rounds; MFU divides by the higher."
    )
    results.note(
        f"Parameters: {pm.total / 1e6:.2f} M total and {pm.active / 1e6:.2f} M active in the MoE, "
        f"{pd.total / 1e6:.2f} M in the dense twin ({abs(pm.active / pd.active - 1):.2%} apart in active "
        f"parameters); the optimizer updates {pm.total / pd.total:.2f}× as many in the MoE."
    )
    shares = flop_shares(moe_cfg, args.seq)
    results.note(
        f"At this size the MLPs are {shares['mlp']:.0%} of the forward FLOPs per token and the "
        f"{moe_cfg.vocab_size:,}-token LM head {shares['head']:.0%}."
    )
    results.note(
        f"MoE ÷ dense in process CPU time (medians): "
        f"{rows['moe_auto']['cpu_s_median'] / rows['dense']['cpu_s_median']:.3g}×; `auto` resolved to "
        f"{', '.join(sorted(set(auto_backends)))} in the {len(auto_backends)} MoE layers."
    )

    if args.breakdown:
        parts = layer_breakdown(moe_model, dense_model, args.batch, args.seq, device, max(3, args.rounds))
        opt_rows = optimizer_breakdown(moe, dense, ids_BT, labels_BT, clip, max(3, args.rounds))
        for row in parts + opt_rows:
            results.row(**row)
        results.table(
            "One MoE layer's parts, forward + backward on the same hidden states (median ms per layer; "
            "dispatch overhead = layer − router − experts), against the dense twin's MLP.",
            ["part", "ms per layer", "ms per step (all layers)", "÷ dense MLP"],
            [[p["breakdown"], p["ms_per_layer"], p["ms_per_step"], p["over_dense_mlp"]] for p in parts],
        )
        results.table(
            "Grad clipping + AdamW step per model (median ms): scales with total parameters.",
            ["model", "ms per step", "parameters"],
            [[o["breakdown"].removeprefix("optimizer_"), o["ms_per_step"], o["params"]] for o in opt_rows],
        )
        p = {x["breakdown"]: x for x in parts}
        o_moe, o_dense = opt_rows[0]["ms_per_step"], opt_rows[1]["ms_per_step"]
        results.note(
            f"Breakdown: an MoE layer's experts cost {p['experts']['over_dense_mlp']:.3g}× the dense MLP, its "
            f"dispatch (sort, gather, combine, statistics) {p['dispatch_overhead']['over_dense_mlp']:.0%} of "
            f"an MLP, its router {p['router']['over_dense_mlp']:.0%}; the optimizer step takes {o_moe} ms "
            f"for the MoE and {o_dense} ms for the dense model."
        )
    if args.profile:
        prof_rows = []
        for name in ("moe_auto", "dense"):
            for row in profile_steps(by_name[name], ids_BT, labels_BT, clip, args.profile, args.top):
                prof_rows.append(results.row(**row))
        results.table(
            f"Top ops by self CPU time over {args.profile} profiled steps (ms per step, share of the step).",
            ["model", "op", "self ms per step", "share", "calls per step"],
            [
                [
                    r["profile"],
                    f"`{r['op']}`",
                    r["self_ms_per_step"],
                    f"{r['share']:.1%}",
                    r["calls_per_step"],
                ]
                for r in prof_rows
            ],
        )
    print(json.dumps({"summary": "train_step", "moe_over_dense_step_time": ratio.as_dict()}), flush=True)
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
