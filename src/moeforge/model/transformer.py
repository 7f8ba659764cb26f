"""The decoder-only language model: embeddings → pre-norm blocks (attention + MLP or MoE) → norm → head.

Initialization (GPT-2 / Megatron "scaled init"): every weight matrix is drawn from N(0, init_std²),
except the two projections that write into the residual stream (attention ``o_proj`` and the MLP /
expert down projection), whose std is ``init_std / sqrt(2 · n_layers)`` so the residual's variance
does not grow with depth. Norm weights start at 1, q/k/v biases (qkv_bias) at 0, the router at N(0, init_std²).

Decoding one token per row has its own form of the model, :meth:`MoETransformer.prepare_for_decode`,
assembled from each module's ``prepare_for_decode`` (see :mod:`moeforge.model.layers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.model.config import ModelConfig
from moeforge.model.layers import (
    Attention,
    AttentionDecode,
    DecodeLinear,
    KVCache,
    Linear,
    LinearFactory,
    RMSNorm,
    RopeDecode,
    RotaryEmbedding,
    SublayerDecode,
    SwiGLU,
    build_attention_mask,
)
from moeforge.model.moe import MoELayer, MoEStats

__all__ = ["Block", "BlockDecode", "MoETransformer", "ModelOutput", "TransformerDecode"]


@dataclass
class ModelOutput:
    """Forward result. ``loss`` is the LM cross-entropy only; ``aux_loss`` = lb_coef·LB + z_coef·Z summed
    over MoE layers (add it to ``loss`` to train). ``moe_stats`` maps layer index → :class:`MoEStats`."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    lb_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    moe_stats: dict[int, MoEStats] = field(default_factory=dict)


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.qkv_bias)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: MoELayer | SwiGLU
        if cfg.is_moe_layer(index):
            assert cfg.moe is not None
            self.mlp = MoELayer(cfg.d_model, cfg.moe)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_sin, mask, cache, self.index)
        h = self.mlp_norm(x_BTD)
        if isinstance(self.mlp, MoELayer):
            y, stats = self.mlp(h, stats=cache is None)  # decoding reads no routing statistics
            return x_BTD + y, stats
        return x_BTD + self.mlp(h), None

    def prepare_for_decode(self, linear: LinearFactory = DecodeLinear) -> BlockDecode:
        """This block as a :class:`BlockDecode`: its attention's and its MLP's decode forms, each with its
        pre-norm. Any MLP type plugs in through its ``prepare_for_decode(norm, linear)``."""
        return BlockDecode(
            self.index,
            self.attn.prepare_for_decode(self.attn_norm, linear),
            self.mlp.prepare_for_decode(self.mlp_norm, linear),
        )


class BlockDecode:
    """A block for one new token per row: the attention's decode form, then the MLP's."""

    def __init__(self, index: int, attn: AttentionDecode, mlp: SublayerDecode) -> None:
        self.index, self.attn, self.mlp = index, attn, mlp

    @property
    def nbytes(self) -> int:
        return self.attn.nbytes + self.mlp.nbytes

    def step(
        self,
        x_BD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache,
    ) -> torch.Tensor:
        return self.mlp.step(self.attn.step(x_BD, cos_sin, mask, cache, self.index))


