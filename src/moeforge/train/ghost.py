"""Ghost experts: watch each MoE layer for saturation and wake a dormant expert slot when it persists.

The model side (:class:`moeforge.model.moe.MoELayer`) has ``num_ghost`` extra expert slots after the
routed ones, each with an activation ``ghost_alpha[j]``: 0 keeps it out of routing (no tokens, no
gradient), a value in (0, 1] routes it like any expert and scales its output. This controller decides
when to set that value.

**Saturation** of a layer, per check (one check per optimizer step, from all of that step's training
micro-batches, summed over ranks when torch.distributed is initialized so every rank decides alike):

- ``"orthogonality"`` (default) = ``orthogonality × unexplained``, both in [0, 1]:

  - *orthogonality*: take each awake expert's mean raw output over the assignments it processed
    (``m_e``), normalize it (an expert that got no tokens contributes a zero vector), form the Gram
    matrix ``G = M̂ M̂ᵀ`` (``E_a × E_a``) and compute ``1 − mean((G − I)²)``. 1 means the experts write
    mutually orthogonal directions (specialized, no redundancy); shared directions or idle experts lower it.
  - *unexplained*: ``1 − Σ_n ⟨x_n, ŷ_n⟩² / Σ_n ‖x_n‖²`` with ``x_n`` the MoE input (normed hidden
    state) and ``ŷ_n`` the unit vector of the routed output (shared experts excluded): the share of the
    input's energy lying outside the direction the experts wrote for each token. It is a proxy — an MLP
    has no explicit target — chosen because it is layer-local, costs ``O(N·D)`` and is bounded.

  The product is high when the experts are already distinct *and* still leave most of the signal
  untouched: more distinct experts is what a new one adds. At initialization both factors are near 1
  (random experts are orthogonal and explain nothing), so set ``warmup_steps`` past the early phase.
- ``"load"``: 1.0 when every awake expert's token share is at least ``load_factor × top_k / E_awake``
  (all experts busy) or the capacity limit drops more than ``drop_threshold`` of the assignments; else 0.

**Waking**: when at least ``min_fraction_above`` of the last ``window`` checks exceed ``threshold``
(never on one noisy step), after ``warmup_steps`` and ``cooldown_steps`` since the layer's last wake, the
next dormant ghost of that layer wakes; its alpha ramps linearly ``1/R, 2/R, …, 1`` over ``R =
ramp_steps`` steps; the window restarts so the next wake needs fresh evidence with the new expert.

**Learning rate follows alpha.** The expert weights are stacked tensors ``w13 [E, D, 2F]``, ``w2 [E, F,
D]``, so a ghost's rows cannot be an optimizer param group of their own. Scaling their *gradients* by
alpha would not work either: Adam normalizes the gradient scale away. Instead :meth:`scaled_updates`
wraps ``optimizer.step()`` and blends the ghost rows ``p ← p_old + c · (p_new − p_old)``, ``c =
ghost_lr_scale × alpha``: exactly a learning rate of ``c × lr`` for any optimizer whose update is linear
in lr (SGD, Adam/AdamW with decoupled decay, Lion). It also keeps dormant rows (``c = 0``) bit-identical,
where AdamW's weight decay would otherwise shrink them before they ever wake.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field

from moeforge.config import StrictModel
from moeforge.model.moe import MoELayer, MoEStats
from moeforge.model.transformer import MoETransformer
from moeforge.train.distributed import all_reduce
from moeforge.train.fsdp import local_rows

__all__ = ["GhostConfig", "GhostController", "GhostEvent", "orthogonality"]

log = logging.getLogger(__name__)


class GhostConfig(StrictModel):
    """Trainer settings for :class:`GhostController` (see the module docstring for the rules)."""

    enabled: bool = Field(
        default=False, description="run the controller (the model needs moe.num_ghost_experts)"
    )
    signal: Literal["orthogonality", "load"] = Field(default="orthogonality", description="saturation signal")
    threshold: float = Field(
        default=0.5, ge=0.0, lt=1.0, description="a check counts when saturation exceeds this"
    )
    window: int = Field(
        default=20, ge=1, description="checks (optimizer steps) the wake rule looks back over"
    )
    min_fraction_above: float = Field(
        default=0.8, gt=0.0, le=1.0, description="share of the window's checks that must exceed the threshold"
    )
    warmup_steps: int = Field(default=0, ge=0, description="no wake before this step (saturation ~1 at init)")
    ramp_steps: int = Field(default=100, ge=0, description="steps over which alpha rises linearly to 1")
    cooldown_steps: int = Field(
        default=200, ge=0, description="steps after a wake before the layer may wake another"
    )
    ghost_lr_scale: float = Field(
        default=1.0, ge=0.0, description="ghost rows' lr = lr × ghost_lr_scale × alpha"
    )
    load_factor: float = Field(
        default=0.8,
        gt=0.0,
        description='"load": every awake expert carries ≥ load_factor × its balanced share',
    )
    drop_threshold: float = Field(
        default=0.05, ge=0.0, le=1.0, description='"load": or capacity drops more than this fraction'
    )


@dataclass(frozen=True)
class GhostEvent:
    """``kind="wake"``: ghost ``ghost`` (expert slot ``slot``) of layer ``layer`` woke at ``step`` with the
    window's mean saturation; ``kind="full"``: its alpha reached 1."""

    step: int
    layer: int
    ghost: int
    slot: int
    kind: Literal["wake", "full"]
    saturation: float


