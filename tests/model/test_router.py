"""Router features: straight-through top-1, balancing losses, noise schedule, renormalization, aux-free bias,
ghost slots."""

from __future__ import annotations

import pytest
import torch

from moeforge.model.config import MoEConfig
from moeforge.model.moe import MoELayer
from moeforge.model.router import Router, load_balancing_loss, z_loss

D = 16


def _moe_layer(**moe: object) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 1, "expert_hidden": 16, "dispatch": "loop", **moe})
    layer = MoELayer(D, cfg)
    with torch.no_grad():
        layer.w13.normal_(std=0.2)
        layer.w2.normal_(std=0.2)
    return layer


def _router_grad_from_output_loss(layer: MoELayer) -> torch.Tensor:
    x = torch.randn(64, D)
    y, _ = layer(x)
    y.pow(2).sum().backward()  # a loss on the layer output only, no balancing losses
    assert layer.router.weight.grad is not None
    return layer.router.weight.grad


# --- straight-through top-1 ------------------------------------------------------------------------


def test_straight_through_weights_are_one_in_value() -> None:
    layer = _moe_layer(straight_through=True)
    out = layer.router(torch.randn(64, D))
    torch.testing.assert_close(out.weights, torch.ones(64, 1), atol=1e-6, rtol=0)


def test_straight_through_weights_are_exactly_one() -> None:
    layer = _moe_layer(straight_through=True)
    out = layer.router(torch.randn(256, D))
    assert torch.equal(out.weights, torch.ones(256, 1))


def test_straight_through_top1_router_gets_gradient_from_output_loss() -> None:
    grad = _router_grad_from_output_loss(_moe_layer(straight_through=True))
    assert grad.abs().max() > 1e-2


def test_renormalized_top1_without_straight_through_gets_no_gradient_from_output_loss() -> None:
    torch.manual_seed(1)
    st = _router_grad_from_output_loss(_moe_layer(straight_through=True))
    torch.manual_seed(1)
    plain = _router_grad_from_output_loss(_moe_layer(straight_through=False, renormalize=True))
    # w / w.sum() == 1 has zero derivative; only float rounding (~1e-7 relative) can leak through
    assert plain.abs().max() <= 1e-5 * st.abs().max()


# --- balancing losses ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_lb_loss_is_one_at_uniform_routing(k: int) -> None:
    e, n = 4, 8
    probs = torch.full((n, e), 1.0 / e)
    indices = torch.stack([(torch.arange(n) + j) % e for j in range(k)], dim=1)
    assert torch.bincount(indices.reshape(-1), minlength=e).unique().numel() == 1  # perfectly balanced
    assert load_balancing_loss(probs, indices, e).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_lb_loss_grows_with_skew(k: int) -> None:
    e, n = 4, 8
    probs = torch.softmax(torch.tensor([3.0, 0.0, 0.0, 0.0]), 0).expand(n, e)
    indices = torch.stack([torch.full((n,), j) for j in range(k)], dim=1)  # everyone picks experts 0..k-1
    loss = load_balancing_loss(probs, indices, e).item()
    assert loss > 1.5
    # the worst case, all assignments and all probability on one expert, is E (k=1)
    if k == 1:
        one_hot = torch.zeros(n, e)
        one_hot[:, 0] = 1.0
        assert load_balancing_loss(one_hot, indices, e).item() == pytest.approx(e)


def test_lb_loss_uses_n_active_as_the_expert_count() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    indices = torch.tensor([[0], [1]])
    assert load_balancing_loss(probs, indices, 2).item() == pytest.approx(1.0)


def test_z_loss_equals_mean_squared_logsumexp() -> None:
    logits = 3 * torch.randn(10, 5)
    by_hand = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits]).mean()
    torch.testing.assert_close(z_loss(logits), by_hand, atol=1e-5, rtol=1e-5)


def test_router_reports_losses_of_its_own_outputs() -> None:
    router = Router(D, 4, 2).eval()
    out = router(torch.randn(32, D))
    torch.testing.assert_close(out.lb_loss, load_balancing_loss(out.probs, out.indices, 4))
    torch.testing.assert_close(out.z_loss, z_loss(out.logits))
    assert torch.equal(out.tokens_per_expert, torch.bincount(out.indices.reshape(-1), minlength=4).float())


# --- noise ------------------------------------------------------------------------------------------


def test_noise_std_anneals_linearly_to_exactly_zero() -> None:
    router = Router(D, 4, 2, noise_std=0.8, noise_anneal_steps=4)
    seen = []
    for _ in range(6):
        seen.append(router.current_noise_std)
        router.step()
    assert seen[:4] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert seen[4] == 0.0
    assert seen[5] == 0.0
    assert int(router.num_steps) == 6


