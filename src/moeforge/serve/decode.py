"""The decode step on CPU: the model's forward for one new token per row, with weights laid out for it.

A decode step multiplies a handful of rows (the batch) by every weight matrix, so it is bound by
reading weights from memory and by per-call overhead, not by arithmetic. ``nn.Linear`` keeps weights as
``[out, in]``, and the CPU GEMM for ``x @ W.T`` with 8 rows streams them at a third of the memory
bandwidth (docs/PERFORMANCE.md, "Decode"). :class:`Decoder` therefore keeps a second copy of the
weights, made once per engine:

* projections as ``W.T`` contiguous, so one row is a GEMV at full bandwidth; query, key and value side
  by side (one call instead of three), likewise a dense MLP's gate and up; each RMSNorm's weight folded
  into the projection after it;
* the LM head, the query/key/value projection and, per MoE layer, every expert's gate/up projection
  plus the router (one matrix) and every down projection (another) packed for MKL's packed GEMM at
  ``rows`` rows (``torch.ops.mkl._mkl_linear``: 12-14 GB/s at 8 rows where the plain GEMM reaches 5-8),
  else oneDNN's prepacked linear, else the plain layout, whichever first exists and agrees with
  ``x @ W.T`` on a probe.

An MoE layer whose batch gives every expert rows on average (``B·k >= E``) runs all experts and the
router as one GEMM and the down projections as another, with a zero routing weight where a row did not
choose an expert; a smaller batch routes with :meth:`Router.select` and runs only the chosen experts, on
their weights in place. A layer with a ``capacity_factor`` runs its own forward, since what it drops
depends on the whole batch. Every distinct operation right after a weight-streaming GEMM pays for cold
caches (40-60 us here), so the step is written in as few operations as it can be.

The math is the model's; float rounding differs (other GEMM kernels, folded norm weights, the routing
weight applied before the down projection), on the order of 1e-6 relative. ``tests/serve/test_decode.py``
pins the logits against ``MoETransformer.forward`` for dense, MoE, ghost, shared-expert, capacity and
padded-batch models. The copy costs about 2.5x the weights in memory (:attr:`Decoder.nbytes`; MKL's
packed buffers are larger than the weights); ``Engine(fast_decode=False)`` turns it off. Weights are
checked for changes (in-place updates bump a tensor's version) each time a batch starts, and the copy
is rebuilt when they changed.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from moeforge.model.layers import KVCache, SwiGLU, build_attention_mask
from moeforge.model.moe import MoELayer
from moeforge.model.transformer import MoETransformer

__all__ = ["Decoder", "fast_decode_supported"]

log = logging.getLogger(__name__)


def fast_decode_supported(model: MoETransformer) -> bool:
    """Whether :class:`Decoder` applies: a CPU model in float32 (on GPU the stock forward is the fast one)."""
    p = model.embed.weight
    return p.device.type == "cpu" and p.dtype == torch.float32


class _Plain:
    """``x @ W.T`` with ``W.T`` stored contiguous: a GEMV at full bandwidth for one row."""

    def __init__(self, weight_OI: torch.Tensor) -> None:
        self.wt_IO = weight_OI.detach().t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.wt_IO

    @property
    def nbytes(self) -> int:
        return self.wt_IO.numel() * self.wt_IO.element_size()


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


def _unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + eps)


class _AttentionWeights:
    def __init__(self, block: torch.nn.Module, rows: int) -> None:
        a = block.attn
        self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.eps = block.attn_norm.eps
        w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) * block.attn_norm.weight[None, :]
        self.qkv = _Packed(w, rows)
        self.o = _Plain(a.o_proj.weight)
        biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]  # Qwen2's q/k/v biases (qkv_bias)
        self.qkv_bias = torch.cat(biases).detach() if a.q_proj.bias is not None else None


class _DenseMLPWeights:
    def __init__(self, mlp: SwiGLU) -> None:
        self.hidden = mlp.gate_proj.weight.shape[0]
        self.gate_up = _Plain(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down = _Plain(mlp.down_proj.weight)

    def __call__(self, h_BD: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(h_BD)
        return self.down(F.silu(gu[:, : self.hidden]) * gu[:, self.hidden :])


class _MoEWeights:
    """One MoE layer, given its input as unit-RMS rows (the norm's weight is folded in here): for batches
    that touch most experts, all experts and the router as one prepacked GEMM, the down projections as
    another; for the others, the chosen experts' weights in place."""

    def __init__(self, layer: MoELayer, norm_weight: torch.Tensor, rows: int) -> None:
        self.layer, self.norm_weight = layer, norm_weight
        slots, d, g = layer.w13.shape
        self.slots, self.hidden, self.top_k = slots, g // 2, layer.top_k
        r = layer.router
        self.plain_topk = r.renormalize and not (r.straight_through or r.aux_free_bias_rate or r.num_ghost)
        # [out, in] rows: every expert's gate/up columns, then the router's logits (only batches of 2+
        # rows take this path: no GEMV copy)
        up = torch.cat(
            [layer.w13.detach().permute(0, 2, 1).reshape(slots * g, d), layer.router.weight.detach()]
        )
        self.w13_router = _Packed(up * norm_weight[None, :], rows, gemv=False)
        self.w2_all = _Packed(layer.w2.detach().reshape(slots * self.hidden, d).t(), rows, gemv=False)

    def __call__(self, xhat_BD: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        b = xhat_BD.shape[0]
        if layer.cfg.capacity_factor is not None:  # drops depend on the whole batch: the layer decides
            return layer(xhat_BD * self.norm_weight, stats=False)[0]
        ghost_alpha = layer.ghost_alpha if layer.num_ghost else None
        h_BD: torch.Tensor | None = None
        if b > 1 and b * self.top_k >= self.slots:  # most experts get a row: run them all
            out = self._all_experts(xhat_BD, ghost_alpha)
        else:
            h_BD = xhat_BD * self.norm_weight
            indices_Bk, weights_Bk = layer.router.select(h_BD, ghost_alpha)
            out = self._chosen_experts(h_BD, indices_Bk.tolist(), self._ghost_scaled(indices_Bk, weights_Bk))
        if layer.shared is not None:
            h_BD = xhat_BD * self.norm_weight if h_BD is None else h_BD
            s_BD = layer.shared(h_BD)
            if layer.shared_gate is not None:
                s_BD = torch.sigmoid(layer.shared_gate(h_BD)) * s_BD
            out = out + s_BD
        return out

    def _ghost_scaled(self, indices_Bk: torch.Tensor, weights_Bk: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not layer.num_ghost:
            return weights_Bk
        scale_E = torch.cat([layer.ghost_alpha.new_ones(layer.num_experts), layer.ghost_alpha])
        return weights_Bk * scale_E.to(weights_Bk.dtype)[indices_Bk]

    def _all_experts(self, xhat_BD: torch.Tensor, ghost_alpha: torch.Tensor | None) -> torch.Tensor:
        b, f, e = xhat_BD.shape[0], self.hidden, self.slots
        both = self.w13_router(xhat_BD)
        logits_BE = both[:, 2 * f * e :]
        if self.plain_topk:
            # renormalized top-k of a softmax is the softmax of the top-k logits: two operations, not
            # four (every distinct operation after a weight-streaming GEMM pays for a cold cache)
            top_Bk, indices_Bk = torch.topk(logits_BE, self.top_k, dim=-1)
            weights_Bk = torch.softmax(top_Bk, dim=-1)
        else:
            indices_Bk, weights_Bk = self.layer.router.select_from_logits(logits_BE, ghost_alpha)
            weights_Bk = self._ghost_scaled(indices_Bk, weights_Bk.to(xhat_BD.dtype))
        w_BE = xhat_BD.new_zeros(b, e).scatter_(1, indices_Bk, weights_Bk)
        h_BEG = both[:, : 2 * f * e].view(b, e, 2 * f)
        a_BEF = F.silu(h_BEG[..., :f]) * h_BEG[..., f:]
        return self.w2_all((a_BEF * w_BE[:, :, None]).view(b, e * f))

    def _chosen_experts(
        self, h_BD: torch.Tensor, chosen: list[list[int]], w_Bk: torch.Tensor
    ) -> torch.Tensor:
        """Each chosen expert once, on the rows that chose it, its weights read in place."""
        w13, w2, f = self.layer.w13, self.layer.w2, self.hidden
        if h_BD.shape[0] == 1:  # one row: no gather, no scatter; the weighted sum folded into addmm
            out: torch.Tensor | None = None
            for e, w in zip(chosen[0], w_Bk[0].tolist(), strict=True):
                hg = h_BD @ w13[e]
                a = F.silu(hg[:, :f]) * hg[:, f:]
                out = a @ w2[e] * w if out is None else torch.addmm(out, a, w2[e], alpha=w)
            assert out is not None
            return out
        by_expert: dict[int, tuple[list[int], list[int]]] = {}
        for n, row in enumerate(chosen):
            for j, e in enumerate(row):
                rows, slots = by_expert.setdefault(e, ([], []))
                rows.append(n)
                slots.append(j)
        out = h_BD.new_zeros(h_BD.shape)
        for e, (rows, slots) in by_expert.items():
            rows_t = torch.tensor(rows, device=h_BD.device)
            w = w_Bk[rows_t, torch.tensor(slots, device=h_BD.device)][:, None]
            hg = h_BD.index_select(0, rows_t) @ w13[e]
            out.index_add_(0, rows_t, (F.silu(hg[:, :f]) * hg[:, f:]) @ w2[e] * w)
        return out


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
        m, rows = self.model, self.rows
        with torch.no_grad():
            self.attn = [_AttentionWeights(b, rows) for b in m.blocks]
            self.mlp: list[_DenseMLPWeights | _MoEWeights] = [
                _MoEWeights(b.mlp, b.mlp_norm.weight, rows)
                if isinstance(b.mlp, MoELayer)
                else _DenseMLPWeights(b.mlp)
                for b in m.blocks
            ]
            # RoPE tables; rotate_half(x)·sin == roll(x, half)·(sin with its first half negated)
            s = m.cfg.max_seq_len
            m.rope(torch.tensor([[s - 1]]))  # makes sure the module's float32 tables cover the context
            cos, sin = m.rope.cos_cached[:s], m.rope.sin_cached[:s]  # [S, Dh]; cos is a view, not a copy
            half = cos.shape[-1] // 2
            self.cos, self.sin_signed = cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            self.lm_head = _Packed(m.lm_head.weight * m.norm.weight[None, :], rows)
        self._seen = self._sources()

    @property
    def nbytes(self) -> int:
        """Bytes the decode-friendly copy of the weights holds (beyond the model's own)."""
        linears: list[_Plain | _Packed] = [self.lm_head]
        for a in self.attn:
            linears += [a.qkv, a.o]
        for m in self.mlp:
            linears += [m.w13_router, m.w2_all] if isinstance(m, _MoEWeights) else [m.gate_up, m.down]
        return sum(lin.nbytes for lin in linears)

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
        ``positions_B`` (below the model's ``max_seq_len``); appends the tokens' keys and values to ``cache``. ``key_padding_BS``
        ``[B, cache.length + 1]`` (False = padding) as in :meth:`MoETransformer.forward`."""
        m = self.model
        b = ids_B.shape[0]
        cos_BD, sin_signed = (
            self.cos[positions_B][:, None],
            self.sin_signed[positions_B][:, None],
        )  # [B, 1, Dh]
        half = cos_BD.shape[-1] // 2
        mask = build_attention_mask(1, cache.length, None, key_padding_BS, device=ids_B.device)
        x = m.embed(ids_B)
        for i, (block, attn, mlp) in enumerate(zip(m.blocks, self.attn, self.mlp, strict=True)):
            nh, nkv, dh = attn.n_heads, attn.n_kv, attn.head_dim
            qkv = attn.qkv(_unit_rms(x, attn.eps))
            if attn.qkv_bias is not None:
                qkv = qkv + attn.qkv_bias
            qk = qkv[:, : (nh + nkv) * dh].view(b, nh + nkv, dh)
            qk = torch.addcmul(qk * cos_BD, torch.roll(qk, half, dims=-1), sin_signed)
            v = qkv[:, (nh + nkv) * dh :].view(b, nkv, 1, dh)
            k_all, v_all = cache.update(i, qk[:, nh:, None], v)
            y = F.scaled_dot_product_attention(
                qk[:, :nh, None], k_all, v_all, attn_mask=mask, enable_gqa=nkv != nh
            )
            x = torch.addmm(x, y.reshape(b, nh * dh), attn.o.wt_IO)  # residual + o_proj in one call
            xhat = _unit_rms(x, block.mlp_norm.eps)
            x = x + (mlp(xhat) if isinstance(mlp, _MoEWeights) else mlp(xhat * block.mlp_norm.weight))
        cache.advance(1)
        return self.lm_head(_unit_rms(x, m.norm.eps))
