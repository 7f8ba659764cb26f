"""`moeforge tokenizer …`: train, verify and try out the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    help="Tokenizer: train a byte-level BPE on a dataset run, verify it, encode text.", no_args_is_help=True
)
console = Console()


@app.command("train")
def train(
    run_dir: Path = typer.Argument(
        ..., metavar="RUN_DIR", help="A `moeforge data run` output; its train split is read."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Directory for tokenizer.json and tokenizer_config.json."
    ),
    vocab_size: int = typer.Option(
        32_000, "--vocab-size", help="Vocabulary size (65,536 for the Oracle presets)."
    ),
    min_frequency: int = typer.Option(2, "--min-frequency", help="A merge must occur at least this often."),
) -> None:
    """Train a byte-level BPE with the special, identity and PII tokens and a ChatML chat template."""
    from moeforge.tokens.tokenizer import TokenizerConfig, train_tokenizer, verify_tokenizer

    cfg = TokenizerConfig(vocab_size=vocab_size, min_frequency=min_frequency)
    path = train_tokenizer(run_dir, out, cfg)
    problems = verify_tokenizer(path, cfg)
    console.print(f"wrote {escape(str(path))}")
    if problems:
        for p in problems:
            console.print(f"[bold red]problem:[/] {escape(p)}")
        raise typer.Exit(1)


@app.command("verify")
def verify(
    path: Path = typer.Argument(
        ..., metavar="DIR", help="A directory with tokenizer.json (+ tokenizer_config.json)."
    ),
) -> None:
    """Check every special token is present, one id and round-trips, and the chat template renders; exit 1
    naming what is wrong."""
    from moeforge.tokens.tokenizer import verify_tokenizer

    problems = verify_tokenizer(path)
    for p in problems:
        console.print(f"[bold red]problem:[/] {escape(p)}")
    if problems:
        raise typer.Exit(1)
    console.print(
        "[green]tokenizer ok[/]: every special token is one id and round-trips; the template renders"
    )


@app.command("encode")
def encode(
    path: Path = typer.Argument(..., metavar="DIR", help="A tokenizer directory."),
    text: str = typer.Argument(..., help="Text to encode."),
) -> None:
    """Print the ids and tokens of TEXT as JSON."""
    from moeforge.tokens.tokenizer import load_tokenizer

    enc = load_tokenizer(path).encode(text)
    typer.echo(json.dumps({"ids": enc.ids, "tokens": enc.tokens}, ensure_ascii=False))
