"""Configuration of the emergence experiment (:mod:`moeforge.eval.experiments`): the experiment YAML
(:class:`EmergenceConfig`, one :class:`VariantConfig` per run), its loading with ``--quick`` and overrides,
and the per-run training configs and resolved models built from it (equal active parameters checked).

Design choices, so the comparison is fair and explainable:

- **Equal active parameters.** Every run shares the base model (``model`` + ``model_overrides``). The
  dense run replaces each MoE layer by a SwiGLU of width ``top_k × expert_hidden`` of the main run, so a
  token touches the same weights except the router (``E · d_model`` per MoE layer). When MoE is in some
  layers only, the base ``ffn_hidden`` must already equal that width (checked), so the dense layers of
  the MoE runs and of the dense run are the same.
- **Top-1 weights are the router probability** (Switch): with ``renormalize`` a top-1 weight is exactly 1
  and the router would get no gradient from the language-model loss, so the MoE block of the shipped
  config sets ``renormalize: false``; the top-2 run changes ``top_k`` only.
- **No-LB ablation** sets ``lb_coef: 0`` and keeps the z-loss and the annealed router noise, so exactly
  one thing differs from the main run.
- **Collapse** is the trainer's detector (:mod:`moeforge.train.collapse`) with ``action: warn`` for every
  MoE run, so a collapsed run keeps training on the same budget and we record the step.
- **Seeds.** A variant's ``seeds`` (default: the top-level ``seed``) make one training run each; the seed
  sets the model's initialization, the data order and the router noise (``TrainConfig.seed``). A variant
  with exactly the default seed keeps its plain run directory (``<variant>``), so runs completed before
  variants had seeds are reused; otherwise each run is ``<variant>-seed<k>``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from moeforge.config import (
    ConfigError,
    StrictModel,
    apply_overrides,
    deep_merge,
    read_yaml,
    validate_config,
)
from moeforge.model.config import ModelConfig, MoEConfig
from moeforge.model.sizing import count_params
from moeforge.train.collapse import CollapseConfig
from moeforge.train.config import OptimConfig, TrainConfig, resolve_model

__all__ = [
    "ROLES",
    "EmergenceConfig",
    "ExperimentError",
    "Role",
    "RunSpec",
    "VariantConfig",
    "load_emergence_config",
    "resolve_models",
    "train_config",
]

log = logging.getLogger("moeforge.eval.experiments")  # the experiment's logger, whatever the module

Role = Literal["dense", "main", "no_lb", "top2"]
ROLES: tuple[Role, ...] = ("dense", "main", "no_lb", "top2")
# names the experiment directory uses itself; a variant may not take them
_RESERVED = {"data", "tokenizer", "token-cache"}


class ExperimentError(ValueError):
    """The experiment cannot run as configured (failed data gates, a missing run …); says what to do."""


class VariantConfig(StrictModel):
    """One training run of the experiment."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run directory and report label")
    role: Role = Field(description="dense | main | no_lb | top2: which of the study's comparisons it feeds")
    description: str = ""
    moe: dict[str, Any] = Field(
        default_factory=dict, description="merged onto the experiment's `moe` block (not for dense)"
    )
    seeds: list[int] | None = Field(
        default=None,
        min_length=1,
        description="one training run per seed (model init, data order, router noise); null: the "
        "experiment's `seed`",
    )

    @model_validator(mode="after")
    def _check_seeds(self) -> VariantConfig:
        if self.seeds is not None:
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"variant {self.name!r}: seeds must be distinct (got {self.seeds})")
            if min(self.seeds) < 0:
                raise ValueError(f"variant {self.name!r}: seeds must be >= 0 (got {self.seeds})")
        return self


@dataclass(frozen=True)
class RunSpec:
    """One training run: a variant with one of its seeds, trained in ``out_dir/<name>``."""

    variant: VariantConfig
    seed: int
    name: str


