"""Sparse upcycling: turn a dense model's MLPs into MoE layers whose experts start as copies of the MLP.

Each chosen layer's SwiGLU MLP becomes a :class:`~moeforge.model.moe.MoELayer`; every other weight
(embeddings, attention, norms, head, dense MLPs of the layers left alone) is copied unchanged.

Expert ``e`` of a layer holds hidden slice ``e % granularity`` of the dense MLP (the whole MLP when
``granularity`` is 1): ``w13[e] = [gate_slice.T | up_slice.T]`` (``[D, 2F]``) and ``w2[e] = down_slice.T``
(``[F, D]``). Optional perturbations, applied per expert in this order: multiplicative noise
(``w · (1 + noise_std · ε)``) on the copied weights, then drop-upcycling (a fresh draw for
``round(drop_fraction · F)`` random neurons: the same indices in the gate/up rows and down columns, from a
normal with the mean and std of the whole dense matrix the neuron came from), then the down-projection
scale (``granularity``, times 1/2 with a shared expert) on the whole expert.

Step-0 parity (upcycled logits equal the dense model's up to float rounding) holds when all of:
no noise and no drop (``noise_std == drop_fraction == 0``), no capacity drops (``capacity_factor`` null or
large enough), and the combine weights of each token's experts add up to one per dense slice:

* ``granularity == 1``: every expert equals the MLP, so any router works as long as the top-k weights sum
  to 1 — ``renormalize`` (any ``top_k``), ``top_k == num_experts``, or ``straight_through`` (``top_k == 1``).
  Router noise does not break it (all experts are the same).
* ``granularity == G > 1``: the MLP is the sum of its ``G`` slices, and each slice's down projection is
  multiplied by ``G``. Parity needs every slice to get total weight ``1/G``: ``top_k == num_experts`` and
  ``router_init_std == 0`` (a zero router gives uniform weights ``1/E``; each slice appears ``E/G``
  times). With ``top_k < num_experts`` the scale keeps the output's expected magnitude, not its value.
* ``shared_expert``: the shared expert (the MLP, ungated) and the routed experts each have their down
  projection halved, so ``½·MLP + ½·routed`` equals the MLP under the same conditions as above.

All randomness comes from one ``torch.Generator`` seeded with ``seed``: the result depends only on the
source weights, the config and the seed, never on the global RNG.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field, model_validator

from moeforge.config import StrictModel
from moeforge.model.config import ModelConfig, MoEConfig
from moeforge.model.layers import SwiGLU
from moeforge.model.moe import MoELayer
from moeforge.model.transformer import MoETransformer

__all__ = ["UpcycleConfig", "UpcycleError", "upcycle", "upcycle_config"]

logger = logging.getLogger(__name__)


class UpcycleError(ValueError):
    """The source model or the upcycling settings cannot be combined; the message names the field."""


class UpcycleConfig(StrictModel):
    """How to turn a dense model into an MoE model (see the module docstring for step-0 parity)."""

    num_experts: int = Field(ge=1, description="routed experts per upcycled layer")
    top_k: int = Field(ge=1, description="experts each token is sent to (1..num_experts)")
    layers: list[int] | None = Field(
        default=None, description="indices of the layers to upcycle; null means every layer"
    )
    granularity: int = Field(
        default=1,
        ge=1,
        description="split the MLP into this many hidden slices; expert j holds slice j % granularity",
    )
    drop_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="drop-upcycling: fraction of each expert's neurons re-drawn from the source's statistics",
    )
    noise_std: float = Field(
        default=0.0, ge=0.0, description="relative noise on copied expert weights: w * (1 + noise_std * eps)"
    )
    shared_expert: bool = Field(
        default=False, description="keep the dense MLP as an ungated shared expert (down projections halved)"
    )
    router_init_std: float = Field(
        default=0.02, ge=0.0, description="std of the router's N(0, std²) init; 0 gives uniform routing"
    )
    renormalize: bool = Field(default=True, description="rescale the top-k softmax weights to sum to 1")
    lb_coef: float = Field(default=0.01, ge=0.0, description="weight of the load-balancing loss")
    z_coef: float = Field(default=0.001, ge=0.0, description="weight of the router z-loss")
    router_noise_std: float = Field(default=0.0, ge=0.0, description="std of Gaussian noise on router logits")
    noise_anneal_steps: int = Field(
        default=0,
        ge=0,
        description="optimizer steps over which router noise falls linearly to 0 (0: constant)",
    )
    straight_through: bool = Field(
        default=False, description="top-1 only: combine weight 1 with the router's gradient"
    )
    capacity_factor: float | None = Field(
        default=None, gt=0.0, description="per-expert capacity = ceil(cf * tokens * k / E); null is dropless"
    )

    @model_validator(mode="after")
    def _check(self) -> UpcycleConfig:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k must be between 1 and num_experts={self.num_experts} (got top_k={self.top_k})"
            )
        if self.straight_through and self.top_k != 1:
            raise ValueError(f"straight_through needs top_k == 1 (got top_k={self.top_k})")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must not repeat an index (got {self.layers})")
        return self


def upcycle_config(cfg: ModelConfig, up: UpcycleConfig) -> ModelConfig:
    """The :class:`ModelConfig` of ``cfg`` upcycled with ``up``: same model, plus an ``moe`` block with
    ``expert_hidden = ffn_hidden // granularity`` (and one ungated shared expert of ``ffn_hidden`` when
    ``up.shared_expert``).

    Raises :class:`UpcycleError` when ``cfg`` is already MoE, a layer index is out of range,
    ``granularity`` does not divide ``ffn_hidden`` or ``num_experts`` is not a multiple of ``granularity``.
    """
    if cfg.moe is not None:
        raise UpcycleError(
            f"source model is already MoE (moe is set; MoE layers {cfg.moe_layer_indices}); "
            "upcycling needs a dense model (moe: null)"
        )
    if up.layers is not None:
        bad = [i for i in up.layers if not 0 <= i < cfg.n_layers]
        if bad:
            raise UpcycleError(
                f"layers must be layer indices in 0..{cfg.n_layers - 1} (n_layers={cfg.n_layers}); got {bad}"
            )
    g = up.granularity
    if cfg.ffn_hidden % g:
        allowed = [d for d in range(1, cfg.ffn_hidden + 1) if cfg.ffn_hidden % d == 0]
        raise UpcycleError(
            f"granularity must divide ffn_hidden={cfg.ffn_hidden} (got {g}); allowed: {allowed}"
        )
    if up.num_experts % g:
        raise UpcycleError(
            f"num_experts must be a multiple of granularity={g} (got num_experts={up.num_experts})"
        )
    moe = MoEConfig(
        num_experts=up.num_experts,
        top_k=up.top_k,
        expert_hidden=cfg.ffn_hidden // g,
        layers=sorted(up.layers) if up.layers is not None else None,
        renormalize=up.renormalize,
        router_noise_std=up.router_noise_std,
        noise_anneal_steps=up.noise_anneal_steps,
        straight_through=up.straight_through,
        capacity_factor=up.capacity_factor,
        lb_coef=up.lb_coef,
        z_coef=up.z_coef,
        num_shared_experts=1 if up.shared_expert else 0,
        shared_expert_hidden=cfg.ffn_hidden if up.shared_expert else None,
        shared_expert_gate=False,
    )
    return ModelConfig.model_validate({**cfg.model_dump(), "moe": moe.model_dump()})


def _randn(gen: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard normal float32 draws from ``gen`` (a CPU generator, so results match on every device)."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device)


def _experts(mlp: SwiGLU, up: UpcycleConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w13 [E, D, 2F], w2 [E, F, D])`` in float32 for one layer, built from its dense ``mlp``."""
    gate = mlp.gate_proj.weight.detach().float()  # [H, D]
    upw = mlp.up_proj.weight.detach().float()  # [H, D]
    down = mlp.down_proj.weight.detach().float()  # [D, H]
    dev = gate.device
    d, hidden = down.shape
    f = hidden // up.granularity
    n_drop = round(up.drop_fraction * f)
    stats = [(w.mean(), w.std()) for w in (gate, upw, down)]
    scale = float(up.granularity) * (0.5 if up.shared_expert else 1.0)
    w13 = torch.empty(up.num_experts, d, 2 * f, device=dev)
    w2 = torch.empty(up.num_experts, f, d, device=dev)
    for e in range(up.num_experts):
        sl = slice((e % up.granularity) * f, (e % up.granularity + 1) * f)
        eg, eu, ed = gate[sl].clone(), upw[sl].clone(), down[:, sl].clone()  # [F, D], [F, D], [D, F]
        if up.noise_std > 0.0:
            for w in (eg, eu, ed):
                w.mul_(1.0 + up.noise_std * _randn(gen, tuple(w.shape), dev))
        if n_drop:
            idx = torch.randperm(f, generator=gen)[:n_drop].to(dev)
            (mg, sg), (mu, su), (md, sd) = stats
            eg[idx] = _randn(gen, (n_drop, d), dev) * sg + mg
            eu[idx] = _randn(gen, (n_drop, d), dev) * su + mu
            ed[:, idx] = _randn(gen, (d, n_drop), dev) * sd + md
        w13[e] = torch.cat([eg.T, eu.T], dim=1)
        w2[e] = ed.T * scale
    return w13, w2


