"""The MoE layer against a per-token reference, in every dispatch backend, with capacity and ghost experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeforge.model import dispatch
from moeforge.model import moe as moe_module
from moeforge.model.config import MoEConfig
from moeforge.model.dispatch import choose_backend, grouped_swiglu
from moeforge.model.moe import MoELayer, sort_assignments

D, FH = 16, 12
BACKENDS = ["loop", "grouped_mm", "padded", "auto"]


def _layer(seed: int = 0, **moe: object) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": FH, **moe})
    layer = MoELayer(D, cfg)
    with torch.no_grad():
        layer.w13.normal_(std=0.3)
        layer.w2.normal_(std=0.3)
        layer.router.weight.normal_(std=0.5)
    return layer.eval()


def _expert(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    f = layer.w13.shape[-1] // 2
    h = x @ layer.w13[e]
    return (F.silu(h[..., :f]) * h[..., f:]) @ layer.w2[e]


def _kept(indices: torch.Tensor, num_slots: int, capacity: int | None) -> torch.Tensor:
    """[N, k] bool: which assignments survive the capacity limit (GShard: all j-th choices, then token order)."""
    n, k = indices.shape
    kept = torch.ones(n, k, dtype=torch.bool)
    if capacity is None:
        return kept
    used = [0] * num_slots
    for j in range(k):
        for t in range(n):
            e = int(indices[t, j])
            kept[t, j] = used[e] < capacity
            used[e] += 1
    return kept


def _naive(layer: MoELayer, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: sum over its kept experts of weight · alpha · SwiGLU_e(x), plus the shared expert."""
    alpha = layer.ghost_alpha if layer.num_ghost else None
    r = layer.router(x_ND, alpha)
    scale = torch.ones(layer.w13.shape[0])
    if layer.num_ghost:
        scale[layer.num_experts :] = layer.ghost_alpha
    kept = _kept(r.indices, layer.w13.shape[0], layer.capacity(x_ND.shape[0]))
    rows = []
    for t in range(x_ND.shape[0]):
        acc = torch.zeros(x_ND.shape[-1])
        for j in range(layer.top_k):
            if kept[t, j]:
                e = int(r.indices[t, j])
                acc = acc + r.weights[t, j] * scale[e] * _expert(layer, e, x_ND[t])
        if layer.shared is not None:
            s = layer.shared(x_ND[t])
            if layer.shared_gate is not None:
                s = torch.sigmoid(layer.shared_gate(x_ND[t])) * s
            acc = acc + s
        rows.append(acc)
    return torch.stack(rows), kept


