"""`moeforge curriculum run PLAN.yaml`: pretrain → SFT → preference alignment as one resumable plan."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeforge.cli._progress import Bars, train_fields

console = Console()

app = typer.Typer(help="Run a curriculum: stages of training, each from the previous stage's checkpoint.")


@app.command("run")
def run(
    plan: Path = typer.Argument(
        ..., metavar="PLAN", help="Curriculum plan YAML, e.g. configs/curriculum/demo.yaml."
    ),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: the plan's `out`)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a plan value: key.path=value (repeatable)."
    ),
    restart: bool = typer.Option(
        False, "--restart", help="Run from the first stage even if the directory holds another plan's state."
    ),
) -> None:
    """Run the plan's stages in order: data and tokenizer (when the plan builds them), then each stage's
    training from the previous stage's best checkpoint, with pair generation before a preference stage.

    Run the same command again after an interruption: finished stages are skipped and the stage that was
    running continues from its last checkpoint. Writes curriculum.json, loss.png and report.html.
    """
    from moeforge.curriculum import run_curriculum

    with Bars(console) as bars:

        def progress(step: int, total: int, scalars: dict[str, float]) -> None:
            bars.update("train", "train", step, total, **train_fields(scalars))

        def say(line: str) -> None:
            console.print(escape(line))

        result = run_curriculum(
            plan, overrides, out=out, restart=restart, notify=say, train_progress=progress
        )
    table = Table(title=f"curriculum → {escape(str(result.out))}")
    for col in ("stage", "kind", "status", "valid loss", "accuracy", "checkpoint"):
        table.add_column(col)
    for name, rec in result.state["stages"].items():
        fv = rec.get("final_valid") or {}
        table.add_row(
            name,
            rec.get("kind", ""),
            rec.get("status", ""),
            f"{fv['loss']:.4f}" if "loss" in fv else "",
            f"{fv['rewards/accuracy']:.3f}" if "rewards/accuracy" in fv else "",
            escape(str(rec.get("checkpoint", ""))),
        )
    console.print(table)
    console.print(f"report: {escape(str(result.report))}")
