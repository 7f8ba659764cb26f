"""``moeforge eval``: lm-evaluation-harness tasks on a checkpoint, in process, with the results kept.

:func:`run_eval` builds the ``moeforge`` LM (:class:`~moeforge.harness.lm.MoeforgeLM`) for a checkpoint,
runs lm-eval's ``simple_evaluate`` on the named tasks (lm-eval's own tasks and the offline suite in
``configs/eval``, found by default), and writes what came out:

- ``eval/results.json`` beside the checkpoint's run (the run directory of a trained checkpoint, the
  checkpoint directory of an imported one): per task its metrics, the settings (limit, few-shot, seed),
  the checkpoint and the sha256 of its weights, lm-eval's version. A later run of other tasks adds to it;
  a task evaluated again replaces its entry;
- the run's ``summary.json`` (when there is one) gains ``lm_eval``: the same metrics by task;
- ``moeforge export hf`` puts them in the model card's Evaluation section.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.io import atomic_write_json, sha256_file

__all__ = [
    "HELDOUT_TASK",
    "EvalResult",
    "default_tasks_dir",
    "eval_dir",
    "heldout_scores",
    "read_results",
    "run_eval",
]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """``scores``: task → metric → value (lm-eval's ``metric,filter`` keys, stderr included); ``path``:
    the results file written."""

    scores: dict[str, dict[str, float]]
    path: Path
    n_samples: dict[str, int]


def default_tasks_dir() -> Path:
    """The offline task suite shipped with moeforge (``configs/eval``)."""
    return Path(__file__).resolve().parent.parent / "configs" / "eval"


def _checkpoint_dir(path: Path) -> Path:
    from moeforge.train.checkpoint import latest_checkpoint

    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        from moeforge.harness.lm import HarnessError

        raise HarnessError(
            f"{path}: no checkpoint here (a run directory, checkpoints/step-… or an imported model)"
        )
    return latest


def eval_dir(checkpoint: Path) -> Path:
    """Where a checkpoint's evaluation results live: ``RUN/eval`` for a trainer checkpoint
    (``RUN/checkpoints/step-…``), ``CKPT/eval`` for any other."""
    ckpt = _checkpoint_dir(checkpoint.resolve())
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    return run / "eval"


def read_results(run_or_checkpoint: Path) -> dict[str, Any] | None:
    """The ``eval/results.json`` of a run or checkpoint, or None."""
    return _read_json(Path(run_or_checkpoint) / "eval" / "results.json")


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _clean(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


def run_eval(
    checkpoint: str | os.PathLike[str],
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    include_path: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
    seed: int = 1234,
    bootstrap_iters: int = 1000,
    out: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    confirm_run_unsafe_code: bool = False,
    metadata: dict[str, Any] | None = None,
) -> EvalResult:
    """Evaluate ``checkpoint`` on ``tasks`` (see the module docstring). ``data``: the root the offline
    tasks read (default ``$MOEFORGE_EVAL_DATA``, ``$MOEFORGE_REAL_DATA`` or ``../shared/data``);
    ``limit``: the first N documents of each task (or a fraction); ``out``: the results directory
    (default :func:`eval_dir`); ``confirm_run_unsafe_code``: let tasks that execute generated code
    (``moeforge_humaneval``, in its sandbox) run; ``metadata``: passed to the tasks' loaders (e.g.
    ``{"run": DATA_RUN}`` for ``moeforge_heldout``); ``system_instruction``: a system turn opening every
    prompt (with ``apply_chat_template``; its special tokens, e.g. an identity token, stay special). Raises :class:`~moeforge.harness.lm.HarnessError` for
    unknown tasks, ValueError (lm-eval's) for an unsafe task without the confirmation."""
    from lm_eval import __version__ as lm_eval_version
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    from moeforge.harness.lm import HarnessError, MoeforgeLM

    if not tasks:
        raise HarnessError("no tasks given; e.g. --tasks moeforge_gsm8k_mc (see `moeforge eval --list`)")
    ckpt = _checkpoint_dir(Path(checkpoint).resolve())
    if data is not None:
        os.environ["MOEFORGE_EVAL_DATA"] = str(Path(data).resolve())
    where_ours = str(include_path or default_tasks_dir())
    # indexing lm-eval's own thousands of task files takes seconds: only when a task is not one of ours
    manager = TaskManager(include_path=where_ours, include_defaults=False, metadata=metadata)
    if any(t not in set(manager.all_tasks) for t in tasks):
        manager = TaskManager(include_path=where_ours, metadata=metadata)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        ours = sorted(t for t in known if t.startswith("moeforge_"))
        where = (
            f"the offline suite has {', '.join(ours)}"
            if ours
            else f"{include_path} defines no moeforge_* task"
        )
        raise HarnessError(
            f"unknown task(s) {', '.join(unknown)}; {where} (lm-eval's own tasks are known too: lm_eval ls tasks)"
        )
    lm = MoeforgeLM(checkpoint=str(ckpt), batch_size=batch_size, device=device)
    t0 = time.perf_counter()
    raw = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        apply_chat_template=apply_chat_template,
        system_instruction=system_instruction,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        confirm_run_unsafe_code=confirm_run_unsafe_code,
    )
    seconds = time.perf_counter() - t0
    if raw is None:  # lm-eval returns None on non-zero ranks only
        raise HarnessError("lm-eval returned no results")
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in (raw.get("results") or {}).items():
        # metrics only: lm-eval's "metric,filter" keys; not its fixed keys (alias, name, sample_len)
        pairs = ((k, _clean(v)) for k, v in metrics.items() if "," in k)
        clean = {k: v for k, v in pairs if v is not None}
        scores[task] = clean
    n_samples = {t: int((v or {}).get("effective", 0)) for t, v in (raw.get("n-samples") or {}).items()}
    target = Path(out) if out is not None else eval_dir(ckpt)
    path = target / "results.json"
    previous = _read_json(path)
    if previous is None and path.is_file():
        log.warning("%s is not a results file; starting it again", path)
    entry = {
        "checkpoint": str(ckpt),
        "model_sha256": sha256_file(ckpt / "model.safetensors"),
        "lm_eval": lm_eval_version,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "apply_chat_template": apply_chat_template,
        "seed": seed,
        "metadata": {k: str(v) for k, v in (metadata or {}).items()},
        "seconds": round(seconds, 3),
    }
    tasks_out = dict((previous or {}).get("tasks") or {})
    for task, metrics in scores.items():
        tasks_out[task] = {"metrics": metrics, "n_samples": n_samples.get(task), **entry}
    doc = {"format": "moeforge.eval/1", "tasks": dict(sorted(tasks_out.items()))}
    atomic_write_json(path, doc)
    _update_summary(target.parent, tasks_out)
    log.info("lm-eval: %d task(s) in %.1f s → %s", len(scores), seconds, path)
    return EvalResult(scores, path, n_samples)