CASES = {
    "top1": {"top_k": 1},
    "top2": {},
    "top_k_all": {"num_experts": 3, "top_k": 3},
    "capacity": {"capacity_factor": 0.5},
    "capacity_top1": {"top_k": 1, "capacity_factor": 0.75},
    "shared_gated": {"num_shared_experts": 2, "shared_expert_hidden": 8},
    "shared_ungated": {"num_shared_experts": 1, "shared_expert_hidden": 8, "shared_expert_gate": False},
    "no_renorm": {"renormalize": False},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_moe_layer_equals_naive_per_token_reference(case: str, backend: str) -> None:
    layer = _layer(**CASES[case], dispatch=backend)
    x = torch.randn(2, 10, D)
    y, stats = layer(x)
    ref, kept = _naive(layer, x.reshape(-1, D))
    torch.testing.assert_close(y.reshape(-1, D), ref, atol=1e-5, rtol=1e-5)
    assert stats.dropped == int((~kept).sum())
    assert int(stats.tokens_per_expert.sum()) == 20 * layer.top_k - stats.dropped


@pytest.mark.parametrize("n_tokens", [6, 200])
def test_auto_backend_matches_loop_for_small_and_large_groups(n_tokens: int) -> None:
    x = torch.randn(n_tokens, D)
    y_loop, _ = _layer(dispatch="loop")(x)
    y_auto, _ = _layer(dispatch="auto")(x)
    torch.testing.assert_close(y_auto, y_loop, atol=1e-5, rtol=1e-5)


def test_auto_backend_choice_on_cpu() -> None:
    x = torch.randn(4, D)
    assert choose_backend("auto", x, [2, 3, 0, 1]) == "padded"
    assert choose_backend("auto", x, [100, 120, 90, 110]) == "grouped_mm"  # padding 1.14
    assert choose_backend("auto", x, [100, 105, 98, 103]) == "padded"  # near-even: padding 1.03
    assert choose_backend("auto", x, [20, 24, 16, 20]) == "padded"  # small groups, padding 1.2
    assert choose_backend("auto", x, [20, 28, 12, 20]) == "grouped_mm"  # small groups, padding 1.4
    assert choose_backend("auto", x, [8, 12, 4, 8]) == "padded"  # smaller groups, padding 1.5
    # few rows per expert: padded pays for idle experts too
    assert choose_backend("auto", x, [2, 1, 1, 0]) == "padded"  # one idle of four
    assert choose_backend("auto", x, [1, 1, 1] + [0] * 5) == "grouped_mm"  # five idle of eight
    assert choose_backend("auto", x, [400, 520, 380, 300]) == "loop"  # large, padding 1.30
    assert choose_backend("auto", x, [600, 600, 600, 600]) == "loop"  # even, but past 512 rows
    assert choose_backend("auto", x, [256] * 32) == "padded"  # even, 8192 rows in all
    assert choose_backend("auto", x, [256] * 64) == "loop"  # even, but 16384 rows: out of cache padded
    assert choose_backend("auto", x, [0, 0]) == "loop"
    assert choose_backend("padded", x, [100, 120]) == "padded"


@pytest.mark.parametrize("case", ["top2", "capacity", "shared_gated"])
def test_gradients_agree_across_backends(case: str) -> None:
    x0 = torch.randn(24, D)
    grads = {}
    for backend in ["loop", "grouped_mm", "padded"]:
        layer = _layer(**CASES[case], dispatch=backend).train()
        x = x0.clone().requires_grad_(True)
        y, _ = layer(x)
        (y * torch.linspace(-1, 1, D)).sum().backward()
        grads[backend] = {
            "x": x.grad,
            "w13": layer.w13.grad,
            "w2": layer.w2.grad,
            "router": layer.router.weight.grad,
        }
    for backend in ["grouped_mm", "padded"]:
        for name, g in grads[backend].items():
            assert g is not None
            torch.testing.assert_close(g, grads["loop"][name], atol=1e-5, rtol=1e-4, msg=f"{backend}: {name}")
    assert grads["loop"]["w13"].abs().sum() > 0


def test_sort_assignments_gives_first_choices_priority_then_token_order() -> None:
    indices = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]])  # N=4, k=2
    order, counts, dropped = sort_assignments(indices, 2, capacity=2)
    # assignment id a = j*N + n; expert 0: first choices of tokens 1, 2 beat second choices of tokens 0, 3
    # kept ones grouped by expert, then the dropped ones (a fixed-size order: no host read for the shape)
    assert order.tolist() == [1, 2, 0, 3, 4, 7, 5, 6]
    assert counts.tolist() == [2, 2]
    assert dropped == 4
    order, counts, dropped = sort_assignments(indices, 2, capacity=None)
    assert order.tolist() == [1, 2, 4, 7, 0, 3, 5, 6]
    assert counts.tolist() == [4, 4]
    assert dropped == 0


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "padded"])
def test_tiny_capacity_drops_assignments_and_they_contribute_zero(backend: str) -> None:
    layer = _layer(capacity_factor=0.25, dispatch=backend)
    x = torch.randn(32, D)
    assert layer.capacity(32) == 4  # ceil(0.25 * 32 * 2 / 4)
    y, stats = layer(x)
    ref, kept = _naive(layer, x)
    assert stats.dropped > 0
    assert stats.dropped == 32 * 2 - int(stats.tokens_per_expert.sum())
    assert stats.dropped == int((~kept).sum())
    assert (stats.tokens_per_expert <= 4).all()
    assert stats.assignments == 64
    assert stats.dropped_fraction == pytest.approx(stats.dropped / 64)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # a token all of whose assignments were dropped rides the residual: the layer adds exactly zero
    fully_dropped = ~kept.any(-1)
    assert fully_dropped.any()
    assert torch.equal(y[fully_dropped], torch.zeros_like(y[fully_dropped]))


