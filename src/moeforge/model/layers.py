"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention with a KV cache, SwiGLU.

Shapes are named in variable suffixes: B batch, T query positions, S key positions (cache + new),
H query heads, K key/value heads, Dh head dim, D model dim, F hidden dim, I/O a matrix's in/out dims.
The math matches transformers' Llama/Mixtral modules so weights move between them unchanged.

Decode forms. Besides its training ``forward``, each module that a decode step runs has a
``prepare_for_decode`` returning its *decode form*: the same math for one new token per row, on a copy of
the weights laid out for it (see :meth:`moeforge.model.transformer.MoETransformer.prepare_for_decode`).
A sublayer's form (:class:`AttentionDecode`, :class:`SwiGLUDecode`, and ``MoELayer``'s) takes the
residual stream ``x_BD`` and returns ``x_BD + sublayer(norm(x_BD))``: the pre-norm's weight is folded into
the projection after it and the residual add into the last matmul where that saves an operation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "AttentionDecode",
    "DecodeLinear",
    "KVCache",
    "Linear",
    "LinearFactory",
    "RMSNorm",
    "RopeDecode",
    "RotaryEmbedding",
    "SublayerDecode",
    "SwiGLU",
    "SwiGLUDecode",
    "apply_rope",
    "apply_rope_decode",
    "build_attention_mask",
]


class Linear(Protocol):
    """A decode form's projection: ``x_NI -> x_NI @ W.T`` for a weight ``W [O, I]``, and the bytes it holds."""

    def __call__(self, x_NI: torch.Tensor) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...


LinearFactory = Callable[..., Linear]
"""``factory(weight_OI, gemv=True) -> Linear``: how a decode form stores a projection it may lay out as
it likes (e.g. prepacked for a CPU GEMM kernel). ``gemv=False`` promises it is never called on a single
row. The default, :class:`DecodeLinear`, is the plain layout."""


class DecodeLinear:
    """``x @ W.T`` with ``W.T`` stored contiguous: a GEMV at full memory bandwidth for one row, where
    ``nn.Linear``'s ``[out, in]`` layout streams the weight at a fraction of it (docs/PERFORMANCE.md)."""

    def __init__(self, weight_OI: torch.Tensor, gemv: bool = True) -> None:
        del gemv  # the plain layout serves any row count
        self.wt_IO = weight_OI.detach().t().contiguous()

    def __call__(self, x_NI: torch.Tensor) -> torch.Tensor:
        return x_NI @ self.wt_IO

    @property
    def nbytes(self) -> int:
        return self.wt_IO.numel() * self.wt_IO.element_size()


