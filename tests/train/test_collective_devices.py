"""Every collective of the training code runs on the process's device: NCCL rejects CPU tensors, so a
reduction built on the host would fail the first log or eval of a multi-GPU run, which no CPU test sees.

The code path is forced without a GPU: a fake process group of two (torch's ``fake`` backend) makes the
code distributed, the process's device (``DistInfo.device``) is ``meta`` — a device that is not the
CPU, as CUDA would be — and the collectives of ``torch.distributed`` are replaced by a check, NCCL-like,
that every tensor handed to one lives on that device. The check then stops the path (``Reached``): the
collectives are fakes and a meta tensor holds no numbers to read afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from moeforge.model import router as router_mod
from moeforge.model.moe import MoEStats
from moeforge.train import distributed, fsdp
from moeforge.train.config import load_train_config
from moeforge.train.distributed import DistInfo, all_reduce_mean, all_reduce_sum_tensor
from moeforge.train.evaluation import eval_batches, evaluate
from moeforge.train.metrics import RoutingAccumulator
from moeforge.train.trainer import Trainer

DEVICE = torch.device("meta")  # the process's device: not the CPU, like a GPU under NCCL
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
)


class Reached(Exception):
    """A collective was reached with every tensor on the process's device."""


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, list | tuple):
        for y in x:
            yield from _tensors(y)


@contextmanager
def fake_nccl_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[DistInfo]:
    """A fake process group of two whose collectives check their tensors' device, then stop the path."""

    def check(name: str) -> Any:
        def collective(*args: Any, **kwargs: Any) -> None:
            tensors = list(_tensors([*args, *kwargs.values()]))
            assert tensors, f"{name} was called without a tensor"
            for t in tensors:
                assert t.device == DEVICE, f"{name} on a {t.device} tensor: NCCL needs the process's {DEVICE}"
            raise Reached(name)

        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, check(name))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield DistInfo(rank=0, world_size=2, local_rank=0, device=DEVICE)
    finally:
        router_mod.set_count_reducer(None)
        dist.destroy_process_group()


@pytest.fixture
def fake_nccl(monkeypatch: pytest.MonkeyPatch) -> Iterator[DistInfo]:
    with fake_nccl_group(monkeypatch) as info:
        yield info


def test_the_reduction_helpers_reduce_on_the_process_device(fake_nccl: DistInfo) -> None:
    with pytest.raises(Reached):
        all_reduce_mean(1.5, fake_nccl)  # the trainer's logged loss
    with pytest.raises(Reached):
        all_reduce_sum_tensor(torch.ones(3, dtype=torch.float64), fake_nccl)  # eval sums, from the host


def test_the_router_count_reducer_reduces_on_the_process_device(
    fake_nccl: DistInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed, "_pick_device", lambda pref, local: DEVICE)
    assert distributed.init_distributed("cpu").device == DEVICE  # joins the (fake) group already there
    assert router_mod._count_reducer is not None
    with pytest.raises(Reached):
        router_mod._count_reducer(torch.ones(5))


def test_routing_statistics_reduce_on_the_process_device(fake_nccl: DistInfo) -> None:
    routed = torch.tensor([3.0, 1.0, 0.0, 4.0])
    stats = MoEStats(
        lb_loss=torch.tensor(1.0),
        z_loss=torch.tensor(2.0),
        tokens_per_expert=routed.long(),
        dropped=1,
        assignments=8,
        probs_mean=routed / routed.sum(),
        entropy=torch.tensor(0.5),
        tokens=8,
        routed_per_expert=routed,
    )
    acc = RoutingAccumulator()
    acc.add({0: stats})
    with pytest.raises(Reached):
        acc.all_reduce(fake_nccl.device)


def _trainer(make_config: Any, tmp_path: Path) -> Trainer:
    cfg = load_train_config(make_config.write(tmp_path / "t.yaml", make_config(tmp_path / "run")))
    return Trainer.from_config(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


@pytest.mark.parametrize("sharded", [False, True], ids=["final-sums", "fsdp-lockstep"])
def test_evaluation_reduces_on_the_process_device(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharded: bool
) -> None:
    trainer = _trainer(make_config, tmp_path)  # a model and its eval batches, built on the CPU
    try:
        assert trainer.valid_ds is not None
        batches = list(eval_batches(trainer.valid_ds, 2, max_batches=1))
        # sharded: a forward is a collective, so the processes keep in step (fsdp.lockstep) every batch
        monkeypatch.setattr(fsdp, "is_sharded", lambda model: sharded)
        with fake_nccl_group(monkeypatch) as info, pytest.raises(Reached):
            evaluate(trainer.model, batches, ["count", "echo"], device=trainer.device, info=info)
    finally:
        trainer.close()


def test_the_trainer_log_reduces_on_the_process_device(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(make_config, tmp_path)
    try:
        window = [trainer.train_step()]
        with fake_nccl_group(monkeypatch) as info, pytest.raises(Reached):
            trainer.info = info  # the log of a multi-process run: its loss is averaged over processes
            trainer._log(window)
    finally:
        trainer.close()