def test_noise_without_anneal_stays_constant() -> None:
    router = Router(D, 4, 2, noise_std=0.5)
    for _ in range(3):
        router.step()
    assert router.current_noise_std == 0.5


def test_noise_is_on_in_training_and_off_in_eval() -> None:
    router = Router(D, 4, 2, noise_std=1.0)
    x = torch.randn(32, D)
    router.train()
    a, b = router(x), router(x)
    assert not torch.equal(a.probs, b.probs)
    torch.testing.assert_close(a.logits, b.logits)  # logits are reported before noise
    router.eval()
    c, d = router(x), router(x)
    assert torch.equal(c.probs, d.probs)
    assert torch.equal(c.indices, d.indices)
    torch.testing.assert_close(c.probs, torch.softmax(c.logits, -1))


# --- renormalization ------------------------------------------------------------------------------


def test_renormalized_weights_sum_to_one() -> None:
    out = Router(D, 6, 3, renormalize=True)(torch.randn(20, D))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(20))
    assert (out.weights > 0).all()


def test_weights_without_renormalize_equal_raw_probs() -> None:
    out = Router(D, 6, 3, renormalize=False)(torch.randn(20, D))
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))
    assert (out.weights.sum(-1) < 1).all()
    top = out.probs.topk(3, -1).values
    torch.testing.assert_close(out.weights, top)


# --- aux-loss-free balancing bias --------------------------------------------------------------------


def _skewed_router(rate: float) -> Router:
    torch.manual_seed(0)
    router = Router(D, 4, 1, aux_free_bias_rate=rate)
    with torch.no_grad():
        router.weight.normal_(std=0.1)
        router.weight[0] += 0.1  # expert 0 dominates for inputs with a positive mean
    return router.train()


def test_aux_free_bias_moves_toward_balance() -> None:
    x = torch.randn(512, D) + 1.0
    frozen = _skewed_router(0.01)
    frozen_load = frozen(x).tokens_per_expert
    assert frozen_load[0] > 0.8 * 512

    router = _skewed_router(0.01)
    router(x)
    router.step()
    assert router.expert_bias[0] < 0
    assert (router.expert_bias[1:] > 0).all()

    loads = []
    for _ in range(80):
        loads.append(router(x).tokens_per_expert)
        router.step()
    late = torch.stack(loads[-20:]).mean(0)
    assert late.max() < 0.5 * 512
    assert late.max() / late.mean() < frozen_load.max() / frozen_load.mean()
    assert router.expert_bias[0] < 0


def test_aux_free_bias_steers_selection_but_not_weights() -> None:
    router = Router(D, 4, 2, renormalize=False, aux_free_bias_rate=0.1).eval()
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    out = router(torch.randn(16, D))
    assert torch.equal(out.indices.sort(-1).values, torch.tensor([[0, 1]]).expand(16, 2))
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))


def test_aux_free_load_is_only_accumulated_in_training() -> None:
    router = Router(D, 4, 1, aux_free_bias_rate=0.1)
    x = torch.randn(8, D)
    router.eval()
    router(x)
    assert router.load_since_step.sum() == 0
    router.train()
    router(x)
    assert router.load_since_step.sum() == 8
    router.step()
    assert router.load_since_step.sum() == 0


# --- ghost slots -------------------------------------------------------------------------------------


def test_dormant_ghost_slots_get_no_assignments_and_zero_probability() -> None:
    router = Router(D, 3, 2, num_ghost=2)
    with torch.no_grad():
        router.weight[3:] += 1.0  # ghosts would win every token if they were routable
    x = torch.randn(64, D).abs()
    out = router(x, torch.zeros(2))
    assert (out.indices < 3).all()
    assert torch.equal(out.probs[:, 3:], torch.zeros(64, 2))
    assert torch.equal(out.tokens_per_expert[3:], torch.zeros(2))
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(64))
    woken = router(x, torch.tensor([0.5, 0.0]))
    assert (woken.indices == 3).any()
    assert (woken.indices != 4).all()


def test_top_k_larger_than_the_routed_experts_raises() -> None:
    # checked once when built (ghosts may sleep, the routed experts never do): no host read per forward
    with pytest.raises(ValueError, match="exceeds the 1 routed experts"):
        Router(D, 1, 2, num_ghost=1)


def test_dormant_ghosts_get_no_tokens_with_aux_free_bias() -> None:
    router = Router(D, 3, 2, num_ghost=1, aux_free_bias_rate=0.05).train()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 5.0
        router.weight[1, 0] = 5.0
    alpha = torch.zeros(1)
    x = torch.randn(256, D).abs()
    ghost_tokens = 0.0
    for _ in range(25):
        ghost_tokens += router(x, alpha).tokens_per_expert[3].item()
        router.step(alpha)
    assert ghost_tokens == 0.0
