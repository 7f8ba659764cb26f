"""Sparse upcycling: step-0 parity with the dense model, drop-upcycling, noise, determinism and refusals."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moeforge.model.config import ModelConfig, MoEConfig
from moeforge.model.layers import SwiGLU
from moeforge.model.moe import MoELayer
from moeforge.model.transformer import MoETransformer
from moeforge.model.upcycle import UpcycleConfig, UpcycleError, upcycle, upcycle_config

F_HIDDEN = 96


def _dense_cfg(tie: bool = False) -> ModelConfig:
    # init_std 0.1 so the MLPs move the logits well beyond the parity tolerance
    return ModelConfig(
        vocab_size=128,
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=F_HIDDEN,
        max_seq_len=64,
        tie_embeddings=tie,
        init_std=0.1,
    )


def _dense(tie: bool = False) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(_dense_cfg(tie)).eval()


def _tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: MoETransformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _assert_parity(dense: MoETransformer, up: UpcycleConfig) -> MoETransformer:
    moe = upcycle(dense, up)
    ids = _tokens()
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), atol=1e-5, rtol=1e-5)
    return moe


@pytest.mark.parametrize("tie", [False, True])
def test_upcycled_logits_equal_dense_at_step_zero(tie: bool) -> None:
    dense = _dense(tie)
    moe = _assert_parity(dense, UpcycleConfig(num_experts=4, top_k=2, layers=[2, 3]))
    assert [type(b.mlp) for b in moe.blocks] == [SwiGLU, SwiGLU, MoELayer, MoELayer]
    assert (moe.lm_head.weight is moe.embed.weight) == tie
    assert moe.cfg.moe is not None and moe.cfg.moe.expert_hidden == F_HIDDEN


@pytest.mark.parametrize(
    "up",
    [
        UpcycleConfig(num_experts=4, top_k=1, layers=[2, 3]),
        UpcycleConfig(num_experts=4, top_k=2),
        UpcycleConfig(num_experts=3, top_k=3, renormalize=False),
        UpcycleConfig(num_experts=4, top_k=1, straight_through=True, router_init_std=0.5),
    ],
    ids=["top1-renormalized", "all-layers", "k-equals-E-no-renorm", "straight-through"],
)
def test_parity_holds_whenever_combine_weights_sum_to_one(up: UpcycleConfig) -> None:
    _assert_parity(_dense(), up)


def test_parity_breaks_without_renormalization_when_k_below_e() -> None:
    dense = _dense()
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, renormalize=False, router_init_std=0.0))
    ids = _tokens()
    assert not torch.allclose(_logits(moe, ids), _logits(dense, ids), atol=1e-3)


def test_shared_expert_keeps_parity_and_halves_down_projections() -> None:
    dense = _dense()
    up = UpcycleConfig(num_experts=4, top_k=2, layers=[1, 3], shared_expert=True)
    moe = _assert_parity(dense, up)
    layer, src = moe.blocks[1].mlp, dense.blocks[1].mlp
    assert isinstance(layer, MoELayer) and isinstance(src, SwiGLU)
    assert layer.shared is not None and layer.shared_gate is None
    torch.testing.assert_close(layer.shared.down_proj.weight, src.down_proj.weight * 0.5)
    torch.testing.assert_close(layer.shared.gate_proj.weight, src.gate_proj.weight)
    torch.testing.assert_close(layer.w2[0], src.down_proj.weight.T * 0.5)


@pytest.mark.parametrize(
    "up",
    [
        UpcycleConfig(num_experts=4, top_k=4, granularity=4, router_init_std=0.0),
        UpcycleConfig(num_experts=8, top_k=8, granularity=4, router_init_std=0.0),
        UpcycleConfig(num_experts=4, top_k=4, granularity=2, router_init_std=0.0, shared_expert=True),
    ],
    ids=["E=G=k", "E=2G=k", "granular+shared"],
)
def test_granular_upcycling_keeps_parity_with_zero_router_and_k_equal_e(up: UpcycleConfig) -> None:
    moe = _assert_parity(_dense(), up)
    assert moe.cfg.moe is not None and moe.cfg.moe.expert_hidden == F_HIDDEN // up.granularity


def test_granular_experts_hold_consecutive_slices_with_down_scaled_by_granularity() -> None:
    dense = _dense()
    g, f = 3, F_HIDDEN // 3
    moe = upcycle(dense, UpcycleConfig(num_experts=6, top_k=2, granularity=g, layers=[0]))
    layer, src = moe.blocks[0].mlp, dense.blocks[0].mlp
    assert isinstance(layer, MoELayer) and isinstance(src, SwiGLU)
    for e in range(6):
        sl = slice((e % g) * f, (e % g + 1) * f)
        torch.testing.assert_close(layer.w13[e, :, :f], src.gate_proj.weight[sl].T, atol=0, rtol=0)
        torch.testing.assert_close(layer.w13[e, :, f:], src.up_proj.weight[sl].T, atol=0, rtol=0)
        torch.testing.assert_close(layer.w2[e], src.down_proj.weight[:, sl].T * g)


def test_drop_upcycling_redraws_the_same_neurons_in_all_three_matrices() -> None:
    dense = _dense()
    frac, f = 0.3, F_HIDDEN
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, layers=[2], drop_fraction=frac), seed=3)
    layer, src = moe.blocks[2].mlp, dense.blocks[2].mlp
    assert isinstance(layer, MoELayer) and isinstance(src, SwiGLU)
    gate, upw, down = src.gate_proj.weight, src.up_proj.weight, src.down_proj.weight
    dropped_sets = []
    for e in range(4):
        g_changed = (gate != layer.w13[e, :, :f].T).any(dim=1)
        u_changed = (upw != layer.w13[e, :, f:].T).any(dim=1)
        d_changed = (layer.w2[e] != down.T).any(dim=1)
        assert int(g_changed.sum()) == round(frac * f)
        assert torch.equal(g_changed, u_changed) and torch.equal(g_changed, d_changed)
        # re-drawn rows are fully new; the others are exact copies
        assert (layer.w13[e, :, :f].T[g_changed] != gate[g_changed]).all()
        dropped_sets.append(frozenset(torch.nonzero(g_changed).flatten().tolist()))
        redrawn = layer.w2[e][d_changed]
        assert abs(redrawn.std().item() / down.std().item() - 1) < 0.2
    assert len(set(dropped_sets)) == 4  # every expert drops its own neurons
    # the layer left dense is untouched
    assert torch.equal(moe.blocks[1].mlp.gate_proj.weight, dense.blocks[1].mlp.gate_proj.weight)


def test_noise_breaks_exact_equality_but_stays_close() -> None:
    dense = _dense()
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, noise_std=0.01))
    layer, src = moe.blocks[0].mlp, dense.blocks[0].mlp
    assert isinstance(layer, MoELayer) and isinstance(src, SwiGLU)
    assert not torch.equal(layer.w13[0, :, :F_HIDDEN], layer.w13[1, :, :F_HIDDEN])
    rel = (layer.w13[0, :, :F_HIDDEN] / src.gate_proj.weight.T - 1).std().item()
    assert 0.005 < rel < 0.02
    ids = _tokens()
    a, b = _logits(moe, ids), _logits(dense, ids)
    assert not torch.allclose(a, b, atol=1e-5)
    assert ((a - b).norm() / b.norm()).item() < 0.05


def test_same_seed_gives_identical_bytes_and_other_seeds_differ() -> None:
    dense = _dense()
    up = UpcycleConfig(num_experts=4, top_k=2, drop_fraction=0.25, noise_std=0.01)
    a, b = upcycle(dense, up, seed=7), upcycle(dense, up, seed=7)
    torch.manual_seed(123)  # the global RNG plays no part
    c = upcycle(dense, up, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.mlp.router.weight"], sc["blocks.0.mlp.router.weight"])
    assert not torch.equal(sa["blocks.0.mlp.w13"], sc["blocks.0.mlp.w13"])


def test_upcycle_does_not_read_or_advance_the_global_rng() -> None:
    dense = _dense()
    state = torch.get_rng_state()
    upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, noise_std=0.01, drop_fraction=0.1))
    assert torch.equal(torch.get_rng_state(), state)


def test_router_is_drawn_with_the_given_std_and_buffers_start_at_zero() -> None:
    dense = _dense()
    moe = upcycle(dense, UpcycleConfig(num_experts=8, top_k=2, router_init_std=0.5))
    for layer in moe.moe_layers():
        assert abs(layer.router.weight.std().item() - 0.5) < 0.05
        assert not layer.router.expert_bias.any() and not layer.router.load_since_step.any()
        assert int(layer.router.num_steps) == 0
    zero = upcycle(dense, UpcycleConfig(num_experts=8, top_k=2, router_init_std=0.0))
    assert all(not layer.router.weight.any() for layer in zero.moe_layers())


def test_source_model_is_not_modified() -> None:
    dense = _dense(tie=True)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    cfg_before = dense.cfg.model_dump()
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, drop_fraction=0.5, noise_std=0.1))
    after = dense.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dense.cfg.model_dump() == cfg_before and dense.cfg.moe is None
    assert moe.embed.weight.data_ptr() != dense.embed.weight.data_ptr()


def test_dtype_and_mode_of_the_source_are_kept() -> None:
    dense = _dense().to(torch.bfloat16).train()
    moe = upcycle(dense, UpcycleConfig(num_experts=2, top_k=1, layers=[0]))
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert moe.training
    assert moe.rope.cos_cached.dtype == torch.float32


def test_upcycle_config_describes_the_moe_model() -> None:
    cfg = upcycle_config(
        _dense_cfg(), UpcycleConfig(num_experts=8, top_k=2, granularity=2, layers=[3, 1], shared_expert=True)
    )
    assert cfg.moe is not None
    assert cfg.moe_layer_indices == [1, 3]
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden) == (8, 2, F_HIDDEN // 2)
    assert (cfg.moe.num_shared_experts, cfg.moe.shared_expert_hidden) == (1, F_HIDDEN)
    assert cfg.moe.shared_expert_gate is False
    assert cfg.d_model == 64 and cfg.ffn_hidden == F_HIDDEN


@pytest.mark.parametrize(
    ("cfg", "up", "field"),
    [
        (
            _dense_cfg().model_copy(update={"moe": MoEConfig(num_experts=2, top_k=1, expert_hidden=8)}),
            UpcycleConfig(num_experts=4, top_k=2),
            "moe",
        ),
        (_dense_cfg(), UpcycleConfig(num_experts=4, top_k=2, layers=[1, 4]), "layers"),
        (_dense_cfg(), UpcycleConfig(num_experts=5, top_k=2, granularity=5), "granularity"),
        (_dense_cfg(), UpcycleConfig(num_experts=6, top_k=2, granularity=4), "num_experts"),
    ],
    ids=["already-moe", "layer-out-of-range", "granularity-not-dividing", "experts-not-multiple"],
)
def test_refusals_raise_upcycle_error_naming_the_field(
    cfg: ModelConfig, up: UpcycleConfig, field: str
) -> None:
    with pytest.raises(UpcycleError, match=field):
        upcycle_config(cfg, up)


def test_upcycling_an_moe_model_is_refused() -> None:
    cfg = _dense_cfg().model_copy(update={"moe": MoEConfig(num_experts=2, top_k=1, expert_hidden=8)})
    with pytest.raises(UpcycleError, match="already MoE"):
        upcycle(MoETransformer(cfg), UpcycleConfig(num_experts=4, top_k=2))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"num_experts": 0, "top_k": 1}, "num_experts"),
        ({"num_experts": 4, "top_k": 2, "drop_fraction": 1.5}, "drop_fraction"),
        ({"num_experts": 4, "top_k": 2, "straight_through": True}, "straight_through"),
        ({"num_experts": 4, "top_k": 2, "layers": [1, 1]}, "layers"),
        ({"num_experts": 4, "top_k": 2, "router_init_std": -1.0}, "router_init_std"),
        ({"num_experts": 4, "top_k": 2, "granularity": 0}, "granularity"),
        ({"num_experts": 4, "top_k": 2, "bogus": 1}, "bogus"),
    ],
)
def test_invalid_upcycle_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        UpcycleConfig(**kwargs)  # type: ignore[arg-type]


def test_gradients_reach_router_and_experts() -> None:
    moe = upcycle(_dense(), UpcycleConfig(num_experts=4, top_k=2, layers=[2, 3])).train()
    ids = _tokens()
    out = moe(ids[:, :-1], ids[:, 1:])
    assert out.loss is not None and out.aux_loss is not None
    (out.loss + out.aux_loss).backward()
    for layer in moe.moe_layers():
        for p in (layer.router.weight, layer.w13, layer.w2):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_upcycled_model_trains_without_nan() -> None:
    moe = upcycle(
        _dense(), UpcycleConfig(num_experts=4, top_k=2, drop_fraction=0.5, router_noise_std=0.1)
    ).train()
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    ids = _tokens(batch=4, seq=24)
    losses = []
    for _ in range(6):
        out = moe(ids[:, :-1], ids[:, 1:])
        assert out.loss is not None and out.aux_loss is not None
        loss = out.loss + out.aux_loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe.router_step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(p).all() for p in moe.parameters())
    assert losses[-1] < losses[0]