def test_dropless_layer_drops_nothing() -> None:
    layer = _layer()
    _, stats = layer(torch.randn(32, D))
    assert layer.capacity(32) is None
    assert stats.dropped == 0
    assert stats.dropped_fraction == 0.0
    assert int(stats.tokens_per_expert.sum()) == 64


def test_moe_stats_report_routing_summary() -> None:
    layer = _layer()
    x = torch.randn(40, D)
    _, stats = layer(x)
    r = layer.router(x)
    assert stats.probs_mean is None and stats.entropy is None  # computed on demand, not in the forward
    probs_mean, entropy = stats.detail()
    torch.testing.assert_close(probs_mean, r.probs.mean(0))
    torch.testing.assert_close(entropy, -(r.probs * r.probs.log()).sum(-1).mean())
    assert stats.detail()[0] is probs_mean  # kept after the first call
    torch.testing.assert_close(stats.lb_loss, r.lb_loss)
    torch.testing.assert_close(stats.z_loss, r.z_loss)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "padded"])
def test_dormant_ghosts_get_no_tokens_and_exactly_zero_grads(backend: str) -> None:
    layer = _layer(num_ghost_experts=2, dispatch=backend).train()
    with torch.no_grad():
        layer.router.weight[4:] += 2.0  # ghosts would be popular if they were routable
    x = torch.randn(48, D).abs()
    y, stats = layer(x)
    (y.pow(2).sum() + stats.lb_loss + stats.z_loss).backward()
    assert stats.tokens_per_expert[4:].tolist() == [0, 0]
    assert torch.equal(layer.w13.grad[4:], torch.zeros_like(layer.w13[4:]))
    assert torch.equal(layer.w2.grad[4:], torch.zeros_like(layer.w2[4:]))
    assert torch.equal(layer.router.weight.grad[4:], torch.zeros_like(layer.router.weight[4:]))
    assert layer.w13.grad[:4].abs().sum() > 0


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "padded"])
def test_woken_ghost_receives_tokens_scaled_by_alpha(backend: str) -> None:
    layer = _layer(num_ghost_experts=2, dispatch=backend)
    with torch.no_grad():
        layer.ghost_alpha.copy_(torch.tensor([0.5, 0.0]))
        layer.router.weight[4] += 1.0
    x = torch.randn(48, D).abs()
    y, stats = layer(x)
    assert stats.tokens_per_expert[4] > 0
    assert stats.tokens_per_expert[5] == 0
    ref, _ = _naive(layer, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # the same layer with the ghost at full strength gives a different output on tokens routed to it
    with torch.no_grad():
        layer.ghost_alpha[0] = 1.0
    y_full, _ = layer(x)
    routed = (layer.router(x, layer.ghost_alpha).indices == 4).any(-1)
    assert not torch.allclose(y_full[routed], y[routed])
    torch.testing.assert_close(y_full[~routed], y[~routed])


def test_capacity_counts_woken_ghosts_as_active_experts() -> None:
    layer = _layer(num_ghost_experts=2, capacity_factor=1.0)
    assert layer.capacity(40) == 20  # ceil(40 * 2 / 4)
    with torch.no_grad():
        layer.ghost_alpha.fill_(1.0)
    assert layer.capacity(40) == 14  # ceil(40 * 2 / 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_swiglu_on_zero_rows_returns_empty(backend: str) -> None:
    w13 = torch.randn(3, D, 2 * FH, requires_grad=True)
    w2 = torch.randn(3, FH, D, requires_grad=True)
    y = grouped_swiglu(torch.zeros(0, D), w13, w2, torch.zeros(3, dtype=torch.long), backend)
    assert y.shape == (0, D)
    y.sum().backward()
    assert torch.equal(w13.grad, torch.zeros_like(w13))


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "padded"])
def test_grouped_swiglu_rows_go_through_their_own_expert(backend: str) -> None:
    w13, w2 = torch.randn(3, D, 2 * FH), torch.randn(3, FH, D)
    counts = torch.tensor([5, 0, 7])
    x = torch.randn(12, D)
    y = grouped_swiglu(x, w13, w2, counts, backend)
    expert = [0] * 5 + [2] * 7
    for i, e in enumerate(expert):
        h = x[i] @ w13[e]
        # a vector-matrix product against a batched one: float32 summation order differs by CPU (seen
        # 1.3e-5 absolute on values of ~0.2 on one machine), so the bound is float32 noise, not 1e-5
        torch.testing.assert_close(y[i], (F.silu(h[:FH]) * h[FH:]) @ w2[e], atol=1e-4, rtol=1e-4)