class EmergenceConfig(StrictModel):
    """``configs/experiments/emergence-*.yaml``; see ``emergence-tiny.yaml`` for a documented example."""

    name: str = Field(default="emergence", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field(default="runs/emergence", description="everything the experiment writes")
    data: str = Field(
        default="builtin",
        description="`builtin` (configs/data/demo.yaml: stdlib code, pydoc prose, generated math) or a "
        "data recipe path (relative to the working directory)",
    )
    real_data: bool = Field(
        default=False,
        description="use configs/data/emergence-real.yaml (stdlib code, GSM8K, tiny Shakespeare under "
        "$MOEFORGE_REAL_DATA) instead of `data`",
    )
    data_overrides: list[str] = Field(default_factory=list, description="key.path=value onto the recipe")
    data_workers: int = Field(default=2, ge=1, description="processes for the data pipeline")
    tokenizer_vocab: int = Field(default=4096, ge=300, description="byte-level BPE vocabulary size")
    seq_len: int = Field(default=128, ge=8, description="tokens per packed training sequence")
    model: str = Field(default="tiny", description="base model preset name or YAML path")
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="merged onto the preset for every run (dims, layers)"
    )
    moe: dict[str, Any] = Field(description="the main run's MoE block (MoEConfig fields)")
    variants: list[VariantConfig] = Field(min_length=4)
    steps: int = Field(ge=1, description="optimizer steps of every run (the same token budget)")
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(default=1, ge=1)
    seed: int = Field(default=0, ge=0, description="the seed of every variant that sets no `seeds`")
    log_every: int = Field(default=10, ge=1, description="routing loads and collapse checks every N steps")
    eval_every: int = Field(default=50, ge=1, description="validation loss every N steps")
    eval_max_batches: int | None = Field(default=8, ge=1, description="validation batches (null: all)")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    train: dict[str, Any] = Field(
        default_factory=dict, description="any other TrainConfig fields, for every run (device, precision)"
    )
    affinity_max_batches: int | None = Field(
        default=None, ge=1, description="test batches for the expert × domain affinity (null: all)"
    )
    parallel: int = Field(
        default=1,
        ge=1,
        le=8,
        description="runs trained at the same time, each in its own process (1: one after another, in process)",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads per training process (null: torch's default); restored after",
    )
    similar_pct: float = Field(
        default=1.0, gt=0, description="top-2 ≈ top-1 when their test losses differ by at most this %"
    )
    quick: dict[str, Any] = Field(
        default_factory=dict, description="merged onto this config by --quick: a test-sized experiment"
    )

    @model_validator(mode="after")
    def _check(self) -> EmergenceConfig:
        roles = [v.role for v in self.variants]
        wrong = {r: roles.count(r) for r in ROLES if roles.count(r) != 1}
        if wrong:
            raise ValueError(
                f"variants need exactly one run per role {list(ROLES)}; got counts {wrong} (roles: {roles})"
            )
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique (got {names})")
        clash = sorted(set(names) & _RESERVED)
        if clash:
            raise ValueError(f"variant names {clash} are used by the experiment directory; rename them")
        for v in self.variants:
            if v.seeds is None:
                v.seeds = [self.seed]
        dirs = [r.name for r in self.runs()]
        clash = sorted({d for d in dirs if dirs.count(d) > 1} | (set(dirs) & _RESERVED))
        if clash:
            raise ValueError(f"run directories {clash} clash (a variant named like another's seed run?)")
        if self.real_data and self.data != "builtin":
            raise ValueError(f"set either data ({self.data!r}) or real_data: true, not both")
        if self.collapse.action != "warn":
            raise ValueError(
                "collapse.action must be warn: a stopped run would train on fewer tokens than the others"
            )
        for v in self.variants:
            if v.role == "dense":
                if v.moe:
                    raise ValueError(f"variant {v.name!r} is the dense run; it takes no moe overrides")
                continue
            try:
                MoEConfig.model_validate({**self.moe, **v.moe})
            except ValueError as exc:
                raise ValueError(f"variant {v.name!r}: moe: {exc}") from exc
        return self

    def variant(self, role: Role) -> VariantConfig:
        return next(v for v in self.variants if v.role == role)

    def seeds_of(self, v: VariantConfig) -> list[int]:
        return list(v.seeds) if v.seeds is not None else [self.seed]

    def run_name(self, v: VariantConfig, seed: int) -> str:
        """``v.name`` when the variant has exactly the default seed (the pre-seeds directory, reused), else
        ``<name>-seed<k>``."""
        return v.name if self.seeds_of(v) == [self.seed] == [seed] else f"{v.name}-seed{seed}"

    def runs(self) -> list[RunSpec]:
        """Every training run: per variant (in order), per seed."""
        return [RunSpec(v, k, self.run_name(v, k)) for v in self.variants for k in self.seeds_of(v)]

    def moe_block(self, v: VariantConfig) -> dict[str, Any] | None:
        """The MoE block of run ``v`` (None for the dense run)."""
        return None if v.role == "dense" else {**self.moe, **v.moe}


def load_emergence_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None, *, quick: bool = False
) -> EmergenceConfig:
    """Read an experiment YAML; with ``quick`` its ``quick:`` section is merged onto it first (nested
    mappings merge key by key; a mapping onto ``variants`` merges into the variants it names, e.g.
    ``variants: {dense: {seeds: [0, 1]}}``), then the ``key.path=value`` ``overrides`` apply."""
    p = Path(path)
    data = read_yaml(p)
    if quick:
        q = data.get("quick") or {}
        if not isinstance(q, dict):
            raise ConfigError(f"{p}: quick must be a mapping of settings merged onto the config (--quick)")
        data = _merge_quick(data, q)
    data = apply_overrides(data, overrides or [])
    return validate_config(EmergenceConfig, data, source=str(p))


