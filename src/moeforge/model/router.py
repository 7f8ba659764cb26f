"""Top-k softmax router with noisy gating, straight-through top-1, balancing losses and aux-free bias.

Shapes: N tokens, E experts (routed + ghost slots), k experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Router", "RouterOutput", "load_balancing_loss", "z_loss"]


@dataclass
class RouterOutput:
    """What the router decided for ``N`` tokens.

    indices: ``[N, k]`` chosen experts; weights: ``[N, k]`` combine weights (differentiable);
    probs: ``[N, E]`` softmax over the (noisy) logits; logits: ``[N, E]`` pre-noise logits;
    lb_loss / z_loss: unscaled scalars; tokens_per_expert: ``[E]`` assignment counts (no grad).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor


_count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None


def set_count_reducer(fn: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """The one path by which routing statistics become global: ``fn`` sums a tensor over all data-parallel
    processes (``all_reduce``). Set by :func:`moeforge.train.distributed.init_distributed` under torchrun
    and cleared at shutdown; ``model/`` itself never imports ``torch.distributed``. With it the balancing
    loss uses load fractions over the *global* batch, so N processes compute exactly the loss of one
    process holding the whole batch (``P_i`` stays local and is averaged by DDP's gradient mean), and
    :meth:`Router.step` moves the aux-free bias by the global step's loads, the same on every process."""
    global _count_reducer
    _count_reducer = fn


def load_balancing_loss(
    probs_NE: torch.Tensor,
    indices_Nk: torch.Tensor,
    n_active: int | torch.Tensor,
    counts_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer balancing loss ``E · Σ_i f_i · P_i``, normalized to 1.0 at perfect balance for any k.

    ``f_i`` is the fraction of the ``N·k`` token→expert *assignments* that went to expert ``i`` (so the
    ``f_i`` sum to 1, not to ``k``) and ``P_i`` the mean router probability of expert ``i``. Uniform routing
    gives ``f_i = P_i = 1/E`` and a loss of exactly 1.0; any skew raises it (up to ``E``). Codebases
    disagree here: transformers' Mixtral divides the counts by ``N`` only, so its value at balance is ``k``.
    ``E`` is ``n_active``, the experts that may receive tokens (dormant ghosts excluded). ``counts_E``: the
    assignments per expert if the caller has counted them already (in ``probs``' dtype; not modified).
    """
    n, k = indices_Nk.shape
    if counts_E is None:
        counts_E = torch.zeros(probs_NE.shape[-1], dtype=probs_NE.dtype, device=probs_NE.device)
        counts_E.scatter_add_(
            0, indices_Nk.reshape(-1), torch.ones(n * k, dtype=probs_NE.dtype, device=probs_NE.device)
        )
    total = probs_NE.new_full((), float(n * k))  # a fill on the device, not a copy from the host
    if _count_reducer is not None and probs_NE.requires_grad:
        both = _count_reducer(torch.cat([counts_E, total[None]]))
        counts_E, total = both[:-1], both[-1]
    f_E = counts_E / total.clamp(min=1.0)
    p_E = probs_NE.mean(0)
    return n_active * (f_E * p_E).sum()


def z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean(logsumexp(logits)²)`` (ST-MoE), on the pre-noise logits."""
    return torch.logsumexp(logits_NE.float(), dim=-1).pow(2).mean()


class Router(nn.Module):
    """Linear router over ``num_experts + num_ghost`` expert slots.

    Selection uses ``logits + noise + bias``; the combine weights come from the softmax of the
    (noisy) logits without the bias, so the aux-free bias steers which experts are chosen but never
    scales their outputs. Ghost slots whose activation ``alpha`` is 0 are masked out of routing.

    State updated outside the forward, after each optimizer step, by :meth:`step`: the noise schedule
    and the aux-free bias (``bias_i += rate · sign(mean_load − load_i)`` over the loads since the last step).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        num_ghost: int = 0,
        renormalize: bool = True,
        noise_std: float = 0.0,
        noise_anneal_steps: int = 0,
        straight_through: bool = False,
        aux_free_bias_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if top_k > num_experts:  # ghosts only add slots: the routed experts (always awake) must cover top_k
            raise ValueError(
                f"top_k={top_k} exceeds the {num_experts} routed experts (ghost slots may sleep)"
            )
        self.num_experts = num_experts
        self.num_ghost = num_ghost
        self.top_k = top_k
        self.renormalize = renormalize
        self.noise_std = noise_std
        self.noise_anneal_steps = noise_anneal_steps
        self.straight_through = straight_through
        self.aux_free_bias_rate = aux_free_bias_rate
        total = num_experts + num_ghost
        self.weight = nn.Parameter(torch.empty(total, d_model))
        nn.init.normal_(self.weight, std=0.02)
        # Buffers are saved with the weights so that a resumed run routes exactly like the original.
        self.register_buffer("expert_bias", torch.zeros(total))
        self.register_buffer("load_since_step", torch.zeros(total))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    @property
    def current_noise_std(self) -> float:
        """Noise std at the current step: linear decay from ``noise_std`` to 0 over ``noise_anneal_steps``."""
        if self.noise_std == 0.0:
            return 0.0
        if self.noise_anneal_steps <= 0:
            return self.noise_std
        frac = min(self._steps_host() / self.noise_anneal_steps, 1.0)
        return self.noise_std * (1.0 - frac)

    def _steps_host(self) -> int:
        """``num_steps`` as a host int, read from the device once per step, not once per forward: the
        count only changes in :meth:`step` (and when a checkpoint loads, which the cached copy notices)."""
        cached = getattr(self, "_steps_cache", None)
        if cached is None or cached[0] is not self.num_steps or cached[1] != self.num_steps._version:
            cached = (self.num_steps, self.num_steps._version, int(self.num_steps.item()))
            self._steps_cache = cached
        return cached[2]

    def active_mask(self, ghost_alpha: torch.Tensor | None) -> torch.Tensor | None:
        """``[E]`` bool of slots that may receive tokens, or None when all may."""
        if self.num_ghost == 0 or ghost_alpha is None:
            return None
        awake = ghost_alpha > 0
        return torch.cat([torch.ones(self.num_experts, dtype=torch.bool, device=awake.device), awake])

    def forward(
        self, x_ND: torch.Tensor, ghost_alpha: torch.Tensor | None = None, *, losses: bool = True
    ) -> RouterOutput:
        """Route ``x``. ``losses=False`` (generation) skips the balancing and z losses and the load counts,
        which nothing reads while decoding; ``lb_loss``/``z_loss``/``tokens_per_expert`` are then empty."""
        logits_NE = F.linear(x_ND, self.weight).float()
        active = self.active_mask(ghost_alpha)
        # With ghost slots the number awake is a tensor (no host read in the forward); ghosts only add
        # slots to the routed experts, so top_k <= num_experts (checked by MoEConfig) is always satisfiable.
        n_active: int | torch.Tensor = logits_NE.shape[-1] if active is None else active.sum()
        masked_NE = logits_NE if active is None else logits_NE.masked_fill(~active, float("-inf"))
        noisy_NE = masked_NE
        std = self.current_noise_std if self.training else 0.0
        if std > 0.0:
            noisy_NE = masked_NE + torch.randn_like(masked_NE) * std
        probs_NE = torch.softmax(noisy_NE, dim=-1)
        scores_NE = probs_NE
        if self.aux_free_bias_rate > 0.0:
            scores_NE = probs_NE + self.expert_bias  # selection only, see class docstring
            if active is not None:  # a dormant ghost must never outrank an awake expert with a low bias
                scores_NE = scores_NE.masked_fill(~active, float("-inf"))
        _, indices_Nk = torch.topk(scores_NE, self.top_k, dim=-1)
        weights_Nk = probs_NE.gather(1, indices_Nk)
        if self.straight_through:
            # value 1 (so eval and export see weight 1), gradient of p (so the router learns in training)
            weights_Nk = (weights_Nk - weights_Nk.detach()) + 1.0  # this order gives exactly 1.0
        elif self.renormalize:
            weights_Nk = weights_Nk / weights_Nk.sum(-1, keepdim=True)

        if not losses:
            empty = logits_NE.new_zeros(())
            return RouterOutput(
                indices=indices_Nk,
                weights=weights_Nk.to(x_ND.dtype),
                probs=probs_NE,
                logits=logits_NE,
                lb_loss=empty,
                z_loss=empty,
                tokens_per_expert=logits_NE.new_zeros(0),
            )
        with torch.no_grad():
            counts_E = torch.bincount(indices_Nk.reshape(-1), minlength=logits_NE.shape[-1]).to(
                logits_NE.dtype
            )
            if self.training and self.aux_free_bias_rate > 0.0:
                self.load_since_step += counts_E
        return RouterOutput(
            indices=indices_Nk,
            weights=weights_Nk.to(x_ND.dtype),
            probs=probs_NE,
            logits=logits_NE,
            lb_loss=load_balancing_loss(probs_NE, indices_Nk, n_active, counts_E),
            # logsumexp over the masked logits (-inf for dormant ghosts) is the one over the awake columns,
            # without the data-dependent column selection (a host sync)
            z_loss=z_loss(masked_NE),
            tokens_per_expert=counts_E,
        )

    def select(
        self, x_ND: torch.Tensor, ghost_alpha: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [N, k], weights [N, k])`` exactly as :meth:`forward` picks them without noise (eval),
        in as few tensor operations as possible: the decode step's routing (nothing else is computed)."""
        indices_Nk, weights_Nk = self.select_from_logits(F.linear(x_ND, self.weight), ghost_alpha)
        return indices_Nk, weights_Nk.to(x_ND.dtype)

    def select_from_logits(
        self, logits_NE: torch.Tensor, ghost_alpha: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`select` given the router logits ``x @ weight.T`` (computed elsewhere, e.g. fused into a
        larger matmul); the weights are float32."""
        logits_NE = logits_NE.float()
        active = self.active_mask(ghost_alpha)
        if active is not None:
            logits_NE = logits_NE.masked_fill(~active, float("-inf"))
        probs_NE = torch.softmax(logits_NE, dim=-1)
        if self.aux_free_bias_rate > 0.0:
            scores_NE = probs_NE + self.expert_bias
            if active is not None:
                scores_NE = scores_NE.masked_fill(~active, float("-inf"))
            indices_Nk = torch.topk(scores_NE, self.top_k, dim=-1).indices
            weights_Nk = probs_NE.gather(1, indices_Nk)
        else:
            weights_Nk, indices_Nk = torch.topk(probs_NE, self.top_k, dim=-1)  # the values are the probs
        if self.straight_through:
            weights_Nk = torch.ones_like(weights_Nk)  # forward's value in eval: exactly 1
        elif self.renormalize:
            weights_Nk = weights_Nk / weights_Nk.sum(-1, keepdim=True)
        return indices_Nk, weights_Nk

    def select_for_decode(
        self, logits_NE: torch.Tensor, ghost_alpha: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`select_from_logits` in the fewest operations the rule allows, for a decode step whose
        logits come out of a larger fused matmul: a renormalized top-k of a softmax (no bias, no ghosts,
        no straight-through) is the softmax of the top-k logits, two operations instead of four (every
        distinct operation after a weight-streaming GEMM pays for a cold cache). Weights equal
        :meth:`select_from_logits`' up to float rounding, and so do the indices but for exact ties."""
        if self.renormalize and not (self.straight_through or self.aux_free_bias_rate or self.num_ghost):
            top_Nk, indices_Nk = torch.topk(logits_NE, self.top_k, dim=-1)
            return indices_Nk, torch.softmax(top_Nk, dim=-1)
        return self.select_from_logits(logits_NE, ghost_alpha)

    @torch.no_grad()
    def step(self, ghost_alpha: torch.Tensor | None = None) -> None:
        """Advance the router one optimizer step: anneal noise, move the aux-free bias toward balance."""
        self.num_steps += 1
        if self.aux_free_bias_rate > 0.0:
            # the loads of the whole data-parallel step: every process moves its bias by the same amount
            # (this runs on every process together, the sum before any test of it)
            if _count_reducer is not None:
                self.load_since_step.copy_(_count_reducer(self.load_since_step))
            self._move_bias(ghost_alpha)
        self.load_since_step.zero_()

    def _move_bias(self, ghost_alpha: torch.Tensor | None) -> None:
        if self.load_since_step.sum() > 0:
            active = self.active_mask(ghost_alpha)
            load = self.load_since_step
            if active is None:
                mean = load.mean()
                self.expert_bias += self.aux_free_bias_rate * torch.sign(mean - load)
            else:
                mean = load[active].mean()
                self.expert_bias[active] += self.aux_free_bias_rate * torch.sign(mean - load[active])