class SublayerDecode(Protocol):
    """A block sublayer's decode form (what a new MLP type's ``prepare_for_decode(norm, linear)`` returns):
    ``step(x_BD)`` is ``x_BD + sublayer(norm(x_BD))`` for one token per row; ``nbytes`` counts the weight
    copies it made (not the model's own tensors it reads in place)."""

    def step(self, x_BD: torch.Tensor) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)`` with the mean taken in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's kernel computes exactly the expression below (bit-identical in float32), in one call
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x / sqrt(mean(x²) + eps)`` without the weight, in ``x``'s dtype: the decode forms fold the
        weight into the projection that follows (float32 is where they run)."""
        return x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + self.eps)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, rotate-half convention (GPT-NeoX / Llama), with cached cos/sin tables.

    ``forward(positions)`` returns ``(cos, sin)`` of shape ``[B, T, Dh]`` for integer positions ``[B, T]``;
    the tables grow on demand past ``max_seq_len``. Tables are float32 and cast to the input dtype.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_seq_len = max_seq_len
        self.register_buffer("cos_cached", torch.empty(0), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0), persistent=False)
        self.reset(max_seq_len)

    def reset(self, length: int | None = None, device: torch.device | str | None = None) -> None:
        """(Re)build the tables in float32 from ``theta`` — never from a buffer a dtype cast may have rounded."""
        length = length or self.max_seq_len
        device = device if device is not None else self.cos_cached.device
        if torch.device(device).type == "meta":
            device = "cpu"
        idx = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq_F = 1.0 / (self.theta ** (idx / self.head_dim))
        pos_T = torch.arange(length, dtype=torch.float32, device=device)
        freqs_TF = pos_T[:, None] * inv_freq_F[None, :]
        emb_TD = torch.cat([freqs_TF, freqs_TF], dim=-1)
        self.cos_cached = emb_TD.cos()
        self.sin_cached = emb_TD.sin()

    def forward(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions_BT.max().item()) + 1 if positions_BT.numel() else 0
        stale = self.cos_cached.dtype != torch.float32 or self.cos_cached.device != positions_BT.device
        if stale or needed > self.cos_cached.shape[0]:
            self.reset(max(needed, self.cos_cached.shape[0], self.max_seq_len), positions_BT.device)
        return self.cos_cached[positions_BT], self.sin_cached[positions_BT]

    def prepare_for_decode(self, length: int | None = None) -> RopeDecode:
        """The tables for positions below ``length`` (default ``max_seq_len``) in the form one-token steps use."""
        return RopeDecode(self, length or self.max_seq_len)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    cos = cos_BTD[:, None].to(x_BHTD.dtype)
    sin = sin_BTD[:, None].to(x_BHTD.dtype)
    return x_BHTD * cos + _rotate_half(x_BHTD) * sin


class RopeDecode:
    """RoPE tables for one token per row: :meth:`at` looks up ``(cos, signed sin)`` once per step for every
    layer, and :func:`apply_rope_decode` rotates with them in two operations."""

    def __init__(self, rope: RotaryEmbedding, length: int) -> None:
        rope(torch.tensor([[length - 1]]))  # makes sure the module's float32 tables cover the context
        cos, sin = rope.cos_cached[:length], rope.sin_cached[:length]  # [S, Dh]; cos is a view, not a copy
        half = cos.shape[-1] // 2
        self.cos_SD = cos
        self.sin_signed_SD = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    def at(self, positions_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, signed sin)`` ``[B, 1, Dh]`` at integer positions ``[B]`` (below the tables' length)."""
        return self.cos_SD[positions_B][:, None], self.sin_signed_SD[positions_B][:, None]