def test_loop_backend_chunks_large_groups_like_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_CHUNK", 64)  # groups of 150 and 70 rows span several chunks
    counts = torch.tensor([150, 0, 70])
    x0 = torch.randn(220, D)
    w13_0, w2_0 = 0.3 * torch.randn(3, D, 2 * FH), 0.3 * torch.randn(3, FH, D)
    g_out = torch.randn(220, D)
    results = {}
    for backend in ("loop", "padded"):
        x, w13, w2 = (t.clone().requires_grad_(True) for t in (x0, w13_0, w2_0))
        y = grouped_swiglu(x, w13, w2, counts, backend)
        (y * g_out).sum().backward()
        results[backend] = (y, x.grad, w13.grad, w2.grad)
    for a, b in zip(results["loop"], results["padded"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(results["loop"][2][1], torch.zeros(D, 2 * FH))


def test_grouped_mm_backend_backward_accepts_expanded_gradient() -> None:
    x = torch.randn(12, D, requires_grad=True)
    w13 = torch.randn(3, D, 2 * FH, requires_grad=True)
    w2 = torch.randn(3, FH, D, requires_grad=True)
    grouped_swiglu(x, w13, w2, torch.tensor([5, 0, 7]), "grouped_mm").sum().backward()
    gx = x.grad.clone()
    x.grad = None
    grouped_swiglu(x, w13, w2, torch.tensor([5, 0, 7]), "loop").sum().backward()
    torch.testing.assert_close(gx, x.grad)


def test_auto_dispatch_works_for_expert_hidden_not_multiple_of_four() -> None:
    layer = _layer(expert_hidden=6, dispatch="auto")
    x = torch.randn(128, D)
    y, _ = layer(x)
    ref, _ = _naive(layer, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", [True, False])
def test_host_combine_equals_the_permutation_and_sum_across_chunks(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, kernels: bool
) -> None:
    """_WeightedCombine (the host kernels, or index_add_ in chunks without them) against the device path's
    permutation into k·N slots and sum: same output and gradients, bit-identical on a second run, gradients
    in their inputs' dtypes."""
    from moeforge.model import cpu_kernels

    monkeypatch.setattr(moe_module, "_COMBINE_ROWS", 7)  # 60 assignments span nine chunks
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_lib", None)
        monkeypatch.setattr(cpu_kernels, "_tried", True)
    n, k = 20, 3
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(n * k, generator=gen)
    y0 = torch.randn(n * k, D, generator=gen).to(dtype)
    w0 = torch.rand(n * k, generator=gen)
    g_out = torch.randn(n, D, generator=gen)

    def ours() -> tuple[torch.Tensor, ...]:
        y, w = y0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        out = moe_module._WeightedCombine.apply(y, w, order % n, torch.argsort(order), n)
        (out * g_out).sum().backward()
        return out, y.grad, w.grad

    y, w = y0.float().clone().requires_grad_(True), w0.clone().requires_grad_(True)
    yw = y * w[:, None]
    ref = yw.new_zeros(k * n, D).index_copy(0, order, yw).view(k, n, D).sum(0)
    (ref * g_out).sum().backward()
    out, gy, gw = ours()
    assert gy.dtype == dtype and gw.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip((out, gy, gw), (ref, y.grad, w.grad), strict=True):
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=tol)
    for a, b in zip((out, gy, gw), ours(), strict=True):
        assert torch.equal(a, b)
