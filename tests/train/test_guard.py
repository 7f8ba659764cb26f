"""The resource guard: fits, refusals with numbers and advice, cluster-only presets."""

from __future__ import annotations

import logging

import pytest
import torch

from moeforge.model.config import load_model_config
from moeforge.model.sizing import GIB, memory_estimate
from moeforge.train import guard
from moeforge.train.guard import USABLE_FRACTION, ResourceError, available_memory, check_resources


@pytest.fixture
def ram(monkeypatch: pytest.MonkeyPatch):
    """Pretend the device has ``gib`` GiB free."""

    def set_free(gib: float) -> None:
        monkeypatch.setattr(guard, "available_memory", lambda _device: int(gib * GIB))

    return set_free


def test_tiny_fits_on_this_machine_and_the_report_adds_up() -> None:
    cfg = load_model_config("tiny")
    r = check_resources(cfg, micro_batch=2, seq_len=64, device="cpu", dtype="float32")
    est = memory_estimate(cfg, 2, 64, "float32")
    assert r.fits and r.available is not None and r.available > 0
    assert r.need == est.weights + est.grads + est.optimizer + est.activations == est.train_total
    assert r.usable == pytest.approx(USABLE_FRACTION * r.available)
    assert "need" in r.describe()


def test_cpu_memory_is_read_from_the_system() -> None:
    free = available_memory(torch.device("cpu"))
    assert free is not None and free > 0


def test_a_run_that_does_not_fit_is_refused_with_the_numbers_and_what_to_change(ram) -> None:
    cfg = load_model_config("small")
    est = memory_estimate(cfg, 64, 2048, "bfloat16")
    ram(est.train_total / GIB)  # 90% usable: just too little
    with pytest.raises(ResourceError) as info:
        check_resources(cfg, micro_batch=64, seq_len=2048, device="cpu", dtype="bfloat16")
    msg = str(info.value)
    assert f"need {est.train_total / GIB:.2f} GiB" in msg
    for part in ("weights", "grads", "optimizer", "activations", "available", "90% ="):
        assert part in msg
    assert (
        "micro_batch ≤" in msg
        and "seq_len ≤" in msg
        and "activation checkpointing" in msg
        and "moeforge model mini small" in msg
    )
    assert "80 GB GPU" in msg
    assert isinstance(info.value, ValueError)


def test_suggested_micro_batch_fits(ram) -> None:
    cfg = load_model_config("small")
    ram(4.0)
    with pytest.raises(ResourceError) as info:
        check_resources(cfg, micro_batch=64, seq_len=1024, device="cpu", dtype="float32")
    suggested = int(str(info.value).split("micro_batch ≤ ")[1].split()[0])
    assert check_resources(cfg, micro_batch=suggested, seq_len=1024, device="cpu", dtype="float32").fits
    with pytest.raises(ResourceError):
        check_resources(cfg, micro_batch=suggested + 1, seq_len=1024, device="cpu", dtype="float32")


def test_when_the_states_alone_do_not_fit_batch_advice_is_not_given(ram) -> None:
    ram(0.01)
    with pytest.raises(ResourceError) as info:
        check_resources(load_model_config("small"), micro_batch=1, seq_len=16, device="cpu", dtype="float32")
    msg = str(info.value)
    assert "cannot help" in msg and "micro_batch ≤" not in msg and "smaller preset" in msg


def test_cluster_only_presets_are_refused_unless_allowed(ram, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_model_config("oracle-850b")
    assert cfg.cluster_only and not load_model_config("tiny").cluster_only
    monkeypatch.delenv("ALLOW_LOCAL_TRAIN", raising=False)
    with pytest.raises(ResourceError, match=r"cluster_only.*ALLOW_LOCAL_TRAIN=1") as info:
        check_resources(cfg, micro_batch=1, seq_len=8192, device="cpu", dtype="bfloat16")
    gpus = memory_estimate(cfg, 1, 8192, "bfloat16").min_gpus_80gb
    assert f"at least {gpus} 80 GB GPUs" in str(info.value)
    monkeypatch.setenv("ALLOW_LOCAL_TRAIN", "1")
    ram(64)
    with pytest.raises(ResourceError, match=f"at least {gpus} 80 GB GPUs"):  # now the memory check speaks
        check_resources(cfg, micro_batch=1, seq_len=8192, device="cpu", dtype="bfloat16")


def test_sharding_divides_the_states_and_checkpointing_shrinks_activations(ram) -> None:
    cfg = load_model_config("small")
    ram(1000)
    full = check_resources(cfg, micro_batch=4, seq_len=512, device="cpu", dtype="float32")
    sharded = check_resources(
        cfg,
        micro_batch=4,
        seq_len=512,
        device="cpu",
        dtype="float32",
        shard_over=4,
        activation_checkpointing=True,
    )
    assert sharded.optimizer == pytest.approx(full.optimizer / 4)
    assert sharded.activations < full.activations


def test_bad_arguments_and_unmeasurable_devices(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_model_config("tiny")
    with pytest.raises(ValueError, match="dtype must be one of"):
        check_resources(cfg, micro_batch=1, seq_len=8, device="cpu", dtype="fp8")
    with pytest.raises(ValueError, match="shard_over"):
        check_resources(cfg, micro_batch=1, seq_len=8, device="cpu", dtype="float32", shard_over=0)
    with caplog.at_level(logging.WARNING, logger="moeforge.train.guard"):
        r = check_resources(cfg, micro_batch=1, seq_len=8, device="meta", dtype="float16")
    assert r.fits and r.available is None and "cannot measure" in caplog.text
