"""Grouped SwiGLU over tokens already sorted by expert — the hot loop of every MoE layer.

Input rows ``x_ND`` are grouped by expert: the first ``counts[0]`` rows go to expert 0, the next
``counts[1]`` to expert 1, and so on. Expert weights are stacked: ``w13_EDG`` holds gate and up
projections side by side (``G = 2F``: columns ``[:F]`` gate, ``[F:]`` up) and ``w2_EFD`` the down
projection, both in ``x @ w`` (in, out) layout.

Backends (all compute the same function; tests pin them against a per-token reference):

- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` — one kernel for all experts, forward and backward.
- ``loop``: one ``mm`` per expert written straight into preallocated outputs, with a hand-written
  backward; elementwise work (SiLU and its derivative) runs once over all rows, never per expert.
- ``padded``: scatter rows into ``[E, C, D]`` with ``C`` the largest group, then ``bmm`` — wastes FLOPs
  on padding but makes one call regardless of E; wins when groups are small or near-even.

``auto`` picks ``grouped_mm`` on CUDA, and on CPU the backend measured fastest for the group sizes at
hand and the padding ``padded`` would add (:func:`choose_backend`): ``padded`` while its padded rows
(all experts × the largest group) cost less than the rows plus a fixed cost per active group, up to 512
rows each (8192 in all), else ``loop`` from 256 rows per expert and ``grouped_mm`` in between (see
``docs/PERFORMANCE.md``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from moeforge.model import cpu_kernels, grad_buffers

__all__ = ["Backend", "choose_backend", "grouped_swiglu", "has_grouped_mm"]

Backend = Literal["auto", "grouped_mm", "loop", "padded"]

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def has_grouped_mm(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...] = ()) -> bool:
    """Whether a grouped-matmul kernel exists for this device and dtype, and the row lengths ``dims``
    (d_model, expert hidden) meet its 16-byte stride alignment."""
    if _GROUPED_MM is None:
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any((d * itemsize) % 16 for d in dims):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


_PADDED_MAX_ROWS = 8192  # the padded backend runs up to this many rows in all (choose_backend)
# choose_backend's cost model, in rows of work: a grouped kernel's fixed cost per active expert, and what
# an idle expert costs the padded bmm beyond its padded rows (reading its weights, writing its gradients)
_GROUP_COST_ROWS = 6
_IDLE_EXPERT_ROWS = 4


def choose_backend(
    requested: Backend, x: torch.Tensor, counts: list[int], hidden: int | None = None
) -> Backend:
    """Resolve ``auto`` (and an unavailable ``grouped_mm``) to a concrete backend for these group sizes."""
    dims = (x.shape[-1],) if hidden is None else (x.shape[-1], hidden)
    grouped_ok = has_grouped_mm(x.device, x.dtype, dims)
    if requested == "grouped_mm" and not grouped_ok:
        return "loop"
    if requested != "auto":
        return requested
    if x.device.type == "cuda":
        return "grouped_mm" if grouped_ok else "loop"
    n = sum(counts)
    active = sum(1 for c in counts if c)
    if active == 0:
        return "loop"
    per_expert = n / active
    if n <= 32 and not torch.is_grad_enabled():
        # decoding (a few tokens, no backward): the loop reads only the active experts' weights; the
        # padded bmm would read every expert's, idle ones too, which costs more than the math
        return "loop"
    # A cost model in rows of work, fitted to benchmarks/dispatch_sweep.py on 2-core x86 CPUs (an AMD EPYC,
    # then an Intel Xeon; its table in docs/PERFORMANCE.md) over even groups with padding up to 1.75× and
    # routed groups (uneven, some experts idle). The padded backend runs one bmm over all E experts × the
    # largest group, idle experts too, each of which also costs reading its weights; the grouped kernels
    # run the rows themselves plus a fixed cost per active group. Padded wins while its rows cost less:
    # with every expert active the crossover is about 1.75× padding at 8 rows per expert, 1.1× at 64, none
    # from 256. Its batch must also stay small (up to 8192 rows, 512 per expert: beyond that its
    # activations leave the cache and the chunked loop was faster, by a quarter or more at 64 experts ×
    # 256-512 rows). Otherwise large groups go to the chunked loop, which keeps activations in cache, and
    # the rest to torch's grouped_mm kernel.
    padded_rows = len(counts) * max(counts) + _IDLE_EXPERT_ROWS * (len(counts) - active)
    if padded_rows <= n + _GROUP_COST_ROWS * active and n <= _PADDED_MAX_ROWS and per_expert <= 512:
        return "padded"
    if per_expert >= 256:
        return "loop"
    return "grouped_mm" if grouped_ok else "loop"


def _silu_mul(h_NG: torch.Tensor) -> torch.Tensor:
    """``silu(g)·u`` for ``h = [g, u]``, under autograd (the device path)."""
    f = h_NG.shape[-1] // 2
    return F.silu(h_NG[..., :f]) * h_NG[..., f:]


def _swiglu(h_NG: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(s, a)`` for ``h = [g, u]``: the activation ``a = silu(g)·u`` and what the backward needs besides
    ``h``. With the fused kernels (:mod:`moeforge.model.cpu_kernels`: contiguous float32 on the host) ``a``
    comes from one pass and ``s`` is None (the backward recomputes the sigmoid); otherwise ``s = silu(g)``,
    kept as autograd would keep it for these two ops."""
    a_NF = cpu_kernels.swiglu_forward(h_NG)
    if a_NF is not None:
        return None, a_NF
    f = h_NG.shape[-1] // 2
    s_NF = F.silu(h_NG[..., :f])
    return s_NF, s_NF * h_NG[..., f:]


