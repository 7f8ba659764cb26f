"""Entry point of the `moeforge` command: the root app, `--version`, and error handling.

Each command group lives in its own module and is registered here. User mistakes (bad config, unknown
preset, impossible sizes) print one clear message and exit with code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from moeforge import __version__
from moeforge.cli import curriculum as curriculum_cli
from moeforge.cli import data as data_cli
from moeforge.cli import demo as demo_cli
from moeforge.cli import eval as eval_cli
from moeforge.cli import experiment as experiment_cli
from moeforge.cli import export as export_cli
from moeforge.cli import model as model_cli
from moeforge.cli import serve as serve_cli
from moeforge.cli import tokenizer as tokenizer_cli
from moeforge.cli import train as train_cli
from moeforge.cli._help import tidy_help
from moeforge.config import ConfigError

tidy_help()
app = typer.Typer(
    name="moeforge",
    help="Raw text to a trained, evaluated and served Mixture-of-Experts language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_cli.app, name="data")
app.add_typer(model_cli.app, name="model")
app.add_typer(tokenizer_cli.app, name="tokenizer")
app.add_typer(train_cli.app, name="train")
app.command("demo")(demo_cli.demo)
app.add_typer(experiment_cli.app, name="experiment")
app.add_typer(export_cli.app, name="export")
app.command("serve")(serve_cli.serve)
app.command("eval")(eval_cli.eval_command)
app.add_typer(curriculum_cli.app, name="curriculum")

err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moeforge {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    """moeforge: data pipeline, tokenizer, MoE model, training, eval and serving in one tool."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


def main() -> None:
    """Run the CLI; user errors become one red line and exit code 2."""
    try:
        app()
    except (ConfigError, ValueError, OSError) as exc:
        err_console.print("[bold red]error:[/]", escape(str(exc)), soft_wrap=True, highlight=False)
        sys.exit(2)
