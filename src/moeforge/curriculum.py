"""`moeforge curriculum run PLAN.yaml`: pretrain → SFT stages → preference alignment as one resumable plan.

A plan (:class:`CurriculumPlan`) lists stages; each is a training config (``train:``, a YAML path, with
``set:`` overrides) that starts from the previous stage's best checkpoint (lowest validation loss, else its
latest). Before the stages, the plan's ``data`` section can build what they share — a data run from a recipe
and a tokenizer trained on it — and a stage's ``pairs`` section generates its preference pairs
(``moeforge data pairs generate``) with the previous stage's checkpoint. Placeholders in ``set`` values:
``${data}`` (the data run), ``${tokenizer}``, ``${pairs}`` (the stage's pair set), ``${out}``, ``${prev}``
(the previous stage's checkpoint).

Everything lands under the plan's ``out`` directory::

    curriculum.json     the plan's state: each stage's status, checkpoint, data manifest sha256, results
    data/ tokenizer/    the shared data run and tokenizer (reused when already built from the same inputs)
    <stage>/train/      the stage's training run;   <stage>/pairs/  its generated pair set
    report.html, loss.png   all stages' loss curves on one step axis and the metrics after each stage

Resuming: run the same plan again. Finished stages are skipped (their checkpoints are verified to still
exist); the stage that was running continues from its own last checkpoint (``--resume`` semantics), pair
generation from its last finished chunk. A changed plan is refused unless ``restart`` is given, because
finished stages would no longer match it.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from moeforge.config import StrictModel, load_yaml_config
from moeforge.io import atomic_write_json, atomic_write_text, sha256_file

__all__ = [
    "CurriculumError",
    "CurriculumPlan",
    "CurriculumResult",
    "StagePlan",
    "run_curriculum",
]

log = logging.getLogger(__name__)

Notify = Callable[[str], None]
_STATE = "curriculum.json"


class CurriculumError(ValueError):
    """A plan that cannot run or continue; the message says why and what to do."""


class DataPlan(StrictModel):
    """Shared inputs built once before the stages."""

    recipe: str | None = Field(default=None, description="a data recipe; its run is ${data}")
    tokenizer_vocab: int | None = Field(
        default=None, ge=256, description="train a byte-level BPE of this size on ${data}; it is ${tokenizer}"
    )
    workers: int = Field(default=2, ge=1)


class StagePlan(StrictModel):
    """One stage: a training config started from the previous stage's checkpoint."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["pretrain", "sft", "preference"] = Field(
        description="for the report; checked against the config"
    )
    train: str = Field(description="the stage's training config (YAML)")
    set: list[str] = Field(default_factory=list, description="overrides, key=value, placeholders allowed")
    pairs: str | None = Field(
        default=None,
        description="a pair-generation config run with the previous checkpoint; the set is ${pairs}",
    )
    pairs_set: list[str] = Field(default_factory=list, description="overrides of the pair-generation config")


class EvalPlan(StrictModel):
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks scored after each stage")
    limit: int | None = Field(default=None, ge=1, description="documents per task")
    apply_chat_template: bool = Field(default=False, description="prompt as ChatML chats")
    system_instruction: str | None = Field(
        default=None, description="a system turn opening every chat (with apply_chat_template)"
    )


class CurriculumPlan(StrictModel):
    name: str = Field(default="curriculum", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out: str = "runs/curriculum"
    data: DataPlan = Field(default_factory=DataPlan)
    stages: list[StagePlan] = Field(min_length=1)
    eval: EvalPlan = Field(default_factory=EvalPlan)

    @model_validator(mode="after")
    def _check(self) -> CurriculumPlan:
        names = [s.name for s in self.stages]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dups)}")
        if self.data.tokenizer_vocab and not self.data.recipe:
            raise ValueError("data.tokenizer_vocab trains on the plan's data run: set data.recipe too")
        for s in self.stages:
            if s.pairs and s.kind != "preference":
                raise ValueError(
                    f"stage {s.name}: `pairs` generates preference pairs; its kind must be preference"
                )
        if self.stages[0].pairs:
            raise ValueError(
                f"stage {self.stages[0].name}: the first stage has no previous checkpoint to generate pairs with"
            )
        return self


@dataclass
class CurriculumResult:
    out: Path
    state: dict[str, Any]
    report: Path