def _swiglu_backward(h_NG: torch.Tensor, s_NF: torch.Tensor | None, ga_NF: torch.Tensor) -> torch.Tensor:
    """``dL/dh`` for ``h = [g, u]`` given ``dL/da`` for ``a = silu(g)·u`` and ``s`` from :func:`_swiglu`.
    The fused kernel makes one pass; the ATen ops make three that allocate nothing but the result:
    ``dL/du = dL/da·s``, then ``dL/dg = silu'(g)·(dL/da·u)``. ``ga`` may be consumed (overwritten with
    ``dL/da·u``): callers pass a fresh matmul output. (Not an in-place ``silu_backward`` into the strided
    half of the result: aliased, that runs about six times slower on CPU.)"""
    gh_fused = cpu_kernels.swiglu_backward(h_NG, ga_NF)
    if gh_fused is not None:
        return gh_fused
    f = h_NG.shape[-1] // 2
    g, u = h_NG[..., :f], h_NG[..., f:]
    if s_NF is None:  # the forward took the fused kernel, this backward cannot (e.g. a strided gradient)
        s_NF = F.silu(g)
    gh = torch.empty_like(h_NG)
    torch.mul(ga_NF, s_NF, out=gh[..., f:])
    torch.ops.aten.silu_backward(ga_NF.mul_(u), g, grad_input=gh[..., :f])
    return gh


_CHUNK = 1024  # rows per matmul in the loop backend: keeps an expert's [rows, 2F] activations in cache


