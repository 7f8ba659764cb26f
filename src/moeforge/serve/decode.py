"""The CPU decode path: the model's decode form (:meth:`MoETransformer.prepare_for_decode`) on weights
prepacked for this machine's GEMM kernels, kept in step with the model's weights, on a thread count
chosen per step (:mod:`moeforge.serve.threads`).

A decode step multiplies a handful of rows (the batch) by every weight matrix, so it is bound by
reading weights from memory and by per-call overhead, not by arithmetic. The model's decode form lays its
weights out for that (``W.T`` contiguous, query/key/value and gate/up fused, norm weights folded in,
an MoE layer's experts and router stacked; see ``moeforge.model``); this module decides how the
projections worth it are stored: prepacked for a GEMM of ``rows`` rows by oneDNN
(``torch.ops.mkldnn._linear_pointwise``) or MKL (``torch.ops.mkl._mkl_linear``), in the order
:func:`default_kernels` gives for this CPU (MKL first on Intel, oneDNN first elsewhere), else the plain
layout, whichever first exists and agrees with ``x @ W.T`` on a probe (:class:`_Packed`, the :data:`~moeforge.model.layers.LinearFactory` handed to the model; the dense MLPs'
matrices are swapped for prepacked ones afterwards, :func:`_pack_dense_mlps`). :class:`Decoder` holds the
form, rebuilds it when the weights change and runs its steps, optionally through ``torch.compile``.

``tests/serve/test_decode.py`` pins the logits against ``MoETransformer.forward`` for dense, MoE, ghost,
shared-expert, capacity and padded-batch models (``tests/model/test_decode_forms.py`` each module's form;
``tests/serve/test_threads.py`` the thread policy and the tokens across thread counts). The copy costs
memory beside the weights (:attr:`Decoder.nbytes`: with oneDNN's packing about 1.4x the weights for
``small`` and 1.9x for SmolLM2-135M, whose dense MLPs keep a plain copy for one row and a packed one for
more; MKL's packed buffers would be about 2.4x the matrices they pack); ``Engine(fast_decode=False)``
turns it off. Weights are checked for changes (in-place updates bump a tensor's version) each time a
batch starts, and the copy is rebuilt when they changed.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from moeforge.model.layers import DecodeLinear, KVCache, SwiGLUDecode
from moeforge.model.transformer import MoETransformer, TransformerDecode
from moeforge.serve.threads import DecodeThreads

__all__ = [
    "Decoder",
    "cpu_vendor",
    "default_kernels",
    "fast_decode_supported",
    "moe_one_row_threads",
]

log = logging.getLogger(__name__)


@functools.cache
def cpu_vendor() -> str:
    """The CPU vendor from ``/proc/cpuinfo`` (``GenuineIntel``, ``AuthenticAMD``, ...); ``""`` unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def default_kernels(vendor: str | None = None) -> tuple[str, ...]:
    """The prepacked GEMMs the decoder tries, in order, for a CPU of ``vendor`` (default: this one's).

    MKL dispatches its optimized code on Intel CPUs only and takes a generic path elsewhere, so MKL's
    packed GEMM goes first on Intel and oneDNN's (which picks its code by instruction set, whoever made
    the CPU) first everywhere else. Measured with ``small`` (benchmarks/notes/generate.md): on an AMD
    EPYC oneDNN ran a batch-8 step about twice as fast as MKL; on an Intel Xeon MKL ran it about a
    fifth faster than oneDNN."""
    vendor = cpu_vendor() if vendor is None else vendor
    return ("mkl", "onednn") if vendor == "GenuineIntel" else ("onednn", "mkl")


def moe_one_row_threads(vendor: str | None = None) -> int | None:
    """The most threads a one-row step of an MoE model gets on a CPU of ``vendor`` (None: no limit).

    A one-row MoE step runs the chosen experts as GEMVs on their weights in place. On an AMD EPYC a
    second thread did not speed those up and only added barriers, so they stay on one thread there (and
    on CPUs not measured); on an Intel Xeon two threads took about a quarter off the step."""
    vendor = cpu_vendor() if vendor is None else vendor
    return None if vendor == "GenuineIntel" else 1


