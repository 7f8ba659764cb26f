"""Persistent weight-gradient buffers for the expert weights (Megatron's ``main_grad`` idea).

An MoE layer's backward produces a gradient for every expert's weights, ``E · 3 · D · F`` floats, whatever
the number of tokens. Autograd allocates that fresh each step; on the CPU an allocation that large comes
from ``mmap`` in glibc, so every step pays a page fault per 4 KiB and a zero-fill of memory it then
overwrites. With a buffer attached (:func:`attach`), the grouped SwiGLU's backward
(:mod:`moeforge.model.dispatch`) writes the expert weight gradients straight into ``param.main_grad``:
the first backward after :func:`begin_step` *writes* (no zero pass), later ones (gradient accumulation)
add. :func:`publish` then hands the buffer to the optimizer as ``param.grad`` (the same storage, no copy).

The lifecycle, per optimizer step::

    begin_step(params)        # after zero_grad: the next backward writes instead of adding
    loss.backward() × k       # dispatch writes / accumulates into p.main_grad, returns no grad for p
    publish(params)           # p.grad = p.main_grad (or adds it to a grad autograd produced as well)
    clip, optimizer.step(), optimizer.zero_grad(set_to_none=True)

Only the expert weight tensors themselves take this path (a cast copy under autocast does not carry the
buffer, so it falls back to autograd). Under DDP, FSDP and expert parallelism the buffers are not
attached: those wrappers reduce gradients from autograd hooks, which a gradient written outside autograd
would bypass. On CUDA the caching allocator already reuses memory, so the buffers only matter on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["attach", "begin_step", "buffered", "detach", "publish", "target"]


def attach(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Give each parameter a persistent ``main_grad`` buffer; returns the parameters that got one."""
    out = []
    for p in params:
        if not p.requires_grad:
            continue
        p.main_grad = torch.empty_like(p)  # type: ignore[attr-defined]
        p.main_grad_fresh = True  # type: ignore[attr-defined]
        p.main_grad_published = False  # type: ignore[attr-defined]
        out.append(p)
    return out


def detach(params: Iterable[torch.Tensor]) -> None:
    """Drop the buffers (gradients go through autograd again)."""
    for p in params:
        for name in ("main_grad", "main_grad_fresh", "main_grad_published"):
            if hasattr(p, name):
                delattr(p, name)


def buffered(w: torch.Tensor) -> bool:
    """Whether backward should write ``w``'s gradient into its buffer (``w`` is the parameter itself)."""
    return hasattr(w, "main_grad") and w.requires_grad


def target(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(buffer, fresh)`` for a backward about to produce ``w``'s gradient; marks the buffer written.
    ``fresh``: overwrite (the first backward since :func:`begin_step`); else add to it."""
    fresh = bool(w.main_grad_fresh)  # type: ignore[attr-defined]
    w.main_grad_fresh = False  # type: ignore[attr-defined]
    w.main_grad_published = False  # type: ignore[attr-defined]
    return w.main_grad, fresh  # type: ignore[attr-defined]


def begin_step(params: Iterable[torch.Tensor]) -> None:
    """Mark every buffer stale: the next backward overwrites it."""
    for p in params:
        p.main_grad_fresh = True  # type: ignore[attr-defined]
        p.main_grad_published = False  # type: ignore[attr-defined]


def publish(params: Iterable[torch.Tensor]) -> None:
    """Hand each written buffer to the optimizer as ``p.grad`` (added to any gradient autograd also
    produced for ``p``, e.g. from an empty batch's zero path). A buffer no backward wrote leaves ``p.grad``
    as it is."""
    for p in params:
        if p.main_grad_fresh or p.main_grad_published:  # type: ignore[attr-defined]
            continue  # nothing written since begin_step, or already handed over
        p.main_grad_published = True  # type: ignore[attr-defined]
        if p.grad is None:
            p.grad = p.main_grad  # type: ignore[attr-defined]
        # (a grad left from an earlier step without zero_grad is the buffer itself: nothing to add)
        elif p.grad.data_ptr() != p.main_grad.data_ptr():  # type: ignore[attr-defined]
            p.grad.add_(p.main_grad)  # type: ignore[attr-defined]
