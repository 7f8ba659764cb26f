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

Import (:func:`import_hf`, :func:`model_from_hf`) reads those layouts and Mistral's; the GGUF reader
(:mod:`moeforge.model.gguf`) feeds the same mapping.

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
from safetensors.torch import load_file, save_file

from moeforge.io import atomic_directory
from moeforge.model.config import ModelConfig, MoEConfig
from moeforge.model.moe import MoELayer
from moeforge.model.transformer import MoETransformer

__all__ = ["ExportError", "export_hf", "hf_layout", "import_hf", "to_hf_state_dict"]

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
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "moeforge"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def _refuse_unsupported(c: dict[str, Any]) -> None:
    """Raise ExportError naming every ``config.json`` field whose math moeforge's model does not implement."""
    problems = []
    rope = c.get("rope_scaling") or {}
    params = c.get("rope_parameters") or {}
    rope_type = params.get("rope_type", rope.get("rope_type", rope.get("type", "default")))
    if rope_type not in (None, "default"):
        field = "rope_parameters.rope_type" if "rope_type" in params else "rope_scaling.type"
        problems.append(f"{field}={rope_type!r} (only plain RoPE)")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c['hidden_act']!r} (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            problems.append(f"{key}=true (biases on o_proj / the MLP; only q/k/v biases, as Qwen2 has)")
    window = c.get("sliding_window")
    uses_window = c.get("use_sliding_window", c.get("model_type") in ("mistral", "mixtral"))
    if window and uses_window and window < c.get("max_position_embeddings", 0):
        problems.append(
            f"sliding_window={window} < max_position_embeddings={c.get('max_position_embeddings')} "
            "(no sliding-window attention)"
        )
    if c.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp={c['pretraining_tp']}")
    if problems:
        raise ExportError("cannot import: moeforge does not implement " + "; ".join(problems))


def _config_from_hf(c: dict[str, Any]) -> ModelConfig:
    _refuse_unsupported(c)
    mt = c.get("model_type")
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    base: dict[str, Any] = {
        "name": c.get("moeforge_name", mt or "imported"),
        "vocab_size": c["vocab_size"],
        "d_model": c["hidden_size"],
        "n_layers": c["num_hidden_layers"],
        "n_heads": c["num_attention_heads"],
        "n_kv_heads": c.get("num_key_value_heads"),
        "max_seq_len": c.get("max_position_embeddings", 2048),
        "rope_theta": theta,
        "norm_eps": c.get("rms_norm_eps", 1e-5),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "init_std": c.get("initializer_range", 0.02),
    }
    hd = c.get("head_dim")
    if hd is not None and hd != c["hidden_size"] // c["num_attention_heads"]:
        raise ExportError(
            f"head_dim={hd} differs from hidden_size / num_attention_heads = "
            f"{c['hidden_size'] // c['num_attention_heads']}; moeforge's attention cannot represent it"
        )
    if mt in ("llama", "mistral"):
        return ModelConfig(**base, ffn_hidden=c["intermediate_size"])
    if mt == "qwen2":
        return ModelConfig(**base, ffn_hidden=c["intermediate_size"], qkv_bias=True)
    if mt == "mixtral":
        moe = MoEConfig(
            num_experts=c["num_local_experts"],
            top_k=c["num_experts_per_tok"],
            expert_hidden=c["intermediate_size"],
        )
        return ModelConfig(**base, ffn_hidden=c["intermediate_size"], moe=moe)
    if mt == "qwen2_moe":
        dense = set(c.get("mlp_only_layers") or [])
        step = c.get("decoder_sparse_step", 1)
        layers = [i for i in range(c["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]
        shared = c.get("shared_expert_intermediate_size", 0)
        moe = MoEConfig(
            num_experts=c["num_experts"],
            top_k=c["num_experts_per_tok"],
            expert_hidden=c["moe_intermediate_size"],
            renormalize=bool(c.get("norm_topk_prob", False)),
            layers=None if len(layers) == c["num_hidden_layers"] else layers,
            num_shared_experts=1 if shared else 0,
            shared_expert_hidden=shared or None,
            shared_expert_gate=True,
        )
        return ModelConfig(
            **base, ffn_hidden=c["intermediate_size"], moe=moe, qkv_bias=bool(c.get("qkv_bias", True))
        )
    raise ExportError(
        f"model_type={mt!r} is not supported; moeforge imports llama, mistral, qwen2, mixtral and qwen2_moe"
    )


def _expert_stack(sd: dict[str, torch.Tensor], prefix: str, n: int, names: tuple[str, str, str]):
    """Return (gate [E,F,D], up [E,F,D], down [E,D,F]) from per-expert or fused (transformers 5) keys."""
    fused = prefix + "experts.gate_up_proj"
    if fused in sd:
        gate_up = sd[fused]  # [E, 2F, D]
        f = gate_up.shape[1] // 2
        return gate_up[:, :f], gate_up[:, f:], sd[prefix + "experts.down_proj"]
    g = torch.stack([sd[f"{prefix}experts.{j}.{names[0]}.weight"] for j in range(n)])
    u = torch.stack([sd[f"{prefix}experts.{j}.{names[1]}.weight"] for j in range(n)])
    dn = torch.stack([sd[f"{prefix}experts.{j}.{names[2]}.weight"] for j in range(n)])
    return g, u, dn


def import_hf(path: str | Path) -> MoETransformer:
    """Load a llama / mistral / mixtral / qwen2_moe directory (``config.json`` + ``*.safetensors``)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"{path}: no config.json; expected a Hugging Face model directory")
    try:
        c = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"{cfg_file}: not valid JSON ({exc})") from exc
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{path}: no *.safetensors weights found")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
            raise ExportError(f"{f}: not a readable safetensors file ({exc})") from exc
    return model_from_hf(c, sd, str(path))


def model_from_hf(
    c: dict[str, Any], state: dict[str, torch.Tensor], source: str = "<state>"
) -> MoETransformer:
    """Our model from a transformers ``config.json`` dict and a state dict under transformers' names
    (float32 is kept exactly; other dtypes are cast to float32). Every tensor must find its place and
    every place its tensor; a missing or left-over weight raises :class:`ExportError` naming it."""
    cfg = _config_from_hf(c)
    path = source
    sd = _TrackedDict(
        {k.replace(".block_sparse_moe.", ".mlp."): v.float() for k, v in state.items()}, Path(source)
    )
    names = ("w1", "w3", "w2") if c["model_type"] == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    model = MoETransformer.uninitialized(cfg, "cpu")
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.ghost_alpha.zero_()
        model.embed.weight.copy_(sd["model.embed_tokens.weight"])
        for block in model.blocks:
            p = f"model.layers.{block.index}."
            block.attn_norm.weight.copy_(sd[p + "input_layernorm.weight"])
            block.mlp_norm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(block.attn, name).weight.copy_(sd[p + f"self_attn.{name}.weight"])
                bias = getattr(block.attn, name).bias
                if bias is not None:
                    bias.copy_(sd[p + f"self_attn.{name}.bias"])
            mlp = block.mlp
            if not isinstance(mlp, MoELayer):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    getattr(mlp, name).weight.copy_(sd[p + f"mlp.{name}.weight"])
                continue
            mp = p + "mlp."
            mlp.router.weight.copy_(sd[mp + "gate.weight"])
            mlp.router.expert_bias.zero_()
            mlp.router.load_since_step.zero_()
            mlp.router.num_steps.zero_()
            g, u, dn = _expert_stack(sd, mp, mlp.num_experts, names)
            mlp.w13.copy_(torch.cat([g, u], dim=1).transpose(1, 2))
            mlp.w2.copy_(dn.transpose(1, 2))
            if mlp.shared is not None:
                mlp.shared.gate_proj.weight.copy_(sd[mp + "shared_expert.gate_proj.weight"])
                mlp.shared.up_proj.weight.copy_(sd[mp + "shared_expert.up_proj.weight"])
                mlp.shared.down_proj.weight.copy_(sd[mp + "shared_expert.down_proj.weight"])
                assert mlp.shared_gate is not None
                mlp.shared_gate.weight.copy_(sd[mp + "shared_expert_gate.weight"])
        model.norm.weight.copy_(sd["model.norm.weight"])
        if not cfg.tie_embeddings:
            model.lm_head.weight.copy_(sd["lm_head.weight"])
    unused = sd.unused()
    if cfg.tie_embeddings:
        unused.discard("lm_head.weight")  # some exporters write the tied head anyway
    if cfg.moe is not None and cfg.moe.num_shared_experts == 0:  # gate of Qwen2-MoE's width-0 shared expert
        unused = {k for k in unused if not k.endswith("shared_expert_gate.weight")}
    if unused:
        shown = ", ".join(sorted(unused)[:5])
        raise ExportError(f"{path}: {len(unused)} weights moeforge's model has no place for (e.g. {shown})")
    return model


class _TrackedDict(dict):
    """A state dict that records which keys were read and names the file when one is missing."""

    def __init__(self, data: dict[str, torch.Tensor], path: Path) -> None:
        super().__init__(data)
        self.path = path
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        if not super().__contains__(key):
            raise ExportError(f"{self.path}: weight {key!r} is missing from the safetensors files")
        self.used.add(key)
        return super().__getitem__(key)

    def unused(self) -> set[str]:
        """Keys never read, ignoring empty tensors (Qwen2-MoE's width-0 shared expert carries nothing)."""
        return {k for k in set(self.keys()) - self.used if dict.__getitem__(self, k).numel() > 0}
