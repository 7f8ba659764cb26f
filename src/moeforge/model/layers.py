"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention with a KV cache, SwiGLU.

Shapes are named in variable suffixes: B batch, T query positions, S key positions (cache + new),
H query heads, K key/value heads, Dh head dim, D model dim, F hidden dim.
The math matches transformers' Llama/Mixtral modules so weights move between them unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "KVCache", "RMSNorm", "RotaryEmbedding", "SwiGLU", "build_attention_mask"]


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    cos = cos_BTD[:, None].to(x_BHTD.dtype)
    sin = sin_BTD[:, None].to(x_BHTD.dtype)
    return x_BHTD * cos + _rotate_half(x_BHTD) * sin


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


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` — the dense MLP, and the shape of every expert."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
