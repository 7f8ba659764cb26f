"""The MoE layer: route, sort by expert, run experts as one grouped SwiGLU, combine — no loop over tokens.
Its decode form (:class:`MoEDecode`) runs the same layer for one token per row.

Shapes: N tokens (batch × sequence flattened), B rows of a decode step, D model dim, F expert hidden,
G = 2F, E expert slots (routed + ghost), k experts per token, A = N·k token→expert assignments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.model import cpu_kernels
from moeforge.model.config import MoEConfig
from moeforge.model.dispatch import grouped_swiglu
from moeforge.model.layers import DecodeLinear, LinearFactory, RMSNorm, SwiGLU
from moeforge.model.router import Router, RouterOutput

__all__ = ["ExpertOutputStats", "MoEDecode", "MoELayer", "MoEStats", "sort_assignments"]


@dataclass
class ExpertOutputStats:
    """What the experts wrote in one forward, recorded only when ``MoELayer.record_expert_outputs`` is on.

    Sufficient statistics (sums, so micro-batches add up) for the ghost-expert saturation signal
    (:mod:`moeforge.train.ghost`); all detached fp32. ``sum_ED``: per expert slot, the sum of its raw
    SwiGLU outputs (before combine weight and ghost alpha) over the assignments it processed — divide by
    ``MoEStats.tokens_per_expert`` for the mean output; ``input_energy``: ``Σ_n ‖x_n‖²`` over the layer's
    input tokens ``x_n`` (the block's normed hidden state); ``explained_energy``:
    ``Σ_n ⟨x_n, y_n⟩² / ‖y_n‖²``, the part of each input vector that lies along the routed output ``y_n``
    (shared experts excluded; tokens with ``y_n = 0`` add 0).
    """

    sum_ED: torch.Tensor
    input_energy: torch.Tensor
    explained_energy: torch.Tensor


@dataclass
class MoEStats:
    """Per-layer routing statistics of one forward (all detached except the two losses).

    tokens_per_expert: ``[E]`` assignments each expert actually processed (after capacity drops);
    dropped: assignments dropped by the capacity limit; assignments: ``N·k``;
    probs_mean: ``[E]`` mean router probability; entropy: mean per-token routing entropy (nats) — the
    layer leaves both None and keeps the detached ``[N, E]`` router ``probs`` instead: :meth:`detail`
    computes them on first use, so a training step that logs nothing never pays for them;
    tokens: ``N``, the tokens routed (``assignments / k``); routed_per_expert: ``[E]`` the router's
    assignments per expert *before* the capacity limit (a collapse stays visible when capacity hides it
    in ``tokens_per_expert``); expert_outputs: see :class:`ExpertOutputStats`, None unless
    ``MoELayer.record_expert_outputs`` is on. Everything after ``assignments`` defaults to None.
    """

    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: int | torch.Tensor  # a 0-d tensor from the layer (read on the host only when logged)
    assignments: int
    probs_mean: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    tokens: int | None = None
    routed_per_expert: torch.Tensor | None = None
    expert_outputs: ExpertOutputStats | None = None
    probs: torch.Tensor | None = None

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped) / max(self.assignments, 1)

    @torch.no_grad()
    def detail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs_mean, entropy)``: computed from ``probs`` on the first call, then kept."""
        if self.probs_mean is None or self.entropy is None:
            if self.probs is None:
                raise ValueError(
                    "MoEStats has neither probs_mean/entropy nor the router probs to compute them"
                )
            p = self.probs
            self.probs_mean = p.mean(0)
            self.entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()
        return self.probs_mean, self.entropy


_COMBINE_ROWS = 1024  # assignment rows per combine chunk: its temporaries stay in cache, none is [A, D]


class _WeightedCombine(torch.autograd.Function):
    """``out[t] = Σ w[a]·y[a]`` over the assignments ``a`` of token ``t`` (``token[a] = t``), on the host.

    With the host kernels (:mod:`moeforge.model.cpu_kernels`, float32): forward and backward are one pass
    each — the forward reads each token's rows through ``pos`` (the inverse of the sort), in parallel over
    tokens and summing in the token's choice order; the backward writes ``dL/dy`` and ``dL/dw`` row by row.
    Otherwise ATen ops: ``index_add_`` of the weighted rows into ``[N, D]`` zeros, where the permutation
    into ``[k·N, D]`` slots and the sum over ``k`` touch the ``A`` rows three times more; the backward
    gathers the output gradient once and derives both gradients from it in place. Both run in chunks of
    :data:`_COMBINE_ROWS` rows, so no ``[A, D]`` temporary is allocated (at that size a fresh tensor's
    page faults cost more than the arithmetic). On the host ``index_add_`` adds in index order. Either way
    the sum is deterministic (on GPU it would use atomics: the caller keeps the permutation there)."""

    @staticmethod
    def forward(ctx, y_AD, weight_A, token_A, pos_A, n):  # type: ignore[override]
        ctx.save_for_backward(y_AD, weight_A, token_A)
        if y_AD.dtype == weight_A.dtype:
            out_ND = cpu_kernels.gather_sum(y_AD, weight_A, pos_A, n)
            if out_ND is not None:
                return out_ND
        out_ND = y_AD.new_zeros(n, y_AD.shape[-1], dtype=torch.result_type(y_AD, weight_A))
        for c in range(0, y_AD.shape[0], _COMBINE_ROWS):
            rows = slice(c, c + _COMBINE_ROWS)
            out_ND.index_add_(0, token_A[rows], y_AD[rows] * weight_A[rows, None])
        return out_ND

    @staticmethod
    def backward(ctx, g_ND):  # type: ignore[override]
        y_AD, weight_A, token_A = ctx.saved_tensors
        fused = cpu_kernels.combine_backward(
            g_ND.contiguous(), y_AD, weight_A, token_A, ctx.needs_input_grad[1]
        )
        if fused is not None:
            return fused[0] if ctx.needs_input_grad[0] else None, fused[1], None, None, None
        g_AD = g_ND.index_select(0, token_A)  # becomes dL/dy, scaled in place below
        g_w = g_AD.new_empty(g_AD.shape[0]) if ctx.needs_input_grad[1] else None
        for c in range(0, g_AD.shape[0], _COMBINE_ROWS):
            rows = slice(c, c + _COMBINE_ROWS)
            if g_w is not None:
                torch.sum(g_AD[rows] * y_AD[rows], -1, out=g_w[rows])
            g_AD[rows].mul_(weight_A[rows, None])
        g_y = g_AD.to(y_AD.dtype) if ctx.needs_input_grad[0] else None
        return g_y, None if g_w is None else g_w.to(weight_A.dtype), None, None, None


class _Gather(torch.autograd.Function):
    """``x[token]``, each assignment's input row (``index_select``), on the host. The backward sums each
    token's ``k`` row gradients with :func:`cpu_kernels.gather_sum` (through ``pos``, the inverse of the
    sort: in parallel over tokens, no zero-fill), or ``index_add_`` into zeros where the kernels do not
    apply — what autograd's ``index_select`` backward does."""

    @staticmethod
    def forward(ctx, x_ND, token_A, pos_A):  # type: ignore[override]
        ctx.save_for_backward(token_A, pos_A)
        ctx.n = x_ND.shape[0]
        return x_ND.index_select(0, token_A)

    @staticmethod
    def backward(ctx, g_AD):  # type: ignore[override]
        token_A, pos_A = ctx.saved_tensors
        g_AD = g_AD.contiguous()
        g_ND = cpu_kernels.gather_sum(g_AD, None, pos_A, ctx.n)
        if g_ND is None:
            g_ND = g_AD.new_zeros(ctx.n, g_AD.shape[-1]).index_add_(0, token_A, g_AD)
        return g_ND, None, None


def sort_assignments(
    indices_Nk: torch.Tensor, num_slots: int, capacity: int | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order token→expert assignments by expert and apply the capacity limit.

    Assignments are numbered slot-major (``a = j·N + n`` for the token's j-th choice) so that, within
    an expert, every token's first choice outranks any second choice (GShard priority), then token order.
    Returns ``(order_A, counts_E, dropped)``: all ``N·k`` assignment ids, the kept ones first, grouped by
    expert (stable), then the dropped ones; the per-expert counts of kept assignments (so rows past
    ``counts_E.sum()`` are the dropped ones, which no expert reads); and how many were dropped (a 0-d
    tensor). Fixed sizes throughout: no data-dependent shape, so no host read even with a capacity.
    """
    flat_A = indices_Nk.t().reshape(-1)
    counts_E = torch.bincount(flat_A, minlength=num_slots)
    if capacity is None:
        return torch.argsort(flat_A, stable=True), counts_E, counts_E.new_zeros(())
    order_A = torch.argsort(flat_A, stable=True)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_A = torch.arange(order_A.numel(), device=order_A.device) - starts_E[flat_A[order_A]]
    # dropped assignments sort after every kept one (key num_slots), kept ones stay grouped by expert
    key_A = torch.where(rank_A < capacity, flat_A[order_A], num_slots)
    order_A = order_A[torch.argsort(key_A, stable=True)]
    kept_counts = counts_E.clamp(max=capacity)
    return order_A, kept_counts, counts_E.sum() - kept_counts.sum()


class MoELayer(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts and ghost experts) replacing a dense MLP.

    Ghost experts are extra expert slots after the routed ones. While a ghost's activation
    ``ghost_alpha[j]`` is 0 it is masked out of routing, so it gets no tokens and no gradient; once
    woken (alpha > 0, set by the training controller) it is routed like any expert and its output is
    scaled by alpha. Dropped assignments (capacity) contribute nothing: the token rides the residual.

    ``record_expert_outputs`` (off by default, set by the ghost controller) adds
    :class:`ExpertOutputStats` to the returned stats: detached, computed after the output, so it never
    changes the layer's numerics, and costs nothing when off.
    """

    record_expert_outputs: bool = False
    # The seam parallelism plugs into from outside (``moeforge.train.expert_parallel``): given the rows
    # sorted by expert slot and the per-slot counts, return the experts' outputs in the same order. None:
    # every slot's weights are here and the grouped SwiGLU runs locally.
    expert_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.num_ghost = cfg.num_ghost_experts
        self.top_k = cfg.top_k
        slots = self.num_slots = cfg.num_experts + cfg.num_ghost_experts
        self.router = Router(
            d_model,
            cfg.num_experts,
            cfg.top_k,
            num_ghost=cfg.num_ghost_experts,
            renormalize=cfg.renormalize,
            noise_std=cfg.router_noise_std,
            noise_anneal_steps=cfg.noise_anneal_steps,
            straight_through=cfg.straight_through,
            aux_free_bias_rate=cfg.aux_free_bias_rate,
        )
        self.w13 = nn.Parameter(torch.empty(slots, d_model, 2 * cfg.expert_hidden))
        self.w2 = nn.Parameter(torch.empty(slots, cfg.expert_hidden, d_model))
        # standalone default; MoETransformer.reset_parameters re-draws with its documented scaled init
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)
        self.register_buffer("ghost_alpha", torch.zeros(cfg.num_ghost_experts))
        self.shared: SwiGLU | None = None
        self.shared_gate: nn.Linear | None = None
        if cfg.num_shared_experts > 0:
            assert cfg.shared_expert_hidden is not None
            # n shared SwiGLU experts summed equal one SwiGLU of n× the width.
            self.shared = SwiGLU(d_model, cfg.num_shared_experts * cfg.shared_expert_hidden)
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(d_model, 1, bias=False)

    def capacity(self, n_tokens: int) -> int | torch.Tensor | None:
        """Per-expert capacity ``ceil(cf · N · k / E_active)``, or None when dropless. With awake ghost slots
        it is a 0-d tensor (how many are awake lives on the device; no host read)."""
        if self.cfg.capacity_factor is None:
            return None
        want = self.cfg.capacity_factor * n_tokens * self.top_k
        if not self.num_ghost:
            return max(1, math.ceil(want / self.num_experts))
        active = self.num_experts + (self.ghost_alpha > 0).sum()
        return torch.ceil(want / active).clamp(min=1).long()

    def slot_scale(self) -> torch.Tensor | None:
        """``[E]`` the factor on each slot's output: 1 for routed experts, ``ghost_alpha`` for ghosts;
        None without ghost slots."""
        if not self.num_ghost:
            return None
        return torch.cat([self.ghost_alpha.new_ones(self.num_experts), self.ghost_alpha])

    def forward(self, x_BTD: torch.Tensor, *, stats: bool = True) -> tuple[torch.Tensor, MoEStats | None]:
        """Output and routing statistics; ``stats=False`` (generation) skips the losses and statistics
        and returns None for them — the output is the same."""
        shape = x_BTD.shape
        x_ND = x_BTD.reshape(-1, shape[-1])
        n = x_ND.shape[0]
        ghost_alpha = self.ghost_alpha if self.num_ghost else None
        r: RouterOutput = self.router(x_ND, ghost_alpha, losses=stats)

        capacity = self.capacity(n)
        order_A, counts_E, dropped = sort_assignments(r.indices, self.num_slots, capacity)
        token_A = order_A % n
        weight_A = r.weights.t().reshape(-1)[order_A]
        scale_E = self.slot_scale()
        if scale_E is not None:  # ghost slots are scaled by their activation level; routed experts by 1
            weight_A = weight_A * scale_E.to(weight_A.dtype)[r.indices.t().reshape(-1)[order_A]]

        if x_ND.is_cuda and self.top_k > 1:
            # index_select's backward scatters with atomics when a token appears k times; gathering from
            # k copies makes every index unique, so the gradient sum is deterministic on GPU too.
            x_AD = x_ND.repeat(self.top_k, 1).index_select(0, order_A)
        elif x_ND.is_cuda:
            x_AD = x_ND.index_select(0, token_A)
        else:
            # where each assignment's row went: token n's j-th choice (id j·N + n) is row pos_A[j·N + n]
            pos_A = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(order_A.numel()))
            x_AD = _Gather.apply(x_ND, token_A, pos_A)
        if self.expert_fn is None:  # with a capacity, rows past counts_E.sum() are dropped: zeros out
            y_AD = grouped_swiglu(
                x_AD, self.w13, self.w2, counts_E, self.cfg.dispatch, tail=capacity is not None
            )
        else:
            y_AD = self.expert_fn(x_AD, counts_E)
        raw_AD = y_AD
        if x_ND.is_cuda:
            # Put each weighted result back in its assignment slot (a permutation: deterministic, no
            # atomics), then sum a token's k slots; dropped slots stay zero.
            y_AD = y_AD * weight_A[:, None]
            buf_kND = y_AD.new_zeros(self.top_k * n, shape[-1]).index_copy(0, order_A, y_AD)
            out_ND = buf_kND.view(self.top_k, n, -1).sum(0) if self.top_k > 1 else buf_kND
        else:
            out_ND = _WeightedCombine.apply(y_AD, weight_A, token_A, pos_A, n)
        recorded = self._record(x_ND, raw_AD, out_ND, counts_E) if self.record_expert_outputs else None

        if self.shared is not None:
            s_ND = self.shared(x_ND)
            if self.shared_gate is not None:
                s_ND = torch.sigmoid(self.shared_gate(x_ND)) * s_ND
            out_ND = out_ND + s_ND

        if not stats:
            return out_ND.view(shape), None
        result = MoEStats(  # probs_mean and entropy: on demand (MoEStats.detail), at logging steps
            lb_loss=r.lb_loss,
            z_loss=r.z_loss,
            tokens_per_expert=counts_E.detach(),
            dropped=dropped,
            assignments=n * self.top_k,
            tokens=n,
            routed_per_expert=r.tokens_per_expert.detach(),
            expert_outputs=recorded,
            probs=r.probs.detach(),
        )
        return out_ND.view(shape), result

    @torch.no_grad()
    def prepare_for_decode(self, norm: RMSNorm, linear: LinearFactory = DecodeLinear) -> MoEDecode:
        """This layer preceded by ``norm`` (its block's pre-norm) as a :class:`MoEDecode`."""
        return MoEDecode(self, norm, linear)

    @torch.no_grad()
    def _record(
        self, x_ND: torch.Tensor, raw_AD: torch.Tensor, out_ND: torch.Tensor, counts_E: torch.Tensor
    ) -> ExpertOutputStats:
        """Per-expert output sums and input/explained energies (see :class:`ExpertOutputStats`)."""
        slots = self.num_slots
        expert_A = torch.repeat_interleave(torch.arange(slots, device=counts_E.device), counts_E)
        sum_ED = raw_AD.new_zeros(slots, raw_AD.shape[-1], dtype=torch.float32)
        sum_ED.index_add_(0, expert_A, raw_AD.detach().float())
        x = x_ND.detach().float()
        y = out_ND.detach().float()
        y_sq_N = y.pow(2).sum(-1)
        dot_N = (x * y).sum(-1)
        explained = torch.where(y_sq_N > 0, dot_N.pow(2) / y_sq_N.clamp_min(1e-30), torch.zeros_like(dot_N))
        return ExpertOutputStats(sum_ED=sum_ED, input_energy=x.pow(2).sum(), explained_energy=explained.sum())


class MoEDecode:
    """``x + moe(norm(x))`` for one token per row, in eval (no noise, no statistics).

    A batch that gives every expert rows on average (``B·k >= E``, ``B > 1``) runs all experts' gate/up
    projections and the router as one matrix (the norm's weight folded in; through ``linear``), and all
    down projections as another, with a zero combine weight where a row did not choose an expert. A
    smaller batch routes with :meth:`Router.select` and runs only the chosen experts, on their weights in
    place. With a ``capacity_factor`` the layer's own forward runs, since what it drops depends on the
    whole batch. Shared experts run through their module. The math is the layer's; rounding differs (the
    combine weight applied before the down projection, other GEMM kernels), about 1e-6 relative.
    """

    def __init__(self, layer: MoELayer, norm: RMSNorm, linear: LinearFactory) -> None:
        self.layer, self.norm = layer, norm
        slots, d, g = layer.w13.shape
        self.slots, self.hidden, self.top_k = slots, g // 2, layer.top_k
        # [out, in] rows: every expert's gate/up columns, then the router's logits (only batches of 2+
        # rows take this path: no GEMV copy)
        up_OD = torch.cat(
            [layer.w13.detach().permute(0, 2, 1).reshape(slots * g, d), layer.router.weight.detach()]
        )
        self.w13_router = linear(up_OD * norm.weight[None, :], gemv=False)
        self.w2_all = linear(layer.w2.detach().reshape(slots * self.hidden, d).t(), gemv=False)

    @property
    def nbytes(self) -> int:
        return self.w13_router.nbytes + self.w2_all.nbytes

    def step(self, x_BD: torch.Tensor) -> torch.Tensor:
        layer, norm_weight = self.layer, self.norm.weight
        xhat_BD = self.norm.normalize(x_BD)
        b = xhat_BD.shape[0]
        if layer.cfg.capacity_factor is not None:  # drops depend on the whole batch: the layer decides
            return x_BD + layer(xhat_BD * norm_weight, stats=False)[0]
        ghost_alpha = layer.ghost_alpha if layer.num_ghost else None
        h_BD: torch.Tensor | None = None
        if b > 1 and b * self.top_k >= self.slots:  # most experts get a row: run them all
            out = self._all_experts(xhat_BD, ghost_alpha)
        else:
            h_BD = xhat_BD * norm_weight
            indices_Bk, weights_Bk = layer.router.select(h_BD, ghost_alpha)
            out = self._chosen_experts(h_BD, indices_Bk.tolist(), self._slot_scaled(indices_Bk, weights_Bk))
        if layer.shared is not None:
            h_BD = xhat_BD * norm_weight if h_BD is None else h_BD
            s_BD = layer.shared(h_BD)
            if layer.shared_gate is not None:
                s_BD = torch.sigmoid(layer.shared_gate(h_BD)) * s_BD
            out = out + s_BD
        return x_BD + out

    def _slot_scaled(self, indices_Bk: torch.Tensor, weights_Bk: torch.Tensor) -> torch.Tensor:
        scale_E = self.layer.slot_scale()
        return weights_Bk if scale_E is None else weights_Bk * scale_E.to(weights_Bk.dtype)[indices_Bk]

    def _all_experts(self, xhat_BD: torch.Tensor, ghost_alpha: torch.Tensor | None) -> torch.Tensor:
        b, f, e = xhat_BD.shape[0], self.hidden, self.slots
        both = self.w13_router(xhat_BD)
        indices_Bk, weights_Bk = self.layer.router.select_for_decode(both[:, 2 * f * e :], ghost_alpha)
        weights_Bk = self._slot_scaled(indices_Bk, weights_Bk.to(xhat_BD.dtype))
        w_BE = xhat_BD.new_zeros(b, e).scatter_(1, indices_Bk, weights_Bk)
        h_BEG = both[:, : 2 * f * e].view(b, e, 2 * f)
        a_BEF = F.silu(h_BEG[..., :f]) * h_BEG[..., f:]
        return self.w2_all((a_BEF * w_BE[:, :, None]).view(b, e * f))

    def _chosen_experts(
        self, h_BD: torch.Tensor, chosen: list[list[int]], w_Bk: torch.Tensor
    ) -> torch.Tensor:
        """Each chosen expert once, on the rows that chose it, its weights read in place."""
        w13, w2, f = self.layer.w13, self.layer.w2, self.hidden
        if h_BD.shape[0] == 1:  # one row: no gather, no scatter; the weighted sum folded into addmm
            out: torch.Tensor | None = None
            for e, w in zip(chosen[0], w_Bk[0].tolist(), strict=True):
                hg = h_BD @ w13[e]
                a = F.silu(hg[:, :f]) * hg[:, f:]
                out = a @ w2[e] * w if out is None else torch.addmm(out, a, w2[e], alpha=w)
            assert out is not None
            return out
        by_expert: dict[int, tuple[list[int], list[int]]] = {}
        for n, row in enumerate(chosen):
            for j, e in enumerate(row):
                rows, slots = by_expert.setdefault(e, ([], []))
                rows.append(n)
                slots.append(j)
        out = h_BD.new_zeros(h_BD.shape)
        for e, (rows, slots) in by_expert.items():
            rows_t = torch.tensor(rows, device=h_BD.device)
            w = w_Bk[rows_t, torch.tensor(slots, device=h_BD.device)][:, None]
            hg = h_BD.index_select(0, rows_t) @ w13[e]
            out.index_add_(0, rows_t, (F.silu(hg[:, :f]) * hg[:, f:]) @ w2[e] * w)
        return out
