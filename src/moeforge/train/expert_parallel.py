"""Expert parallelism: each MoE layer's expert slots sharded over the ranks, tokens exchanged all-to-all.

Applied from outside the model, as torchtitan does: :func:`apply_expert_parallel` replaces each
:class:`~moeforge.model.moe.MoELayer`'s ``w13``/``w2`` by this rank's contiguous block of ``slots / N``
experts and sets the layer's ``expert_fn`` seam. The model file stays math; routing, sorting by slot,
combining and the losses run as in one process.

One exchange per layer and direction (forward; backward mirrors it through autograd):

1. **counts first** — each rank's per-slot counts ``[N, slots/N]`` go all-to-all, so every rank knows
   how many rows it will receive from each source for each of its experts (the one host read of the
   exchange: the split sizes a collective takes are host integers);
2. **rows** — the rows, already sorted by slot and therefore by owning rank, go all-to-all; the received
   block ``[source][local expert]`` is permuted to ``[local expert][source]`` (a gather, no atomics) and
   runs through the local experts as one grouped SwiGLU;
3. **back** — the inverse permutation, then the reverse all-to-all returns each row to its token's rank
   in the order it left.

The gradient of an expert weight arrives from the tokens of every rank, each rank's loss being the mean
over its own tokens: the sum over ranks is ``N`` times the gradient of the global mean loss, so expert
gradients are scaled by ``1/N`` — the same average DDP forms for the other parameters, which
:func:`wrap_ddp_expert_parallel` leaves to DDP (and keeps DDP's hands off the experts).

Checkpoints stay whole: :func:`checkpoint_transforms` gathers the shards (weights and their optimizer
moments) into the full tensors for rank 0 to save, and slices a full checkpoint for each rank — so a
checkpoint written under EP loads without it and the other way round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from moeforge.model.dispatch import grouped_swiglu
from moeforge.model.moe import MoELayer

__all__ = [
    "ExpertShard",
    "apply_expert_parallel",
    "checkpoint_transforms",
    "expert_parameter_names",
    "is_expert_parallel",
    "wrap_ddp_expert_parallel",
]

log = logging.getLogger(__name__)

_EXPERT_PARAMS = ("w13", "w2")


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: object) -> torch.Tensor:
    """Differentiable all-to-all of rows: the backward sends the gradients back along the same routes."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


def _regroup(counts_SL: torch.Tensor) -> torch.Tensor:
    """The gather index that turns rows received as ``[source][local expert]`` blocks into
    ``[local expert][source]`` blocks (``counts_SL[s, l]`` rows in each)."""
    sources, experts = counts_SL.shape
    blocks = sources * experts
    flat = counts_SL.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # where each (source, expert) block begins as received
    order = torch.arange(blocks, device=flat.device).view(sources, experts).t().reshape(-1)  # expert-major
    lengths = flat[order]
    # row i of block b (in the new order) comes from starts[b] + i
    block_of_row = torch.repeat_interleave(torch.arange(blocks, device=flat.device), lengths)
    new_starts = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(int(lengths.sum()), device=flat.device) - new_starts[block_of_row]
    return starts[order][block_of_row] + within


