"""Hugging Face checkpoints in: a transformers ``config.json`` + state dict → :class:`MoETransformer`.

:func:`import_hf` reads a directory (``config.json`` + ``*.safetensors``); :func:`model_from_hf` takes the
config dict and tensors directly, which is how GGUF files (:mod:`moeforge.model.gguf`) come in too.
Supported: ``llama``, ``mistral``, ``qwen2`` (q/k/v biases), ``mixtral`` and ``qwen2_moe`` — the layouts
:mod:`moeforge.model.hf` exports, so export → import is exact. Refused with the ``config.json`` field
named (:class:`~moeforge.model.hf.ExportError`): RoPE scaling, a non-SiLU activation, biases other than
q/k/v, a sliding window shorter than the context, a head size other than hidden / heads; a weight that is
missing or has no place is named too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from moeforge.model.config import ModelConfig, MoEConfig
from moeforge.model.hf import ExportError
from moeforge.model.moe import MoELayer
from moeforge.model.transformer import MoETransformer

__all__ = ["import_hf", "model_from_hf"]


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
