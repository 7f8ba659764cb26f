"""What training records: routing statistics per MoE layer, a JSONL (+ TensorBoard) writer, throughput, MFU.

The trainer feeds :class:`RoutingAccumulator` every micro-batch's ``ModelOutput.moe_stats`` and reads a
flat ``{name: float}`` dict each logging interval; :class:`MetricsWriter` appends that dict as one JSON
line to ``metrics.jsonl`` (the file every later tool reads) and mirrors it to TensorBoard when that is
installed. MFU divides achieved FLOP/s by a *measured* matmul peak (:func:`measure_peak_flops`), because
vendor peak figures are unknown on CPUs and optimistic on GPUs.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moeforge.io import atomic_write_json, cache_base
from moeforge.model.moe import MoELayer, MoEStats
from moeforge.model.transformer import MoETransformer
from moeforge.train.distributed import all_reduce

__all__ = [
    "RoutingAccumulator",
    "Throughput",
    "measure_peak_flops",
    "mfu",
    "peak_flops_cache_path",
]

log = logging.getLogger(__name__)


@dataclass
class _LayerSums:
    """Token-weighted sums of one MoE layer's stats since the last reset (tensors stay on the device)."""

    routed_E: torch.Tensor
    probs_E: torch.Tensor
    entropy: torch.Tensor
    lb: torch.Tensor
    z: torch.Tensor
    tokens: int = 0
    assignments: int = 0
    dropped: int = 0
    detail_tokens: int = 0  # tokens behind probs_E and entropy (the micro-batches added with detail)


