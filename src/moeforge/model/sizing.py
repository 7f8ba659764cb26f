"""Exact sizing of a :class:`ModelConfig`: parameters, FLOPs, memory, GPUs; plus scaling a preset down
(:func:`mini_config`) and proposing dimensions for target sizes (:func:`solve_dims`).

Parameter counts are closed-form and equal, by test, to counting a ``meta``-device instance.
Conventions (state them, because papers differ):

- **active parameters**: everything a token touches — embeddings, attention, norms, dense MLPs, routers,
  shared experts, ``top_k`` routed experts per MoE layer, and the head (counted once when tied).
- **FLOPs per token (forward)**: ``2 ×`` the active matmul parameters (embedding lookup excluded, head
  included) ``+ 4 · n_layers · seq_len · n_heads · head_dim`` for the attention scores and weighted sum
  (no causal halving, as PaLM's MFU formula). Training = 3 × forward.
- **training memory**: ZeRO accounting, 16 bytes/param for both bf16 mixed precision (2 weights + 2 grads
  + 12 fp32 master/Adam m/v) and fp32 (4 + 4 + 8); activations counted per saved tensor (below).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moeforge.model.config import ModelConfig, MoEConfig

__all__ = [
    "MemoryEstimate",
    "ParamCount",
    "count_params",
    "flops_per_token",
    "memory_estimate",
    "mini_config",
    "solve_dims",
    "summarize",
]

GPU_BYTES = 80e9
GPU_USABLE = 0.85  # headroom for allocator fragmentation, NCCL buffers and workspace


@dataclass
class ParamCount:
    embedding: int
    attention: int
    norms: int
    dense_mlp: int
    router: int
    experts: int
    experts_active: int
    shared_experts: int
    head: int
    total: int
    active: int


def _layer_attention(cfg: ModelConfig) -> int:
    hd = cfg.head_dim
    bias = (cfg.n_heads + 2 * cfg.kv_heads) * hd if cfg.qkv_bias else 0
    return 2 * cfg.d_model * cfg.n_heads * hd + 2 * cfg.d_model * cfg.kv_heads * hd + bias


def count_params(cfg: ModelConfig) -> ParamCount:
    """Exact parameter counts by component (see module docstring for "active")."""
    d, moe = cfg.d_model, cfg.moe
    n_moe = len(cfg.moe_layer_indices)
    n_dense = cfg.n_layers - n_moe
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    attention = cfg.n_layers * _layer_attention(cfg)
    norms = (2 * cfg.n_layers + 1) * d
    dense_mlp = n_dense * 3 * d * cfg.ffn_hidden
    router = experts = experts_active = shared = 0
    if moe is not None and n_moe:
        slots = moe.num_experts + moe.num_ghost_experts
        router = n_moe * slots * d
        experts = n_moe * slots * 3 * d * moe.expert_hidden
        experts_active = n_moe * moe.top_k * 3 * d * moe.expert_hidden
        if moe.num_shared_experts:
            assert moe.shared_expert_hidden is not None
            per = 3 * d * moe.num_shared_experts * moe.shared_expert_hidden + (
                d if moe.shared_expert_gate else 0
            )
            shared = n_moe * per
    common = embedding + head + attention + norms + dense_mlp + router + shared
    return ParamCount(
        embedding=embedding,
        attention=attention,
        norms=norms,
        dense_mlp=dense_mlp,
        router=router,
        experts=experts,
        experts_active=experts_active,
        shared_experts=shared,
        head=head,
        total=common + experts,
        active=common + experts_active,
    )


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Forward and training FLOPs per token at ``seq_len`` (default ``max_seq_len``)."""
    s = cfg.max_seq_len if seq_len is None else seq_len
    if s < 1:
        raise ValueError(f"seq_len must be at least 1 (got {s})")
    p = count_params(cfg)
    matmul = p.active - p.embedding - p.norms + (p.embedding if cfg.tie_embeddings else 0)
    dense = 2.0 * matmul
    attn = 4.0 * cfg.n_layers * s * cfg.n_heads * cfg.head_dim
    fwd = dense + attn
    return {"forward": fwd, "forward_matmul": dense, "forward_attention": attn, "training": 3.0 * fwd}


GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs, by part: from :func:`memory_estimate` for the whole model, and from the
    resource guard (:func:`moeforge.train.guard.check_resources`) for one run on one device.

    ``train_total`` is ``weights + grads + optimizer + activations``. In the guard's report the three
    states are per device (divided over the FSDP ranks), ``activations`` are the ones the run keeps (with
    or without checkpointing), ``dtype`` is the one asked for, and ``device``, ``available`` and
    ``usable`` (bytes; None when not measurable) say what the need was compared with. The other fields
    always describe the whole model.
    """

    dtype: str
    micro_batch: int
    seq_len: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    activations_checkpointed: float
    train_total: float
    inference_weights: float
    kv_cache_per_token: float
    min_gpus_80gb: int
    device: str | None = None
    available: float | None = None
    usable: float | None = None

    @property
    def need(self) -> float:
        """What training needs: :attr:`train_total`."""
        return self.train_total

    @property
    def fits(self) -> bool:
        """The need fits the usable memory (True when that is unknown)."""
        return self.usable is None or self.need <= self.usable

    def sizes(self) -> dict[str, float | int | str]:
        """The estimate without the device comparison (``moeforge model info --json``'s ``memory``)."""
        return {k: v for k, v in asdict(self).items() if k not in ("device", "available", "usable")}

    def describe(self) -> str:
        """One line for the training log."""
        avail = "unknown" if self.available is None else f"{self.available / GIB:.2f} GiB"
        return (
            f"memory on {self.device} ({self.dtype}, micro_batch={self.micro_batch}, seq_len={self.seq_len}): "
            f"need {self.need / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, grads {self.grads / GIB:.2f}, "
            f"optimizer {self.optimizer / GIB:.2f}, activations {self.activations / GIB:.2f}); available {avail}"
        )


def _activation_elems_per_layer(cfg: ModelConfig) -> list[float]:
    """Elements saved for backward per token, per layer (flash attention: no score matrix)."""
    d, kvd = cfg.d_model, cfg.kv_heads * cfg.head_dim
    attn = 2 * d + (d + 2 * kvd) + d + 2 * cfg.n_heads  # norm in/out, q k v, attn out, softmax stats
    out = []
    for i in range(cfg.n_layers):
        total = float(attn)
        if cfg.is_moe_layer(i):
            m: MoEConfig = cfg.moe  # type: ignore[assignment]
            slots = m.num_experts + m.num_ghost_experts
            # norm in/out, router logits+probs (fp32 → 2 elements each); per assignment the gathered x,
            # h=[g,u], silu(g) and the activation (both kept for the backward), the expert output
            total += 2 * d + 4 * slots + m.top_k * (2 * d + 4 * m.expert_hidden)
            if m.num_shared_experts:
                total += 3 * m.num_shared_experts * (m.shared_expert_hidden or 0)
        else:
            total += 2 * d + 3 * cfg.ffn_hidden
        out.append(total)
    return out


def memory_estimate(
    cfg: ModelConfig, micro_batch: int = 1, seq_len: int | None = None, dtype: str | None = None
) -> MemoryEstimate:
    """Training and inference memory in bytes, and the fewest 80 GB GPUs that can train the model.

    GPU count: FSDP/ZeRO-3 shards weights, grads and optimizer states over all GPUs (expert parallelism
    shards experts the same way); each GPU also holds one micro-batch's activations with full activation
    checkpointing (one layer input per layer + one layer recomputed) and the logits; usable memory is
    ``GPU_USABLE`` of 80 GB.
    """
    s = cfg.max_seq_len if seq_len is None else seq_len
    if s < 1 or micro_batch < 1:
        raise ValueError(f"seq_len and micro_batch must be at least 1 (got {s}, {micro_batch})")
    dt = dtype or cfg.dtype
    act_bytes = 2 if dt == "bfloat16" else 4
    p = count_params(cfg)
    weights = p.total * act_bytes
    grads = p.total * act_bytes
    optimizer = p.total * (12 if dt == "bfloat16" else 8)
    tokens = micro_batch * s
    logits = tokens * cfg.vocab_size * 4
    per_layer = _activation_elems_per_layer(cfg)
    act = tokens * sum(per_layer) * act_bytes + logits
    per_layer_max = max(per_layer)
    act_ckpt = tokens * act_bytes * (cfg.n_layers * cfg.d_model + per_layer_max) + logits
    state = weights + grads + optimizer
    budget = GPU_BYTES * GPU_USABLE - act_ckpt
    gpus = math.ceil(state / budget) if budget > 0 else -1
    kv = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * act_bytes
    return MemoryEstimate(
        dtype=dt,
        micro_batch=micro_batch,
        seq_len=s,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=act,
        activations_checkpointed=act_ckpt,
        train_total=state + act,
        inference_weights=weights,
        kv_cache_per_token=kv,
        min_gpus_80gb=gpus,
    )


def summarize(cfg: ModelConfig, micro_batch: int = 1, seq_len: int | None = None) -> dict[str, object]:
    """Everything ``moeforge model info --json`` prints."""
    p = count_params(cfg)
    f = flops_per_token(cfg, seq_len)
    m = memory_estimate(cfg, micro_batch, seq_len)
    return {
        "name": cfg.name,
        "total_params": p.total,
        "active_params": p.active,
        "params": asdict(p),
        "flops_per_token": f["forward"],
        "flops": f,
        "memory": m.sizes(),
        "config": cfg.model_dump(),
    }


def _round(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def mini_config(cfg: ModelConfig, target_params: float, vocab_size: int | None = None) -> ModelConfig:
    """Scale ``cfg`` down to about ``target_params`` total parameters, keeping its architecture.

    Kept: expert count, top-k, ghost/shared expert counts, routing options, which fraction of layers are
    MoE, the ratios ffn/d, expert_hidden/d, shared_hidden/d, heads/kv-heads, tying, RoPE theta.
    Searched: d_model (a multiple of the head count × 8) and n_layers (≥ 2). ``vocab_size`` defaults to
    the original; raises ValueError when the embeddings alone exceed the target.
    """
    vocab = vocab_size or cfg.vocab_size
    emb = vocab * 16 * (1 if cfg.tie_embeddings else 2)
    if emb >= target_params:
        raise ValueError(
            f"with vocab_size={vocab} the embeddings alone need {emb:,} parameters at d_model=16, more than the "
            f"target {int(target_params):,}; pass a smaller vocab_size (--vocab)"
        )
    group = cfg.n_heads // cfg.kv_heads
    moe_frac = len(cfg.moe_layer_indices) / cfg.n_layers
    best: tuple[float, ModelConfig] | None = None
    for n_kv in sorted({1, 2, min(cfg.kv_heads, 4)}):
        heads = n_kv * group
        for d in range(heads * 8, 4097, heads * 8):
            for layers in range(2, 49):
                c = _scaled(cfg, d, heads, n_kv, layers, moe_frac, vocab)
                if c is None:
                    continue
                total = count_params(c).total
                # prefer close to target, then a transformer-like aspect ratio d/L in [16, 128]
                aspect = d / layers
                err = abs(math.log(total / target_params)) + 0.02 * abs(math.log(aspect / 48))
                if best is None or err < best[0]:
                    best = (err, c)
    if best is None or abs(math.log(count_params(best[1]).total / target_params)) > math.log(1.25):
        got = f" (closest: {count_params(best[1]).total:,})" if best else ""
        raise ValueError(
            f"no configuration of {cfg.name}'s architecture with vocab_size={vocab} comes within 25% of "
            f"{int(target_params):,} parameters{got}; the embeddings dominate at this size — pass a smaller "
            "vocab_size (--vocab) or a larger target"
        )
    return best[1]


def _scaled(
    cfg: ModelConfig, d: int, heads: int, n_kv: int, layers: int, moe_frac: float, vocab: int
) -> ModelConfig | None:
    r = d / cfg.d_model
    moe = None
    if cfg.moe is not None:
        m = cfg.moe
        n_moe = max(1, round(moe_frac * layers))
        moe_layers = None if m.layers is None else list(range(layers - n_moe, layers))
        moe = m.model_copy(
            update={
                "expert_hidden": _round(m.expert_hidden * r, 8),
                "shared_expert_hidden": None
                if m.shared_expert_hidden is None
                else _round(m.shared_expert_hidden * r, 8),
                "layers": moe_layers,
            }
        )
    try:
        return ModelConfig(
            **{
                **cfg.model_dump(exclude={"moe"}),
                "name": f"{cfg.name}-mini",
                "vocab_size": vocab,
                "d_model": d,
                "n_layers": layers,
                "n_heads": heads,
                "n_kv_heads": n_kv,
                "ffn_hidden": _round(cfg.ffn_hidden * r, 8),
                "max_seq_len": min(cfg.max_seq_len, 1024),
                "dtype": "float32",
                "cluster_only": False,  # a laptop-sized copy of a cluster model is meant to train locally
            },
            moe=moe,
        )
    except ValueError:
        return None


def solve_dims(
    total: float,
    active: float,
    num_experts: int,
    top_k: int,
    vocab_size: int = 65536,
    head_dim: int = 128,
    n_kv_heads: int = 8,
    max_seq_len: int = 8192,
) -> tuple[ModelConfig, list[str]]:
    """Propose dims whose exact counts hit ``total`` and ``active`` parameters; returns (config, derivation).

    Per MoE layer, each routed expert has ``3·d·F`` parameters, so ``total − active = (E − k) · L · 3dF``
    fixes ``F`` for a given ``d`` and ``L``. The rest of ``active`` — embeddings, attention, routers — is the
    dense part; whatever that leaves goes into a shared expert (one always-on SwiGLU per layer). Among all
    (d, L) on a grid, pick the one closest to the targets with a conventional shape (``d/L`` near 128, expert width
    near 1.5·d, shared expert at most 4·d).
    """
    if active >= total:
        raise ValueError(f"active ({active:,.0f}) must be smaller than total ({total:,.0f})")
    if not 1 <= top_k < num_experts:
        raise ValueError(
            f"top_k must be in 1..{num_experts - 1} (got {top_k}): with top_k == experts every parameter is "
            "active and total cannot exceed active"
        )
    per_expert = (total - active) / (num_experts - top_k)
    best: tuple[float, ModelConfig] | None = None
    for d in range(2048, 32769, 1024):
        if d % head_dim:
            continue
        heads = d // head_dim
        kv = math.gcd(heads, n_kv_heads)
        for layers in range(16, 161, 4):
            f = _round(per_expert / (3 * d * layers), 128)
            base = ModelConfig(
                name="solved",
                vocab_size=vocab_size,
                d_model=d,
                n_layers=layers,
                n_heads=heads,
                n_kv_heads=kv,
                ffn_hidden=4 * d,
                max_seq_len=max_seq_len,
                dtype="bfloat16",
                moe=MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=f),
            )
            gap = active - count_params(base).active
            if gap < -0.02 * active:
                continue
            shared_h = _round(gap / (3 * d * layers), 128) if gap > 3 * d * layers * 64 else None
            cfg = base
            if shared_h is not None:
                cfg = base.model_copy(
                    update={
                        "moe": base.moe.model_copy(  # type: ignore[union-attr]
                            update={"num_shared_experts": 1, "shared_expert_hidden": shared_h}
                        )
                    }
                )
            p = count_params(cfg)
            # shape prior: aspect d/L near 128, routed expert width near 1-2 d, shared expert at most 4 d
            shape = abs(math.log(d / layers / 128)) + abs(math.log(f / (1.5 * d)))
            shape += max(0.0, math.log((shared_h or 0) / (4 * d))) if shared_h else 0.0
            err = abs(p.total / total - 1) + abs(p.active / active - 1) + 0.01 * shape
            if best is None or err < best[0]:
                best = (err, cfg)
    if best is None:
        raise ValueError("no dims found: the dense part alone exceeds the active target; raise --active")
    cfg = best[1]
    p = count_params(cfg)
    m = cfg.moe
    assert m is not None
    notes = [
        f"per routed expert over all layers: (total - active) / (E - k) = {per_expert / 1e9:.3f}B",
        f"expert_hidden F = {per_expert / 1e9:.3f}B / (3 * d={cfg.d_model} * L={cfg.n_layers}) -> {m.expert_hidden}",
        f"dense part (embeddings {p.embedding + p.head:,}, attention {p.attention:,}, routers {p.router:,})",
        f"shared expert hidden fills the rest of active: {m.shared_expert_hidden}",
        f"result: total {p.total:,} ({p.total / total - 1:+.2%}), active {p.active:,} ({p.active / active - 1:+.2%})",
    ]
    return cfg, notes
