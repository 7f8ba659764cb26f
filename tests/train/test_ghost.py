"""Ghost experts: the recorded expert outputs, the saturation signals, waking, ramping, lr-follows-alpha
and resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeforge.model.config import MoEConfig, load_model_config
from moeforge.model.moe import ExpertOutputStats, MoELayer, MoEStats
from moeforge.model.transformer import MoETransformer
from moeforge.train.ghost import GhostConfig, GhostController, orthogonality


def _model() -> MoETransformer:
    return MoETransformer(load_model_config("ghost-32d")).train()  # 2 MoE layers: 2 routed + 2 ghost slots


def _cfg(**kw: object) -> GhostConfig:
    base: dict[str, object] = {
        "enabled": True,
        "window": 4,
        "min_fraction_above": 0.75,
        "threshold": 0.5,
        "ramp_steps": 4,
        "cooldown_steps": 1000,
    }
    return GhostConfig(**{**base, **kw})


def _stats(moe: MoELayer, saturated: bool, tokens: int = 64) -> MoEStats:
    """Synthetic stats: the awake experts' mean outputs orthogonal (saturated) or identical (not)."""
    slots, d = moe.w13.shape[0], moe.w13.shape[1]
    awake = torch.cat([torch.ones(moe.num_experts, dtype=torch.bool), moe.ghost_alpha > 0])
    counts = torch.zeros(slots, dtype=torch.long)
    counts[awake] = tokens * moe.top_k // int(awake.sum())
    sums = torch.eye(slots, d) if saturated else torch.ones(slots, d)
    sums = sums * counts[:, None] * awake[:, None]
    return MoEStats(
        lb_loss=torch.tensor(1.0),
        z_loss=torch.tensor(0.0),
        tokens_per_expert=counts,
        dropped=0,
        assignments=tokens * moe.top_k,
        probs_mean=awake.float() / awake.sum(),
        entropy=torch.tensor(0.5),
        tokens=tokens,
        routed_per_expert=counts.float(),
        expert_outputs=ExpertOutputStats(
            sum_ED=sums,
            input_energy=torch.tensor(1.0),
            explained_energy=torch.tensor(0.0 if saturated else 0.9),
        ),
    )


def _feed(ctrl: GhostController, model: MoETransformer, step: int, saturated: dict[int, bool]) -> list:
    layers = {b.index: b.mlp for b in model.blocks}
    ctrl.observe(step, {i: _stats(layers[i], s) for i, s in saturated.items()})
    return ctrl.step(step)


def test_recording_expert_outputs_changes_nothing_and_sums_what_each_expert_wrote() -> None:
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=12, num_ghost_experts=2)
    layer = MoELayer(16, cfg).eval()
    with torch.no_grad():
        layer.ghost_alpha[0] = 0.5
    x = torch.randn(3, 5, 16)
    plain, s0 = layer(x)
    assert s0.expert_outputs is None
    layer.record_expert_outputs = True
    recorded, s1 = layer(x)
    assert torch.equal(plain, recorded)
    eo = s1.expert_outputs
    assert eo is not None
    x_ND = x.reshape(-1, 16)
    r = layer.router(x_ND, layer.ghost_alpha)
    f = cfg.expert_hidden
    want = torch.zeros(6, 16)
    routed = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        for j in range(2):
            e = int(r.indices[n, j])
            h = x_ND[n] @ layer.w13[e]
            y = (F.silu(h[:f]) * h[f:]) @ layer.w2[e]
            want[e] += y
            routed[n] += r.weights[n, j] * (0.5 if e == 4 else 1.0) * y
    torch.testing.assert_close(eo.sum_ED, want.detach(), rtol=1e-4, atol=1e-5)
    assert eo.sum_ED[5].abs().sum() == 0  # the dormant ghost wrote nothing
    explained = ((x_ND * routed).sum(-1) ** 2 / routed.pow(2).sum(-1)).sum()
    torch.testing.assert_close(eo.explained_energy, explained.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eo.input_energy, x_ND.pow(2).sum())


def test_orthogonality_is_one_for_orthogonal_means_and_drops_for_shared_directions() -> None:
    assert orthogonality(torch.eye(3, 8) * 5.0) == pytest.approx(1.0)
    assert orthogonality(torch.ones(4, 8)) == pytest.approx(1.0 - 12 / 16)  # every off-diagonal is 1
    idle = torch.eye(3, 8)
    idle[2] = 0.0  # an expert that got no tokens counts as a zero vector: its diagonal misses by 1
    assert orthogonality(idle) == pytest.approx(1.0 - 1 / 9)