class RoutingAccumulator:
    """Sums routing statistics over micro-batches and steps; :meth:`summary` turns them into flat metrics.

    Averages are token-weighted, so a short last micro-batch counts for its tokens and no more. Nothing is
    copied to the host until :meth:`summary` / :meth:`load_fractions` (one sync per logging interval, not
    per micro-batch). Neither of those resets: read both, then call :meth:`reset`.

    **Load** of expert ``i`` is the share of *tokens* the router sent to it, before capacity drops:
    ``routed_i / N``. The shares sum to ``top_k``; perfect balance gives ``top_k / E_active`` each, and 1.0
    means every token uses the expert — the same scale for any ``k``, which is what the collapse
    threshold needs. Counting before capacity keeps a collapse visible when the capacity limit would cap it.

    Loads, drops and the aux losses cover every micro-batch added; the router's mean distribution and
    per-token entropy only those added with ``detail=True`` (the trainer's logging steps), which is where
    they are computed at all (:meth:`MoEStats.detail`).
    """

    def __init__(self) -> None:
        self._layers: dict[int, _LayerSums] = {}

    def reset(self) -> None:
        self._layers.clear()

    def __len__(self) -> int:
        """Number of MoE layers seen since the last reset (0: nothing to report)."""
        return len(self._layers)

    @torch.no_grad()
    def add(self, moe_stats: Mapping[int, MoEStats], *, detail: bool = True) -> None:
        """Add one forward's ``ModelOutput.moe_stats`` (layer index → stats); ``detail=False`` leaves out
        the mean routing distribution and entropy (and never computes them)."""
        for layer, s in moe_stats.items():
            n = s.tokens if s.tokens is not None else s.assignments
            routed = s.routed_per_expert if s.routed_per_expert is not None else s.tokens_per_expert
            acc = self._layers.get(layer)
            dev = routed.device
            dt = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
            if acc is None:
                e = routed.numel()
                acc = _LayerSums(
                    routed_E=torch.zeros(e, dtype=dt, device=dev),
                    probs_E=torch.zeros(e, dtype=dt, device=dev),
                    entropy=torch.zeros((), dtype=dt, device=dev),
                    lb=torch.zeros((), dtype=dt, device=dev),
                    z=torch.zeros((), dtype=dt, device=dev),
                )
                self._layers[layer] = acc
            acc.routed_E += routed.detach().to(dt)
            if detail:
                probs_mean, entropy = s.detail()
                acc.probs_E += probs_mean.detach().to(dt) * n
                acc.entropy += entropy.detach().to(dt) * n
                acc.detail_tokens += n
            acc.lb += s.lb_loss.detach().to(dt) * n
            acc.z += s.z_loss.detach().to(dt) * n
            acc.tokens += n
            acc.assignments += s.assignments
            acc.dropped += s.dropped

    @torch.no_grad()
    def all_reduce(self, device: torch.device | None = None) -> None:
        """Sum the statistics over all data-parallel ranks (no-op without torch.distributed).

        Call it on every rank before :meth:`summary` / :meth:`load_fractions` when each rank routes its own
        tokens: every rank then reports the global figures, and a collapse detector fed from them reaches
        the same ``should_stop`` everywhere. All ranks must have seen the same MoE layers. The collective
        runs on ``device``, the process's (NCCL takes no CPU tensors); by default the sums' own, which
        is the model's. The reduced sums stay there: the host reads them in :meth:`summary`.
        """
        if not (dist.is_available() and dist.is_initialized()) or not self._layers:
            return
        accs = [acc for _, acc in sorted(self._layers.items())]
        dev = device if device is not None else accs[0].routed_E.device
        parts: list[torch.Tensor] = []
        for acc in accs:
            ints = torch.tensor(
                [acc.tokens, acc.assignments, acc.dropped, acc.detail_tokens], dtype=acc.routed_E.dtype
            )
            parts += [
                acc.routed_E.to(dev),
                acc.probs_E.to(dev),
                torch.stack([acc.entropy, acc.lb, acc.z]).to(dev),
                ints.to(dev),
            ]
        flat = all_reduce(torch.cat(parts), dev)
        offset = 0
        for acc in accs:
            e = acc.routed_E.numel()
            acc.routed_E, acc.probs_E = flat[offset : offset + e], flat[offset + e : offset + 2 * e]
            acc.entropy, acc.lb, acc.z = flat[offset + 2 * e : offset + 2 * e + 3]
            tokens, assignments, dropped, detail = flat[offset + 2 * e + 3 : offset + 2 * e + 7].tolist()
            acc.tokens, acc.assignments, acc.dropped = int(tokens), int(assignments), int(dropped)
            acc.detail_tokens = int(detail)
            offset += 2 * e + 7

    def load_fractions(self) -> dict[int, list[float]]:
        """Per layer, each expert slot's token share (see the class docstring); for the collapse detector."""
        return {
            layer: (acc.routed_E / max(acc.tokens, 1)).tolist() for layer, acc in sorted(self._layers.items())
        }

    def summary(self, model: MoETransformer | None = None) -> dict[str, float]:
        """Flat metrics ``moe/L{layer}/{name}`` plus cross-layer ``moe/{name}``.

        Per layer: ``load/e{i}`` (every slot, dormant ghosts included), ``load_max``, ``load_std`` and
        ``load_max_over_mean`` (over active experts), ``entropy_token`` (mean per-token routing entropy,
        nats), ``entropy_mean_dist`` (entropy of the mean routing distribution) and
        ``entropy_mean_dist_norm`` (÷ log E_active: 1.0 is uniform use) — these three over the micro-batches
        added with ``detail``, left out when there were none — ``dropped_fraction``, ``lb_loss``
        and ``z_loss`` (unscaled). With ``model``: ``lb_loss_scaled`` / ``z_loss_scaled`` (× the config's
        lb_coef / z_coef) and, when the router's aux_free_bias_rate > 0, its biases ``bias/e{i}``.

        Active experts: routed ones plus ghosts with alpha > 0, read from ``model``; without it, the slots
        with a non-zero mean routing probability (dormant ghosts are masked to exactly 0), or with no
        detail, the slots that got tokens.
        """
        out: dict[str, float] = {}
        total_assign = total_drop = 0
        lb_total = z_total = 0.0
        load_max_all = 0.0
        for layer, acc in sorted(self._layers.items()):
            if acc.tokens == 0:
                continue
            pre = f"moe/L{layer}"
            share = (acc.routed_E / acc.tokens).cpu()
            detail = acc.detail_tokens > 0
            probs = (acc.probs_E / max(acc.detail_tokens, 1)).cpu()
            scalars = torch.stack(
                [acc.entropy / max(acc.detail_tokens, 1), acc.lb / acc.tokens, acc.z / acc.tokens]
            ).tolist()
            moe = _moe_layer(model, layer)
            if moe is not None:
                active = torch.ones(share.numel(), dtype=torch.bool)
                if moe.num_ghost:
                    active[moe.num_experts :] = moe.ghost_alpha.detach().cpu() > 0
            elif detail:
                active = probs > 0
            else:  # no distribution to read dormant ghosts from: the slots that got tokens
                active = share > 0
            for i, v in enumerate(share.tolist()):
                out[f"{pre}/load/e{i}"] = v
            act = share[active]
            e_active = int(active.sum())
            out[f"{pre}/load_max"] = float(share.max())
            out[f"{pre}/load_std"] = float(act.std(unbiased=False)) if e_active else 0.0
            mean = float(act.mean()) if e_active else 0.0
            out[f"{pre}/load_max_over_mean"] = float(act.max()) / mean if mean > 0 else 0.0
            if detail:  # none of the interval's micro-batches computed them (added with detail=False)
                out[f"{pre}/entropy_token"] = scalars[0]
                h = float(-(probs * probs.clamp_min(1e-30).log()).sum())
                out[f"{pre}/entropy_mean_dist"] = h
                out[f"{pre}/entropy_mean_dist_norm"] = h / math.log(e_active) if e_active > 1 else 1.0
            out[f"{pre}/dropped_fraction"] = acc.dropped / max(acc.assignments, 1)
            out[f"{pre}/lb_loss"] = scalars[1]
            out[f"{pre}/z_loss"] = scalars[2]
            if moe is not None:
                out[f"{pre}/lb_loss_scaled"] = moe.cfg.lb_coef * scalars[1]
                out[f"{pre}/z_loss_scaled"] = moe.cfg.z_coef * scalars[2]
                if moe.router.aux_free_bias_rate > 0:
                    for i, b in enumerate(moe.router.expert_bias.detach().cpu().tolist()):
                        out[f"{pre}/bias/e{i}"] = b
            total_assign += acc.assignments
            total_drop += acc.dropped
            lb_total += scalars[1]
            z_total += scalars[2]
            load_max_all = max(load_max_all, out[f"{pre}/load_max"])
        if total_assign:
            out["moe/load_max"] = load_max_all
            out["moe/dropped_fraction"] = total_drop / total_assign
            out["moe/lb_loss"] = lb_total  # summed over layers, like ModelOutput.lb_loss
            out["moe/z_loss"] = z_total
            if model is not None and model.cfg.moe is not None:
                out["moe/aux_loss"] = model.cfg.moe.lb_coef * lb_total + model.cfg.moe.z_coef * z_total
        return out


