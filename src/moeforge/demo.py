"""`moeforge demo`: the whole flow on built-in data, no downloads.

demo recipe → data run (records, manifest, report.html) → byte-level BPE tokenizer → packed token
shards → the tiny MoE trained with ``configs/train/demo.yaml`` → test-set eval per domain → charts
(loss curves, largest expert load per layer, expert × domain heatmaps) and a summary, all in
``runs/demo/``. ``quick`` shrinks the tokenizer and the training to fit in about two minutes.

Each stage reuses a finished earlier result (the data run resumes; a tokenizer already trained on the
same run is kept), so re-running the demo after an interruption is cheap; training always starts fresh.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeforge.io import atomic_write_text

__all__ = ["DemoResult", "run_demo"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent.parent  # the project root in a source checkout
Notify = Callable[[str], None]


@dataclass
class DemoResult:
    out: Path
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _configs_dir() -> Path:
    # configs/ is shipped inside the package as a symlink in a checkout (src/moeforge/configs)
    here = Path(__file__).resolve().parent / "configs"
    return here if here.is_dir() else ROOT / "configs"


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    workers: int = 2,
    notify: Notify | None = None,
    train_progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> DemoResult:
    """Run every stage into ``out``; ``notify`` receives one line per stage."""
    from moeforge.data.pipeline import run_pipeline
    from moeforge.data.recipe import load_recipe
    from moeforge.data.report import write_report
    from moeforge.tokens.tokenize import tokenize_run
    from moeforge.tokens.tokenizer import TokenizerConfig, train_tokenizer, verify_tokenizer
    from moeforge.train.run import run_training

    say = notify or (lambda s: log.info("%s", s))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = _configs_dir()

    say("1/5 data: demo recipe → records, manifest, gates, report")
    data_dir = out / "data"
    result = run_pipeline(load_recipe(cfgs / "data" / "demo.yaml"), data_dir, workers=workers)
    if not result.gates_passed:
        failed = [g.gate for g in result.gates if not g.passed]
        raise RuntimeError(f"the demo data run failed its gates {failed}; see {data_dir / 'manifest.json'}")
    report = write_report(data_dir)

    say("2/5 tokenizer: byte-level BPE with special, identity and PII tokens")
    tok_dir = out / "tokenizer"
    vocab = 2048 if quick else 4096
    tok_cfg = TokenizerConfig(vocab_size=vocab)
    stamp = tok_dir / "trained_on.json"
    want = {"run_manifest": (data_dir / "manifest.json").read_text(), "vocab_size": vocab}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        train_tokenizer(data_dir, tok_dir, tok_cfg)
        atomic_write_text(stamp, json.dumps(want))
    problems = verify_tokenizer(tok_dir, tok_cfg)
    if problems:
        raise RuntimeError(f"the demo tokenizer failed verification: {problems}")

    say("3/5 tokens: pack 128-token blocks into indexed shards")
    tokens_dir = out / "tokens"
    seq_len = 128
    tok = tokenize_run(data_dir, tok_dir, seq_len=seq_len, mode="pretrain", out=tokens_dir, overwrite=True)

    say("4/5 train: the tiny MoE with LB + z losses, eval, checkpoints, routing metrics")
    train_dir = out / "train"
    shutil.rmtree(train_dir, ignore_errors=True)
    overrides = [f"out_dir={train_dir}", f"data.tokens={tokens_dir}", f"data.seq_len={seq_len}"]
    if quick:
        overrides += [
            "steps=60",
            "eval.every=30",
            "checkpoint_every=30",
            "log_every=5",
            "optim.warmup_steps=10",
        ]
    res = run_training(cfgs / "train" / "demo.yaml", overrides, progress=train_progress)

    say("5/5 report: test eval per domain, curves, routing heatmaps, held-out lm-eval scores")
    files = _charts(out, train_dir, tokens_dir)
    from moeforge.harness.run import heldout_scores

    # the data run's test records scored by lm-eval through the same `moeforge` model as `moeforge eval`
    heldout = heldout_scores(train_dir, data_dir, limit=40 if quick else None)
    summary = {
        "data": {
            "records": result.manifest["records"],
            "report": str(report),
            "gates": {g["gate"]: g["verdict"] for g in result.manifest["gates"]},
        },
        "tokenizer": {"path": str(tok_dir), "vocab_size": vocab},
        "tokens": {
            s: {k: v[k] for k in ("samples", "tokens", "packing_efficiency", "per_domain_samples")}
            for s, v in tok.manifest["splits"].items()
        },
        "splits_note": split_mix_note(tokens_dir),
        "train": json.loads((train_dir / "summary.json").read_text()),
        "heldout_lm_eval": heldout,
        "charts": {k: str(v) for k, v in files.items()},
        "checkpoint": str(_last_checkpoint(train_dir)),
        "status": res.status,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    files["summary"] = out / "summary.json"
    files["report"] = report
    return DemoResult(out, summary, files)


def _last_checkpoint(train_dir: Path) -> Path | None:
    from moeforge.train.checkpoint import latest_checkpoint

    return latest_checkpoint(train_dir)


def split_mix_note(tokens_dir: Path) -> str | None:
    """Each split's share of blocks per domain, and why the overall losses of splits with different mixes
    are not comparable (a few long prose or code documents decide a small split's mix)."""
    try:
        splits = json.loads((tokens_dir / "manifest.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError):
        return None
    parts = []
    for name in ("train", "valid", "test"):
        per = (splits.get(name) or {}).get("per_domain_samples") or {}
        total = sum(per.values())
        if total:
            parts.append(f"{name} " + " ".join(f"{d} {100 * n / total:.0f}%" for d, n in sorted(per.items())))
    if len(parts) < 2:
        return None
    return (
        "blocks per domain: " + "; ".join(parts) + ". Records are split by hash, so a few long documents "
        "decide a small split's domain mix; overall valid/test loss follows that mix (math is easy, prose "
        "hard). Compare the per-domain curves."
    )


def _charts(out: Path, train_dir: Path, tokens_dir: Path) -> dict[str, Path]:
    from moeforge.eval.plots import affinity_heatmaps, load_metrics, loss_curves, routing_load_curves
    from moeforge.eval.routing import expert_domain_affinity
    from moeforge.model.config import ModelConfig
    from moeforge.model.transformer import MoETransformer
    from moeforge.tokens.loader import TokenDataset
    from moeforge.train.checkpoint import load_checkpoint
    from moeforge.train.evaluation import eval_batches

    rows = load_metrics(train_dir)
    moe = json.loads((train_dir / "config.json").read_text(encoding="utf-8"))["model"].get("moe") or {}
    balanced = moe["top_k"] / moe["num_experts"] if moe else None
    files = {
        "loss": loss_curves(
            {"tiny MoE": rows},
            out / "loss.png",
            title="demo: train and validation loss",
            per_domain=True,
            note=split_mix_note(tokens_dir),
        ),
        "routing_load": routing_load_curves(rows, out / "routing_load.png", balanced=balanced),
    }
    ckpt_dir = _last_checkpoint(train_dir)
    if ckpt_dir is not None:
        state = json.loads((ckpt_dir / "state.json").read_text())
        model = MoETransformer(ModelConfig.model_validate(state["model_config"]))
        load_checkpoint(ckpt_dir, model, None, restore_rng_state=False)
        split = "test" if (tokens_dir / "test.idx").exists() else "valid"
        ds = TokenDataset(tokens_dir, split)
        aff = expert_domain_affinity(model, eval_batches(ds, 16, max_batches=16), len(ds.domains))
        files["affinity"] = affinity_heatmaps(
            aff, ds.domains, out / "affinity.png", title=f"share of each domain's tokens per expert ({split})"
        )
    return files