class MoETransformer(nn.Module):
    """Decoder-only LM built from a :class:`ModelConfig` (dense when ``cfg.moe`` is None)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @classmethod
    def uninitialized(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> MoETransformer:
        """A model whose weights are allocated on ``device`` but not drawn — for loading a state dict into
        (random init of a large model costs seconds for nothing). The tied head is re-tied and the RoPE
        tables (non-persistent buffers, never in a file) are rebuilt; every other tensor is garbage."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        if cfg.tie_embeddings:  # to_empty gives each module its own tensor, breaking the tie
            model.lm_head.weight = model.embed.weight
        model.rope.reset(device=device)
        return model

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Apply the documented initialization (module docstring)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)  # q/k/v biases (qkv_bias)
            elif p.ndim == 1:
                nn.init.ones_(p)  # RMSNorm weights
            elif name.endswith(("o_proj.weight", "down_proj.weight")) or name.endswith(".w2"):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoELayer)]

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` (default ``max_seq_len``) tokens."""
        p = self.embed.weight
        return KVCache(
            self.cfg.n_layers,
            batch,
            self.cfg.kv_heads,
            self.cfg.head_dim,
            max_len or self.cfg.max_seq_len,
            dtype=p.dtype,
            device=p.device,
        )

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        labels_BT: torch.Tensor | None = None,
        *,
        doc_ids_BT: torch.Tensor | None = None,
        positions_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_padding_BS: torch.Tensor | None = None,
        ignore_index: int = -100,
        logits_to_keep: int = 0,
        hidden_BTD: torch.Tensor | None = None,
        start_layer: int = 0,
    ) -> ModelOutput:
        """Logits ``[B, T, V]``; with ``labels`` (already shifted: ``labels[t]`` is the target at ``t``),
        the mean cross-entropy over labels ≠ ``ignore_index``.

        ``doc_ids`` limits attention to each packed document; ``positions`` overrides RoPE positions
        (default: ``cache.length + arange(T)``); ``cache`` enables incremental decoding.
        ``key_padding`` ``[B, cache.length + T]`` (False = padding) hides padded key slots, e.g. the left
        padding of a decode batch whose prompts differ in length. A query that sees nothing but padding
        gets NaN from SDPA, so padding is for keys only: prefill each prompt unpadded.
        ``logits_to_keep`` > 0 computes logits for the last that many positions only (``[B, n, V]``): a
        prefill needs the last position's, and the LM head over every prompt position is most of its cost.
        ``hidden_BTD`` with ``start_layer`` = L resumes from the residual stream entering block L (what
        :meth:`trunk` returned for the same ids, positions and documents), skipping the embedding and the
        blocks before L: training only the last blocks over a frozen trunk computes the trunk once.
        """
        if logits_to_keep and labels_BT is not None:
            raise ValueError("logits_to_keep is for generation; a loss needs the logits of every position")
        B, T = input_ids_BT.shape
        past = cache.length if cache is not None else 0
        if positions_BT is None:
            positions_BT = torch.arange(past, past + T, device=input_ids_BT.device).expand(B, T)
        cos_sin = self.rope(positions_BT)
        mask = build_attention_mask(T, past, doc_ids_BT, key_padding_BS, device=input_ids_BT.device)

        if hidden_BTD is not None and cache is not None:
            raise ValueError("hidden_BTD resumes a full-sequence forward; it cannot be combined with a cache")
        x = self.embed(input_ids_BT) if hidden_BTD is None else hidden_BTD
        stats: dict[int, MoEStats] = {}
        for block in self.blocks[start_layer if hidden_BTD is not None else 0 :]:
            x, s = block(x, cos_sin, mask, cache)
            if s is not None:
                stats[block.index] = s
        if cache is not None:
            cache.advance(T)
        h = self.norm(x)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)

        out = ModelOutput(logits=logits, moe_stats=stats)
        if stats:
            moe = self.cfg.moe
            assert moe is not None
            out.lb_loss = torch.stack([s.lb_loss for s in stats.values()]).sum()
            out.z_loss = torch.stack([s.z_loss for s in stats.values()]).sum()
            out.aux_loss = moe.lb_coef * out.lb_loss + moe.z_coef * out.z_loss
        if labels_BT is not None:
            out.loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), labels_BT.reshape(-1), ignore_index=ignore_index
            )
        return out

    def trunk(
        self,
        input_ids_BT: torch.Tensor,
        stop_layer: int,
        *,
        doc_ids_BT: torch.Tensor | None = None,
        positions_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The residual stream ``[B, T, D]`` entering block ``stop_layer`` (0 = the embeddings); pass it to
        ``forward(hidden_BTD=..., start_layer=stop_layer)`` with the same ids, documents and positions."""
        if not 0 <= stop_layer <= self.cfg.n_layers:
            raise ValueError(f"stop_layer must be in 0..{self.cfg.n_layers} (got {stop_layer})")
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(T, device=input_ids_BT.device).expand(B, T)
        cos_sin = self.rope(positions_BT)
        mask = build_attention_mask(T, 0, doc_ids_BT, None, device=input_ids_BT.device)
        x = self.embed(input_ids_BT)
        for block in self.blocks[:stop_layer]:
            x, _ = block(x, cos_sin, mask, None)
        return x

    @torch.no_grad()
    def prepare_for_decode(self, linear: LinearFactory = DecodeLinear) -> TransformerDecode:
        """The model in its decode form: one new token per row through :meth:`TransformerDecode.step`,
        which equals :meth:`forward` with a cache on ``[B, 1]`` ids in eval mode (no router noise, no
        statistics; float rounding differs, about 1e-6 relative) and is faster on CPU.

        The form holds a copy of the weights laid out for one-token steps — fused, norm weights folded
        in, and through ``linear`` (e.g. prepacked for a GEMM kernel) where a layout pays — made now:
        build a new one after the weights change. Written for float32 weights (its norms compute in the
        input dtype). Reads the embedding, the RoPE tables and what it does not copy in place.
        """
        s = self.cfg.max_seq_len
        return TransformerDecode(
            self.embed,
            [block.prepare_for_decode(linear) for block in self.blocks],
            self.rope.prepare_for_decode(s),
            self.norm,
            linear(self.lm_head.weight * self.norm.weight[None, :]),
        )

    def router_step(self) -> None:
        """Call after every optimizer step: anneal router noise, update aux-free biases."""
        for layer in self.moe_layers():
            layer.router.step(layer.ghost_alpha if layer.num_ghost else None)


class TransformerDecode:
    """:class:`MoETransformer` for one new token per row (made by its ``prepare_for_decode``): embedding,
    the blocks' decode forms, the final norm folded into the LM head."""

    def __init__(
        self, embed: nn.Embedding, blocks: list[BlockDecode], rope: RopeDecode, norm: RMSNorm, lm_head: Linear
    ) -> None:
        self.embed, self.blocks, self.rope, self.norm, self.lm_head = embed, blocks, rope, norm, lm_head

    @property
    def nbytes(self) -> int:
        """Bytes of the weight copies this form made (beyond the model's own tensors)."""
        return self.lm_head.nbytes + sum(block.nbytes for block in self.blocks)

    def step(
        self,
        ids_B: torch.Tensor,
        positions_B: torch.Tensor,
        cache: KVCache,
        key_padding_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, V]`` of the next token after ``ids_B`` (one new token per row) at RoPE positions
        ``positions_B`` (below the model's ``max_seq_len``); appends the tokens' keys and values to
        ``cache`` and advances it. ``key_padding_BS`` ``[B, cache.length + 1]`` (False = padding) as in
        :meth:`MoETransformer.forward`. Call under ``torch.no_grad`` or ``torch.inference_mode``."""
        cos_sin = self.rope.at(positions_B)
        mask = build_attention_mask(1, cache.length, None, key_padding_BS, device=ids_B.device)
        x_BD = self.embed(ids_B)
        for block in self.blocks:
            x_BD = block.step(x_BD, cos_sin, mask, cache)
        cache.advance(1)
        return self.lm_head(self.norm.normalize(x_BD))
