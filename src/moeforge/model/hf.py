"""Hugging Face format: export our weights as a checkpoint transformers loads, and import them back.

Layouts, chosen by :func:`hf_layout`:

- ``mixtral`` (``MixtralForCausalLM``) when every layer is MoE, there are no shared experts, no q/k/v
  biases and the top-k weights are renormalized (or top-1 straight-through, whose weight is 1). Expert weights use the
  legacy per-expert keys ``model.layers.{i}.block_sparse_moe.experts.{j}.w1/w2/w3.weight``, which both
  transformers 4.x and 5.x (via its conversion mapping) load.
- ``qwen2_moe`` (``Qwen2MoeForCausalLM``) otherwise: dense layers become ``mlp_only_layers``, shared
  experts map to its sigmoid-gated ``shared_expert``. An ungated shared expert is exported exactly by a
  zero gate (sigmoid(0) = ½) and a down projection scaled by 2.
- ``llama`` (``LlamaForCausalLM``) for dense models; ``qwen2`` (``Qwen2ForCausalLM``) for dense models
  with q/k/v biases (``qkv_bias``).

The way back in (these layouts, Mistral's, and GGUF files through :mod:`moeforge.model.gguf`) is
:mod:`moeforge.model.hf_import`.

Refused, with the reason: ghost experts partly awake (0 < alpha < 1, which no target format can
represent), a non-zero aux-free routing bias (HF routers have none).
Capacity limits are not representable either; the export is dropless and says so in the log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from moeforge.io import atomic_directory, save_safetensors
from moeforge.model.config import ModelConfig
from moeforge.model.moe import MoELayer
from moeforge.model.transformer import MoETransformer

__all__ = ["ExportError", "export_hf", "hf_layout", "to_hf_state_dict"]

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The model cannot be represented in the requested Hugging Face format; the message says why."""


def _ghost_mode(model: MoETransformer) -> str:
    """'none' (no ghosts or all dormant), 'awake' (all at alpha 1); raises for anything in between."""
    modes = set()
    for i, layer in enumerate(model.moe_layers()):
        if not layer.num_ghost:
            continue
        a = layer.ghost_alpha
        if bool((a == 0).all()):
            modes.add("none")
        elif bool((a == 1).all()):
            modes.add("awake")
        else:
            raise ExportError(
                f"MoE layer {i}: ghost experts are half-awake (alpha={a.tolist()}); transformers formats have "
                "no per-expert output scale. Finish the ghost ramp (alpha 0 or 1 for every ghost) before export."
            )
    if len(modes) > 1:
        raise ExportError(
            "ghost experts are dormant in some layers and awake in others; HF formats need one count"
        )
    return modes.pop() if modes else "none"


def hf_layout(cfg: ModelConfig) -> str:
    """The transformers architecture this config exports to: 'mixtral', 'qwen2_moe', 'llama' or 'qwen2'
    (dense with q/k/v biases)."""
    m = cfg.moe
    if m is None or not cfg.moe_layer_indices:
        return "qwen2" if cfg.qkv_bias else "llama"
    if cfg.qkv_bias:
        return "qwen2_moe"
    all_moe = len(cfg.moe_layer_indices) == cfg.n_layers
    weight_is_renormalized = m.renormalize or m.straight_through
    if all_moe and m.num_shared_experts == 0 and weight_is_renormalized:
        return "mixtral"
    return "qwen2_moe"


def _hf_config(model: MoETransformer, layout: str, n_slots: int) -> dict[str, Any]:
    cfg = model.cfg
    common: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "torch_dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "moeforge_name": cfg.name,
    }
    m = cfg.moe
    if layout == "qwen2":
        return {
            **common,
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "intermediate_size": cfg.ffn_hidden,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": cfg.n_layers,
        }
    if layout == "llama":
        return {
            **common,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "intermediate_size": cfg.ffn_hidden,
            "attention_bias": False,
            "mlp_bias": False,
        }
    assert m is not None
    if layout == "mixtral":
        return {
            **common,
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": m.expert_hidden,
            "num_local_experts": n_slots,
            "num_experts_per_tok": m.top_k,
            "router_aux_loss_coef": m.lb_coef,
            "output_router_logits": False,
            "sliding_window": None,
        }
    shared = m.num_shared_experts * (m.shared_expert_hidden or 0)
    return {
        **common,
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "intermediate_size": cfg.ffn_hidden,
        "moe_intermediate_size": m.expert_hidden,
        "shared_expert_intermediate_size": shared,
        "num_experts": n_slots,
        "num_experts_per_tok": m.top_k,
        "norm_topk_prob": m.renormalize or m.straight_through,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
        "qkv_bias": cfg.qkv_bias,
        "use_sliding_window": False,
        "sliding_window": None,
        "router_aux_loss_coef": m.lb_coef,
        "output_router_logits": False,
    }


