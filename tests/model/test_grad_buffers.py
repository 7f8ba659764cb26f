"""Persistent expert weight-gradient buffers (model/grad_buffers.py): the gradients backward writes into
them equal autograd's, micro-batches accumulate, a new step overwrites, and the storage never moves."""

from __future__ import annotations

import copy

import pytest
import torch

from moeforge.model import grad_buffers
from moeforge.model.config import MoEConfig
from moeforge.model.moe import MoELayer


def _layer(dispatch: str, experts: int = 8, top_k: int = 2, capacity: float | None = None) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=experts, top_k=top_k, expert_hidden=32, capacity_factor=capacity, dispatch=dispatch
    )
    return MoELayer(16, cfg)


def _backward(layer: MoELayer, x: torch.Tensor) -> None:
    y, stats = layer(x)
    (y.pow(2).mean() + 0.01 * stats.lb_loss).backward()


@pytest.mark.parametrize(
    ("dispatch", "tokens", "capacity"),
    [
        ("loop", 64, None),
        ("padded", 64, None),
        ("grouped_mm", 64, None),
        ("auto", 64, None),
        ("auto", 3, None),  # most experts idle: their fresh gradient must be zero, not garbage
        ("loop", 64, 1.0),  # capacity drops: the tail path
    ],
)
def test_buffers_hold_what_autograd_computes_across_micro_batches_and_steps(dispatch, tokens, capacity):
    ours = _layer(dispatch, capacity=capacity)
    ref = copy.deepcopy(ours)
    params = grad_buffers.attach([ours.w13, ours.w2])
    ptrs = [p.main_grad.data_ptr() for p in params]
    gen = torch.Generator().manual_seed(1)
    for _step in range(2):
        grad_buffers.begin_step(params)
        for _micro in range(2):
            x = torch.randn(1, tokens, 16, generator=gen)
            _backward(ours, x)
            _backward(ref, x)
        assert ours.w13.grad is None  # backward returned nothing for the buffered weights
        grad_buffers.publish(params)
        for p, r in ((ours.w13, ref.w13), (ours.w2, ref.w2)):
            assert p.grad.data_ptr() == p.main_grad.data_ptr()
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)
        # the router's gradient went through autograd as always
        torch.testing.assert_close(ours.router.weight.grad, ref.router.weight.grad, rtol=1e-5, atol=1e-6)
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    assert [p.main_grad.data_ptr() for p in params] == ptrs


def test_publish_adds_to_a_gradient_autograd_also_produced_and_leaves_unwritten_buffers_alone():
    w = torch.nn.Parameter(torch.ones(2, 3))
    (p,) = grad_buffers.attach([w])
    grad_buffers.publish([p])
    assert p.grad is None  # no backward wrote the buffer
    buf, fresh = grad_buffers.target(p)
    assert fresh and buf is p.main_grad
    buf.fill_(2.0)
    p.grad = torch.full((2, 3), 0.5)
    grad_buffers.publish([p])
    assert torch.equal(p.grad, torch.full((2, 3), 2.5))
    grad_buffers.publish([p])  # publishing again does not add twice
    assert torch.equal(p.grad, torch.full((2, 3), 2.5))
    grad_buffers.detach([p])
    assert not hasattr(p, "main_grad") and not grad_buffers.buffered(p)


def test_a_cast_copy_of_a_buffered_weight_falls_back_to_autograd():
    layer = _layer("loop")
    grad_buffers.attach([layer.w13, layer.w2])
    assert grad_buffers.buffered(layer.w13)
    assert not grad_buffers.buffered(layer.w13.to(torch.float64))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    assert grad_buffers.attach([frozen]) == []
