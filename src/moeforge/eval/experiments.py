"""Emergence experiments: does a small MoE beat a dense model of equal active parameters, does its router
collapse without a balancing loss, and does top-2 add anything over top-1?

The reference is a study that trained GPT-2 small with MoE in its last 4 layers for 10k steps on code,
math and prose and found: MoE 3.6% lower eval loss than dense (2.080 vs 2.157); without the
load-balancing (LB) loss one expert took 73.6% of the tokens by step 500; top-2 ≈ top-1 (2.077).
:func:`run_emergence` repeats that at tiny scale on CPU, with the same token budget for every run:

    data run (reused when done) → BPE tokenizer → packed token shards (document attention)
    → one training run per variant (dense, main top-1, no-LB, top-2) → test loss overall and per domain
    → expert × domain affinity per MoE layer on the test split → ``report.md``, ``results.json``, PNGs

The report's findings are computed from the numbers by :func:`derive_findings` (a pure function of
``results.json``), never written in advance: each of the study's three claims is marked held or not held.

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
- **CPU use.** ``parallel`` runs train at once, each in a spawned process with ``threads`` torch threads:
  on a 2-core machine two single-threaded runs beat one two-threaded run, whose threads stall each other
  whenever another job takes a core. A run's result does not depend on which process trained it.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from moeforge.config import ConfigError, StrictModel, apply_overrides, read_yaml, validate_config
from moeforge.io import atomic_write_json, atomic_write_text, sha256_file
from moeforge.model.config import ModelConfig, MoEConfig
from moeforge.model.sizing import count_params
from moeforge.train.collapse import CollapseConfig
from moeforge.train.config import OptimConfig, TrainConfig, resolve_model

__all__ = [
    "STUDY",
    "EmergenceConfig",
    "ExperimentError",
    "ExperimentResult",
    "Finding",
    "VariantConfig",
    "derive_findings",
    "load_emergence_config",
    "render_report",
    "run_emergence",
]

log = logging.getLogger(__name__)

Role = Literal["dense", "main", "no_lb", "top2"]
ROLES: tuple[Role, ...] = ("dense", "main", "no_lb", "top2")
# names the experiment directory uses itself; a variant may not take them
_RESERVED = {"data", "tokenizer", "token-cache"}

# The study's numbers (GPT-2 small, MoE in its last 4 layers, 10k steps), quoted in the report.
STUDY: dict[str, float] = {
    "dense_loss": 2.157,
    "main_loss": 2.080,
    "top2_loss": 2.077,
    "delta_main_pct": -3.6,
    "no_lb_share": 0.736,
    "no_lb_step": 500,
    "steps": 10_000,
}

# (variant name, step, total steps, the step's scalars)
ExperimentProgress = Callable[[str, int, int, dict[str, float]], None]
Notify = Callable[[str], None]


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
    seed: int = 0
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

    def moe_block(self, v: VariantConfig) -> dict[str, Any] | None:
        """The MoE block of run ``v`` (None for the dense run)."""
        return None if v.role == "dense" else {**self.moe, **v.moe}


def load_emergence_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None, *, quick: bool = False
) -> EmergenceConfig:
    """Read an experiment YAML; with ``quick`` its ``quick:`` section is merged onto it first (nested
    mappings merge key by key), then the ``key.path=value`` ``overrides`` apply."""
    p = Path(path)
    data = read_yaml(p)
    if quick:
        q = data.get("quick") or {}
        if not isinstance(q, dict):
            raise ConfigError(f"{p}: quick must be a mapping of settings merged onto the config (--quick)")
        data = _merge(data, q)
    data = apply_overrides(data, overrides or [])
    return validate_config(EmergenceConfig, data, source=str(p))


# ---- building the runs ---------------------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def train_config(
    cfg: EmergenceConfig, v: VariantConfig, *, tokens_dir: Path, run_dir: Path
) -> dict[str, Any]:
    """The training config (plain data) of run ``v``: the shared base, the variant's model, one budget."""
    overrides = dict(cfg.model_overrides)
    if v.role == "dense":
        main = cfg.moe_block(cfg.variant("main"))
        assert main is not None
        overrides["moe"] = None
        overrides["ffn_hidden"] = int(main["top_k"]) * int(main["expert_hidden"])
    else:
        overrides["moe"] = cfg.moe_block(v)
    data: dict[str, Any] = {
        "name": f"{cfg.name}-{v.name}",
        "out_dir": str(run_dir),
        "seed": cfg.seed,
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
    return _merge(data, cfg.train)


def resolve_models(
    cfg: EmergenceConfig, train_cfgs: Mapping[str, dict[str, Any]], vocab_size: int
) -> dict[str, ModelConfig]:
    """Validate every run's config and resolve its model; checks the dense run's equal active size."""
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


# ---- results -------------------------------------------------------------------------------------------


@dataclass
class ExperimentResult:
    out: Path
    report: Path
    results: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    """One of the study's claims, judged on this experiment's numbers (``held`` None: not measurable)."""

    key: str
    claim: str
    held: bool | None
    evidence: str

    @property
    def verdict(self) -> str:
        return {True: "held", False: "did not hold", None: "not measured"}[self.held]


def _pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def _run_by_role(results: Mapping[str, Any], role: str) -> dict[str, Any] | None:
    return next((r for r in results.get("runs", []) if r.get("role") == role), None)


def _test_loss(run: Mapping[str, Any] | None) -> float | None:
    if run is None:
        return None
    v = (run.get("test") or {}).get("loss")
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _gap_trend(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """How the validation-loss gap ``a − b`` moved between their first and last common evaluation."""
    va = {int(st): float(x) for st, x in a.get("valid_curve") or []}
    vb = {int(st): float(x) for st, x in b.get("valid_curve") or []}
    common = sorted(set(va) & set(vb))
    if len(common) < 2:
        return ""
    g0, g1 = va[common[0]] - vb[common[0]], va[common[-1]] - vb[common[-1]]
    trend = "narrowing" if abs(g1) < abs(g0) else "widening" if abs(g1) > abs(g0) else "flat"
    if (g0 < 0) != (g1 < 0) and g0 != 0 and g1 != 0:
        trend = "changing sign"
    return (
        f" Validation-loss gap {a['name']} − {b['name']}: {g0:+.4f} at step {common[0]} → {g1:+.4f} at step "
        f"{common[-1]} ({trend})."
    )


def derive_findings(results: Mapping[str, Any]) -> list[Finding]:
    """Judge the study's three findings on ``results`` (the ``results.json`` data): runs by role with test
    losses and routing statistics, and ``settings`` (``steps``, ``collapse_threshold``,
    ``collapse_patience``, ``similar_pct``). Pure: the same numbers give the same verdicts and text."""
    s = results.get("settings", {})
    steps = int(s.get("steps", 0)) or 1
    thr = float(s.get("collapse_threshold", 0.6))
    patience = int(s.get("collapse_patience", 3))
    tol = float(s.get("similar_pct", 1.0))
    dense, main, no_lb, top2 = (_run_by_role(results, r) for r in ROLES)
    out: list[Finding] = []

    # 1. MoE beats dense at equal active parameters
    claim = (
        f"MoE has lower eval loss than a dense model of equal active parameters "
        f"({STUDY['main_loss']:.3f} vs {STUDY['dense_loss']:.3f}, {STUDY['delta_main_pct']:+.1f}%)"
    )
    ld, lm = _test_loss(dense), _test_loss(main)
    if ld is None or lm is None or main is None or dense is None:
        out.append(Finding("moe_beats_dense", claim, None, "the dense or the main run has no test loss"))
    else:
        d = _pct(lm, ld)
        doms = sorted(k.split("/", 1)[1] for k in main.get("test", {}) if k.startswith("loss/"))
        better = [x for x in doms if main["test"][f"loss/{x}"] < dense.get("test", {}).get(f"loss/{x}", -1)]
        worse = [x for x in doms if x not in better]
        per_dom = ", ".join(
            f"{x} {_pct(main['test'][f'loss/{x}'], dense['test'][f'loss/{x}']):+.2f}%"
            for x in doms
            if f"loss/{x}" in dense.get("test", {})
        )
        ev = (
            f"test loss {main['name']} (MoE top-1) {lm:.4f} vs {dense['name']} (dense) {ld:.4f}: {d:+.2f}% "
            f"(study {STUDY['delta_main_pct']:+.1f}%). Per domain: {per_dom or 'n/a'}"
        )
        if better and worse:
            ev += f"; lower on {', '.join(better)}, not on {', '.join(worse)}"
        ev += (
            f". Active parameters {main.get('params_active', 0):,} vs {dense.get('params_active', 0):,}; "
            f"total {main.get('params_total', 0):,} vs {dense.get('params_total', 0):,}."
        )
        if lm < ld:
            ev += f" The gain is {abs(d) / abs(STUDY['delta_main_pct']):.2f}× the study's."
        ev += _gap_trend(main, dense)
        out.append(Finding("moe_beats_dense", claim, lm < ld, ev))

    # 2. Without LB one expert takes most of the tokens early
    claim = (
        f"without the load-balancing loss one expert takes most of the tokens early "
        f"({100 * STUDY['no_lb_share']:.1f}% by step {STUDY['no_lb_step']:.0f} of {STUDY['steps']:,.0f}, "
        f"{100 * STUDY['no_lb_step'] / STUDY['steps']:.0f}% of training)"
    )
    if no_lb is None or not (no_lb.get("routing") or {}).get("load_max_curve"):
        out.append(Finding("no_lb_collapses", claim, None, "the no-LB run recorded no routing loads"))
    else:
        r = no_lb["routing"]
        first = r.get("first_collapse")
        peak = f"peak largest-expert share {100 * r['load_max_peak']:.1f}% at step {r['load_max_peak_step']}"
        if first is not None:
            ev = (
                f"{no_lb['name']}: the collapse detector fired at step {first['step']} "
                f"({100 * first['step'] / steps:.0f}% of training) — layer {first['layer']}'s expert "
                f"{first['expert']} held {100 * first['fraction']:.1f}% of the tokens, above "
                f"{100 * thr:.0f}% for {patience} consecutive checks; {peak}; final "
                f"{100 * r['load_max_final']:.1f}%"
            )
        else:
            ev = (
                f"{no_lb['name']}: no collapse (largest share never above {100 * thr:.0f}% for {patience} "
                f"consecutive checks); {peak}; final {100 * r['load_max_final']:.1f}%"
            )
        early = r.get("load_at_study_point")
        if early:
            ev += (
                f"; at step {early['step']} ({100 * early['step'] / steps:.0f}% of training, the study's "
                f"point) {100 * early['value']:.1f}%"
            )
        mr = (main or {}).get("routing") or {}
        if mr.get("load_max_curve"):
            ev += (
                f". With LB ({main['name']}) the largest share peaked at {100 * mr['load_max_peak']:.1f}% "
                f"and ended at {100 * mr['load_max_final']:.1f}%"
            )
            if mr.get("first_collapse") is not None:
                ev += f" — the main run collapsed too (step {mr['first_collapse']['step']})"
            balanced = mr.get("balanced_share")
            if balanced:
                ev += f" (balanced: {100 * balanced:.1f}%)"
            ratio = r["load_max_peak"] / mr["load_max_peak"] if mr["load_max_peak"] > 0 else float("inf")
            ev += f". Without LB the peak share is {ratio:.2f}× the LB run's, so removing LB " + (
                "did skew the routing" if ratio > 1 else "did not skew the routing more"
            )
        out.append(Finding("no_lb_collapses", claim, first is not None, ev + "."))

    # 3. top-2 ≈ top-1
    claim = (
        f"top-2 routing is about as good as top-1 ({STUDY['top2_loss']:.3f} vs {STUDY['main_loss']:.3f}, "
        f"{_pct(STUDY['top2_loss'], STUDY['main_loss']):+.2f}%)"
    )
    l2 = _test_loss(top2)
    if l2 is None or lm is None or top2 is None or main is None:
        out.append(Finding("top2_matches_top1", claim, None, "the top-2 or the main run has no test loss"))
    else:
        d2 = _pct(l2, lm)
        ev = (
            f"test loss {top2['name']} (top-2) {l2:.4f} vs {main['name']} (top-1) {lm:.4f}: {d2:+.2f}% "
            f'({"within" if abs(d2) <= tol else "outside"} the ±{tol:g}% taken as "about as good"); '
            f"top-2 is {'better' if d2 < 0 else 'worse' if d2 > 0 else 'equal'}, with "
            f"{top2.get('params_active', 0):,} active parameters against {main.get('params_active', 0):,}"
        )
        out.append(Finding("top2_matches_top1", claim, abs(d2) <= tol, ev + "."))
    return out


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def render_report(results: Mapping[str, Any]) -> str:
    """``report.md`` from ``results`` (the ``results.json`` data); findings via :func:`derive_findings`."""
    s = results.get("settings", {})
    runs = results.get("runs", [])
    dense = _run_by_role(results, "dense")
    ld = _test_loss(dense)
    domains: list[str] = list(results.get("domains", []))
    lines = [
        f"# Emergence experiment: {results.get('name', '')}",
        "",
        f"Data: {results.get('data', {}).get('recipe', '?')} — domains {', '.join(domains) or '?'}; "
        f"{s.get('steps')} steps × {s.get('micro_batch')} × {s.get('grad_accum', 1)} sequences of "
        f"{s.get('seq_len')} tokens per run (the same budget for every run, "
        f"{_fmt(s.get('tokens_per_run'), ',.0f')} tokens; the train split holds "
        f"{_fmt(results.get('tokens', {}).get('train'), ',.0f')}). "
        f"MoE layers {s.get('moe_layers')} of {s.get('n_layers')}, "
        f"{s.get('num_experts')} experts. Seed {s.get('seed')}.",
        "",
        "## Results",
        "",
    ]
    lines += ["Runs (one token budget and data order each):", ""]
    for r in runs:
        moe = r.get("moe")
        how = (
            f"dense, MLP width {r.get('ffn_hidden')}"
            if not moe
            else f"top-{moe['top_k']} of {moe['num_experts']} experts × {moe['expert_hidden']} in layers "
            f"{r.get('moe_layers')}, lb_coef {moe['lb_coef']:g}, z_coef {moe['z_coef']:g}, router noise "
            f"{moe['router_noise_std']:g} annealed over {moe['noise_anneal_steps']} steps"
            + (", renormalized" if moe.get("renormalize") and moe["top_k"] > 1 else "")
        )
        lines.append(f"- **{r['name']}** ({r['role']}): {r.get('description', '')} — {how}.")
    lines.append("")
    head = ["run", "role", "active params", "total params", "valid loss", "test loss"]
    head += [f"test {d}" for d in domains]
    head += ["Δ vs dense", "peak load", "final load", "first collapse step"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        test = r.get("test") or {}
        lt = _test_loss(r)
        rt = r.get("routing") or {}
        fc = rt.get("first_collapse")
        row = [
            f"{r['name']}",
            r["role"],
            f"{r.get('params_active', 0):,}",
            f"{r.get('params_total', 0):,}",
            _fmt((r.get("final_valid") or {}).get("loss")),
            _fmt(lt),
            *(_fmt(test.get(f"loss/{d}")) for d in domains),
            "—" if lt is None or ld is None or r["role"] == "dense" else f"{_pct(lt, ld):+.2f}%",
            "—" if not rt.get("load_max_curve") else f"{100 * rt['load_max_peak']:.1f}%",
            "—" if not rt.get("load_max_curve") else f"{100 * rt['load_max_final']:.1f}%",
            "—"
            if fc is None
            else f"{fc['step']} (L{fc['layer']} e{fc['expert']} {100 * fc['fraction']:.1f}%)",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Losses are cross-entropy in nats per token (test: the whole test split; valid: the last validation "
        "pass). Load: the largest expert's share of a layer's tokens per logging interval, the maximum over "
        "MoE layers (peak over training; final interval). Collapse: that share above "
        f"{100 * float(s.get('collapse_threshold', 0.6)):.0f}% for {s.get('collapse_patience')} consecutive "
        f"checks (every {s.get('log_every')} steps).",
        "",
        "## Findings",
        "",
    ]
    for f in derive_findings(results):
        lines.append(f"- **{f.verdict.upper()}** — study: {f.claim}. Here: {f.evidence}")
    lines += ["", "## Specialization", ""]
    lines.append(
        "Per MoE layer, how far the experts' domain mix departs from uniform (mean total-variation distance "
        "of each domain's expert distribution from the average one; 0 = no specialization):"
    )
    lines.append("")
    for r in runs:
        spec = r.get("specialization") or {}
        if spec:
            lines.append(f"- {r['name']}: " + ", ".join(f"layer {k} {float(v):.3f}" for k, v in spec.items()))
    lines += ["", "## Caveats", ""]
    lines.append(
        f"- One seed per run and {_fmt(s.get('tokens_per_run'), ',.0f')} training tokens each: differences "
        f"of a percent or so can come from the seed alone."
    )
    sizes = ", ".join(f"{r['name']} {r.get('params_total', 0):,}" for r in runs)
    lines.append(
        f"- Tiny models ({sizes} parameters) trained on CPU; the study trained GPT-2 small for "
        f"{STUDY['steps']:,.0f} steps."
    )
    env = results.get("environment", {})
    if env:
        lines.append(
            f"- Wall time {env.get('wall_seconds', 0) / 60:.1f} min on {env.get('cpus')} CPUs "
            f"({env.get('parallel', 1)} run(s) at a time, {env.get('torch_threads')} torch thread(s) each); "
            "load average "
            f"{env.get('loadavg_start')} at the start, {env.get('loadavg_end')} at the end."
        )
        per_run = ", ".join(f"{r['name']} {r.get('train_seconds', 0):.0f} s" for r in runs)
        lines.append(f"- Training time per run (its own process, wall clock): {per_run}.")
        reused = [r["name"] for r in runs if r.get("reused")]
        if reused:
            lines.append(
                f"- Reused from an earlier invocation (identical config, completed): {', '.join(reused)}; "
                "the wall time above excludes their training."
            )
    files = results.get("files", {})
    if files:
        lines += ["", "## Charts", ""]
        for k, p in files.items():
            if str(p).endswith(".png"):
                lines.append(f"- {k}: ![{k}]({Path(p).name})")
    return "\n".join(lines) + "\n"


# ---- routing statistics --------------------------------------------------------------------------------


def routing_stats(
    rows: Sequence[Mapping[str, Any]],
    collapse_events: Sequence[Mapping[str, Any]],
    *,
    steps: int,
    study_fraction: float = STUDY["no_lb_step"] / STUDY["steps"],
) -> dict[str, Any]:
    """From a run's ``metrics.jsonl`` rows: the largest expert share per MoE layer over training, its
    peak and final value (max over layers), the value at ``study_fraction`` of training, and the first
    collapse event."""
    train = [r for r in rows if r.get("split") == "train"]
    curve: dict[str, list[list[float]]] = {}
    for r in train:
        for k, v in r.items():
            if k.startswith("moe/L") and k.endswith("/load_max"):
                curve.setdefault(k.split("/")[1], []).append([int(r["step"]), float(v)])
    if not curve:
        return {}
    per_step: dict[int, float] = {}
    for pts in curve.values():
        for st, v in pts:
            per_step[int(st)] = max(per_step.get(int(st), 0.0), v)
    peak_step = max(per_step, key=lambda k: (per_step[k], -k))
    target = study_fraction * steps
    early = next(((st, v) for st, v in sorted(per_step.items()) if st >= target), None)
    first = min(collapse_events, key=lambda e: (e["step"], e["layer"]), default=None)
    return {
        "load_max_curve": dict(sorted(curve.items())),
        "load_max_peak": per_step[peak_step],
        "load_max_peak_step": peak_step,
        "load_max_final": per_step[max(per_step)],
        "load_at_study_point": None if early is None else {"step": early[0], "value": early[1]},
        "first_collapse": None if first is None else dict(first),
    }


# ---- the experiment ------------------------------------------------------------------------------------


def _recipe_path(cfg: EmergenceConfig) -> Path:
    # the shipped configs/ (a symlink in the package in a checkout, package data in a wheel)
    configs = Path(__file__).resolve().parent.parent / "configs"
    if cfg.real_data:
        return configs / "data" / "emergence-real.yaml"
    if cfg.data == "builtin":
        return configs / "data" / "demo.yaml"
    return Path(cfg.data)


def _data_run(cfg: EmergenceConfig, data_dir: Path) -> dict[str, Any]:
    from moeforge.data.manifest import load_manifest
    from moeforge.data.pipeline import run_pipeline
    from moeforge.data.recipe import load_recipe

    recipe = load_recipe(_recipe_path(cfg), cfg.data_overrides)
    stored = data_dir / "recipe.json"
    done = (data_dir / "manifest.json").is_file() and stored.is_file()
    if done and json.loads(stored.read_text(encoding="utf-8")) == recipe.resolved():
        log.info("data: reusing the finished run in %s", data_dir)
        return load_manifest(data_dir)
    res = run_pipeline(recipe, data_dir, workers=cfg.data_workers)
    if not res.gates_passed:
        failed = [g.gate for g in res.gates if not g.passed]
        raise ExperimentError(
            f"the data run in {data_dir} failed its gates {failed}; see {data_dir / 'manifest.json'} and fix "
            "the recipe (data_overrides) before training on it"
        )
    return res.manifest


def _tokenizer(cfg: EmergenceConfig, data_dir: Path, tok_dir: Path) -> Path:
    from moeforge.tokens.tokenizer import TokenizerConfig, train_tokenizer, verify_tokenizer

    tok_cfg = TokenizerConfig(vocab_size=cfg.tokenizer_vocab)
    stamp = tok_dir / "trained_on.json"
    want = {"run_manifest_sha256": sha256_file(data_dir / "manifest.json"), "vocab_size": cfg.tokenizer_vocab}
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == want:
        log.info("tokenizer: reusing %s", tok_dir)
    else:
        train_tokenizer(data_dir, tok_dir, tok_cfg)
        atomic_write_json(stamp, want)
    problems = verify_tokenizer(tok_dir, tok_cfg)
    if problems:
        raise ExperimentError(f"the tokenizer in {tok_dir} failed verification: {problems}")
    return tok_dir


def _affinity(run_dir: Path, tokens_dir: Path, batch: int, max_batches: int | None) -> dict[int, Any]:
    """Expert × domain affinity per MoE layer of the run's final checkpoint, on the test split."""
    from moeforge.eval.routing import expert_domain_affinity
    from moeforge.model.transformer import MoETransformer
    from moeforge.tokens.loader import TokenDataset
    from moeforge.train.checkpoint import latest_checkpoint, load_checkpoint
    from moeforge.train.trainer import eval_batches

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ExperimentError(f"{run_dir} has no checkpoint to compute routing affinity from")
    mcfg = ModelConfig.model_validate(json.loads((run_dir / "config.json").read_text())["model"])
    if not mcfg.moe_layer_indices:
        return {}
    model = MoETransformer(mcfg)
    load_checkpoint(ckpt, model, None, restore_rng_state=False)
    ds = TokenDataset(tokens_dir, "test")
    return expert_domain_affinity(model, eval_batches(ds, batch, max_batches=max_batches), len(ds.domains))


def _prepare_run(
    cfg: EmergenceConfig, v: VariantConfig, tc: dict[str, Any], run_dir: Path, *, fresh: bool
) -> bool:
    """True when ``run_dir`` holds a completed run of exactly ``tc`` (reused); otherwise empty ``run_dir``
    and write ``tc`` as its ``config.yaml``, ready to train."""
    text = yaml.safe_dump(tc, sort_keys=False)
    cfg_path = run_dir / "config.yaml"
    summary_path = run_dir / "summary.json"
    if not fresh and cfg_path.is_file() and summary_path.is_file() and cfg_path.read_text() == text:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("status") == "completed" and summary.get("steps") == cfg.steps:
            log.info("%s: reusing the completed run in %s", v.name, run_dir)
            return True
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    atomic_write_text(cfg_path, text)
    return False


# set in each worker process by _worker_init: where progress goes
_worker_queue: Any = None


def _worker_init(queue: Any, threads: int | None) -> None:
    global _worker_queue
    _worker_queue = queue
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _train_one(name: str, cfg_path: str, progress: ExperimentProgress | None = None) -> float:
    """Train one prepared run; returns its wall seconds. Raises ExperimentError unless it completed."""
    from moeforge.train.run import run_training

    def on_step(step: int, total: int, scalars: dict[str, float]) -> None:
        if progress is not None:
            progress(name, step, total, scalars)
        elif _worker_queue is not None:
            _worker_queue.put((name, step, total, {"loss": float(scalars["loss"])}))

    t = time.perf_counter()
    load = [round(x, 2) for x in os.getloadavg()]
    res = run_training(cfg_path, progress=on_step)
    if res.status != "completed":
        raise ExperimentError(f"run {name!r} ended {res.status} at step {res.steps}; see {res.run_dir}")
    seconds = time.perf_counter() - t
    # kept beside the run, so a later invocation that reuses it still reports what training cost
    atomic_write_json(
        Path(cfg_path).parent / "timing.json",
        {
            "train_seconds": round(seconds, 1),
            "loadavg_start": load,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
    )
    return seconds


def _train_all(
    cfg: EmergenceConfig, pending: list[tuple[str, Path]], progress: ExperimentProgress | None
) -> dict[str, float]:
    """Train the prepared runs, ``cfg.parallel`` at a time; returns wall seconds per run."""
    if cfg.parallel == 1 or len(pending) <= 1:
        return {name: _train_one(name, str(path), progress) for name, path in pending}
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited torch or thread state
    queue = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                item = queue.get_nowait()
            except Empty:
                return
            if progress is not None:
                progress(*item)

    seconds: dict[str, float] = {}
    with ProcessPoolExecutor(
        max_workers=min(cfg.parallel, len(pending)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(queue, cfg.threads),
    ) as pool:
        futures = {pool.submit(_train_one, name, str(path)): name for name, path in pending}
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, timeout=0.25, return_when=FIRST_COMPLETED)
            drain()
            for f in done:
                try:
                    seconds[futures[f]] = f.result()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        drain()
    return seconds


def run_emergence(
    cfg: EmergenceConfig,
    *,
    progress: ExperimentProgress | None = None,
    notify: Notify | None = None,
    fresh: bool = False,
) -> ExperimentResult:
    """Run the whole experiment into ``cfg.out_dir``; see the module docstring.

    Finished stages are reused: the data run (same recipe), the tokenizer (same data and vocabulary), the
    token shards (a cache keyed by their inputs) and every run whose ``config.yaml`` and budget match a
    completed run (``fresh`` retrains all runs). ``progress(variant, step, total, scalars)`` follows
    training; ``notify`` receives one line per stage. Raises :class:`ExperimentError` or ConfigError.
    """

    import torch

    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, progress=progress, notify=notify, fresh=fresh)
    finally:
        torch.set_num_threads(threads)


def _run(
    cfg: EmergenceConfig, *, progress: ExperimentProgress | None, notify: Notify | None, fresh: bool
) -> ExperimentResult:
    import torch

    from moeforge.eval.plots import affinity_heatmaps, load_metrics, loss_curves, routing_load_curves
    from moeforge.eval.routing import specialization
    from moeforge.tokens.tokenize import tokenize_run

    say = notify or (lambda m: log.info("%s", m))
    t_start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    recipe = _recipe_path(cfg)
    say(f"data: {recipe} → {out / 'data'}")
    t = time.perf_counter()
    manifest = _data_run(cfg, out / "data")
    timings["data"] = time.perf_counter() - t

    say(f"tokenizer: byte-level BPE, {cfg.tokenizer_vocab} tokens")
    t = time.perf_counter()
    tok_dir = _tokenizer(cfg, out / "data", out / "tokenizer")
    timings["tokenizer"] = time.perf_counter() - t

    say(f"tokens: {cfg.seq_len}-token blocks, document attention")
    t = time.perf_counter()
    tok = tokenize_run(
        out / "data", tok_dir, seq_len=cfg.seq_len, mode="pretrain", cache_root=out / "token-cache"
    )
    timings["tokens"] = time.perf_counter() - t
    tokens_dir = tok.path
    domains: list[str] = list(tok.manifest["domains"])
    vocab = int(tok.manifest["tokenizer"]["vocab_size"])

    train_cfgs = {
        v.name: train_config(cfg, v, tokens_dir=tokens_dir, run_dir=out / v.name) for v in cfg.variants
    }
    models = resolve_models(cfg, train_cfgs, vocab)

    reused = {
        v.name: _prepare_run(cfg, v, train_cfgs[v.name], out / v.name, fresh=fresh) for v in cfg.variants
    }
    pending = [(v.name, out / v.name / "config.yaml") for v in cfg.variants if not reused[v.name]]
    for v in cfg.variants:
        state = "reused" if reused[v.name] else "to train"
        say(f"run {v.name} ({v.role}, {state}): {v.description}".rstrip())
        if reused[v.name] and progress is not None:
            progress(v.name, cfg.steps, cfg.steps, {})
    if pending:
        say(f"training {len(pending)} run(s), {min(cfg.parallel, len(pending))} at a time")
    t = time.perf_counter()
    train_seconds = _train_all(cfg, pending, progress)
    timings["train_wall"] = time.perf_counter() - t

    runs: list[dict[str, Any]] = []
    files: dict[str, Path] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for v in cfg.variants:
        run_dir = out / v.name
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        timing = (
            json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").is_file() else {}
        )
        train_s = train_seconds.get(v.name, float(timing.get("train_seconds", 0.0)))
        rows = load_metrics(run_dir)
        curves[v.name] = rows
        t = time.perf_counter()
        aff = _affinity(run_dir, tokens_dir, cfg.micro_batch, cfg.affinity_max_batches)
        mcfg = models[v.name]
        record: dict[str, Any] = {
            "name": v.name,
            "role": v.role,
            "description": v.description,
            "status": summary["status"],
            "steps": summary["steps"],
            "tokens_seen": summary["tokens_seen"],
            "params_total": summary["params_total"],
            "params_active": summary["params_active"],
            "moe": None if mcfg.moe is None else mcfg.moe.model_dump(mode="json"),
            "moe_layers": mcfg.moe_layer_indices,
            "ffn_hidden": mcfg.ffn_hidden,
            "final_valid": summary.get("final_valid") or {},
            "best_valid_loss": summary.get("best_valid_loss"),
            "test": summary.get("test") or {},
            "collapse_events": summary.get("collapse_events") or [],
            "routing": routing_stats(rows, summary.get("collapse_events") or [], steps=cfg.steps),
            "affinity": {str(k): m.round(4).tolist() for k, m in aff.items()},
            "specialization": {str(k): round(specialization(m), 4) for k, m in aff.items()},
            "valid_curve": [
                [int(r["step"]), float(r["loss"])] for r in rows if r.get("split") == "valid" and "loss" in r
            ],
            "train_seconds": round(train_s, 1),
            "train_loadavg": [timing.get("loadavg_start"), timing.get("loadavg_end")],
            "reused": reused[v.name],
        }
        if mcfg.moe is not None and record["routing"]:
            record["routing"]["balanced_share"] = mcfg.moe.top_k / mcfg.moe.num_experts
        tps = [r["tokens_per_s"] for r in rows if r.get("split") == "train" and r.get("tokens_per_s")]
        record["tokens_per_s"] = round(float(sum(tps) / len(tps)), 1) if tps else None
        if aff:
            files[f"affinity_{v.name}"] = affinity_heatmaps(
                aff, domains, out / f"affinity_{v.name}.png", title=f"{v.name}: share of each domain's tokens"
            )
            files[f"routing_load_{v.name}"] = routing_load_curves(
                rows, out / f"routing_load_{v.name}.png", title=f"{v.name}: largest expert's token share"
            )
        timings[f"run:{v.name}"] = train_s
        timings[f"affinity:{v.name}"] = time.perf_counter() - t
        runs.append(record)

    ld = _test_loss(next(r for r in runs if r["role"] == "dense"))
    for r in runs:
        lt = _test_loss(r)
        r["delta_vs_dense_pct"] = None if lt is None or ld is None else round(_pct(lt, ld), 3)
    files = {
        "loss": loss_curves(curves, out / "loss.png", title=f"{cfg.name}: train and validation loss")
    } | files

    main_model = models[cfg.variant("main").name]
    assert main_model.moe is not None
    results: dict[str, Any] = {
        "name": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "study": STUDY,
        "data": {
            "recipe": str(recipe),
            "dir": str(out / "data"),
            "records": manifest.get("records"),
        },
        "tokens": {s: v["tokens"] for s, v in tok.manifest["splits"].items()},
        "tokens_dir": str(tokens_dir),
        "domains": domains,
        "settings": {
            "steps": cfg.steps,
            "micro_batch": cfg.micro_batch,
            "grad_accum": cfg.grad_accum,
            "seq_len": cfg.seq_len,
            "tokens_per_run": cfg.steps * cfg.micro_batch * cfg.grad_accum * cfg.seq_len,
            "seed": cfg.seed,
            "n_layers": main_model.n_layers,
            "d_model": main_model.d_model,
            "moe_layers": main_model.moe_layer_indices,
            "num_experts": main_model.moe.num_experts,
            "log_every": cfg.log_every,
            "collapse_threshold": cfg.collapse.threshold,
            "collapse_patience": cfg.collapse.patience,
            "similar_pct": cfg.similar_pct,
        },
        "runs": runs,
        "files": {k: str(p) for k, p in files.items()},
    }
    results["environment"] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "parallel": cfg.parallel,
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "stage_seconds": {k: round(x, 1) for k, x in timings.items()},
    }
    results["findings"] = [asdict(f) | {"verdict": f.verdict} for f in derive_findings(results)]
    atomic_write_json(out / "results.json", results)
    report = atomic_write_text(out / "report.md", render_report(results))
    files["results"] = out / "results.json"
    files["report"] = report
    say(f"report: {report}")
    return ExperimentResult(out, report, results, files)