def apply_rope_decode(x_BHD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """:func:`apply_rope` for one position per row, with :meth:`RopeDecode.at`'s tables:
    ``rotate_half(x)·sin == roll(x, Dh/2)·(sin with its first half negated)``."""
    cos_B1D, sin_signed_B1D = cos_sin
    return torch.addcmul(x_BHD * cos_B1D, torch.roll(x_BHD, x_BHD.shape[-1] // 2, dims=-1), sin_signed_B1D)


class KVCache:
    """Preallocated key/value cache for all layers: ``[B, K, max_len, Dh]`` per layer.

    ``length`` is the number of positions already stored; :meth:`update` appends a layer's new keys
    and values and returns views of everything stored so far. :meth:`advance` moves ``length`` once per
    forward (after all layers have written).
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = k_BKTD.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, capacity {self.max_len}")
        self.k[layer][:, :, self.length : end] = k_BKTD
        self.v[layer][:, :, self.length : end] = v_BKTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def keep_rows(self, index_B: torch.Tensor) -> None:
        """Keep only the batch rows in ``index_B`` (in that order): a decode batch drops its finished
        sequences so they stop costing attention and memory."""
        self.k = [k.index_select(0, index_B) for k in self.k]
        self.v = [v.index_select(0, index_B) for v in self.v]


def build_attention_mask(
    t_new: int,
    past: int,
    doc_ids_BT: torch.Tensor | None = None,
    key_padding_BS: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Boolean attention mask ``[B|1, 1, T, S]`` (True = may attend), or None for plain causal attention.

    Query ``i`` (absolute position ``past + i``) sees key ``j`` when ``j <= past + i``; with ``doc_ids``
    (packed sequences, no cache) only keys of its own document; with ``key_padding`` (False = padding)
    never a padded key. Returns None when the causal rule alone applies and SDPA's ``is_causal`` can be used.
    """
    if doc_ids_BT is None and key_padding_BS is None and past == 0:
        return None
    if t_new == 1 and doc_ids_BT is None and key_padding_BS is None:
        return None  # one new token sees every cached position
    s = past + t_new
    q_pos = torch.arange(past, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask_TS = (k_pos <= q_pos)[None, None]
    if doc_ids_BT is not None:
        if past:
            raise ValueError("document masking applies to a full packed sequence, not to cached decoding")
        same_doc = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
        mask_TS = mask_TS & same_doc[:, None]
    if key_padding_BS is not None:
        mask_TS = mask_TS & key_padding_BS[:, None, None, :].bool()
    return mask_TS


class Attention(nn.Module):
    """Causal grouped-query attention through ``F.scaled_dot_product_attention`` (flash kernels on GPU)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        causal = mask is None and k.shape[2] == T and T > 1
        y_BHTD = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y_BHTD.transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def prepare_for_decode(self, norm: RMSNorm, linear: LinearFactory = DecodeLinear) -> AttentionDecode:
        """This attention preceded by ``norm`` (its block's pre-norm) as an :class:`AttentionDecode`."""
        return AttentionDecode(self, norm, linear)


class AttentionDecode:
    """``x + attention(norm(x))`` for one new token per row: query, key and value projections as one
    matrix with the norm's weight folded in (through ``linear``), the output projection in the plain
    layout so the residual add rides in its ``addmm``."""

    def __init__(self, attn: Attention, norm: RMSNorm, linear: LinearFactory) -> None:
        self.n_heads, self.n_kv, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.norm = norm
        w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) * norm.weight[None, :]
        self.qkv = linear(w)
        self.o = DecodeLinear(attn.o_proj.weight)
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]  # Qwen2's q/k/v biases (qkv_bias)
        self.qkv_bias = torch.cat(biases).detach() if attn.q_proj.bias is not None else None

    @property
    def nbytes(self) -> int:
        return self.qkv.nbytes + self.o.nbytes

    def step(
        self,
        x_BD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache,
        layer: int,
    ) -> torch.Tensor:
        """The residual stream after this sublayer; appends the new keys/values to ``cache`` layer
        ``layer`` (``cache.advance`` is the caller's, after every layer). ``cos_sin``: this step's
        :meth:`RopeDecode.at`; ``mask``: :func:`build_attention_mask` for one new token."""
        b = x_BD.shape[0]
        nh, nkv, dh = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv(self.norm.normalize(x_BD))
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        qk = apply_rope_decode(qkv[:, : (nh + nkv) * dh].view(b, nh + nkv, dh), cos_sin)
        v = qkv[:, (nh + nkv) * dh :].view(b, nkv, 1, dh)
        k_all, v_all = cache.update(layer, qk[:, nh:, None], v)
        y = F.scaled_dot_product_attention(
            qk[:, :nh, None], k_all, v_all, attn_mask=mask, enable_gqa=nkv != nh
        )
        return torch.addmm(x_BD, y.reshape(b, nh * dh), self.o.wt_IO)  # residual + o_proj in one call


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` — the dense MLP, and the shape of every expert."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    @torch.no_grad()
    def prepare_for_decode(self, norm: RMSNorm, linear: LinearFactory = DecodeLinear) -> SwiGLUDecode:
        """This MLP preceded by ``norm`` as a :class:`SwiGLUDecode`. Its two matrices stay in the plain
        layout whatever ``linear`` offers (taken for the common signature of MLP types)."""
        del linear
        return SwiGLUDecode(self, norm)


class SwiGLUDecode:
    """``x + swiglu(norm(x))`` for one token per row: gate and up as one plain-layout matrix."""

    def __init__(self, mlp: SwiGLU, norm: RMSNorm) -> None:
        self.norm = norm
        self.hidden = mlp.gate_proj.weight.shape[0]
        self.gate_up = DecodeLinear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down = DecodeLinear(mlp.down_proj.weight)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def step(self, x_BD: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(self.norm.normalize(x_BD) * self.norm.weight)
        return x_BD + self.down(F.silu(gu[:, : self.hidden]) * gu[:, self.hidden :])