@torch.no_grad()
def upcycle(model: MoETransformer, up: UpcycleConfig, *, seed: int = 0) -> MoETransformer:
    """A new model: ``model`` with the MLPs of ``up.layers`` turned into MoE layers (module docstring).

    Non-MoE weights are copies of the source's; the source is not modified. The result has the source's
    device, dtype (that of its embedding) and train/eval mode, tied embeddings stay tied, router buffers
    and ghost activations start at zero. Deterministic in ``seed``; the global RNG is neither read nor
    advanced. Raises :class:`UpcycleError` as :func:`upcycle_config` does.
    """
    cfg = upcycle_config(model.cfg, up)
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    new = MoETransformer.uninitialized(cfg, device).to(dtype)
    new.rope.reset(device=device)  # the cast rounded the float32 RoPE tables: rebuild them from theta

    moe_idx = set(cfg.moe_layer_indices)
    moe_prefixes = tuple(f"blocks.{i}.mlp." for i in moe_idx)
    src_sd = model.state_dict()
    for name, t in new.state_dict().items():
        if not name.startswith(moe_prefixes):
            t.copy_(src_sd[name])

    gen = torch.Generator().manual_seed(seed)
    for block in new.blocks:
        if block.index not in moe_idx:
            continue
        layer = block.mlp
        dense = model.blocks[block.index].mlp
        assert isinstance(layer, MoELayer) and isinstance(dense, SwiGLU)
        router = layer.router
        router.weight.copy_(_randn(gen, tuple(router.weight.shape), device) * up.router_init_std)
        for buf in (router.expert_bias, router.load_since_step, router.num_steps, layer.ghost_alpha):
            buf.zero_()
        w13, w2 = _experts(dense, up, gen)
        layer.w13.copy_(w13)
        layer.w2.copy_(w2)
        if layer.shared is not None:
            layer.shared.gate_proj.weight.copy_(dense.gate_proj.weight)
            layer.shared.up_proj.weight.copy_(dense.up_proj.weight)
            layer.shared.down_proj.weight.copy_(dense.down_proj.weight.float() * 0.5)
    new.train(model.training)
    logger.info(
        "upcycled %d of %d layers %s: %d experts (top-%d, granularity %d, expert_hidden %d)%s, "
        "drop_fraction=%g noise_std=%g router_init_std=%g seed=%d",
        len(moe_idx),
        cfg.n_layers,
        sorted(moe_idx),
        up.num_experts,
        up.top_k,
        up.granularity,
        cfg.moe.expert_hidden if cfg.moe else 0,
        " + shared expert" if up.shared_expert else "",
        up.drop_fraction,
        up.noise_std,
        up.router_init_std,
        seed,
    )
    return new
