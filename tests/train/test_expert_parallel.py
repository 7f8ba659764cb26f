"""Expert parallelism on 2 gloo ranks (CPU) against one process holding the whole model and batch:
forward outputs, losses and every gradient equal (fp32 tolerance), with DDP over the non-expert
parameters; the expert shards gather into full tensors and a full state dict slices back into shards."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

WORLD = 2


def _model(overrides: list[str]):
    from moeforge.model.config import load_model_config
    from moeforge.model.transformer import MoETransformer

    cfg = load_model_config(
        "tiny", ["vocab_size=256", "n_layers=2", "moe.router_noise_std=0.0", "moe.num_experts=4", *overrides]
    )
    torch.manual_seed(0)
    return MoETransformer(cfg)


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2 * WORLD, 33), generator=g)


def _loss(model, ids: torch.Tensor):
    out = model(ids[:, :-1], ids[:, 1:])
    return out, out.loss + out.aux_loss


CASES = {
    "top2": [],
    "top1": ["moe.top_k=1"],
    "shared": ["moe.num_shared_experts=1", "moe.shared_expert_hidden=64"],
}


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name, overrides in CASES.items():
            try:
                _check(rank, overrides)
            except AssertionError as exc:
                raise AssertionError(f"case {name}: {exc}") from exc
    finally:
        dist.destroy_process_group()


def _check(rank: int, overrides: list[str]) -> None:
    from moeforge.model import router as router_mod
    from moeforge.train.expert_parallel import (
        apply_expert_parallel,
        checkpoint_transforms,
        wrap_ddp_expert_parallel,
    )

    ids = _batch()
    ref = _model(overrides)
    ref_out, ref_total = _loss(ref, ids)  # one process, the whole batch
    ref_total.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    def sum_all(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    router_mod.set_count_reducer(sum_all)  # the balancing loss over the global batch, as training does
    model = _model(overrides)
    apply_expert_parallel(model)
    ddp = wrap_ddp_expert_parallel(model, torch.device("cpu"))
    mine = ids[2 * rank : 2 * rank + 2]
    out, total = _loss(ddp, mine)
    total.backward()
    router_mod.set_count_reducer(None)

    torch.testing.assert_close(out.logits, ref_out.logits[2 * rank : 2 * rank + 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum_all(total) / WORLD, ref_total.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        want = ref_grads[n]
        if p.shape != want.shape:  # an expert shard: this rank's block of slots
            per = p.shape[0]
            want = want[rank * per : (rank + 1) * per]
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")

    whole, _ = checkpoint_transforms(model, torch.optim.SGD(model.parameters(), lr=0.1))
    full, _ = whole(model.state_dict(), {})
    ref_state = ref.state_dict()
    assert set(full) == set(ref_state)
    for k, v in full.items():
        torch.testing.assert_close(v, ref_state[k])  # the shards gather into the unsharded weights
    again = _model(overrides)
    apply_expert_parallel(again)
    _, local = checkpoint_transforms(again, torch.optim.SGD(again.parameters(), lr=0.1))
    again.load_state_dict(local(ref_state, {})[0])  # a checkpoint without EP, under EP
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_ranks_of_expert_parallelism_match_one_process() -> None:
    """Top-2, top-1 and with a shared expert, in one pair of processes (start-up is most of the cost)."""
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD)
