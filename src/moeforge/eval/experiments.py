"""Emergence experiments: does a small MoE beat a dense model of equal active parameters, does its router
collapse without a balancing loss, and does top-2 add anything over top-1?

The reference is a study that trained GPT-2 small with MoE in its last 4 layers for 10k steps on code,
math and prose and found: MoE 3.6% lower eval loss than dense (2.080 vs 2.157); without the
load-balancing (LB) loss one expert took 73.6% of the tokens by step 500; top-2 ≈ top-1 (2.077).
:func:`run_emergence` repeats that at tiny scale on CPU, with the same token budget for every run:

    data run (reused when done) → BPE tokenizer → packed token shards (document attention)
    → one training run per variant (dense, main top-1, no-LB, top-2) and seed → test loss overall and per
    domain → expert × domain affinity per MoE layer on the test split → per-variant mean ± std over seeds
    → ``report.md``, ``results.json``, PNGs

The report's findings are computed from the numbers by :func:`derive_findings` (a pure function of
``results.json``), never written in advance: each of the study's three claims is marked held, not held
or — for MoE vs dense, when the difference of the means is inside the seeds' noise band — inconclusive.

Design choices, so the comparison is fair and explainable (equal active parameters, top-1 weights, the
no-LB ablation, collapse) are set out in :mod:`moeforge.eval.emergence_config`; the runner's own:

- **CPU use.** ``parallel`` runs train at once, each in a spawned process with ``threads`` torch threads:
  on a 2-core machine two single-threaded runs beat one two-threaded run, whose threads stall each other
  whenever another job takes a core. A run's result does not depend on which process trained it.

The configuration lives in :mod:`moeforge.eval.emergence_config`, the findings and the report in
:mod:`moeforge.eval.findings`; this module runs the experiment.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import asdict
from pathlib import Path
from queue import Empty
from typing import Any

import yaml

from moeforge.eval.emergence_config import (
    EmergenceConfig,
    ExperimentError,
    RunSpec,
    resolve_models,
    train_config,
)
from moeforge.eval.findings import (
    STUDY,
    ExperimentResult,
    aggregate_runs,
    derive_findings,
    pct_change,
    render_report,
    routing_stats,
    run_test_loss,
)
from moeforge.harness.run import heldout_scores
from moeforge.io import atomic_write_json, atomic_write_text, sha256_file
from moeforge.model.config import ModelConfig
from moeforge.procs import spawn_pool

__all__ = ["run_emergence"]

log = logging.getLogger(__name__)

# test records per run scored by lm-eval's rolling log-likelihood (moeforge_heldout), the first N in order
HELDOUT_DOCS = 100

# (variant name, step, total steps, the step's scalars)
ExperimentProgress = Callable[[str, int, int, dict[str, float]], None]
Notify = Callable[[str], None]


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
    from moeforge.train.evaluation import eval_batches

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


def _prepare_run(cfg: EmergenceConfig, name: str, tc: dict[str, Any], run_dir: Path, *, fresh: bool) -> bool:
    """True when ``run_dir`` holds a completed run of exactly ``tc`` (reused); otherwise empty ``run_dir``
    and write ``tc`` as its ``config.yaml``, ready to train."""
    text = yaml.safe_dump(tc, sort_keys=False)
    cfg_path = run_dir / "config.yaml"
    summary_path = run_dir / "summary.json"
    if not fresh and cfg_path.is_file() and summary_path.is_file() and cfg_path.read_text() == text:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("status") == "completed" and summary.get("steps") == cfg.steps:
            log.info("%s: reusing the completed run in %s", name, run_dir)
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
    with spawn_pool(min(cfg.parallel, len(pending)), _worker_init, (queue, cfg.threads)) as pool:
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
    completed run (``fresh`` retrains all runs). A run is a variant with one of its seeds, in
    ``out_dir/<run name>`` (:meth:`EmergenceConfig.run_name`); ``progress(run name, step, total, scalars)``
    follows training; ``notify`` receives one line per stage. Raises :class:`ExperimentError` or ConfigError.
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

    specs: list[RunSpec] = cfg.runs()
    train_cfgs = {
        sp.name: train_config(cfg, sp.variant, tokens_dir=tokens_dir, run_dir=out / sp.name, seed=sp.seed)
        for sp in specs
    }
    # the model does not depend on the seed: resolved (and checked) once per variant
    first = {v.name: next(sp for sp in specs if sp.variant is v).name for v in cfg.variants}
    models = resolve_models(cfg, {v: train_cfgs[n] for v, n in first.items()}, vocab)

    reused = {
        sp.name: _prepare_run(cfg, sp.name, train_cfgs[sp.name], out / sp.name, fresh=fresh) for sp in specs
    }
    pending = [(sp.name, out / sp.name / "config.yaml") for sp in specs if not reused[sp.name]]
    for sp in specs:
        state = "reused" if reused[sp.name] else "to train"
        say(f"run {sp.name} ({sp.variant.role}, seed {sp.seed}, {state}): {sp.variant.description}".rstrip())
        if reused[sp.name] and progress is not None:
            progress(sp.name, cfg.steps, cfg.steps, {})
    if pending:
        say(f"training {len(pending)} run(s), {min(cfg.parallel, len(pending))} at a time")
    t = time.perf_counter()
    train_seconds = _train_all(cfg, pending, progress)
    timings["train_wall"] = time.perf_counter() - t

    runs: list[dict[str, Any]] = []
    files: dict[str, Path] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for sp in specs:
        v, name = sp.variant, sp.name
        run_dir = out / name
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        timing = (
            json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").is_file() else {}
        )
        train_s = train_seconds.get(name, float(timing.get("train_seconds", 0.0)))
        rows = load_metrics(run_dir)
        curves[name] = rows
        t = time.perf_counter()
        aff = _affinity(run_dir, tokens_dir, cfg.micro_batch, cfg.affinity_max_batches)
        # the data run's test records through lm-eval (the same `moeforge` model as `moeforge eval`)
        heldout = heldout_scores(run_dir, out / "data", limit=HELDOUT_DOCS)
        if heldout is not None:
            summary.setdefault("test", {})["heldout_bits_per_byte"] = heldout.get("bits_per_byte")
        mcfg = models[v.name]
        record: dict[str, Any] = {
            "name": name,
            "variant": v.name,
            "seed": sp.seed,
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
            "heldout_lm_eval": heldout,
            "collapse_events": summary.get("collapse_events") or [],
            "routing": routing_stats(rows, summary.get("collapse_events") or [], steps=cfg.steps),
            "affinity": {str(k): m.round(4).tolist() for k, m in aff.items()},
            "specialization": {str(k): round(specialization(m), 4) for k, m in aff.items()},
            "valid_curve": [
                [int(r["step"]), float(r["loss"])] for r in rows if r.get("split") == "valid" and "loss" in r
            ],
            "train_seconds": round(train_s, 1),
            "train_loadavg": [timing.get("loadavg_start"), timing.get("loadavg_end")],
            "reused": reused[name],
        }
        if mcfg.moe is not None and record["routing"]:
            record["routing"]["balanced_share"] = mcfg.moe.top_k / mcfg.moe.num_experts
        tps = [r["tokens_per_s"] for r in rows if r.get("split") == "train" and r.get("tokens_per_s")]
        record["tokens_per_s"] = round(float(sum(tps) / len(tps)), 1) if tps else None
        if aff:
            files[f"affinity_{name}"] = affinity_heatmaps(
                aff, domains, out / f"affinity_{name}.png", title=f"{name}: share of each domain's tokens"
            )
            files[f"routing_load_{name}"] = routing_load_curves(
                rows,
                out / f"routing_load_{name}.png",
                title=f"{name}: largest expert's token share",
                balanced=(record.get("routing") or {}).get("balanced_share"),
            )
        timings[f"run:{name}"] = train_s
        timings[f"affinity:{name}"] = time.perf_counter() - t
        runs.append(record)

    variants = aggregate_runs(runs)
    dense_mean = next(a for a in variants if a["role"] == "dense")["test"].get("loss", {}).get("mean")
    for r in runs:  # each run against the dense mean over seeds
        lt = run_test_loss(r)
        r["delta_vs_dense_pct"] = (
            None if lt is None or dense_mean is None else round(pct_change(lt, dense_mean), 3)
        )
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
            "seeds": {v.name: cfg.seeds_of(v) for v in cfg.variants},
            "n_runs": len(specs),
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
        "variants": variants,
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