COMPILE_ENV = "MOEFORGE_DECODE_COMPILE"


@torch.library.custom_op("moeforge::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, n_out: int) -> torch.Tensor:
    """oneDNN's prepacked linear as an opaque op for ``torch.compile``: inductor's own lowering of it
    wants the weight frozen into the graph, which a weight held outside an ``nn.Module`` is not."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@_onednn_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, n_out: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n_out)


def fast_decode_supported(model: MoETransformer) -> bool:
    """Whether :class:`Decoder` applies: a CPU model in float32 (on GPU the stock forward is the fast one)."""
    p = model.embed.weight
    return p.device.type == "cpu" and p.dtype == torch.float32


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max())))


class _Packed:
    """``x @ W.T`` with ``W`` prepacked for a GEMM of ``rows`` rows by the first of ``kernels`` that
    exists and agrees with ``x @ W.T`` on a probe: ``"mkl"``, MKL's packed GEMM (it needs exactly
    ``rows`` rows, so fewer are zero-padded and more are chunked), or ``"onednn"``, oneDNN's prepacked
    linear (any row count); else the plain layout. With ``gemv``, a single row on one thread goes
    through the plain layout (a GEMV there is at the bandwidth one core gets), at the cost of a plain
    copy too; on more threads oneDNN takes it (:meth:`_threaded_gemv`)."""

    def __init__(
        self,
        weight_OI: torch.Tensor,
        rows: int,
        *,
        gemv: bool = True,
        kernels: tuple[str, ...] = ("mkl", "onednn"),
    ) -> None:
        w = weight_OI.detach().contiguous()
        self.rows, (self.n_out, self.n_in) = rows, w.shape
        self.kind = "plain"
        self.packed: torch.Tensor | None = None
        self.wt_IO: torch.Tensor | None = None
        probe = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(0))
        ref = probe @ w.t()
        for kind in kernels:
            try:
                if kind == "mkl":
                    self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
                    # the kernel reads only the packed copy when the row count matches; the original
                    # weight it takes for the shape (and for a fallback we never trigger) can be a
                    # stride-0 stand-in
                    self.shape_only = w.new_zeros(1).expand(w.shape)
                    got = self._mkl(probe)
                elif kind == "onednn":
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
                    got = self._onednn(probe)
                else:
                    raise ValueError(f"unknown kernel {kind!r} (mkl, onednn)")
                if not _close(got, ref):
                    raise RuntimeError(f"{kind}'s prepacked GEMM disagrees with x @ W.T")
                self.kind = kind
                break
            except (RuntimeError, AttributeError) as exc:
                log.debug("%s prepacked GEMM unavailable (%s)", kind, exc)
                self.packed = None
        if self.kind == "plain":
            log.debug("no prepacked GEMM of %s; plain layout", kernels)
        if gemv or self.kind == "plain":
            self.wt_IO = w.t().contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed copy (MKL's format pads, about 2.4x for fp32) and the plain one."""
        held = [t for t in (self.packed, self.wt_IO) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def _threaded_gemv(self) -> bool:
        """Whether one row goes through oneDNN rather than the plain GEMV: on more than one thread,
        where oneDNN splits the weight across the threads and the plain GEMV hardly does (measured on
        SmolLM2's matrices: about a quarter faster on two threads, slower on one)."""
        return self.kind == "onednn" and torch.get_num_threads() > 1

    def _mkl(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkl._mkl_linear(x, self.packed, self.shape_only, None, self.rows)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _onednn_linear(x, self.packed, self.n_out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if self.kind == "plain" or (m == 1 and self.wt_IO is not None and not self._threaded_gemv()):
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


def _pack_dense_mlps(form: TransformerDecode, linear: functools.partial[_Packed]) -> None:
    """Give the dense MLPs' decode forms (:class:`~moeforge.model.layers.SwiGLUDecode`, which keeps its
    gate/up and down matrices in the plain layout whatever ``linear`` offers) prepacked matrices too.

    At 8 rows the plain layout's GEMM streams the weight at about half the rate of the prepacked one,
    and a dense model's MLPs are most of its weights: on SmolLM2-135M this cut a batch-8 step by about
    two fifths (benchmarks/notes/generate.md). One row still takes the GEMV (``_Packed`` keeps the plain
    copy for it), so batch 1 is unchanged. The forms keep their own arithmetic; only the two callables
    are swapped, so the logits stay within GEMM rounding of the model's forward."""
    for block in form.blocks:
        mlp = block.mlp
        if isinstance(mlp, SwiGLUDecode) and isinstance(mlp.gate_up, DecodeLinear):
            mlp.gate_up = linear(mlp.gate_up.wt_IO.t())
            mlp.down = linear(mlp.down.wt_IO.t())


class Decoder:
    """One-token decode steps of ``model`` (see the module docstring); made by the engine.

    ``rows``: the batch size the packed weights are tuned for (the engine's ``max_batch``); any batch
    size works. ``threads``: how many threads each step runs on (:class:`~moeforge.serve.threads.DecodeThreads`;
    default: chosen per step from the batch size and the machine's load); the caller's torch thread
    count is back after every step. ``kernels``: the prepacked GEMMs to try for the projections, in
    order (:class:`_Packed`; default: :func:`default_kernels` for this CPU). ``compile`` (default: the
    environment variable ``MOEFORGE_DECODE_COMPILE`` set to 1): steps of two or more rows through ``torch.compile`` (opt-in: a compile of tens of seconds
    at the first step of each new shape, for a few percent; benchmarks/notes/generate.md).
    """

    def __init__(
        self,
        model: MoETransformer,
        rows: int = 8,
        *,
        threads: DecodeThreads | None = None,
        kernels: tuple[str, ...] | None = None,
        compile: bool | None = None,
    ) -> None:
        if not fast_decode_supported(model):
            raise ValueError("the fast decode path is for float32 models on CPU")
        self.model = model
        self.rows = min(max(rows, 2), 16)
        self.threads = threads if threads is not None else DecodeThreads()
        if self.threads.one_row is None and model.moe_layers():
            # an MoE layer's one-row step runs the chosen experts as small GEMVs on their weights in
            # place; whether a second thread helps them depends on the CPU (moe_one_row_threads); a
            # dense model's one-row GEMVs go through oneDNN on several threads and gain
            self.threads.one_row = moe_one_row_threads()
        if kernels is None:
            kernels = default_kernels()
        if compile is None:
            compile = os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        # MKL's packed GEMM takes a stride-0 stand-in weight that inductor cannot lower: oneDNN only
        self.kernels = tuple(k for k in kernels if k != "mkl") if compile else kernels
        self.compile = compile
        self._compiled: Any = None
        self._build()

    def _sources(self) -> list[tuple[torch.Tensor, int]]:
        return [(p, p._version) for p in self.model.parameters()]

    def _build(self) -> None:
        linear = functools.partial(_Packed, rows=self.rows, kernels=self.kernels)
        self.form: TransformerDecode = self.model.prepare_for_decode(linear)
        _pack_dense_mlps(self.form, linear)
        self._seen = self._sources()
        self._compiled = torch.compile(self.form.step) if self.compile else None

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
        :meth:`MoETransformer.forward`. Runs on :attr:`threads`' count for this batch size; with
        ``compile``, a step of two or more rows runs ``torch.compile``'s version of the form's step (one
        row stays eager: an MoE layer's routing at one row is data-dependent and breaks the graph)."""
        step = self._compiled if self._compiled is not None and ids_B.shape[0] > 1 else self.form.step
        with self.threads.use(ids_B.shape[0]):
            return step(ids_B, positions_B, cache, key_padding_BS)
