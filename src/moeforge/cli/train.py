"""`moeforge train CONFIG`: train a model from a YAML config, with progress and resume."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()


def train(
    config: Path = typer.Argument(
        ..., metavar="CONFIG", help="Training config YAML, e.g. configs/train/demo.yaml."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a config value: key.path=value (repeatable)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier run's checkpoints and metrics in out_dir."
    ),
) -> None:
    """Train (pretrain or SFT) with MoE losses, eval, checkpoints, routing metrics and collapse detection.

    Multi-process: torchrun --nproc-per-node N -m moeforge.train CONFIG. Ctrl-C writes a checkpoint and
    stops; --resume continues bit-exactly.
    """
    from moeforge.train.run import run_training

    with Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("train", total=None, loss="-")

        def progress(step: int, total: int, scalars: dict[str, float]) -> None:
            bar.update(task, completed=step, total=total, loss=f"{scalars['loss']:.4f}")

        result = run_training(config, overrides, resume=resume, overwrite=overwrite, progress=progress)
    line = f"{result.status}: {result.steps} steps → {escape(str(result.run_dir))}"
    if result.final_valid.get("loss") is not None:
        line += f"; valid loss {result.final_valid['loss']:.4f} (ppl {result.final_valid['ppl']:.2f})"
    if result.test.get("loss") is not None:
        line += f"; test loss {result.test['loss']:.4f}"
    console.print(line)
    for e in result.collapse_events:
        console.print(f"[bold red]router collapse[/] layer {e['layer']} at step {e['step']}: {e}")
    if result.status == "collapsed":
        raise typer.Exit(1)