def to_hf_state_dict(
    model: MoETransformer, layout: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our weights under transformers' key names for ``layout``, and the matching ``config.json`` dict."""
    cfg = model.cfg
    layout = layout or hf_layout(cfg)
    if layout == "mixtral" and hf_layout(cfg) != "mixtral":
        raise ExportError(
            "Mixtral needs every layer MoE, no shared experts and renormalized top-k weights; "
            f"this model exports as {hf_layout(cfg)!r}"
        )
    if cfg.qkv_bias and layout in ("llama", "mixtral"):
        raise ExportError(
            f"{layout} has no q/k/v biases; this model (qkv_bias) exports as {hf_layout(cfg)!r}"
        )
    if layout == "qwen2" and cfg.moe_layer_indices:
        raise ExportError(f"qwen2 is a dense layout; this MoE model exports as {hf_layout(cfg)!r}")
    ghosts = _ghost_mode(model)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight}
    for block in model.blocks:
        p = f"model.layers.{block.index}."
        sd[p + "input_layernorm.weight"] = block.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = getattr(block.attn, name).weight
            bias = getattr(block.attn, name).bias
            if bias is not None:
                sd[p + f"self_attn.{name}.bias"] = bias
            elif layout == "qwen2" and name != "o_proj":  # Qwen2 always has q/k/v biases: zero is exact
                sd[p + f"self_attn.{name}.bias"] = getattr(block.attn, name).weight.new_zeros(
                    getattr(block.attn, name).weight.shape[0]
                )
        mlp = block.mlp
        if not isinstance(mlp, MoELayer):
            for name in ("gate_proj", "up_proj", "down_proj"):
                sd[p + f"mlp.{name}.weight"] = getattr(mlp, name).weight
            continue
        if mlp.router.aux_free_bias_rate > 0 and bool((mlp.router.expert_bias != 0).any()):
            raise ExportError(
                f"layer {block.index}: the aux-free routing bias is non-zero; transformers' routers have no "
                "selection bias, so the exported model would route differently"
            )
        n_slots = mlp.num_experts + (mlp.num_ghost if ghosts == "awake" else 0)
        f = mlp.w13.shape[-1] // 2
        moe_p = p + ("block_sparse_moe." if layout == "mixtral" else "mlp.")
        sd[moe_p + "gate.weight"] = mlp.router.weight[:n_slots]
        names = ("w1", "w3", "w2") if layout == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for j in range(n_slots):
            e = f"{moe_p}experts.{j}."
            sd[e + f"{names[0]}.weight"] = mlp.w13[j, :, :f].t()
            sd[e + f"{names[1]}.weight"] = mlp.w13[j, :, f:].t()
            sd[e + f"{names[2]}.weight"] = mlp.w2[j].t()
        if layout == "qwen2_moe":
            d = cfg.d_model
            if mlp.shared is not None:
                sd[moe_p + "shared_expert.gate_proj.weight"] = mlp.shared.gate_proj.weight
                sd[moe_p + "shared_expert.up_proj.weight"] = mlp.shared.up_proj.weight
                if mlp.shared_gate is not None:
                    sd[moe_p + "shared_expert.down_proj.weight"] = mlp.shared.down_proj.weight
                    sd[moe_p + "shared_expert_gate.weight"] = mlp.shared_gate.weight
                else:  # sigmoid(0) = 1/2: a zero gate and a doubled down projection are exact
                    sd[moe_p + "shared_expert.down_proj.weight"] = mlp.shared.down_proj.weight * 2
                    sd[moe_p + "shared_expert_gate.weight"] = mlp.w13.new_zeros(1, d)
            else:  # Qwen2-MoE always has a shared expert: give it width 0 (contributes exactly 0)
                for name, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                    sd[moe_p + f"shared_expert.{name}.weight"] = mlp.w13.new_zeros(shape)
                sd[moe_p + "shared_expert_gate.weight"] = mlp.w13.new_zeros(1, d)
    sd["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    moes = model.moe_layers()
    n_slots = (moes[0].num_experts + (moes[0].num_ghost if ghosts == "awake" else 0)) if moes else 0
    if any(m.cfg.capacity_factor is not None for m in moes):
        log.warning("capacity_factor is not representable in HF formats: the exported model is dropless")
    out = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    return out, _hf_config(model, layout, n_slots)


def export_hf(
    model: MoETransformer, out_dir: str | Path, layout: str | None = None, overwrite: bool = False
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that transformers loads; returns the directory.

    The directory is built under a temporary name and renamed into place, so a crash leaves no
    half-written export. Raises :class:`ExportError` when the model cannot be represented.
    """
    sd, hf_cfg = to_hf_state_dict(model, layout)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_safetensors(sd, tmp / "model.safetensors", metadata={"format": "pt", "producer": "moeforge"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