def _update_summary(run: Path, tasks: dict[str, Any]) -> None:
    """Add the scores to a training run's ``summary.json`` (a checkpoint without one is left alone)."""
    p = run / "summary.json"
    if not p.is_file():
        return
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s is not valid JSON; the scores are in eval/results.json only", p)
        return
    summary["lm_eval"] = {t: v["metrics"] for t, v in tasks.items()}
    atomic_write_json(p, summary)


HELDOUT_TASK = "moeforge_heldout"


def heldout_scores(
    checkpoint: str | os.PathLike[str],
    data_run: str | os.PathLike[str],
    *,
    limit: int | None = None,
    split: str = "test",
) -> dict[str, float] | None:
    """``moeforge_heldout`` on a data run's held-out split through the same lm-eval path as ``moeforge
    eval`` (rolling log-likelihood per record → ``bits_per_byte``, ``byte_perplexity``,
    ``word_perplexity``); the demo and the emergence study report it. Results also go to the run's
    ``eval/results.json`` and ``summary.json``. None, with a log line, when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        log.info("lm-eval is not installed (pip install 'moeforge[eval]'): no held-out lm-eval scores")
        return None
    res = run_eval(
        checkpoint,
        [HELDOUT_TASK],
        limit=limit,
        metadata={"run": str(Path(data_run).resolve()), "split": split},
        bootstrap_iters=0,
    )
    metrics = res.scores.get(HELDOUT_TASK, {})
    out = {k.split(",", 1)[0]: v for k, v in metrics.items() if "_stderr" not in k and k != "sample_len"}
    out["documents"] = float(res.n_samples.get(HELDOUT_TASK, 0))
    return out