def _chunks(bounds: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(expert, start, end) row ranges of at most ``_CHUNK`` rows, expert by expert."""
    out = []
    for e, (s, t) in enumerate(bounds):
        for c in range(s, t, _CHUNK):
            out.append((e, c, min(c + _CHUNK, t)))
    return out


class _LoopSwiGLU(torch.autograd.Function):
    """Per expert and row chunk: matmul, activation, matmul while the chunk is still in cache."""

    @staticmethod
    def forward(ctx, x_ND, w13_EDG, w2_EFD, counts):  # type: ignore[override]
        y_ND = x_ND.new_empty(x_ND.shape[0], w2_EFD.shape[-1])
        chunks = _chunks(_bounds(counts))
        # (h, silu(g) or None with the host kernels, a) per chunk, kept for the backward: one [rows, 2F]
        # tensor per chunk rather than one for all rows, which at large batches is past glibc's mmap
        # threshold and so would come back as fresh pages every step, a page fault each 4 KiB
        acts: list[torch.Tensor | None] = []
        for e, s, t in chunks:
            h = torch.mm(x_ND[s:t], w13_EDG[e])
            acts += (h, *_swiglu(h))
            torch.mm(acts[-1], w2_EFD[e], out=y_ND[s:t])
        ctx.save_for_backward(x_ND, w13_EDG, w2_EFD, *acts)
        ctx.chunks = chunks
        return y_ND

    @staticmethod
    def backward(ctx, gy_ND):  # type: ignore[override]
        x_ND, w13_EDG, w2_EFD, *acts = ctx.saved_tensors
        gy_ND = gy_ND.contiguous()
        gx_ND = torch.empty_like(x_ND)
        (gw13, fresh13), (gw2, fresh2) = (
            _weight_grad(w, ctx.needs_input_grad[i]) for i, w in ((1, w13_EDG), (2, w2_EFD))
        )
        # Weight grads are written, not accumulated, by each expert's first chunk: no zero-fill pass over
        # E·D·3F floats; only experts that received no rows are zeroed. Into a persistent buffer
        # (grad_buffers) that already holds this step's earlier micro-batches, every chunk adds.
        seen: set[int] = set()
        per_chunk = zip(acts[0::3], acts[1::3], acts[2::3], strict=True)
        for (e, s, t), (h, silu, a) in zip(ctx.chunks, per_chunk, strict=True):
            gy = gy_ND[s:t]
            gh = _swiglu_backward(h, silu, gy @ w2_EFD[e].t())
            torch.mm(gh, w13_EDG[e].t(), out=gx_ND[s:t])
            first = e not in seen
            seen.add(e)
            if gw13 is not None:
                _mm_into(gw13[e], x_ND[s:t].t(), gh, first and fresh13)
            if gw2 is not None:
                _mm_into(gw2[e], a.t(), gy, first and fresh2)
        _zero_idle([(gw13, fresh13), (gw2, fresh2)], [e for e in range(w13_EDG.shape[0]) if e not in seen])
        return gx_ND, _returned(w13_EDG, gw13), _returned(w2_EFD, gw2), None


class _PaddedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w13_EDG, w2_EFD, expert_N, slot_N, capacity):  # type: ignore[override]
        e = w13_EDG.shape[0]
        x_ECD = x_ND.new_zeros(e, capacity, x_ND.shape[-1])
        x_ECD[expert_N, slot_N] = x_ND
        h_ECG = torch.bmm(x_ECD, w13_EDG)
        s_ECF, a_ECF = _swiglu(h_ECG)
        y_ECD = torch.bmm(a_ECF, w2_EFD)
        ctx.save_for_backward(x_ECD, w13_EDG, w2_EFD, h_ECG, s_ECF, a_ECF, expert_N, slot_N)
        return y_ECD[expert_N, slot_N]

    @staticmethod
    def backward(ctx, gy_ND):  # type: ignore[override]
        x_ECD, w13_EDG, w2_EFD, h_ECG, s_ECF, a_ECF, expert_N, slot_N = ctx.saved_tensors
        gy_ECD = gy_ND.new_zeros(x_ECD.shape)
        gy_ECD[expert_N, slot_N] = gy_ND
        ga_ECF = torch.bmm(gy_ECD, w2_EFD.transpose(1, 2))
        gh_ECG = _swiglu_backward(h_ECG, s_ECF, ga_ECF)
        gx_ND = torch.bmm(gh_ECG, w13_EDG.transpose(1, 2))[expert_N, slot_N]
        gw13, gw2 = None, None
        if ctx.needs_input_grad[1]:
            gw13 = _bmm_grad(w13_EDG, x_ECD.transpose(1, 2), gh_ECG)
        if ctx.needs_input_grad[2]:
            gw2 = _bmm_grad(w2_EFD, a_ECF.transpose(1, 2), gy_ECD)
        return gx_ND, gw13, gw2, None, None, None


class _HostGroupedSwiGLU(torch.autograd.Function):
    """``grouped_mm`` forward and backward for the host (CPU) path, with the SwiGLU backward fused
    (:func:`_swiglu_backward`) and the weight gradients written per expert into persistent buffers
    (:mod:`moeforge.model.grad_buffers`) instead of fresh ``[E, D, G]`` tensors."""

    @staticmethod
    def forward(ctx, x_ND, w13_EDG, w2_EFD, offs, counts):  # type: ignore[override]
        assert _GROUPED_MM is not None
        h_NG = _GROUPED_MM(x_ND, w13_EDG, offs=offs)
        s_NF, a_NF = _swiglu(h_NG)
        y_ND = _GROUPED_MM(a_NF, w2_EFD, offs=offs)
        ctx.save_for_backward(x_ND, w13_EDG, w2_EFD, h_NG, s_NF, a_NF, offs)
        ctx.bounds = _bounds(counts)
        return y_ND

    @staticmethod
    def backward(ctx, gy_ND):  # type: ignore[override]
        assert _GROUPED_MM is not None
        x_ND, w13_EDG, w2_EFD, h_NG, s_NF, a_NF, offs = ctx.saved_tensors
        gy_ND = gy_ND.contiguous()
        gh_NG = _swiglu_backward(h_NG, s_NF, _GROUPED_MM(gy_ND, w2_EFD.transpose(1, 2), offs=offs))
        gx_ND = _GROUPED_MM(gh_NG, w13_EDG.transpose(1, 2), offs=offs)
        (gw13, fresh13), (gw2, fresh2) = (
            _weight_grad(w, ctx.needs_input_grad[i]) for i, w in ((1, w13_EDG), (2, w2_EFD))
        )
        idle = []
        for e, (s, t) in enumerate(ctx.bounds):
            if s == t:
                idle.append(e)
                continue
            if gw13 is not None:
                _mm_into(gw13[e], x_ND[s:t].t(), gh_NG[s:t], fresh13)
            if gw2 is not None:
                _mm_into(gw2[e], a_NF[s:t].t(), gy_ND[s:t], fresh2)
        _zero_idle([(gw13, fresh13), (gw2, fresh2)], idle)
        return gx_ND, _returned(w13_EDG, gw13), _returned(w2_EFD, gw2), None, None


def _weight_grad(w: torch.Tensor, wanted: bool) -> tuple[torch.Tensor | None, bool]:
    """Where a weight's gradient goes: ``(tensor, fresh)`` — its persistent buffer (fresh: overwrite it)
    or a new uninitialized tensor (always fresh); ``(None, True)`` when no gradient is wanted."""
    if not wanted:
        return None, True
    if grad_buffers.buffered(w):
        return grad_buffers.target(w)
    return torch.empty_like(w), True


def _returned(w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor | None:
    """What backward returns for ``w``: nothing when the gradient went into its buffer."""
    return None if g is None or (grad_buffers.buffered(w) and g is w.main_grad) else g


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, write: bool) -> None:
    if write:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _zero_idle(grads: list[tuple[torch.Tensor | None, bool]], idle: list[int]) -> None:
    """Experts that got no rows: a fresh gradient is zero there (an accumulating one is left alone). One
    ``zero_`` (a memset) per expert: about twice as fast as ``g[idle] = 0`` (an indexed fill), which at many
    experts and few tokens was a sixth of the step."""
    for g, fresh in grads:
        if g is not None and fresh:
            for e in idle:
                g[e].zero_()


def _bmm_grad(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    if not grad_buffers.buffered(w):
        return torch.bmm(a, b)
    buf, fresh = grad_buffers.target(w)
    if fresh:
        torch.bmm(a, b, out=buf)
    else:
        buf.baddbmm_(a, b)
    return None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g.contiguous()


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    out, s = [], 0
    for c in counts:
        out.append((s, s + c))
        s += c
    return out


def grouped_swiglu(
    x_ND: torch.Tensor,
    w13_EDG: torch.Tensor,
    w2_EFD: torch.Tensor,
    counts_E: torch.Tensor,
    backend: Backend = "auto",
    *,
    tail: bool = False,
) -> torch.Tensor:
    """SwiGLU of each row through its expert: ``y[i] = (silu(x[i] W_gate) · x[i] W_up) W_down`` of its group.

    ``counts_E`` (int64, ``[E]``) gives the group sizes; rows must already be sorted by expert.
    ``tail``: rows may follow the last group (assignments a capacity dropped); their outputs (and
    gradients) are zero. Differentiable with respect to ``x`` and both weight tensors.

    On CUDA (and whenever ``grouped_mm`` is asked for and available) the group offsets stay on the device:
    nothing here reads ``counts_E`` on the host, so the forward and backward never wait for the GPU.
    """
    dev = x_ND.device.type
    if torch.is_autocast_enabled(dev):
        # Our kernels write into preallocated buffers (out= is outside autocast's reach) and run their own
        # backward (outside autocast): cast inputs once here, then run with autocast off, so forward and
        # backward see one dtype.
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _grouped_swiglu(x_ND.to(dt), w13_EDG.to(dt), w2_EFD.to(dt), counts_E, backend, tail)
    return _grouped_swiglu(x_ND, w13_EDG, w2_EFD, counts_E, backend, tail)


def _device_grouped(
    x_ND: torch.Tensor, w13_EDG: torch.Tensor, w2_EFD: torch.Tensor, counts_E: torch.Tensor, tail: bool
) -> torch.Tensor:
    """``grouped_mm`` with device offsets. Rows past the last offset are not any group's: a ``where``
    zeroes their outputs and (through its backward) their input gradients — no host-side slicing."""
    assert _GROUPED_MM is not None
    offs = torch.cumsum(counts_E, 0).to(torch.int32)
    valid_N1 = None
    if tail:
        valid_N1 = (torch.arange(x_ND.shape[0], device=x_ND.device) < offs[-1])[:, None]
        x_ND = torch.where(valid_N1, x_ND, 0.0)
    h_NG = _GROUPED_MM(x_ND, w13_EDG, offs=offs)
    # grouped_mm's backward rejects stride-0 (expanded) gradients, e.g. from .sum(): make them dense
    y_ND = _ContiguousGrad.apply(_GROUPED_MM(_silu_mul(h_NG), w2_EFD, offs=offs))
    return y_ND if valid_N1 is None else torch.where(valid_N1, y_ND, 0.0)


def _grouped_swiglu(
    x_ND: torch.Tensor,
    w13_EDG: torch.Tensor,
    w2_EFD: torch.Tensor,
    counts_E: torch.Tensor,
    backend: Backend,
    tail: bool = False,
) -> torch.Tensor:
    if x_ND.shape[0] == 0:
        return x_ND.new_zeros(0, w2_EFD.shape[-1]) + 0.0 * (w13_EDG.sum() + w2_EFD.sum())
    dims = (x_ND.shape[-1], w2_EFD.shape[1])
    # on the host, weights with persistent gradient buffers take _HostGroupedSwiGLU below
    host_buffers = not x_ND.is_cuda and (grad_buffers.buffered(w13_EDG) or grad_buffers.buffered(w2_EFD))
    device_path = (x_ND.is_cuda and backend in ("auto", "grouped_mm")) or (
        backend == "grouped_mm" and not host_buffers
    )
    if device_path and has_grouped_mm(x_ND.device, x_ND.dtype, dims):
        return _device_grouped(x_ND, w13_EDG, w2_EFD, counts_E, tail)
    counts = counts_E.tolist()  # the host-side backends (CPU) need the group sizes as numbers
    total = sum(counts)
    if tail and total < x_ND.shape[0]:  # dropped rows: zeros, outside the autograd of the experts
        head = _grouped_swiglu(x_ND[:total], w13_EDG, w2_EFD, counts_E, backend)
        return torch.cat([head, head.new_zeros(x_ND.shape[0] - total, head.shape[-1])])
    chosen = choose_backend(backend, x_ND, counts, w2_EFD.shape[1])
    if chosen == "grouped_mm":
        if host_buffers:
            offs = torch.cumsum(counts_E, 0).to(torch.int32)
            return _HostGroupedSwiGLU.apply(x_ND, w13_EDG, w2_EFD, offs, counts)
        return _device_grouped(x_ND, w13_EDG, w2_EFD, counts_E, False)
    if chosen == "padded":
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        expert_N = torch.repeat_interleave(torch.arange(len(counts), device=x_ND.device), counts_E)
        slot_N = torch.arange(x_ND.shape[0], device=x_ND.device) - starts_E[expert_N]
        return _PaddedSwiGLU.apply(x_ND, w13_EDG, w2_EFD, expert_N, slot_N, max(counts))
    return _LoopSwiGLU.apply(x_ND, w13_EDG, w2_EFD, counts)