def _plan_hash(plan: CurriculumPlan, files: list[Path]) -> str:
    h = hashlib.sha256(plan.model_dump_json().encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def _fill(value: str, env: dict[str, str]) -> str:
    for k, v in env.items():
        value = value.replace("${" + k + "}", v)
    if "${" in value:
        raise CurriculumError(
            f"unknown placeholder in {value!r}; the plan knows: {', '.join('${' + k + '}' for k in env)}"
        )
    return value


def _read_state(out: Path) -> dict[str, Any] | None:
    path = out / _STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CurriculumError(f"{path}: unreadable ({exc}); delete it to start the plan over") from None


def _manifest_sha(train_cfg: Any) -> dict[str, str | None]:
    """sha256 of the manifest of the data a stage trained on."""
    d = train_cfg.data
    for kind, root in (("run", d.run), ("tokens", d.tokens), ("pairs", d.pairs)):
        if root:
            m = Path(root) / "manifest.json"
            return {
                "kind": kind,
                "path": str(root),
                "manifest_sha256": sha256_file(m) if m.is_file() else None,
            }
    return {"kind": "none", "path": None, "manifest_sha256": None}


def _build_data(plan: CurriculumPlan, base: Path, out: Path, say: Notify) -> dict[str, str]:
    env: dict[str, str] = {"out": str(out)}
    if plan.data.recipe is None:
        return env
    from moeforge.data.pipeline import run_pipeline
    from moeforge.data.recipe import load_recipe

    data_dir = out / "data"
    say(f"data: {plan.data.recipe} → {data_dir}")
    result = run_pipeline(load_recipe(_path(base, plan.data.recipe)), data_dir, workers=plan.data.workers)
    if not result.gates_passed:
        failed = [g.gate for g in result.gates if not g.passed]
        raise CurriculumError(
            f"the plan's data run failed its gates {failed}; see {data_dir / 'manifest.json'}"
        )
    env["data"] = str(data_dir)
    if plan.data.tokenizer_vocab:
        from moeforge.tokens.tokenizer import TokenizerConfig, train_tokenizer, verify_tokenizer

        tok_dir = out / "tokenizer"
        stamp = tok_dir / "trained_on.json"
        want = {
            "run_manifest_sha256": sha256_file(data_dir / "manifest.json"),
            "vocab_size": plan.data.tokenizer_vocab,
        }
        tok_cfg = TokenizerConfig(vocab_size=plan.data.tokenizer_vocab)
        if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
            say(f"tokenizer: BPE of {plan.data.tokenizer_vocab} on {data_dir}")
            train_tokenizer(data_dir, tok_dir, tok_cfg)
            atomic_write_json(stamp, want)
        problems = verify_tokenizer(tok_dir, tok_cfg)
        if problems:
            raise CurriculumError(f"the plan's tokenizer failed verification: {problems}")
        env["tokenizer"] = str(tok_dir)
    return env


def _path(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() or q.exists() else base / q


def run_curriculum(
    plan_path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    restart: bool = False,
    notify: Notify | None = None,
    train_progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> CurriculumResult:
    """Run (or continue) the plan at ``plan_path``; see the module docstring."""
    from moeforge.train import checkpoint as ckpt
    from moeforge.train.config import load_train_config
    from moeforge.train.run import run_training

    say = notify or (lambda s: log.info("%s", s))
    plan_file = Path(plan_path)
    plan = load_yaml_config(CurriculumPlan, plan_file, overrides)
    base = plan_file.resolve().parent
    root = Path(out if out is not None else plan.out)
    root.mkdir(parents=True, exist_ok=True)
    configs = [_path(base, s.train) for s in plan.stages] + [
        _path(base, s.pairs) for s in plan.stages if s.pairs
    ]
    for c in configs:
        if not c.is_file():
            raise CurriculumError(
                f"{plan_file}: {c} does not exist (paths are relative to the plan or the working directory)"
            )
    digest = _plan_hash(plan, configs)
    state = _read_state(root)
    if state is not None and state.get("plan_sha256") != digest and not restart:
        raise CurriculumError(
            f"{root / _STATE} belongs to another version of this plan (or another plan): its finished stages "
            "would not match it. Pass --restart to run the plan from its first stage, or --out DIR"
        )
    if state is None or state.get("plan_sha256") != digest:
        state = {"plan": str(plan_file), "plan_sha256": digest, "name": plan.name, "stages": {}}
    env = _build_data(plan, base, root, say)
    prev: Path | None = None
    for i, stage in enumerate(plan.stages):
        rec = state["stages"].setdefault(stage.name, {"status": "pending"})
        stage_dir = root / stage.name
        if rec.get("status") == "done" and rec.get("checkpoint") and Path(rec["checkpoint"]).is_dir():
            say(f"stage {i + 1}/{len(plan.stages)} {stage.name}: done earlier, skipped")
            prev = Path(rec["checkpoint"])
            continue
        resume = rec.get("status") == "running"
        rec.update(status="running", started=rec.get("started") or time.time(), kind=stage.kind)
        atomic_write_json(root / _STATE, state)
        senv = {**env, "prev": str(prev) if prev else ""}
        if stage.pairs:
            assert prev is not None
            senv["pairs"] = str(stage_dir / "pairs")
            say(f"stage {i + 1}/{len(plan.stages)} {stage.name}: pairs from {prev}")
            _generate_pairs(_path(base, stage.pairs), stage.pairs_set, prev, stage_dir / "pairs")
        sets = [_fill(s, senv) for s in stage.set] + [f"out_dir={stage_dir / 'train'}"]
        if prev is not None:
            sets += [f"init_from={prev}", "model=null"]
        cfg = load_train_config(_path(base, stage.train), sets)
        _check_kind(stage, cfg)
        say(
            f"stage {i + 1}/{len(plan.stages)} {stage.name} ({stage.kind}): {cfg.steps} steps"
            + (" (resumed)" if resume else "")
        )
        res = run_training(
            _path(base, stage.train), sets, resume=resume, overwrite=not resume, progress=train_progress
        )
        if res.status != "completed":
            rec.update(status="running")
            atomic_write_json(root / _STATE, state)
            raise CurriculumError(f"stage {stage.name} ended {res.status}; run the plan again to continue it")
        best = ckpt.best_checkpoint(stage_dir / "train")
        if best is None:
            raise CurriculumError(f"stage {stage.name} wrote no checkpoint under {stage_dir / 'train'}")
        summary = json.loads((stage_dir / "train" / "summary.json").read_text())
        rec.update(
            status="done",
            finished=time.time(),
            checkpoint=str(best),
            data=_manifest_sha(cfg),
            steps=res.steps,
            final_valid=summary.get("final_valid", {}),
            test=summary.get("test", {}),
            eval=_eval_tasks(plan.eval, best, say),
        )
        atomic_write_json(root / _STATE, state)
        prev = best
    report = write_curriculum_report(root, plan, state)
    return CurriculumResult(root, state, report)


def _check_kind(stage: StagePlan, cfg: Any) -> None:
    """The stage's declared kind must be what its config trains."""
    actual = "preference" if cfg.objective.name != "lm" else cfg.data.mode
    if actual != stage.kind:
        raise CurriculumError(
            f"stage {stage.name} is declared {stage.kind} but its config trains {actual} "
            f"(objective {cfg.objective.name}, data.mode {cfg.data.mode}); fix the stage's kind or its config"
        )


def _generate_pairs(config: Path, sets: list[str], checkpoint: Path, out: Path) -> None:
    from moeforge.data.pairgen import generate_pairs, load_generate_config
    from moeforge.serve.chat_sampler import EngineSampler

    if (out / "manifest.json").is_file():
        return
    cfg = load_generate_config(config, [*sets, f"checkpoint={checkpoint}"])
    generate_pairs(cfg, out, EngineSampler(cfg.checkpoint, max_batch=cfg.batch_size, device=cfg.device))


def _eval_tasks(ev: EvalPlan, checkpoint: Path, say: Notify) -> dict[str, Any]:
    if not ev.tasks:
        return {}
    from moeforge.harness.run import run_eval

    say(f"eval: {', '.join(ev.tasks)} on {checkpoint}")
    res = run_eval(
        checkpoint,
        ev.tasks,
        limit=ev.limit,
        apply_chat_template=ev.apply_chat_template,
        system_instruction=ev.system_instruction,
    )
    return {t: {k: v for k, v in m.items() if "stderr" not in k} for t, m in res.scores.items()}


def _stage_rows(root: Path, plan: CurriculumPlan) -> list[tuple[str, int, list[dict[str, Any]]]]:
    from moeforge.eval.plots import load_metrics

    out = []
    offset = 0
    for s in plan.stages:
        run = root / s.name / "train"
        if not (run / "metrics.jsonl").is_file():
            continue
        rows = load_metrics(run)
        out.append((s.name, offset, rows))
        offset += max((r.get("step", 0) for r in rows), default=0)
    return out


def write_curriculum_report(root: Path, plan: CurriculumPlan, state: dict[str, Any]) -> Path:
    """``loss.png`` (every stage's train and validation loss on one step axis, stage boundaries marked) and
    ``report.html`` (that chart and a table of each stage's metrics after it)."""
    from moeforge.eval.plots import stage_curves

    chart = stage_curves(_stage_rows(root, plan), root / "loss.png", title=f"curriculum {plan.name}")
    rows = []
    keys = ("loss", "ppl", "rewards/accuracy", "rewards/margin", "kl")
    for s in plan.stages:
        rec = state["stages"].get(s.name, {})
        fv = rec.get("final_valid") or {}
        evals = "; ".join(
            f"{t} {k.split(',')[0]}={v:.3f}"
            for t, m in (rec.get("eval") or {}).items()
            for k, v in m.items()
            if isinstance(v, (int, float))
        )
        data = rec.get("data") or {}
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(x))}</td>"
                for x in (
                    s.name,
                    s.kind,
                    rec.get("status", "pending"),
                    rec.get("steps", ""),
                    *(f"{fv[k]:.4f}" if k in fv else "" for k in keys),
                    evals,
                    f"{data.get('kind', '')} {str(data.get('manifest_sha256') or '')[:12]}",
                )
            )
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "stage",
            "kind",
            "status",
            "steps",
            "valid loss",
            "ppl",
            "reward acc.",
            "margin",
            "KL",
            "eval",
            "data (manifest sha256)",
        )
    )
    page = (
        f"<!doctype html><meta charset='utf-8'><title>curriculum {html.escape(plan.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px}"
        "table{border-collapse:collapse}</style>"
        f"<h1>curriculum {html.escape(plan.name)}</h1><img src='{chart.name}' alt='loss curves'>"
        f"<h2>after each stage</h2><table><tr>{head}</tr>{''.join(rows)}</table>"
        f"<p>state: <code>{_STATE}</code>; each stage's run is under <code>STAGE/train</code>.</p>"
    )
    return atomic_write_text(root / "report.html", page)