def orthogonality(mean_out_ED: torch.Tensor) -> float:
    """``1 − mean((G − I)²)`` for ``G`` the Gram matrix of the row-normalized means (zero rows stay zero)."""
    e = mean_out_ED.shape[0]
    if e == 0:
        return 0.0
    m = mean_out_ED.double()
    unit = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    g = unit @ unit.t()
    return float(1.0 - (g - torch.eye(e, dtype=g.dtype, device=g.device)).pow(2).mean())


@dataclass
class _Layer:
    """Controller state of one MoE layer; ``pending`` sums the stats observed since the last check."""

    moe: MoELayer
    history: deque[float]
    wake_steps: list[int | None]
    last_wake: int | None = None
    last: dict[str, float] = field(default_factory=dict)
    pending: dict[str, torch.Tensor] = field(default_factory=dict)


class GhostController:
    """Wakes and ramps ghost experts; call :meth:`observe` per training forward and :meth:`step` per step.

    Usage in the trainer::

        out = model(x, y); ghost.observe(step, out.moe_stats)      # every training micro-batch
        with ghost.scaled_updates():                                # ghost rows' lr follows alpha
            optimizer.step()
        model.router_step(); events = ghost.step(step)

    Take :meth:`state_dict` after :meth:`step` (observations not yet checked are not saved).
    """

    def __init__(self, model: MoETransformer, cfg: GhostConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.events: list[GhostEvent] = []
        self._layers: dict[int, _Layer] = {}
        self._warned_missing = False
        for block in model.blocks:
            moe = block.mlp
            if isinstance(moe, MoELayer) and moe.num_ghost > 0:
                self._layers[block.index] = _Layer(moe, deque(maxlen=cfg.window), [None] * moe.num_ghost)
        if cfg.enabled and not self._layers:
            raise ValueError(
                "ghost experts are enabled (ghost.enabled=true) but the model has no ghost slots; set "
                "moe.num_ghost_experts > 0 in the model config or disable ghost experts"
            )
        for st in self._layers.values():
            if cfg.enabled and cfg.signal == "orthogonality":
                st.moe.record_expert_outputs = True
            self._reset_pending(st)

    # ---- observation -------------------------------------------------------------------------------
    def _reset_pending(self, st: _Layer) -> None:
        dev = st.moe.w13.device
        dt = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
        slots, d = st.moe.w13.shape[0], st.moe.w13.shape[1]
        st.pending = {
            "count_E": torch.zeros(slots, dtype=dt, device=dev),
            "routed_E": torch.zeros(slots, dtype=dt, device=dev),
            "scalars": torch.zeros(5, dtype=dt, device=dev),  # tokens, dropped, assignments, input, explained
        }
        if self.cfg.signal == "orthogonality":
            st.pending["sum_ED"] = torch.zeros(slots, d, dtype=dt, device=dev)

    @torch.no_grad()
    def observe(self, step: int, moe_stats: Mapping[int, MoEStats]) -> None:
        """Add one training forward's stats; ignored when disabled or the model is in eval mode."""
        if not self.cfg.enabled or not self.model.training:
            return
        for idx, st in self._layers.items():
            s = moe_stats.get(idx)
            if s is None:
                continue
            p = st.pending
            dt = p["count_E"].dtype
            p["count_E"] += s.tokens_per_expert.to(dt)
            routed = s.routed_per_expert if s.routed_per_expert is not None else s.tokens_per_expert
            p["routed_E"] += routed.to(dt)
            tokens = s.tokens if s.tokens is not None else s.assignments // st.moe.top_k
            p["scalars"][:3] += torch.tensor(
                [tokens, s.dropped, s.assignments], dtype=dt, device=p["scalars"].device
            )
            if "sum_ED" in p:
                eo = s.expert_outputs
                if eo is None:
                    if not self._warned_missing:
                        log.warning(
                            "ghost: layer %d recorded no expert outputs (record_expert_outputs off?)", idx
                        )
                        self._warned_missing = True
                    continue
                p["sum_ED"] += eo.sum_ED.to(dt)
                p["scalars"][3] += eo.input_energy.to(dt)
                p["scalars"][4] += eo.explained_energy.to(dt)

    def _all_reduce_pending(self) -> None:
        """Sum the pending stats over ranks so that every rank takes the same wake decision."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        tensors = [t for st in self._layers.values() for _, t in sorted(st.pending.items())]
        if not tensors:
            return
        # on the model's device, where _reset_pending puts the sums (NCCL takes no CPU tensors)
        dev = next(iter(self._layers.values())).moe.w13.device
        flat = all_reduce(torch.cat([t.reshape(-1).to(dev) for t in tensors]), dev)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    # ---- checks and wake-ups -----------------------------------------------------------------------
    def _awake(self, st: _Layer) -> torch.Tensor:
        alpha = st.moe.ghost_alpha.detach().to(st.pending["count_E"].device)
        return torch.cat([torch.ones(st.moe.num_experts, dtype=torch.bool, device=alpha.device), alpha > 0])

    def _saturation(self, st: _Layer) -> dict[str, float] | None:
        p = st.pending
        tokens, dropped, assignments, energy, explained = p["scalars"].tolist()
        if tokens <= 0:
            return None
        awake = self._awake(st)
        if self.cfg.signal == "load":
            share = p["routed_E"][awake] / tokens
            balanced = st.moe.top_k / int(awake.sum())
            min_ratio = float(share.min()) / balanced
            drop = dropped / max(assignments, 1.0)
            busy = min_ratio >= self.cfg.load_factor or drop > self.cfg.drop_threshold
            return {"saturation": float(busy), "min_share_over_balanced": min_ratio, "dropped_fraction": drop}
        if energy <= 0:
            return None
        counts = p["count_E"][awake].clamp_min(1.0)
        orth = orthogonality(p["sum_ED"][awake] / counts[:, None])
        unexplained = min(max(1.0 - explained / energy, 0.0), 1.0)
        return {"saturation": orth * unexplained, "orthogonality": orth, "unexplained": unexplained}

    def _alpha_at(self, step: int, wake_step: int) -> float:
        if self.cfg.ramp_steps == 0:
            return 1.0
        return min(1.0, (step - wake_step + 1) / self.cfg.ramp_steps)

    @torch.no_grad()
    def step(self, step: int) -> list[GhostEvent]:
        """After optimizer step ``step``: advance the ramps, run one check per layer, maybe wake a ghost."""
        if not self.cfg.enabled:
            return []
        self._all_reduce_pending()
        new: list[GhostEvent] = []
        for idx, st in self._layers.items():
            for j, ws in enumerate(st.wake_steps):
                if ws is not None and ws < step and float(st.moe.ghost_alpha[j]) < 1.0:
                    a = self._alpha_at(step, ws)
                    st.moe.ghost_alpha[j] = a
                    if a >= 1.0:
                        new.append(
                            GhostEvent(
                                step, idx, j, st.moe.num_experts + j, "full", st.last.get("saturation", 0.0)
                            )
                        )
            parts = self._saturation(st)
            self._reset_pending(st)
            if parts is not None:
                st.last = parts
                st.history.append(parts["saturation"])
            event = self._maybe_wake(step, idx, st)
            if event is not None:
                new.append(event)
        self.events.extend(new)
        return new

    def _maybe_wake(self, step: int, idx: int, st: _Layer) -> GhostEvent | None:
        cfg = self.cfg
        if len(st.history) < cfg.window or step < cfg.warmup_steps or None not in st.wake_steps:
            return None
        if st.last_wake is not None and step - st.last_wake < cfg.cooldown_steps:
            return None
        above = sum(1 for v in st.history if v > cfg.threshold) / len(st.history)
        if above < cfg.min_fraction_above:
            return None
        j = st.wake_steps.index(None)
        mean_sat = sum(st.history) / len(st.history)
        st.wake_steps[j] = step
        st.last_wake = step
        st.moe.ghost_alpha[j] = self._alpha_at(step, step)
        st.history.clear()
        log.info(
            "ghost: woke ghost %d (expert slot %d) of MoE layer %d at step %d: saturation %.3f over the last "
            "%d checks (%.0f%% above %.2f); alpha ramps to 1 over %d steps",
            j,
            st.moe.num_experts + j,
            idx,
            step,
            mean_sat,
            cfg.window,
            100 * above,
            cfg.threshold,
            cfg.ramp_steps,
        )
        return GhostEvent(step, idx, j, st.moe.num_experts + j, "wake", mean_sat)

    # ---- optimizer integration ---------------------------------------------------------------------
    @contextmanager
    def scaled_updates(self) -> Iterator[None]:
        """Wrap ``optimizer.step()`` so the ghost rows of ``w13``/``w2`` move by ``ghost_lr_scale × alpha``
        times the optimizer's update (module docstring). Router rows keep the full lr so routing can adapt.
        Nothing is blended when the body raises."""
        saved = []
        with torch.no_grad():
            for st in self._layers.values():
                moe = st.moe
                factor = self.cfg.ghost_lr_scale * moe.ghost_alpha.detach().to(moe.w13.dtype)
                j = torch.nonzero(factor != 1.0).flatten()
                # under FSDP each process blends the expert rows of its own shard (sharded on dim 0)
                (w13, first), (w2, _) = local_rows(moe.w13), local_rows(moe.w2)
                slots = j + moe.num_experts - first
                mine = (slots >= 0) & (slots < w13.shape[0])
                slots, f = slots[mine], factor[j][mine]
                if slots.numel():
                    saved.append((w13, w2, slots, f, w13[slots].clone(), w2[slots].clone()))
        yield
        with torch.no_grad():
            for w13, w2, slots, f, w13_old, w2_old in saved:
                c = f.to(w13_old.device)[:, None, None]
                w13[slots] = w13_old + c * (w13[slots] - w13_old)
                w2[slots] = w2_old + c * (w2[slots] - w2_old)

    # ---- reporting and checkpoints -----------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """``ghost/L{layer}/{saturation, orthogonality, unexplained | …}``, ``alpha/g{j}``, ``awake``, and
        ``ghost/awake`` (ghosts woken over all layers)."""
        out: dict[str, float] = {}
        total = 0
        for idx, st in self._layers.items():
            for k, v in st.last.items():
                out[f"ghost/L{idx}/{k}"] = v
            for j, a in enumerate(st.moe.ghost_alpha.detach().cpu().tolist()):
                out[f"ghost/L{idx}/alpha/g{j}"] = a
            awake = sum(ws is not None for ws in st.wake_steps)
            out[f"ghost/L{idx}/awake"] = float(awake)
            total += awake
        out["ghost/awake"] = float(total)
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: per layer the check history, wake steps, alphas; and the events."""
        return {
            "layers": {
                str(idx): {
                    "history": list(st.history),
                    "wake_steps": list(st.wake_steps),
                    "last_wake": st.last_wake,
                    "last": dict(st.last),
                    "alpha": st.moe.ghost_alpha.detach().cpu().tolist(),
                }
                for idx, st in self._layers.items()
            },
            "events": [asdict(e) for e in self.events],
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (also writes the alphas into the model's buffers)."""
        layers = state.get("layers", {})
        if {int(k) for k in layers} != set(self._layers):
            raise ValueError(
                f"ghost controller state covers MoE layers {sorted(int(k) for k in layers)} but this model has "
                f"ghost experts in layers {sorted(self._layers)}; was the checkpoint made with another model config?"
            )
        for key, s in layers.items():
            st = self._layers[int(key)]
            if len(s["wake_steps"]) != st.moe.num_ghost:
                raise ValueError(
                    f"ghost controller state has {len(s['wake_steps'])} ghosts in layer {key}, the model "
                    f"{st.moe.num_ghost} (moe.num_ghost_experts differs from the checkpoint's)"
                )
            st.history = deque((float(v) for v in s["history"]), maxlen=self.cfg.window)
            st.wake_steps = [None if w is None else int(w) for w in s["wake_steps"]]
            st.last_wake = s["last_wake"]
            st.last = {k: float(v) for k, v in s["last"].items()}
            st.moe.ghost_alpha.copy_(torch.tensor(s["alpha"], dtype=st.moe.ghost_alpha.dtype))
            self._reset_pending(st)
        self.events = [GhostEvent(**e) for e in state.get("events", [])]
