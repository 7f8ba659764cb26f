"""`moeforge eval CKPT --tasks …`: lm-evaluation-harness tasks on a checkpoint, in process."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(
            "moeforge eval needs lm-evaluation-harness: pip install 'moeforge[eval]' (or make setup)"
        ) from None


def eval_command(
    checkpoint: Path | None = typer.Argument(
        None,
        metavar="CHECKPOINT",
        help="A run directory, checkpoints/step-… or an imported model (`moeforge model import`).",
    ),
    tasks: str = typer.Option(
        "moeforge_offline",
        "--tasks",
        "-t",
        help="Comma-separated lm-eval tasks or groups; the offline suite is moeforge_offline.",
    ),
    limit: float | None = typer.Option(
        None, "--limit", "-n", help="Only the first N documents of each task (a value below 1: a fraction)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Rows per generation batch."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", help="Override the tasks' few-shot count."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Where the offline tasks read their data (default: $MOEFORGE_EVAL_DATA, $MOEFORGE_REAL_DATA "
        "or ../shared/data).",
    ),
    include_path: Path | None = typer.Option(
        None, "--include-path", help="A directory of lm-eval task YAMLs (default: moeforge's configs/eval)."
    ),
    chat: bool = typer.Option(False, "--chat", help="Apply the model's chat template to every prompt."),
    seed: int = typer.Option(1234, "--seed", help="Few-shot sampling and generation seed."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Results directory (default: RUN/eval, or CHECKPOINT/eval)."
    ),
    unsafe: bool = typer.Option(
        False,
        "--confirm-run-unsafe-code",
        help="Let tasks that execute generated code run (moeforge_humaneval: a subprocess sandbox with a "
        "timeout and no network; see configs/eval/README.md).",
    ),
    list_tasks: bool = typer.Option(False, "--list", help="List the offline suite's tasks and exit."),
) -> None:
    """Score a checkpoint with lm-evaluation-harness through moeforge's own engine (the `moeforge` lm-eval
    model: loglikelihood, rolling perplexity and generation), then write eval/results.json, add the scores
    to the run's summary.json, and print them. `moeforge export hf` puts them in the model card.
    The same model is `lm_eval --model moeforge --model_args checkpoint=DIR` from lm-eval's own CLI."""
    _require_lm_eval()
    from moeforge.harness.run import default_tasks_dir, run_eval

    if list_tasks:
        for p in sorted((include_path or default_tasks_dir()).glob("*.yaml")):
            console.print(f"  {escape(p.stem)}")
        return
    if checkpoint is None:
        raise ValueError(
            "a CHECKPOINT is required (a run directory, checkpoints/step-… or an imported model)"
        )
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    n = None if limit is None else (int(limit) if limit >= 1 else float(limit))
    result = run_eval(
        checkpoint,
        names,
        limit=n,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        include_path=include_path,
        data=data,
        apply_chat_template=chat,
        seed=seed,
        out=out,
        confirm_run_unsafe_code=unsafe,
    )
    table = Table("task", "metric", "value", "± stderr", "samples")
    for task, metrics in sorted(result.scores.items()):
        for key, value in sorted(metrics.items()):
            if "_stderr" in key or key == "alias":
                continue
            name, _, filt = key.partition(",")
            stderr = metrics.get(f"{name}_stderr,{filt}")
            table.add_row(
                task,
                name if filt in ("", "none") else f"{name} ({filt})",
                f"{value:.4f}",
                "" if stderr is None else f"{stderr:.4f}",
                str(result.n_samples.get(task, "")),
            )
    console.print(table)
    console.print(f"results → {escape(str(result.path))}")
