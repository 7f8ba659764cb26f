"""Routing metrics, the JSONL writer, measured peak FLOPs with its cache, MFU and throughput."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moeforge.model.config import load_model_config
from moeforge.model.moe import MoEStats
from moeforge.model.sizing import flops_per_token
from moeforge.model.transformer import MoETransformer
from moeforge.train import metrics
from moeforge.train.metric_log import MetricsWriter
from moeforge.train.metrics import RoutingAccumulator, Throughput, measure_peak_flops, mfu


def _stats(
    routed: list[float], tokens: int, k: int, *, entropy: float, lb: float, dropped: int = 0
) -> MoEStats:
    routed_t = torch.tensor(routed)
    return MoEStats(
        lb_loss=torch.tensor(lb, requires_grad=True),
        z_loss=torch.tensor(2 * lb),
        tokens_per_expert=routed_t.long(),
        dropped=dropped,
        assignments=tokens * k,
        probs_mean=routed_t / routed_t.sum(),
        entropy=torch.tensor(entropy),
        tokens=tokens,
        routed_per_expert=routed_t,
    )


def test_routing_summary_is_token_weighted_over_micro_batches() -> None:
    acc = RoutingAccumulator()
    # 10 tokens top-2 over 4 experts, then 30 tokens; the second micro-batch weighs three times as much
    acc.add({0: _stats([10, 5, 5, 0], 10, 2, entropy=1.0, lb=1.0, dropped=2)})
    acc.add({0: _stats([15, 15, 15, 15], 30, 2, entropy=2.0, lb=3.0)})
    s = acc.summary()
    assert [s[f"moe/L0/load/e{i}"] for i in range(4)] == pytest.approx([25 / 40, 20 / 40, 20 / 40, 15 / 40])
    assert sum(s[f"moe/L0/load/e{i}"] for i in range(4)) == pytest.approx(2.0)  # token shares sum to top_k
    assert s["moe/L0/load_max"] == pytest.approx(25 / 40)
    assert s["moe/L0/entropy_token"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert s["moe/L0/lb_loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    assert s["moe/L0/z_loss"] == pytest.approx(2 * (10 * 1.0 + 30 * 3.0) / 40)
    assert s["moe/L0/dropped_fraction"] == pytest.approx(2 / 80)
    shares = torch.tensor([25, 20, 20, 15]) / 40
    assert s["moe/L0/load_std"] == pytest.approx(float(shares.std(unbiased=False)))
    assert s["moe/L0/load_max_over_mean"] == pytest.approx(float(shares.max() / shares.mean()))
    assert "moe/L0/lb_loss_scaled" not in s  # needs the model's coefficients
    assert acc.load_fractions() == {0: pytest.approx(shares.tolist())}
    acc.reset()
    assert acc.summary() == {} and acc.load_fractions() == {}


def test_without_detail_the_distribution_and_entropy_are_neither_computed_nor_reported() -> None:
    acc = RoutingAccumulator()
    lazy = MoEStats(
        lb_loss=torch.tensor(1.0),
        z_loss=torch.tensor(2.0),
        tokens_per_expert=torch.tensor([6, 4]),
        dropped=0,
        assignments=10,
        tokens=10,
        probs=torch.full((10, 2), 0.5),
    )
    acc.add({0: lazy}, detail=False)
    assert lazy.probs_mean is None and lazy.entropy is None  # never computed
    s = acc.summary()
    assert s["moe/L0/load/e0"] == pytest.approx(0.6) and s["moe/L0/lb_loss"] == pytest.approx(1.0)
    assert not any("entropy" in k for k in s)
    # a detailed micro-batch afterwards: the losses cover both, the entropy only the detailed one
    acc.add({0: _stats([15, 15], 30, 1, entropy=0.25, lb=3.0)})
    s = acc.summary()
    assert s["moe/L0/entropy_token"] == pytest.approx(0.25)
    assert s["moe/L0/entropy_mean_dist"] == pytest.approx(math.log(2))
    assert s["moe/L0/lb_loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    with pytest.raises(ValueError, match="probs"):
        MoEStats(torch.tensor(0.0), torch.tensor(0.0), torch.tensor([1]), 0, 1).detail()


def test_entropy_of_the_mean_distribution_is_normalized_by_active_experts() -> None:
    acc = RoutingAccumulator()
    acc.add({3: _stats([5, 5, 5, 5], 10, 2, entropy=1.0, lb=1.0)})
    s = acc.summary()
    assert s["moe/L3/entropy_mean_dist"] == pytest.approx(math.log(4))
    assert s["moe/L3/entropy_mean_dist_norm"] == pytest.approx(1.0)


def test_summary_with_model_adds_scaled_losses_aux_free_biases_and_counts_before_capacity() -> None:
    cfg = load_model_config("tiny", ["moe.aux_free_bias_rate=0.01", "moe.capacity_factor=0.5"])
    model = MoETransformer(cfg).train()
    acc = RoutingAccumulator()
    for _ in range(2):
        out = model(torch.randint(0, cfg.vocab_size, (2, 16)))
        acc.add(out.moe_stats)
    model.router_step()  # moves the biases away from zero
    s = acc.summary(model)
    moe = cfg.moe
    assert moe is not None
    for layer in cfg.moe_layer_indices:
        pre = f"moe/L{layer}"
        assert s[f"{pre}/lb_loss_scaled"] == pytest.approx(moe.lb_coef * s[f"{pre}/lb_loss"])
        assert s[f"{pre}/z_loss_scaled"] == pytest.approx(moe.z_coef * s[f"{pre}/z_loss"])
        bias = model.blocks[layer].mlp.router.expert_bias.tolist()
        assert [s[f"{pre}/bias/e{i}"] for i in range(4)] == pytest.approx(bias)
        assert s[f"{pre}/dropped_fraction"] > 0  # capacity 0.5 drops assignments ...
        assert sum(s[f"{pre}/load/e{i}"] for i in range(4)) == pytest.approx(2.0)  # ... loads count before it
        assert 0.0 < s[f"{pre}/entropy_mean_dist_norm"] <= 1.0 + 1e-9
    assert s["moe/aux_loss"] == pytest.approx(moe.lb_coef * s["moe/lb_loss"] + moe.z_coef * s["moe/z_loss"])


def test_dormant_ghosts_are_reported_but_not_counted_as_active() -> None:
    cfg = load_model_config("ghost-32d")
    model = MoETransformer(cfg).eval()
    acc = RoutingAccumulator()
    acc.add(model(torch.randint(0, cfg.vocab_size, (2, 32))).moe_stats)
    s = acc.summary(model)
    assert s["moe/L0/load/e2"] == 0.0 and s["moe/L0/load/e3"] == 0.0
    shares = torch.tensor([s["moe/L0/load/e0"], s["moe/L0/load/e1"]])
    assert s["moe/L0/load_std"] == pytest.approx(float(shares.std(unbiased=False)))
    assert s["moe/L0/entropy_mean_dist_norm"] == pytest.approx(s["moe/L0/entropy_mean_dist"] / math.log(2))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_writer_appends_flushed_json_lines_with_null_for_non_finite(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, tensorboard=True)  # TensorBoard is optional: absent means JSONL only
    w.write(1, "train", {"loss": 2.5, "lr": torch.tensor(1e-3), "tokens": 128})
    w.write(2, "valid", {"loss": float("nan"), "grad_norm": float("inf")})
    lines = _lines(tmp_path / "metrics.jsonl")  # readable before close: every write is flushed
    assert lines[0] == {"step": 1, "split": "train", "loss": 2.5, "lr": pytest.approx(1e-3), "tokens": 128}
    assert lines[1] == {"step": 2, "split": "valid", "loss": None, "grad_norm": None}
    with pytest.raises(ValueError, match="reserved"):
        w.write(3, "train", {"step": 1.0})
    w.close()


def test_metrics_writer_is_a_no_op_off_rank_zero(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "run", rank=1) as w:
        w.write(1, "train", {"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_resumed_writer_drops_steps_that_will_be_trained_again_and_a_torn_line(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 6):
            w.write(step, "train", {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "spl')  # killed mid-write
    with MetricsWriter(tmp_path, tensorboard=False, truncate_after_step=3) as w:
        w.write(4, "train", {"loss": 40.0})
    assert [(x["step"], x["loss"]) for x in _lines(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]


def test_resume_at_the_last_step_redoes_the_test_line_and_keeps_the_last_validation(tmp_path: Path) -> None:
    """A run killed after its final checkpoint (and maybe after its test evaluation) is resumed at its last
    step: the test line is written again (once), and the last validation result is what the summary
    reports (it was ``{}`` before: the resumed run trained nothing and evaluated nothing)."""
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(4, "valid", {"loss": 5.0})
        w.write(8, "train", {"loss": 4.0})
        w.write(8, "valid", {"loss": 4.5})
        w.write(8, "test", {"loss": 4.6})
    with MetricsWriter(tmp_path, tensorboard=False, truncate_after_step=8) as w:
        assert w.last("valid") == {"loss": 4.5}
        assert w.last("test") == {}
        w.write(8, "test", {"loss": 4.6})
    assert [(x["step"], x["split"]) for x in _lines(tmp_path / "metrics.jsonl")] == [
        (4, "valid"),
        (8, "train"),
        (8, "valid"),
        (8, "test"),
    ]
    with MetricsWriter(tmp_path, tensorboard=False, truncate_after_step=-1) as w:  # a fresh start
        assert w.last("valid") == {}


def test_peak_flops_is_measured_once_and_cached_per_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEFORGE_CACHE_DIR", str(tmp_path))
    peak = measure_peak_flops(torch.device("cpu"), seconds=0.05)
    assert peak > 1e6
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    (key,) = cache
    assert "torch=" in key and "float32" in key and cache[key]["flops"] == peak

    def _fail(*_: object) -> float:
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(metrics, "_measure", _fail)
    assert measure_peak_flops(torch.device("cpu"), seconds=0.05) == peak
    monkeypatch.setattr(metrics, "_measure", lambda *_: 123.0)
    assert measure_peak_flops(torch.device("cpu"), refresh=True) == 123.0
    assert measure_peak_flops(torch.device("cpu"), torch.bfloat16) == 123.0  # another dtype: another key
    assert len(json.loads((tmp_path / "peak_flops.json").read_text())) == 2


def test_unreadable_peak_flops_cache_is_measured_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEFORGE_CACHE_DIR", str(tmp_path))
    (tmp_path / "peak_flops.json").write_text("{not json")
    monkeypatch.setattr(metrics, "_measure", lambda *_: 7.0)
    assert measure_peak_flops(torch.device("cpu")) == 7.0


def test_mfu_uses_training_flops_per_token() -> None:
    cfg = load_model_config("tiny")
    f = flops_per_token(cfg, 128)["training"]
    assert mfu(1000.0, f, 1000.0 * f * 4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, f, 0.0)


def test_throughput_is_tokens_over_a_moving_window() -> None:
    now = [0.0]
    t = Throughput(window=2, clock=lambda: now[0])
    assert t.tokens_per_s == 0.0
    for tokens, at in [(100, 1.0), (100, 2.0), (400, 3.0)]:
        now[0] = at
        t.update(tokens)
    assert t.tokens_per_s == pytest.approx(500 / 2.0)  # the first update aged out of the window
    assert t.total_tokens == 600
    now[0] = 100.0
    t.restart()  # e.g. after evaluation: the pause does not count
    now[0] = 101.0
    t.update(50)
    assert t.tokens_per_s == pytest.approx(50.0)


def test_all_reduce_over_a_process_group_keeps_the_sums(tmp_path: Path) -> None:
    acc = RoutingAccumulator()
    acc.add({0: _stats([10, 5, 5, 0], 10, 2, entropy=1.0, lb=1.0, dropped=2)})
    acc.add({2: _stats([3, 1], 4, 1, entropy=0.5, lb=2.0)})
    before = (acc.summary(), acc.load_fractions())
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        acc.all_reduce()
    finally:
        dist.destroy_process_group()
    assert (acc.summary(), acc.load_fractions()) == before
    acc.add({0: _stats([10, 5, 5, 0], 10, 2, entropy=1.0, lb=1.0)})  # still accumulates afterwards
    assert acc.summary()["moe/L0/load/e0"] == pytest.approx(1.0)


def test_measuring_the_peak_leaves_the_global_rng_untouched(tmp_path, monkeypatch) -> None:
    """Two fresh runs with one seed save the same RNG state whether or not the peak was cached: the
    measurement draws its matrices from a generator of its own."""
    monkeypatch.setenv("MOEFORGE_CACHE_DIR", str(tmp_path))
    torch.manual_seed(7)
    expected = torch.get_rng_state()
    measure_peak_flops(torch.device("cpu"), seconds=0.01, refresh=True)  # measures: draws matrices
    assert torch.equal(torch.get_rng_state(), expected)