def test_sustained_saturation_wakes_exactly_one_ghost_after_the_window_and_ramps_alpha() -> None:
    model = _model()
    ctrl = GhostController(model, _cfg())
    moe0, moe1 = model.blocks[0].mlp, model.blocks[1].mlp
    alphas = []
    for step in range(10):
        events = _feed(ctrl, model, step, {0: True, 1: False})
        if step < 3:
            assert events == []
        if step == 3:
            (wake,) = events
            assert (wake.kind, wake.layer, wake.ghost, wake.slot) == ("wake", 0, 0, 2)
            assert wake.saturation == pytest.approx(1.0)
        alphas.append(moe0.ghost_alpha.tolist())
    assert [a[0] for a in alphas] == [0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert all(a[1] == 0 for a in alphas)  # cooldown: still one ghost despite continued saturation
    assert moe1.ghost_alpha.tolist() == [0.0, 0.0]  # the unsaturated layer stays as it was
    assert [e.kind for e in ctrl.events] == ["wake", "full"]
    m = ctrl.metrics()
    assert m["ghost/L0/awake"] == 1.0 and m["ghost/awake"] == 1.0 and m["ghost/L0/alpha/g0"] == 1.0
    assert m["ghost/L1/saturation"] < 0.5 < m["ghost/L0/saturation"]


def test_one_noisy_step_does_not_wake_but_a_mostly_saturated_window_does() -> None:
    model = _model()
    ctrl = GhostController(model, _cfg())
    for step, sat in enumerate([False, False, False, True, False, False, True, False]):
        assert _feed(ctrl, model, step, {0: sat, 1: False}) == []
    for step, sat in enumerate([True, False, True], start=8):  # windows at half above: not enough
        assert _feed(ctrl, model, step, {0: sat, 1: False}) == []
    (event,) = _feed(ctrl, model, 11, {0: True, 1: False})  # 3 of the last 4 checks above: 0.75
    assert event.step == 11


def test_warmup_and_cooldown_delay_wakes() -> None:
    model = _model()
    ctrl = GhostController(model, _cfg(window=2, min_fraction_above=1.0, warmup_steps=5, cooldown_steps=3))
    wakes = [e.step for step in range(12) for e in _feed(ctrl, model, step, {0: True}) if e.kind == "wake"]
    assert wakes == [5, 8]  # not before warmup; then cooldown and a fresh window; then no ghost is left


def test_eval_forwards_do_not_change_the_controller() -> None:
    model = _model()
    ctrl = GhostController(model, _cfg())
    ids = torch.randint(0, 4096, (2, 32))
    model.eval()
    ctrl.observe(0, model(ids).moe_stats)
    ctrl.step(0)
    assert ctrl.metrics()["ghost/awake"] == 0 and "ghost/L0/saturation" not in ctrl.metrics()
    assert all(not h["history"] for h in ctrl.state_dict()["layers"].values())
    model.train()
    out = model(ids)
    assert out.moe_stats[0].expert_outputs is not None  # the controller switched recording on
    ctrl.observe(1, out.moe_stats)
    ctrl.step(1)
    assert all(len(h["history"]) == 1 for h in ctrl.state_dict()["layers"].values())
    assert 0.0 <= ctrl.metrics()["ghost/L0/saturation"] <= 1.0


def test_a_woken_ghost_receives_tokens_and_gradient_and_a_dormant_one_none() -> None:
    model = _model()
    ctrl = GhostController(model, _cfg(ramp_steps=2))
    for step in range(4):
        _feed(ctrl, model, step, {0: True})
    moe = model.blocks[0].mlp
    assert moe.ghost_alpha.tolist() == [0.5, 0.0]
    out = model(torch.randint(0, 4096, (4, 64)))
    tokens = out.moe_stats[0].tokens_per_expert
    assert tokens[2] > 0 and tokens[3] == 0
    out.logits.square().mean().backward()
    assert moe.w13.grad[2].abs().sum() > 0 and moe.w2.grad[2].abs().sum() > 0
    assert moe.w13.grad[3].abs().sum() == 0 and moe.w2.grad[3].abs().sum() == 0
    assert moe.router.weight.grad[3].abs().sum() == 0


def test_ghost_rows_move_by_alpha_times_the_update_and_dormant_rows_not_at_all() -> None:
    model = _model()
    ctrl = GhostController(model, _cfg())
    with torch.no_grad():
        model.blocks[0].mlp.ghost_alpha[0] = 0.25
        model.blocks[1].mlp.ghost_alpha[0] = 0.25
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 4096, (2, 32))
    old = {k: v.detach().clone() for k, v in model.named_parameters()}
    new = []
    for m, scaled in ((model, True), (twin, False)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        F.cross_entropy(m(ids).logits.flatten(0, 1), ids.flatten()).backward()
        if scaled:
            with ctrl.scaled_updates():
                opt.step()
        else:
            opt.step()
        new.append(dict(m.named_parameters()))
    scaled_p, full_p = new
    for name, p_old in old.items():
        a, b = scaled_p[name].detach(), full_p[name].detach()
        if name.endswith((".w13", ".w2")):
            torch.testing.assert_close(a[:2], b[:2], rtol=0, atol=0)  # routed experts: untouched
            torch.testing.assert_close(a[2] - p_old[2], 0.25 * (b[2] - p_old[2]), rtol=1e-4, atol=1e-7)
            assert torch.equal(a[3], p_old[3]) and not torch.equal(b[3], p_old[3])  # no decay while dormant
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # routers, attention, norms: full lr


def test_load_signal_counts_busy_experts_and_drops() -> None:
    model = _model()
    ctrl = GhostController(model, _cfg(signal="load", load_factor=0.8, drop_threshold=0.05))
    assert not model.blocks[0].mlp.record_expert_outputs
    moe = model.blocks[0].mlp

    def check(routed: list[float], dropped: int) -> float:
        s = _stats(moe, True)
        s.routed_per_expert = torch.tensor(routed)
        s.expert_outputs = None
        s.dropped = dropped
        ctrl.observe(0, {0: s})
        ctrl.step(0)
        return ctrl.metrics()["ghost/L0/saturation"]

    assert check([32, 32, 0, 0], 0) == 1.0  # top-1 over 2 awake experts: balanced share 0.5 each
    assert check([60, 4, 0, 0], 0) == 0.0  # one expert idles
    assert check([60, 4, 0, 0], 8) == 1.0  # 8 of 64 assignments dropped > 5%


def test_resume_from_state_dict_continues_identically() -> None:
    torch.manual_seed(0)
    fresh = _model()
    a_model = copy.deepcopy(fresh)
    cfg = _cfg(window=2, min_fraction_above=0.5, cooldown_steps=3, ramp_steps=3)
    a = GhostController(a_model, cfg)
    pattern = [True, False, True, True, True, False, True, True, True, True, True, True, True, True]
    for step in range(5):
        _feed(a, a_model, step, {0: pattern[step], 1: not pattern[step]})
    state = json.loads(json.dumps(a.state_dict()))
    b_model = copy.deepcopy(fresh)  # alphas zero: the controller state must restore them
    b = GhostController(b_model, cfg)
    b.load_state_dict(state)
    for step in range(5, len(pattern)):
        ea = _feed(a, a_model, step, {0: pattern[step], 1: not pattern[step]})
        eb = _feed(b, b_model, step, {0: pattern[step], 1: not pattern[step]})
        assert ea == eb
    assert a.state_dict() == b.state_dict()
    assert [e.kind for e in a.events].count("wake") >= 3  # the run exercised wakes before and after resume
    for la, lb in zip(a_model.moe_layers(), b_model.moe_layers(), strict=True):
        assert torch.equal(la.ghost_alpha, lb.ghost_alpha)


def test_mismatched_state_and_models_without_ghosts_are_refused() -> None:
    with pytest.raises(ValueError, match="num_ghost_experts"):
        GhostController(MoETransformer(load_model_config("tiny")), _cfg())
    disabled = GhostController(MoETransformer(load_model_config("tiny")), GhostConfig())
    assert disabled.step(0) == [] and disabled.metrics() == {"ghost/awake": 0.0}
    ctrl = GhostController(_model(), _cfg())
    with pytest.raises(ValueError, match="layers"):
        ctrl.load_state_dict({"layers": {"0": {}}, "events": []})


def test_decisions_are_taken_on_stats_summed_over_ranks(tmp_path: Path) -> None:
    model = _model()
    ctrl = GhostController(model, _cfg())
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        events = [e for step in range(4) for e in _feed(ctrl, model, step, {0: True, 1: False})]
    finally:
        dist.destroy_process_group()
    assert [(e.kind, e.layer, e.step) for e in events] == [("wake", 0, 3)]
    assert ctrl.metrics()["ghost/L0/saturation"] == pytest.approx(1.0)
