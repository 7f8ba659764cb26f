"""Training configuration: one YAML (``configs/train/*.yaml``) validated into :class:`TrainConfig`.

Every field has a default except the data; ``moeforge train CONFIG --set optim.lr=1e-3`` overrides any
of them. The resolved config is saved with every run and every checkpoint, so a run can always be
explained and resumed.

Fine-tuning: ``init_from`` names a checkpoint directory (``model.safetensors`` + ``state.json``) or a
training run directory (its latest checkpoint). The model config then comes from the checkpoint's
``state.json`` ``model_config`` (``model`` must not be given; ``model_overrides`` still apply, but only
shape-preserving ones such as router noise or ``lb_coef`` can load the weights), the vocabulary is the
checkpoint's, and with ``data.run`` the tokenizer defaults to the checkpoint's own (:func:`resolve_tokenizer`).
``freeze`` keeps the embeddings, an untied LM head and/or the first blocks fixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from moeforge.config import ConfigError, StrictModel, deep_merge, load_yaml_config
from moeforge.model.config import ModelConfig, load_model_config
from moeforge.train.collapse import CollapseConfig
from moeforge.train.ghost import GhostConfig

__all__ = [
    "DataConfig",
    "EvalConfig",
    "FreezeConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "TrainConfig",
    "checkpoint_model_config",
    "checkpoint_tokenizer",
    "load_train_config",
    "resolve_init_from",
    "resolve_model",
    "resolve_tokenizer",
]


class DataConfig(StrictModel):
    """Where the tokens come from: a pipeline run tokenized through the cache, or a tokenized directory."""

    run: str | None = Field(default=None, description="a `moeforge data run` output, tokenized via the cache")
    tokens: str | None = Field(default=None, description="a `moeforge data tokenize` output directory")
    pairs: str | None = Field(
        default=None,
        description="a pair set (`moeforge data pairs import|generate`) for a preference objective",
    )
    tokenizer: str | None = Field(
        default=None,
        description="tokenizer directory (needed with `run` or `pairs`, unless `init_from` carries one: "
        "then its own)",
    )
    seq_len: int = Field(
        default=256, ge=8, description="tokens per training sequence (with `pairs`: prompt + side at most)"
    )
    mode: Literal["pretrain", "sft"] = "pretrain"
    attention: Literal["document", "causal"] = Field(
        default="document", description="document: attend only within each packed document"
    )
    max_records: int | None = Field(default=None, ge=1, description="cap records per split when tokenizing")
    cache_dir: str | None = Field(default=None, description="token cache root (default ~/.cache/moeforge)")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if sum(x is not None for x in (self.run, self.tokens, self.pairs)) != 1:
            raise ValueError(
                "data needs exactly one of `run` (with `tokenizer`), `tokens`, or `pairs` (a preference objective)"
            )
        # data.run/pairs without data.tokenizer is checked by TrainConfig: init_from may supply the tokenizer
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


class FreezeConfig(StrictModel):
    """Parameters kept fixed while training (``requires_grad=False``, left out of the optimizer).

    Only parameters are frozen: buffers of a frozen MoE block (the aux-free router bias, the noise
    annealing counter, ghost alphas) still follow their own update rules.
    """

    embeddings: bool = Field(
        default=False, description="freeze the token embedding (and with it a tied LM head)"
    )
    lm_head: bool = Field(
        default=False, description="freeze an untied LM head (a tied one follows `embeddings`)"
    )
    blocks: int = Field(default=0, ge=0, description="freeze the first N transformer blocks (0..n_layers)")


class ObjectiveConfig(StrictModel):
    """What the run minimizes: language modeling, or a preference loss over ``data.pairs``.

    ``dpo`` (sigmoid) and ``ipo`` compare the policy with a reference: the ``init_from`` checkpoint, whose
    log-probabilities of every pair are computed once before the first step into ``RUN/reference/`` (keyed
    by the weights' sha256 and the pairs) — no second model in memory while training. ``simpo`` is
    reference-free (length-normalized log-probabilities with a target margin ``simpo_gamma``). The MoE
    auxiliary losses are added to every objective.
    """

    name: Literal["lm", "dpo", "ipo", "simpo"] = "lm"
    beta: float = Field(default=0.1, gt=0, description="preference temperature (IPO: its regularizer τ)")
    simpo_gamma: float = Field(default=0.5, ge=0, description="SimPO target reward margin")
    nll_coef: float = Field(
        default=0.0,
        ge=0,
        description="add this times the chosen answers' per-token NLL (RPO, TRL's rpo_alpha): DPO alone can "
        "lower both sides' likelihood, a model drifting away from the chosen answers",
    )
    kl_pairs: int = Field(
        default=32,
        ge=0,
        description="held-out pairs whose prompts measure the per-token KL to the reference at each eval "
        "(the reference is loaded for the eval only); 0 skips it",
    )


class ParallelConfig(StrictModel):
    """How a torchrun job splits the model (data parallelism over the ranks is always on)."""

    expert: int = Field(
        default=1,
        ge=1,
        description="expert parallelism: each MoE layer's experts sharded over this many ranks (tokens go "
        "all-to-all); 1 = every rank holds every expert. Must equal the number of processes and divide the "
        "experts",
    )


class TrainConfig(StrictModel):
    """A training run."""

    name: str = Field(default="run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field(default="runs/train", description="run directory: checkpoints, metrics, summary")
    seed: int = 0
    model: str | dict[str, Any] | None = Field(
        default="tiny",
        description="preset name, YAML path or inline config; not with init_from, whose checkpoint's "
        "model config is used (null: unset, e.g. `--set model=null` on a config that names one)",
    )
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="merged onto the model config")
    vocab_from_tokenizer: bool = Field(
        default=True,
        description="set model.vocab_size to the tokenizer's (rounded up to a multiple of 64); "
        "ignored with init_from, whose vocabulary is fixed",
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
    persistent_expert_grads: bool = Field(
        default=True,
        description="CPU, one process: expert weight gradients written into buffers kept across steps "
        "(no fresh allocation per step; model/grad_buffers.py); off under DDP, FSDP, EP and compile",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 on CUDA, fp32 on CPU"
    )
    peak_flops: float | None = Field(
        default=None,
        gt=0,
        description="matmul FLOP/s for MFU; null measures it when the run starts, with the run's threads",
    )
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    ghost: GhostConfig = Field(default_factory=GhostConfig)
    distributed: Literal["ddp", "fsdp"] = Field(default="ddp", description="strategy under torchrun")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    tensorboard: bool = True
    init_from: str | None = Field(
        default=None,
        description="checkpoint or run directory (its latest checkpoint) to start from: weights, model "
        "config and (with data.run) tokenizer",
    )
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)

    @property
    def preference(self) -> bool:
        """True for a preference objective (dpo, ipo, simpo): the run trains on ``data.pairs``."""
        return self.objective.name != "lm"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr ({self.optim.min_lr}) must not exceed optim.lr ({self.optim.lr})")
        if self.init_from is not None and self.model is not None and "model" in self.model_fields_set:
            raise ValueError(
                "`model` and `init_from` are both given: with init_from the model config comes from the "
                "checkpoint's state.json; remove `model` or set it to null (model_overrides still apply, "
                "e.g. for router settings)"
            )
        if self.init_from is None and self.model is None:
            raise ValueError(
                "model is null: name a preset, a YAML path or an inline config, or set init_from"
            )
        if self.data.run is not None and self.data.tokenizer is None and self.init_from is None:
            raise ValueError(
                "data.run needs data.tokenizer (a `moeforge tokenizer train` output), "
                "or init_from a checkpoint that carries its tokenizer"
            )
        name = self.objective.name
        if self.preference and self.data.pairs is None:
            raise ValueError(f"objective {name} trains on preference pairs: set data.pairs to a pair set")
        if not self.preference and self.data.pairs is not None:
            raise ValueError(
                "data.pairs is a preference pair set: set objective.name to dpo, ipo or simpo "
                "(language modeling reads data.run or data.tokens)"
            )
        if name in ("dpo", "ipo") and self.init_from is None:
            raise ValueError(
                f"objective {name} needs init_from: the checkpoint is both the starting policy and the "
                "reference (use simpo to train without a reference)"
            )
        if self.data.pairs is not None and self.data.tokenizer is None and self.init_from is None:
            raise ValueError("data.pairs needs data.tokenizer, or init_from a checkpoint with its tokenizer")
        if self.parallel.expert > 1:
            if self.distributed != "ddp":
                raise ValueError(
                    "parallel.expert > 1 runs with distributed: ddp (DDP over the non-expert weights)"
                )
            if self.preference:
                raise ValueError(
                    "parallel.expert > 1 is for language modeling; preference objectives run without it"
                )
            if self.ghost.enabled:
                raise ValueError(
                    "parallel.expert > 1 with ghost experts is not supported; turn ghost.enabled off"
                )
        return self


def resolve_init_from(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``init_from`` names (absolute): itself when it holds ``model.safetensors``
    and ``state.json``, else the latest complete checkpoint of a run directory. Raises ConfigError naming
    the path and what to point at instead."""
    from moeforge.train.checkpoint import latest_checkpoint

    p = Path(path).expanduser()
    hint = (
        "point init_from at a checkpoint directory (model.safetensors + state.json) "
        "or a training run directory (checkpoints/step-*)"
    )
    if not p.exists():
        raise ConfigError(f"init_from: {p} does not exist; {hint}")
    if not p.is_dir():
        raise ConfigError(f"init_from: {p} is a file; {hint}")
    if (p / "model.safetensors").is_file() and (p / "state.json").is_file():
        return p.resolve()
    if (p / "checkpoints").is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise ConfigError(
                f"init_from: {p} is a run directory with no complete checkpoint under checkpoints/ "
                "(each needs model.safetensors and state.json); train it longer or pick another"
            )
        return latest.resolve()
    missing = [f for f in ("model.safetensors", "state.json") if not (p / f).is_file()]
    raise ConfigError(f"init_from: {p} is not a complete checkpoint (missing {', '.join(missing)}); {hint}")


def checkpoint_model_config(checkpoint: Path) -> dict[str, Any]:
    """The ``model_config`` dict of ``checkpoint/state.json``; ConfigError when absent or unreadable."""
    state_file = checkpoint / "state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"init_from: cannot read {state_file} ({exc})") from exc
    mc = state.get("model_config") if isinstance(state, dict) else None
    if not isinstance(mc, dict):
        raise ConfigError(
            f"init_from: {state_file} has no model_config; was it written by `moeforge train` or an import?"
        )
    return mc


def checkpoint_tokenizer(checkpoint: Path) -> Path | None:
    """The tokenizer a checkpoint carries: ``checkpoint/tokenizer`` (imported/upcycled checkpoints), else
    its run's ``tokenizer/`` (``RUN/checkpoints/step-*/`` → ``RUN/tokenizer``); None when neither has a
    ``tokenizer.json``."""
    for cand in (checkpoint / "tokenizer", checkpoint.parent.parent / "tokenizer"):
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


def resolve_tokenizer(cfg: TrainConfig, checkpoint: Path | None = None) -> Path | None:
    """The tokenizer to tokenize ``data.run`` with: ``data.tokenizer`` when given, else (with init_from)
    the checkpoint's own (:func:`checkpoint_tokenizer`). None when the data is pretokenized
    (``data.tokens``). ``checkpoint``: the already-resolved init_from, to skip resolving it again."""
    if cfg.data.tokenizer is not None:
        return Path(cfg.data.tokenizer)
    if cfg.data.run is None and cfg.data.pairs is None:
        return None
    if cfg.init_from is None:  # the validator already refuses this; kept for direct callers
        raise ConfigError("data.run/pairs needs data.tokenizer (a `moeforge tokenizer train` output)")
    ckpt = checkpoint if checkpoint is not None else resolve_init_from(cfg.init_from)
    tok = checkpoint_tokenizer(ckpt)
    if tok is None:
        raise ConfigError(
            f"data.tokenizer is not set and init_from checkpoint {ckpt} carries no tokenizer "
            f"(looked for {ckpt / 'tokenizer'} and {ckpt.parent.parent / 'tokenizer'}); "
            "set data.tokenizer to the tokenizer the checkpoint was trained with"
        )
    return tok


def resolve_model(
    cfg: TrainConfig, vocab_size: int | None = None, *, checkpoint: Path | None = None
) -> ModelConfig:
    """The model config: preset/path/inline (or, with ``init_from``, the checkpoint's ``model_config``),
    ``model_overrides`` merged, vocab from the tokenizer (``vocab_size``; with init_from the checkpoint's
    vocabulary is kept and the tokenizer's must fit in it), ``max_seq_len`` raised to ``data.seq_len``.
    ``checkpoint``: the already-resolved init_from. Raises ConfigError, also for ``freeze.blocks`` beyond
    ``n_layers``."""
    if cfg.init_from is not None:
        ckpt = checkpoint if checkpoint is not None else resolve_init_from(cfg.init_from)
        data = deep_merge(checkpoint_model_config(ckpt), cfg.model_overrides)
        if vocab_size is not None and int(data.get("vocab_size", 0)) < vocab_size:
            raise ConfigError(
                f"the tokenizer has {vocab_size} tokens but init_from checkpoint {ckpt} has vocab_size "
                f"{data.get('vocab_size')}; tokenize with the checkpoint's tokenizer (omit data.tokenizer "
                "with data.run) — the vocabulary of a checkpoint cannot grow"
            )
        return _validated(cfg, data)
    assert cfg.model is not None  # the validator refuses a null model without init_from
    base = load_model_config(cfg.model).model_dump() if isinstance(cfg.model, str) else dict(cfg.model)
    data = deep_merge(base, cfg.model_overrides)
    if cfg.vocab_from_tokenizer and vocab_size is not None:
        data["vocab_size"] = -(-vocab_size // 64) * 64
    elif vocab_size is not None and int(data.get("vocab_size", 0)) < vocab_size:
        raise ConfigError(
            f"model vocab_size {data.get('vocab_size')} is smaller than the tokenizer's {vocab_size}; "
            "set vocab_from_tokenizer: true or raise model_overrides.vocab_size"
        )
    return _validated(cfg, data)


def _validated(cfg: TrainConfig, data: dict[str, Any]) -> ModelConfig:
    if int(data.get("max_seq_len", 0)) < cfg.data.seq_len:
        data["max_seq_len"] = cfg.data.seq_len
    try:
        mc = ModelConfig.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"model config: {exc}") from exc
    if cfg.freeze.blocks > mc.n_layers:
        raise ConfigError(
            f"freeze.blocks is {cfg.freeze.blocks} but the model has {mc.n_layers} blocks (n_layers); "
            f"use 0..{mc.n_layers}"
        )
    if cfg.freeze.lm_head and mc.tie_embeddings and not cfg.freeze.embeddings:
        raise ConfigError(
            "freeze.lm_head: this model ties its LM head to the token embedding (tie_embeddings); "
            "set freeze.embeddings to freeze both"
        )
    return mc


def load_train_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a training config; errors name the file and field."""
    return load_yaml_config(TrainConfig, Path(path), overrides)
