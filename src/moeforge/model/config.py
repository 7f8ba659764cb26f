"""Model configuration: one pydantic model for dense and MoE decoders, plus named YAML presets.

A config is data only; :mod:`moeforge.model.transformer` builds the network from it and
:mod:`moeforge.model.sizing` counts it. Every constraint between fields is checked here, with a message
that names the field and the allowed values, so a bad preset fails at load time and not deep inside a
forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from moeforge.config import ConfigError, StrictModel, load_yaml_config

__all__ = ["MoEConfig", "ModelConfig", "list_presets", "load_model_config", "preset_dirs"]

DispatchBackend = Literal["auto", "grouped_mm", "loop", "padded"]


class MoEConfig(StrictModel):
    """Mixture-of-Experts settings for the layers listed in ``layers`` (all layers when omitted)."""

    num_experts: int = Field(ge=1, description="routed experts per MoE layer (ghosts not included)")
    top_k: int = Field(ge=1, description="experts each token is sent to")
    expert_hidden: int = Field(ge=1, description="SwiGLU hidden width of one expert")
    layers: list[int] | None = Field(
        default=None, description="indices of the layers whose MLP is an MoE layer; null means every layer"
    )
    renormalize: bool = Field(default=True, description="rescale the top-k softmax weights to sum to 1")
    router_noise_std: float = Field(default=0.0, ge=0.0, description="std of Gaussian noise on router logits")
    noise_anneal_steps: int = Field(
        default=0,
        ge=0,
        description="optimizer steps over which the noise std falls linearly to 0 (0: constant)",
    )
    straight_through: bool = Field(
        default=False, description="top-1 only: weight 1 + p - p.detach() so the router gets a gradient"
    )
    capacity_factor: float | None = Field(
        default=None, gt=0.0, description="per-expert capacity = ceil(cf * tokens * k / E); null is dropless"
    )
    aux_free_bias_rate: float = Field(
        default=0.0, ge=0.0, description="aux-loss-free balancing: bias step per optimizer step (0 disables)"
    )
    lb_coef: float = Field(default=0.01, ge=0.0, description="weight of the load-balancing loss")
    z_coef: float = Field(default=0.001, ge=0.0, description="weight of the router z-loss")
    num_shared_experts: int = Field(default=0, ge=0, description="always-on experts (Qwen2-MoE style)")
    shared_expert_hidden: int | None = Field(
        default=None, ge=1, description="hidden width of one shared expert"
    )
    shared_expert_gate: bool = Field(default=True, description="scale shared output by sigmoid(w·x)")
    num_ghost_experts: int = Field(
        default=0, ge=0, description="extra experts that stay out of routing until woken (alpha > 0)"
    )
    dispatch: DispatchBackend = Field(
        default="auto", description="expert matmul backend: auto | grouped_mm | loop | padded"
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"moe.top_k must be between 1 and moe.num_experts={self.num_experts} (got {self.top_k})"
            )
        if self.straight_through and self.top_k != 1:
            raise ValueError(f"moe.straight_through needs moe.top_k == 1 (got top_k={self.top_k})")
        if self.num_shared_experts > 0 and self.shared_expert_hidden is None:
            raise ValueError("moe.shared_expert_hidden must be set when moe.num_shared_experts > 0")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"moe.layers has duplicates: {self.layers}")
        return self


class ModelConfig(StrictModel):
    """A decoder-only transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU MLPs or MoE layers."""

    name: str = Field(default="custom", description="preset name, for logs and exports")
    vocab_size: int = Field(ge=2)
    d_model: int = Field(ge=2)
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    n_kv_heads: int | None = Field(default=None, ge=1, description="key/value heads (GQA); null = n_heads")
    ffn_hidden: int = Field(ge=1, description="SwiGLU hidden width of the dense MLP layers")
    max_seq_len: int = Field(default=2048, ge=1)
    rope_theta: float = Field(default=10000.0, gt=0.0)
    norm_eps: float = Field(default=1e-5, gt=0.0)
    tie_embeddings: bool = Field(default=False)
    qkv_bias: bool = Field(
        default=False, description="biases on the q/k/v projections (Qwen2); o_proj has none"
    )
    init_std: float = Field(default=0.02, gt=0.0)
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="training/storage dtype")
    moe: MoEConfig | None = Field(default=None, description="MoE settings; null builds a dense model")
    cluster_only: bool = Field(
        default=False,
        description="refuse local training unless ALLOW_LOCAL_TRAIN=1 (for cluster-sized presets)",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads must divide d_model={self.d_model} with an even head size (got n_heads={self.n_heads}); "
                f"allowed: {_head_counts(self.d_model)}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"d_model / n_heads must be even for RoPE (got head_dim={self.head_dim}); "
                f"allowed n_heads: {_head_counts(self.d_model)}"
            )
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(
                f"n_kv_heads must divide n_heads={self.n_heads} (got {kv}); allowed: {_divisors(self.n_heads)}"
            )
        if self.moe is not None and self.moe.layers is not None:
            bad = [i for i in self.moe.layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(
                    f"moe.layers must be layer indices in 0..{self.n_layers - 1} (n_layers={self.n_layers}); "
                    f"got {bad}"
                )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` has an MoE MLP."""
        if self.moe is None:
            return False
        return self.moe.layers is None or index in self.moe.layers

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _head_counts(d_model: int) -> list[int]:
    """Head counts that divide ``d_model`` into an even head size (RoPE rotates pairs)."""
    return [h for h in _divisors(d_model) if (d_model // h) % 2 == 0]


def preset_dirs() -> list[Path]:
    """Where presets are looked up: ``$MOEFORGE_CONFIGS/models`` first, then the shipped ``configs/models``."""
    dirs = []
    env = os.environ.get("MOEFORGE_CONFIGS")
    if env:
        dirs.append(Path(env) / "models")
    dirs.append(Path(__file__).resolve().parent.parent / "configs" / "models")
    return dirs


def list_presets() -> list[str]:
    """Names of all model presets found in :func:`preset_dirs`."""
    names: set[str] = set()
    for d in preset_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def load_model_config(
    name_or_path: str | os.PathLike[str], overrides: list[str] | None = None
) -> ModelConfig:
    """Load a preset by name (``tiny``) or a YAML file path, with optional ``key=value`` overrides.

    Raises :class:`~moeforge.config.ConfigError` naming the preset/file and the offending field.
    """
    path = Path(name_or_path)
    if not path.is_file():  # a preset name, even one with a dot in it (oracle-0.5b)
        for d in preset_dirs():
            candidate = d / f"{name_or_path}.yaml"
            if candidate.is_file():
                path = candidate
                break
        else:
            if path.suffix in (".yaml", ".yml") or os.sep in str(name_or_path):
                return load_yaml_config(ModelConfig, path, overrides)  # names the file and what is wrong
            raise ConfigError(
                f"unknown model preset {str(name_or_path)!r}; known presets: {', '.join(list_presets())} "
                "(or pass a path to a YAML file)"
            )
    return load_yaml_config(ModelConfig, path, overrides)
