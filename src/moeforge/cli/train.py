"""`moeforge train CONFIG`: train a model from a YAML config, with progress and resume;
`moeforge train verify CKPT|RUN`: check checkpoints byte for byte against their checksums."""

from __future__ import annotations

from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from moeforge.cli._progress import Bars, train_fields

console = Console()


class _DefaultRun(TyperGroup):
    """``moeforge train CONFIG …`` runs ``train run CONFIG …``; ``train verify …`` is a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    help="Train a model (`moeforge train CONFIG`, the same as `train run CONFIG`), or verify checkpoints.",
    no_args_is_help=True,
)


@app.command("run")
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
    """Train (pretrain, SFT, or DPO/IPO/SimPO on a pair set) with MoE losses, eval, checkpoints, routing
    metrics and collapse detection.

    Multi-process: torchrun --nproc-per-node N -m moeforge.train CONFIG. Ctrl-C writes a checkpoint and
    stops; --resume continues bit-exactly.
    """
    from moeforge.train.run import run_training

    with Bars(console) as bars:

        def progress(step: int, total: int, scalars: dict[str, float]) -> None:
            bars.update("train", "train", step, total, **train_fields(scalars))

        result = run_training(config, overrides, resume=resume, overwrite=overwrite, progress=progress)
    line = f"{result.status}: {result.steps} steps → {escape(str(result.run_dir))}"
    fv = result.final_valid
    if fv.get("loss") is not None:
        line += f"; valid loss {fv['loss']:.4f}"
        if "ppl" in fv:
            line += f" (ppl {fv['ppl']:.2f})"
        if "rewards/accuracy" in fv:
            line += f" (reward accuracy {fv['rewards/accuracy']:.3f}, margin {fv['rewards/margin']:.4f})"
    if result.test.get("loss") is not None:
        line += f"; test loss {result.test['loss']:.4f}"
    console.print(line)
    for e in result.collapse_events:
        console.print(f"[bold red]router collapse[/] layer {e['layer']} at step {e['step']}: {e}")
    if result.status == "collapsed":
        raise typer.Exit(1)


@app.command("verify")
def verify(
    path: Path = typer.Argument(
        ..., metavar="CKPT|RUN", help="A checkpoint directory, or a run directory (every checkpoint in it)."
    ),
) -> None:
    """Check every file of a checkpoint against the sha256 in its checksums.json.

    Exit 0 when every byte is as written, 1 when a file is missing or corrupt (each one named).
    Checkpoints written before checksums existed are reported as unverifiable.
    """
    from moeforge.io import CHECKSUMS, verify_checksums
    from moeforge.train.checkpoint import list_checkpoints

    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (pass a checkpoint or a run directory)")
    if (path / "state.json").is_file():
        ckpts = [path]
    else:
        ckpts = [p for _, p in list_checkpoints(path)]
        partial = (
            sorted((path / "checkpoints").glob(".step-*.tmp")) if (path / "checkpoints").is_dir() else []
        )
        for p in partial:
            console.print(
                f"[yellow]ignored[/] {escape(str(p))}: an unfinished save (removed by the next save)"
            )
    if not ckpts:
        raise ValueError(f"{path}: no checkpoint here (expected state.json, or checkpoints/step-…/)")
    bad = 0
    for ckpt in ckpts:
        if not (ckpt / CHECKSUMS).is_file():
            console.print(f"[yellow]unverifiable[/] {escape(str(ckpt))}: no {CHECKSUMS} (older moeforge)")
            continue
        problems = verify_checksums(ckpt)
        if problems:
            bad += 1
            console.print(f"[bold red]corrupt[/] {escape(str(ckpt))}")
            for line in problems:
                console.print(f"  {escape(line)}", soft_wrap=True)
        else:
            console.print(f"[green]ok[/] {escape(str(ckpt))}")
    if bad:
        console.print(
            f"{bad} of {len(ckpts)} checkpoint(s) corrupt; delete them to resume from an earlier one"
        )
        raise typer.Exit(1)
