"""Training step: the ``small`` MoE preset vs the dense model of equal active parameters, in one run.

The dense twin is the same config with ``moe: null`` and ``ffn_hidden = top_k × expert_hidden``, so a
token touches the same MLP parameters in both (the MoE adds only its routers; both counts are printed).
A step is what the trainer does: forward with labels, ``(loss + aux_loss).backward()``, grad clipping at
``OptimConfig().grad_clip``, AdamW ``step()``, ``zero_grad(set_to_none=True)`` and ``router_step()`` —
on random token ids of ``--batch × --seq`` (fp32 on CPU; bf16 autocast on CUDA). After ``--warmup``
steps each, contenders take one timed step in turn for ``--steps`` rounds, so MoE and dense share the
machine's noise. MoE rows: dispatch ``auto`` (the default) and, with ``--backends``, forced backends
on the same model and optimizer.

Per contender it prints the median and best step time, tokens/s, achieved FLOP/s and MFU. Achieved
FLOP/s is *model* FLOPs of the *active* parameters — ``sizing.flops_per_token(cfg, seq)["training"]``
(3 × forward: 2 × active matmul params + attention scores) × tokens/s — not what the hardware executed
(routing, gathers, the optimizer and elementwise work count as zero). MFU divides it by this machine's
measured matmul peak (``metrics.measure_peak_flops``, cached; ``--refresh-peak`` re-measures).

``--breakdown`` also times one MoE layer's parts, forward + backward on the same hidden states:
whole layer, router alone, expert SwiGLU alone (rows pre-sorted), and the dense twin's MLP; the layer
minus router minus experts is the dispatch overhead (sort, gather, combine, stats); and each model's
grad clipping + AdamW step, which scales with *total* parameters. ``--profile N``
runs N more steps of MoE (auto) and dense under ``torch.profiler`` and prints each one's top ops by
self CPU time.

One JSON line per contender (and per breakdown part / profiled op), then a summary line with
``moe_over_dense_step_time`` (medians), the target (≤ 1.3), the peak and ``os.getloadavg()``. On a
shared machine, other processes stall torch's thread pool at every op: compare ``--threads 1``.
Run: ``python benchmarks/train_step.py [--quick] [--breakdown] [--profile 3] [--threads 1]`` (``--quick``:
batch 4, auto only, about 30 s on an idle 2-core machine; the default about 3 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moeforge.model.config import ModelConfig, load_model_config
from moeforge.model.dispatch import choose_backend, grouped_swiglu
from moeforge.model.moe import sort_assignments
from moeforge.model.sizing import count_params, flops_per_token
from moeforge.model.transformer import MoETransformer
from moeforge.train.config import OptimConfig
from moeforge.train.metrics import measure_peak_flops, mfu
from moeforge.train.optim import build_optimizer

TARGET = 1.3  # MoE step time at most this × the dense step time


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
    times: list[float] = field(default_factory=list)
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


def _best_times(fns: dict[str, Callable[[], None]], device: torch.device, rounds: int) -> dict[str, float]:
    """Best seconds per call of each function after one warm-up call, interleaved over ``rounds`` so
    every function sees the same machine state (best-of: the least disturbed by other processes)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def layer_breakdown(
    moe_model: MoETransformer,
    dense_model: MoETransformer,
    batch: int,
    seq: int,
    device: torch.device,
    reps: int,
) -> list[dict[str, object]]:
    """Best forward + backward time of one MoE layer and its parts vs the dense twin's MLP, same inputs."""
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
    times = _best_times(parts, device, reps)
    for m in (moe_model, dense_model):
        m.zero_grad(set_to_none=True)
    times["dispatch_overhead"] = times["moe_layer"] - times["router"] - times["experts"]
    return [
        {
            "breakdown": k,
            "ms_per_layer": round(v * 1e3, 2),
            "ms_per_step": round(v * 1e3 * len(moe_model.moe_layers()), 1),
            "over_dense_mlp": round(v / times["dense_mlp"], 3),
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
    reps: int,
) -> list[dict[str, object]]:
    """Best time of grad clipping + AdamW ``step()`` per model: it scales with *total* parameters, so the
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
    times = _best_times(fns, ids_BT.device, reps)
    for c in (moe, dense):
        c.optimizer.zero_grad(set_to_none=True)
    return [
        {
            "breakdown": k,
            "ms_per_step": round(v * 1e3, 1),
            "params": sum(p.numel() for p in c.model.parameters()),
        }
        for (k, v), c in zip(times.items(), (moe, dense), strict=True)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 4, 1 warm-up + 3 timed steps, auto only")
    ap.add_argument("--preset", default="small", help="MoE model preset (every layer MoE)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    ap.add_argument("--steps", type=int, default=7, help="timed steps per contender (rounds)")
    ap.add_argument(
        "--backends",
        default="auto,loop,grouped_mm,padded",
        help="comma-separated MoE dispatch backends to time (auto is always included)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--refresh-peak", action="store_true", help="re-measure the matmul peak, not the cache")
    ap.add_argument(
        "--breakdown", action="store_true", help="also time one MoE layer's parts vs the dense MLP"
    )
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps of MoE and dense")
    ap.add_argument("--top", type=int, default=12, help="ops to print per profiled model")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.warmup, args.steps, args.backends = 4, 1, 3, "auto"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_start = [round(x, 2) for x in os.getloadavg()]
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
    contenders.insert(1, contenders.pop())  # moe_auto, dense, other backends: the pair to compare adjacent

    pm, pd = count_params(moe_cfg), count_params(dense_cfg)
    print(
        json.dumps(
            {
                "models": {
                    "moe": {"name": moe_cfg.name, "total_params": pm.total, "active_params": pm.active},
                    "dense": {"name": dense_cfg.name, "total_params": pd.total, "active_params": pd.active},
                },
                "active_moe_over_dense": round(pm.active / pd.active, 4),
                "dense_ffn_hidden": dense_cfg.ffn_hidden,
                "batch": args.batch,
                "seq": args.seq,
                "tokens_per_step": args.batch * args.seq,
                "device": str(device),
                "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )

    gen = torch.Generator(device="cpu").manual_seed(0)
    ids_BT = torch.randint(0, moe_cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    ids_BT, labels_BT = ids_BT[:, :-1].contiguous(), ids_BT[:, 1:].contiguous()
    tokens = ids_BT.numel()

    for c in contenders:
        for _ in range(args.warmup):
            train_step(c, ids_BT, labels_BT, clip)
    auto_backends = _auto_resolves_to(moe_model, ids_BT)
    for _ in range(args.steps):  # interleave: every contender sees the same machine state
        for c in contenders:
            wall, cpu = train_step(c, ids_BT, labels_BT, clip)
            c.times.append(wall)
            c.cpu_times.append(cpu)
    _set_dispatch(moe_model, "auto")

    peak = measure_peak_flops(device, peak_dtype, refresh=args.refresh_peak)
    for c in contenders:
        med, best = statistics.median(c.times), min(c.times)
        tps = tokens / med
        row: dict[str, object] = {
            "model": c.name,
            "step_s_median": round(med, 4),
            "step_s_best": round(best, 4),
            "tokens_per_s": round(tps, 1),
            "tokens_per_s_best": round(tokens / best, 1),
            "cpu_s_median": round(statistics.median(c.cpu_times), 4),
            "model_gflops_per_s_active": round(tps * c.flops_per_token / 1e9, 2),
            "mfu": round(mfu(tps, c.flops_per_token, peak), 4),
            "training_flops_per_token": c.flops_per_token,
        }
        if c.name == "moe_auto":
            row["auto_resolves_to"] = auto_backends
        print(json.dumps(row), flush=True)

    if args.breakdown:
        for row in layer_breakdown(
            moe_model, dense_model, args.batch, args.seq, device, reps=max(3, args.steps)
        ):
            print(json.dumps(row), flush=True)
    by_name = {c.name: c for c in contenders}
    if args.breakdown:
        rows = optimizer_breakdown(by_name["moe_auto"], by_name["dense"], ids_BT, labels_BT, clip, args.steps)
        for row in rows:
            print(json.dumps(row), flush=True)
    if args.profile:
        for name in ("moe_auto", "dense"):
            for row in profile_steps(by_name[name], ids_BT, labels_BT, clip, args.profile, args.top):
                print(json.dumps(row), flush=True)

    moe, dense = by_name["moe_auto"], by_name["dense"]
    ratio = statistics.median(moe.times) / statistics.median(dense.times)
    summary = {
        "summary": "train_step",
        "preset": moe_cfg.name,
        "moe_over_dense_step_time": round(ratio, 3),
        "moe_over_dense_step_time_best": round(min(moe.times) / min(dense.times), 3),
        # each round's MoE step over the dense step right next to it: robust to load that drifts
        "moe_over_dense_per_round_median": round(
            statistics.median(m / d for m, d in zip(moe.times, dense.times, strict=True)), 3
        ),
        "moe_over_dense_cpu_time": round(
            statistics.median(moe.cpu_times) / statistics.median(dense.cpu_times), 3
        ),
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "backend_over_dense": {
            c.name: round(statistics.median(c.times) / statistics.median(dense.times), 3)
            for c in contenders
            if c is not dense
        },
        "peak_gflops_per_s": round(peak / 1e9, 2),
        "peak_dtype": str(peak_dtype).removeprefix("torch."),
        "loadavg_start": load_start,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