# ---- building the runs ---------------------------------------------------------------------------------


def _merge_quick(data: dict[str, Any], quick: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`~moeforge.config.deep_merge`, except that a mapping onto the ``variants`` list merges into
    the variants it names."""
    variants = quick.get("variants")
    if not (isinstance(variants, Mapping) and isinstance(data.get("variants"), list)):
        return deep_merge(data, quick)
    out = deep_merge(data, {k: v for k, v in quick.items() if k != "variants"})
    out["variants"] = _merge_by_name(data["variants"], variants)
    return out


def _merge_by_name(items: list[Any], extra: Mapping[str, Any]) -> list[Any]:
    """``extra`` (name → settings) merged into the mappings of ``items`` with those names."""
    names = [x.get("name") for x in items if isinstance(x, dict)]
    unknown = sorted(set(extra) - set(names))
    if unknown:
        raise ConfigError(f"variants {unknown} to merge settings into are not in the config (have {names})")
    return [
        deep_merge(x, extra[x["name"]]) if isinstance(x, dict) and x.get("name") in extra else x
        for x in items
    ]


def train_config(
    cfg: EmergenceConfig, v: VariantConfig, *, tokens_dir: Path, run_dir: Path, seed: int | None = None
) -> dict[str, Any]:
    """The training config (plain data) of variant ``v`` with ``seed`` (default: the variant's first): the
    shared base, the variant's model, one budget."""
    seed = cfg.seeds_of(v)[0] if seed is None else seed
    overrides = dict(cfg.model_overrides)
    if v.role == "dense":
        main = cfg.moe_block(cfg.variant("main"))
        assert main is not None
        overrides["moe"] = None
        overrides["ffn_hidden"] = int(main["top_k"]) * int(main["expert_hidden"])
    else:
        overrides["moe"] = cfg.moe_block(v)
    data: dict[str, Any] = {
        "name": f"{cfg.name}-{cfg.run_name(v, seed)}",
        "out_dir": str(run_dir),
        "seed": seed,
        "model": cfg.model,
        "model_overrides": overrides,
        "data": {"tokens": str(tokens_dir), "seq_len": cfg.seq_len, "attention": "document"},
        "steps": cfg.steps,
        "micro_batch": cfg.micro_batch,
        "grad_accum": cfg.grad_accum,
        "log_every": cfg.log_every,
        "checkpoint_every": cfg.steps,
        "keep_last": 1,
        "eval": {"every": cfg.eval_every, "max_batches": cfg.eval_max_batches, "test_at_end": True},
        "optim": cfg.optim.model_dump(mode="json"),
        "collapse": cfg.collapse.model_dump(mode="json"),
        "tensorboard": False,
    }
    return deep_merge(data, cfg.train)


def resolve_models(
    cfg: EmergenceConfig, train_cfgs: Mapping[str, dict[str, Any]], vocab_size: int
) -> dict[str, ModelConfig]:
    """Validate every variant's training config (``train_cfgs`` by variant name; the seed does not change the
    model) and resolve its model; checks the dense run's equal active size."""
    models: dict[str, ModelConfig] = {}
    for v in cfg.variants:
        tc = validate_config(TrainConfig, train_cfgs[v.name], source=f"experiment run {v.name!r}")
        models[v.name] = resolve_model(tc, vocab_size)
    main_name, dense_name = cfg.variant("main").name, cfg.variant("dense").name
    main = models[main_name]
    assert main.moe is not None
    width = main.moe.top_k * main.moe.expert_hidden
    partial = len(main.moe_layer_indices) < main.n_layers
    if partial and main.ffn_hidden != width:
        raise ConfigError(
            f"the main run has MoE in layers {main.moe_layer_indices} only, so its other layers are dense with "
            f"ffn_hidden={main.ffn_hidden}; the dense baseline needs every layer {width} wide "
            f"(top_k × expert_hidden) for equal active parameters: set model_overrides.ffn_hidden={width}"
        )
    a_main, a_dense = count_params(main).active, count_params(models[dense_name]).active
    log.info(
        "active parameters: main %s %d, dense %s %d (%+.2f%%, the router)",
        main_name,
        a_main,
        dense_name,
        a_dense,
        100 * (a_main - a_dense) / a_dense,
    )
    return models
