"""The CPU decode path: the model's decode form (:meth:`MoETransformer.prepare_for_decode`) on weights
prepacked for this machine's GEMM kernels, kept in step with the model's weights.

A decode step multiplies a handful of rows (the batch) by every weight matrix, so it is bound by
reading weights from memory and by per-call overhead, not by arithmetic. The model's decode form lays its
weights out for that (``W.T`` contiguous, query/key/value and gate/up fused, norm weights folded in,
an MoE layer's experts and router stacked; see ``moeforge.model``); this module decides how the
projections worth it are stored: packed for MKL's packed GEMM at ``rows`` rows
(``torch.ops.mkl._mkl_linear``: 12-14 GB/s at 8 rows where the plain GEMM reaches 5-8; docs/PERFORMANCE.md,
"Decode"), else oneDNN's prepacked linear, else the plain layout, whichever first exists and agrees with
``x @ W.T`` on a probe (:class:`_Packed`, the :data:`~moeforge.model.layers.LinearFactory` handed to the
model). :class:`Decoder` holds the form, rebuilds it when the weights change and runs its steps.

``tests/serve/test_decode.py`` pins the logits against ``MoETransformer.forward`` for dense, MoE, ghost,
shared-expert, capacity and padded-batch models (``tests/model/test_decode_forms.py`` each module's form).
The copy costs about 2.5x the weights in memory (:attr:`Decoder.nbytes`; MKL's packed buffers are larger
than the weights); ``Engine(fast_decode=False)`` turns it off. Weights are checked for changes (in-place
updates bump a tensor's version) each time a batch starts, and the copy is rebuilt when they changed.
"""

from __future__ import annotations

import functools
import logging

import torch

from moeforge.model.layers import KVCache
from moeforge.model.transformer import MoETransformer, TransformerDecode

__all__ = ["Decoder", "fast_decode_supported"]

log = logging.getLogger(__name__)


def fast_decode_supported(model: MoETransformer) -> bool:
    """Whether :class:`Decoder` applies: a CPU model in float32 (on GPU the stock forward is the fast one)."""
    p = model.embed.weight
    return p.device.type == "cpu" and p.dtype == torch.float32


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max())))


class _Packed:
    """``x @ W.T`` with ``W`` prepacked for a GEMM of ``rows`` rows: MKL's packed GEMM (the fastest at
    2-16 rows; it needs exactly ``rows`` rows, so fewer are zero-padded and more are chunked), else
    oneDNN's prepacked linear (any row count), else the plain layout when neither kernel exists or
    agrees with ``x @ W.T`` on a probe. With ``gemv``, a single row goes through the plain layout (a
    GEMV is at full bandwidth already), at the cost of a plain copy too."""

    def __init__(self, weight_OI: torch.Tensor, rows: int, *, gemv: bool = True) -> None:
        w = weight_OI.detach().contiguous()
        self.rows, self.n_in = rows, w.shape[1]
        self.kind = "plain"
        self.wt_IO: torch.Tensor | None = None
        probe = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(0))
        ref = probe @ w.t()
        try:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            # the kernel reads only the packed copy when the row count matches; the original weight it
            # takes for the shape (and for a fallback we never trigger) can be a stride-0 stand-in
            self.shape_only = w.new_zeros(1).expand(w.shape)
            self.kind = "mkl"
            if not _close(self._mkl(probe), ref):
                raise RuntimeError("MKL's packed GEMM disagrees with x @ W.T")
        except (RuntimeError, AttributeError) as exc:
            log.debug("MKL packed GEMM unavailable (%s)", exc)
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
                self.kind = "onednn"
                if not _close(self._onednn(probe), ref):
                    raise RuntimeError("oneDNN's prepacked linear disagrees with x @ W.T") from None
            except (RuntimeError, AttributeError) as exc2:
                log.debug("oneDNN prepacked linear unavailable (%s); plain layout", exc2)
                self.kind, self.packed = "plain", None
        if gemv or self.kind == "plain":
            self.wt_IO = w.t().contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed copy (MKL's format pads, about 2.4x for fp32) and the plain one."""
        held = [t for t in (self.packed, self.wt_IO) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def _mkl(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkl._mkl_linear(x, self.packed, self.shape_only, None, self.rows)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if self.wt_IO is not None and (m == 1 or self.kind == "plain"):
            return x @ self.wt_IO
        if self.kind == "onednn":
            return self._onednn(x)
        if m == self.rows:
            return self._mkl(x)
        if m < self.rows:
            padded = x.new_zeros(self.rows, self.n_in)
            padded[:m] = x
            return self._mkl(padded)[:m]
        return torch.cat([self(x[i : i + self.rows]) for i in range(0, m, self.rows)])


class Decoder:
    """One-token decode steps of ``model`` (see the module docstring); made by the engine.

    ``rows``: the batch size the packed weights are tuned for (the engine's ``max_batch``); any batch
    size works.
    """

    def __init__(self, model: MoETransformer, rows: int = 8) -> None:
        if not fast_decode_supported(model):
            raise ValueError("the fast decode path is for float32 models on CPU")
        self.model = model
        self.rows = min(max(rows, 2), 16)
        self._build()

    def _sources(self) -> list[tuple[torch.Tensor, int]]:
        return [(p, p._version) for p in self.model.parameters()]

    def _build(self) -> None:
        self.form: TransformerDecode = self.model.prepare_for_decode(
            functools.partial(_Packed, rows=self.rows)
        )
        self._seen = self._sources()

    @property
    def nbytes(self) -> int:
        """Bytes the decode-friendly copy of the weights holds (beyond the model's own)."""
        return self.form.nbytes

    def refresh(self) -> bool:
        """Rebuild the copy if a weight of the model was replaced or changed in place; True if it was."""
        seen = self._sources()
        if len(seen) == len(self._seen) and all(
            p is q and v == w for (p, v), (q, w) in zip(seen, self._seen, strict=True)
        ):
            return False
        log.info("model weights changed since the decode copy was made; rebuilding it")
        self._build()
        return True

    @torch.inference_mode()
    def step(
        self,
        ids_B: torch.Tensor,
        positions_B: torch.Tensor,
        cache: KVCache,
        key_padding_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, V]`` of the next token after ``ids_B`` (one new token per row) at RoPE positions
        ``positions_B`` (below the model's ``max_seq_len``); appends the tokens' keys and values to
        ``cache``. ``key_padding_BS`` ``[B, cache.length + 1]`` (False = padding) as in
        :meth:`MoETransformer.forward`."""
        return self.form.step(ids_B, positions_B, cache, key_padding_BS)