class ExpertShard:
    """The ``expert_fn`` of one MoE layer under expert parallelism (see the module docstring)."""

    def __init__(self, layer: MoELayer, rank: int, world: int, group: object = None) -> None:
        self.layer, self.rank, self.world = layer, rank, world
        self.group = group if group is not None else dist.group.WORLD  # functional collectives need one
        self.per_rank = layer.num_slots // world

    def __call__(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        counts_RL = counts_E.view(self.world, self.per_rank)  # rows for [destination rank][its expert]
        recv_SL = torch.empty_like(counts_RL)
        dist.all_to_all_single(recv_SL, counts_RL, group=self.group)  # [source rank][my expert]
        both = torch.stack([counts_RL.sum(1), recv_SL.sum(1)]).tolist()  # one host read for the splits
        send, recv = both[0], both[1]
        # with a capacity, the rows past the kept ones were dropped: they stay here, as zeros
        kept = sum(send)
        x_rows = _all_to_all(x_AD[:kept], recv, send, self.group)
        perm = _regroup(recv_SL)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        local = self.layer
        y_local = grouped_swiglu(
            x_rows.index_select(0, perm), local.w13, local.w2, recv_SL.sum(0), local.cfg.dispatch
        )
        y_AD = _all_to_all(y_local.index_select(0, inv), send, recv, self.group)
        if kept < x_AD.shape[0]:
            y_AD = torch.cat([y_AD, y_AD.new_zeros(x_AD.shape[0] - kept, y_AD.shape[-1])])
        return y_AD


def _moe_layers(model: nn.Module) -> Iterator[tuple[str, MoELayer]]:
    for name, mod in model.named_modules():
        if isinstance(mod, MoELayer):
            yield name, mod


def is_expert_parallel(model: nn.Module) -> bool:
    """Whether a forward of ``model`` is a collective (its experts are sharded): every rank must run the
    same number of forwards, in eval too."""
    return any(isinstance(layer.expert_fn, ExpertShard) for _, layer in _moe_layers(model))


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the sharded expert weights (what DDP must leave alone)."""
    return [f"{name}.{p}" for name, _ in _moe_layers(model) for p in _EXPERT_PARAMS]


def apply_expert_parallel(model: nn.Module, group: object = None) -> int:
    """Shard every MoE layer's expert slots over the ranks of ``group`` (all ranks by default); returns the
    number of layers sharded. The model must hold the full weights (identical on every rank) when called."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    n = 0
    for name, layer in _moe_layers(model):
        if layer.num_slots % world:
            raise ValueError(
                f"{name}: {layer.num_slots} expert slots cannot be split over parallel.expert={world} ranks; "
                "choose a degree that divides the number of experts (ghost slots included)"
            )
        per = layer.num_slots // world
        lo = rank * per
        for p in _EXPERT_PARAMS:
            full = getattr(layer, p)
            shard = nn.Parameter(full.detach()[lo : lo + per].clone(), requires_grad=full.requires_grad)
            if shard.requires_grad:
                # each rank's loss is the mean over its own tokens: average like DDP does
                shard.register_hook(lambda g, w=world: g / w)
            setattr(layer, p, shard)
        layer.expert_fn = ExpertShard(layer, rank, world, group)
        layer.ep_shard = (rank, world)  # type: ignore[attr-defined]
        n += 1
    log.info("expert parallelism over %d ranks: %d MoE layers sharded", world, n)
    return n


def wrap_ddp_expert_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the parameters every rank holds whole; the expert shards are excluded (each rank owns its
    own and their gradients already carry every rank's tokens)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)


def _shards(model: nn.Module) -> list[tuple[str, nn.Parameter, ExpertShard]]:
    out = []
    for name, layer in _moe_layers(model):
        if isinstance(layer.expert_fn, ExpertShard):
            out += [(f"{name}.{p}", getattr(layer, p), layer.expert_fn) for p in _EXPERT_PARAMS]
    return out


def _optimizer_ids(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """``id(parameter)`` → the index ``optimizer.state_dict()`` numbers it by."""
    ids, n = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            ids[id(p)] = n
            n += 1
    return ids


def checkpoint_transforms(model: nn.Module, optimizer: torch.optim.Optimizer):  # type: ignore[no-untyped-def]
    """``(whole, local)`` for :func:`moeforge.train.checkpoint.save_checkpoint` / ``load_checkpoint``:
    ``whole`` gathers every expert shard — the weights and their optimizer moments — into the whole tensor
    (a collective: every rank calls it, in the same order); ``local`` cuts whole tensors to this rank's
    block. A checkpoint written under EP is therefore the checkpoint one process writes, and loads
    without EP; one written without EP loads under it."""
    shards = _shards(model)
    ids = _optimizer_ids(optimizer)

    def _keys(opt_t: dict[str, torch.Tensor], param: nn.Parameter) -> list[str]:
        pid = ids.get(id(param))
        prefix = f"state.{pid}."
        return sorted(k for k in opt_t if k.startswith(prefix) and opt_t[k].shape == param.shape)

    def whole(weights: dict[str, torch.Tensor], opt_t: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
        weights, opt_t = dict(weights), dict(opt_t)
        for key, param, shard in shards:
            for table, k in [(weights, key), *((opt_t, o) for o in _keys(opt_t, param))]:
                local = table[k].to(param.device).contiguous()
                parts = [torch.empty_like(local) for _ in range(shard.world)]
                dist.all_gather(parts, local, group=shard.group)
                table[k] = torch.cat(parts).cpu()
        return weights, opt_t

    def local(weights: dict[str, torch.Tensor], opt_t: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
        weights, opt_t = dict(weights), dict(opt_t)
        for key, param, shard in shards:
            lo, per = shard.rank * shard.per_rank, shard.per_rank
            whole_shape = (shard.layer.num_slots, *param.shape[1:])
            pid = ids.get(id(param))
            keys = [key] + [
                k for k in opt_t if k.startswith(f"state.{pid}.") and opt_t[k].shape == whole_shape
            ]
            for k in keys:
                table = weights if k == key else opt_t
                if table[k].shape == whole_shape:
                    table[k] = table[k][lo : lo + per].clone()
        return weights, opt_t

    return whole, local
