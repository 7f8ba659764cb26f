"""The fused SwiGLU host kernels: built here, equal to the ATen ops, refused where they do not apply,
and a failed build that falls back with the compiler's message."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeforge.model import cpu_kernels, dispatch
from moeforge.model.dispatch import grouped_swiglu


def _aten(h: torch.Tensor, ga: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = h.shape[-1] // 2
    g, u = h[..., :f], h[..., f:]
    a = F.silu(g) * u
    gh = torch.cat([torch.ops.aten.silu_backward(ga * u, g), ga * F.silu(g)], -1)
    return a, gh


def _same_without_kernels(run: Callable[[], list[torch.Tensor]], monkeypatch: pytest.MonkeyPatch) -> None:
    """``run()`` through the kernels, then with them switched off (the ATen ops): equal to rounding."""
    fused = run()
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_tried", True)
    aten = run()
    for got, want in zip(fused, aten, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kernels_build_on_this_machine() -> None:
    # CI machines have gcc; a failure here is a broken build, not a missing compiler
    assert cpu_kernels.available()


@pytest.mark.parametrize("shape", [(7, 2 * 37), (3, 5, 2 * 16), (300, 2 * 512), (1, 2)])
def test_kernels_match_aten(shape: tuple[int, ...]) -> None:
    h = torch.randn(shape) * 8  # both tails of the sigmoid
    extremes = torch.tensor([-100.0, 100.0, 0.0, -0.0])[: h.numel()]
    h.view(-1)[: extremes.numel()] = extremes
    ga = torch.randn(*shape[:-1], shape[-1] // 2)
    a = cpu_kernels.swiglu_forward(h)
    gh = cpu_kernels.swiglu_backward(h, ga)
    assert a is not None and gh is not None
    want_a, want_gh = _aten(h, ga)
    torch.testing.assert_close(a, want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, want_gh, rtol=1e-5, atol=1e-5)


def test_kernels_same_bytes_at_any_thread_count() -> None:
    h, ga = torch.randn(256, 2 * 512), torch.randn(256, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (cpu_kernels.swiglu_forward(h), cpu_kernels.swiglu_backward(h, ga))
        torch.set_num_threads(2)
        two = (cpu_kernels.swiglu_forward(h), cpu_kernels.swiglu_backward(h, ga))
    finally:
        torch.set_num_threads(before)
    assert all(x is not None and y is not None and torch.equal(x, y) for x, y in zip(one, two, strict=True))


def test_kernels_refuse_what_they_do_not_handle() -> None:
    h = torch.randn(4, 8)
    assert cpu_kernels.swiglu_forward(h.bfloat16()) is None
    assert cpu_kernels.swiglu_forward(h.double()) is None
    assert cpu_kernels.swiglu_forward(torch.randn(8, 4).t()) is None  # not contiguous
    assert cpu_kernels.swiglu_backward(h, torch.randn(4, 8)[:, :4]) is None  # strided gradient
    assert cpu_kernels.swiglu_forward(torch.empty(0, 8)) is None
    assert cpu_kernels.swiglu_forward(torch.randn(4, 7)) is None  # no [gate | up] halves
    assert cpu_kernels.swiglu_backward(h, torch.randn(3, 4)) is None  # gradient of another shape

    class Deferred(torch.Tensor):  # e.g. a functional collective's result, whose data needs a wait first
        pass

    assert cpu_kernels.swiglu_forward(h.as_subclass(Deferred)) is None


def test_backward_after_fused_forward_falls_back_when_the_kernel_refuses() -> None:
    """The forward saved no silu (fused); a strided gradient sends the backward to the ATen ops, which
    recompute it."""
    h = torch.randn(6, 2 * 24)
    s, _ = dispatch._swiglu(h)
    assert s is None
    ga = torch.randn(24, 6).t()  # not contiguous
    got = dispatch._swiglu_backward(h, s, ga.clone())  # the ATen path overwrites its ga
    torch.testing.assert_close(got, _aten(h, ga)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["loop", "padded", "grouped_mm"])
def test_grouped_swiglu_same_with_and_without_kernels(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeforge.model import grad_buffers

    torch.manual_seed(3)
    x = torch.randn(40, 16)
    w13 = (torch.randn(4, 16, 64) * 0.2).requires_grad_()
    w2 = (torch.randn(4, 32, 16) * 0.2).requires_grad_()
    counts = torch.tensor([9, 0, 20, 11])
    gy = torch.randn(40, 16)
    grad_buffers.attach([w13, w2])  # grouped_mm on the host takes the fused path with buffers attached

    def run() -> list[torch.Tensor]:
        grad_buffers.begin_step([w13, w2])
        w13.grad = w2.grad = None
        xi = x.clone().requires_grad_()
        y = grouped_swiglu(xi, w13, w2, counts, backend)  # type: ignore[arg-type]
        y.backward(gy)
        grad_buffers.publish([w13, w2])
        assert xi.grad is not None and w13.grad is not None and w2.grad is not None
        return [y.detach().clone(), xi.grad.clone(), w13.grad.clone(), w2.grad.clone()]

    _same_without_kernels(run, monkeypatch)


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFORGE_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    assert not cpu_kernels.available()
    assert cpu_kernels.swiglu_forward(torch.randn(2, 8)) is None


def test_cached_build_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_kernels.build(cache_dir=tmp_path)
    built = sorted((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
    compiled: list[list[str]] = []
    real_run = cpu_kernels._run

    def spy(cmd: list[str]):  # type: ignore[no-untyped-def]
        if "--version" not in cmd:
            compiled.append(cmd)
        return real_run(cmd)

    monkeypatch.setattr(cpu_kernels, "_run", spy)
    cpu_kernels.build(cache_dir=tmp_path)
    assert compiled == []


def _fake_compiler(path: Path, body: str) -> str:
    path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo fakecc 1.0; exit 0; fi\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_compile_error_is_reported(tmp_path: Path) -> None:
    cc = _fake_compiler(tmp_path / "cc", 'echo "swiglu.c:1: error: no luck" >&2; exit 1')
    with pytest.raises(cpu_kernels.KernelBuildError, match="no luck"):
        cpu_kernels.build(cc=cc, cache_dir=tmp_path)
    assert list((tmp_path / "kernels").iterdir()) == []  # nothing half-written


def test_missing_compiler_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C compiler"):
        cpu_kernels.build(cache_dir=tmp_path)
    with pytest.raises(cpu_kernels.KernelBuildError, match="could not run"):
        cpu_kernels.build(cc=str(tmp_path / "nope"), cache_dir=tmp_path)


def test_wrong_kernels_fail_the_self_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "swiglu.c"
    bad.write_text(
        cpu_kernels.SOURCE.read_text().replace("o[j] = x * sigmoid(x) * u[j];", "o[j] = x * u[j];")
    )
    monkeypatch.setattr(cpu_kernels, "SOURCE", bad)
    with pytest.raises(cpu_kernels.KernelBuildError, match="SwiGLU forward does not reproduce"):
        cpu_kernels.build(cache_dir=tmp_path)


def test_failed_build_falls_back_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", _fake_compiler(tmp_path / "cc", 'echo "broken toolchain" >&2; exit 1'))
    monkeypatch.setenv("MOEFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    with caplog.at_level("WARNING", logger="moeforge.model.cpu_kernels"):
        s, _ = dispatch._swiglu(torch.randn(3, 8))
    assert s is not None  # the ATen ops ran
    assert "broken toolchain" in caplog.text


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gather_sum_and_combine_backward_match_aten(k: int) -> None:
    n, d = 11, 24
    order = torch.randperm(n * k)  # assignment ids (j*n + t) in row order
    token, pos = order % n, torch.argsort(order)
    y, w, g = torch.randn(n * k, d), torch.rand(n * k), torch.randn(n, d)
    out = cpu_kernels.gather_sum(y, w, pos, n)
    summed = cpu_kernels.gather_sum(y, None, pos, n)
    back = cpu_kernels.combine_backward(g, y, w, token, True)
    assert out is not None and summed is not None and back is not None
    torch.testing.assert_close(out, torch.zeros(n, d).index_add_(0, token, y * w[:, None]))
    torch.testing.assert_close(summed, torch.zeros(n, d).index_add_(0, token, y))
    torch.testing.assert_close(back[0], g[token] * w[:, None])
    assert back[1] is not None
    torch.testing.assert_close(back[1], (g[token] * y).sum(-1))
    no_weight_grad = cpu_kernels.combine_backward(g, y, w, token, False)
    assert no_weight_grad is not None and no_weight_grad[1] is None


def test_gather_sum_and_combine_backward_refuse_what_they_do_not_handle() -> None:
    n, k, d = 4, 2, 8
    order = torch.randperm(n * k)
    token, pos = order % n, torch.argsort(order)
    y, w, g = torch.randn(n * k, d), torch.rand(n * k), torch.randn(n, d)
    assert cpu_kernels.gather_sum(y, w, pos.int(), n) is None  # int32 indices
    assert cpu_kernels.gather_sum(y[:-1], w, pos, n) is None  # rows do not match the indices
    assert cpu_kernels.gather_sum(y.bfloat16(), None, pos, n) is None
    assert cpu_kernels.gather_sum(y, w, pos, 3) is None  # 8 assignments are not k per token of 3
    assert cpu_kernels.combine_backward(g, y, w.double(), token, True) is None
    assert cpu_kernels.combine_backward(g, y.t().contiguous().t(), w, token, True) is None  # strided


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_moe_layer_same_with_and_without_kernels(
    capacity_factor: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole layer (gather, SwiGLU, combine and their backward) through the kernels and through the
    ATen ops: same output and gradients, with and without capacity drops."""
    from moeforge.model.config import MoEConfig
    from moeforge.model.moe import MoELayer

    torch.manual_seed(5)
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=24, capacity_factor=capacity_factor))
    x = torch.randn(2, 9, 16)
    gy = torch.randn(2, 9, 16)

    def run() -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y, stats = layer(xi)
        assert stats is not None
        (y * gy).sum().backward()
        grads = [p.grad for p in (layer.router.weight, layer.w13, layer.w2)]
        assert xi.grad is not None and all(g is not None for g in grads)
        return [y.detach(), xi.grad, *grads]  # type: ignore[list-item]

    _same_without_kernels(run, monkeypatch)


def test_damaged_cached_build_is_dropped(tmp_path: Path) -> None:
    """A cached library that no longer loads (say, truncated by a crash) is deleted, so the next process
    compiles it again; this one goes on with the next flag set."""
    cpu_kernels.build(cache_dir=tmp_path / "good")
    (good,) = (tmp_path / "good" / "kernels").iterdir()
    # the same build's name in another cache (a path this process has not loaded), damaged
    damaged = tmp_path / "bad" / "kernels" / good.name
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a shared object")
    assert cpu_kernels.build(cache_dir=tmp_path / "bad") is not None
    assert not damaged.exists()