def _moe_layer(model: MoETransformer | None, layer: int) -> MoELayer | None:
    if model is None:
        return None
    mlp = model.blocks[layer].mlp
    return mlp if isinstance(mlp, MoELayer) else None


def peak_flops_cache_path() -> Path:
    """``$MOEFORGE_CACHE_DIR/peak_flops.json``, else ``~/.cache/moeforge/peak_flops.json``."""
    return cache_base() / "peak_flops.json"


def _device_key(device: torch.device, dtype: torch.dtype) -> str:
    """What the measured peak depends on: machine, device model (CPU: model and threads), dtype, torch."""
    if device.type == "cuda":
        desc = torch.cuda.get_device_name(device)
    else:
        desc = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                desc = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), desc)
        except OSError:
            pass
        desc = f"{desc} threads={torch.get_num_threads()}"
    return f"{platform.node()}|{device.type}|{desc}|{dtype}|torch={torch.__version__}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """Best FLOP/s of square ``n×n @ n×n`` matmuls (2n³ FLOPs each) over a few timed trials."""
    n = 8192 if device.type == "cuda" else 1024
    # a generator of its own: drawing from the global one would leave a run's RNG state (router noise,
    # the saved rng.safetensors) depending on whether this machine's peak was already cached
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):  # warm-up: kernel selection, thread pool start, clocks ramping up
        torch.mm(a, b)
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    trials = 5
    reps = max(1, int(seconds / trials / one))
    best = 0.0
    for _ in range(trials):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(device)
        best = max(best, 2.0 * n**3 * reps / max(time.perf_counter() - t0, 1e-9))
    return best


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, *, seconds: float = 1.0, refresh: bool = False
) -> float:
    """Achievable matmul FLOP/s on ``device`` in ``dtype``, measured once and cached per machine.

    Square matmuls after a warm-up, the best of five trials spread over about ``seconds``. The result is
    cached in :func:`peak_flops_cache_path` under a key of host, device model (CPU: model and torch
    thread count), dtype and torch version; the trainer always passes ``refresh`` (its MFU divides by a peak measured in the run); ``refresh``
    re-measures. An unreadable cache is ignored with a warning and rewritten.
    """
    device = torch.device(device)
    key = _device_key(device, dtype)
    path = peak_flops_cache_path()
    cache: dict[str, Any] = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(cache, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable peak-FLOPs cache %s (%s); measuring again", path, exc)
            cache = {}
    entry = cache.get(key)
    if not refresh and isinstance(entry, dict) and float(entry.get("flops", 0)) > 0:
        return float(entry["flops"])
    flops = _measure(device, dtype, seconds)
    log.info("measured peak matmul throughput on %s (%s): %.3g FLOP/s", device, dtype, flops)
    cache[key] = {"flops": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_json(path, cache)
    except OSError as exc:  # a read-only home must not stop training
        log.warning("could not cache peak FLOPs in %s: %s", path, exc)
    return flops


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s over ``peak``.

    ``flops_per_token`` is the *training* figure, ``sizing.flops_per_token(cfg, seq_len)["training"]``
    (3 × forward: forward + backward for activations and weights), for the sequence length trained on;
    ``peak`` from :func:`measure_peak_flops` times the number of devices when ``tokens_per_s`` is global.
    """
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive (got {peak})")
    return tokens_per_s * flops_per_token / peak


class Throughput:
    """Tokens per second over the last ``window`` updates (a moving window, so warm-up and stalls age out).

    Call :meth:`update` after each step with the tokens it processed; :meth:`restart` after a pause that
    should not count (evaluation, checkpointing). The clock is injectable for tests.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 (got {window})")
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self.total_tokens = 0
        self.restart()

    def restart(self) -> None:
        """Forget the window and start timing from now."""
        self._events.clear()
        self._events.append((self._clock(), 0))

    def update(self, tokens: int) -> None:
        self._events.append((self._clock(), int(tokens)))
        self.total_tokens += int(tokens)

    @property
    def tokens_per_s(self) -> float:
        """Tokens of the updates in the window over the time since the update before them (0.0 if none)."""
        if len(self._events) < 2:
            return 0.0
        elapsed = self._events[-1][0] - self._events[0][0]
        tokens = sum(t for _, t in list(self._events)[1:])
        return tokens / elapsed if elapsed > 0 else 0.0
