"""Training configuration: one YAML (``configs/train/*.yaml``) validated into :class:`TrainConfig`.

Every field has a default except the data; ``moeforge train CONFIG --set optim.lr=1e-3`` overrides any
of them. The resolved config is saved with every run and every checkpoint, so a run can always be
explained and resumed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from moeforge.config import ConfigError, StrictModel, load_yaml_config
from moeforge.model.config import ModelConfig, load_model_config
from moeforge.train.collapse import CollapseConfig
from moeforge.train.ghost import GhostConfig

__all__ = ["DataConfig", "EvalConfig", "OptimConfig", "TrainConfig", "load_train_config", "resolve_model"]


class DataConfig(StrictModel):
    """Where the tokens come from: a pipeline run tokenized through the cache, or a tokenized directory."""

    run: str | None = Field(default=None, description="a `moeforge data run` output, tokenized via the cache")
    tokens: str | None = Field(default=None, description="a `moeforge data tokenize` output directory")
    tokenizer: str | None = Field(default=None, description="tokenizer directory (needed with `run`)")
    seq_len: int = Field(default=256, ge=8, description="tokens per training sequence")
    mode: Literal["pretrain", "sft"] = "pretrain"
    attention: Literal["document", "causal"] = Field(
        default="document", description="document: attend only within each packed document"
    )
    max_records: int | None = Field(default=None, ge=1, description="cap records per split when tokenizing")
    cache_dir: str | None = Field(default=None, description="token cache root (default ~/.cache/moeforge)")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.run is None) == (self.tokens is None):
            raise ValueError("data needs exactly one of `run` (with `tokenizer`) or `tokens`")
        if self.run is not None and self.tokenizer is None:
            raise ValueError("data.run needs data.tokenizer (a `moeforge tokenizer train` output)")
        return self


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay to ``min_lr`` at ``train.steps``."""

    lr: float = Field(default=3e-4, gt=0)
    min_lr: float = Field(default=3e-5, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.1, ge=0, description="not applied to norms, biases, embeddings")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0, description="max global grad norm; null disables")


class EvalConfig(StrictModel):
    every: int = Field(default=100, ge=1, description="validate every N optimizer steps")
    max_batches: int | None = Field(default=None, ge=1, description="cap validation batches (null: all)")
    test_at_end: bool = Field(default=True, description="evaluate the test split after the last step")


class TrainConfig(StrictModel):
    """A training run."""

    name: str = Field(default="run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field(default="runs/train", description="run directory: checkpoints, metrics, summary")
    seed: int = 0
    model: str | dict[str, Any] = Field(default="tiny", description="preset name, YAML path or inline config")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="merged onto the model config")
    vocab_from_tokenizer: bool = Field(
        default=True, description="set model.vocab_size to the tokenizer's (rounded up to a multiple of 64)"
    )
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    steps: int = Field(default=1000, ge=1, description="optimizer steps")
    micro_batch: int = Field(default=8, ge=1, description="sequences per forward, per process")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_last: int = Field(default=2, ge=1, description="checkpoints kept besides the best")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(default=False, description="torch.compile the model")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 on CUDA, fp32 on CPU"
    )
    peak_flops: float | None = Field(
        default=None, gt=0, description="for MFU; null measures once per machine"
    )
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    ghost: GhostConfig = Field(default_factory=GhostConfig)
    distributed: Literal["ddp", "fsdp"] = Field(default="ddp", description="strategy under torchrun")
    tensorboard: bool = True
    init_from: str | None = Field(default=None, description="checkpoint directory to start from (e.g. SFT)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr ({self.optim.min_lr}) must not exceed optim.lr ({self.optim.lr})")
        return self


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_model(cfg: TrainConfig, vocab_size: int | None = None) -> ModelConfig:
    """The model config: preset/path/inline, ``model_overrides`` merged, vocab from the tokenizer."""
    base = load_model_config(cfg.model).model_dump() if isinstance(cfg.model, str) else dict(cfg.model)
    data = _deep_merge(base, cfg.model_overrides)
    if cfg.vocab_from_tokenizer and vocab_size is not None:
        data["vocab_size"] = -(-vocab_size // 64) * 64
    elif vocab_size is not None and int(data.get("vocab_size", 0)) < vocab_size:
        raise ConfigError(
            f"model vocab_size {data.get('vocab_size')} is smaller than the tokenizer's {vocab_size}; "
            "set vocab_from_tokenizer: true or raise model_overrides.vocab_size"
        )
    if int(data.get("max_seq_len", 0)) < cfg.data.seq_len:
        data["max_seq_len"] = cfg.data.seq_len
    try:
        return ModelConfig.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"model config: {exc}") from exc


def load_train_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a training config; errors name the file and field."""
    return load_yaml_config(TrainConfig, Path(path), overrides)
