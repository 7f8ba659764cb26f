"""`moeforge data tokenize` and `moeforge data cache …`: token shards and the pretokenized cache."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeforge.cli._progress import Bars
from moeforge.cli._util import human_bytes

console = Console()
cache_app = typer.Typer(
    help="The pretokenized cache ($MOEFORGE_CACHE_DIR/tokens or ~/.cache/moeforge/tokens): list, inspect, "
    "clean.",
    no_args_is_help=True,
)

_ROOT_HELP = "Cache root (default: $MOEFORGE_CACHE_DIR/tokens or ~/.cache/moeforge/tokens)."


def tokenize(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A `moeforge data run` output."),
    tokenizer: Path = typer.Option(
        ...,
        "--tokenizer",
        "-t",
        help="Tokenizer directory (tokenizer.json, or GPT-2 vocab.json + merges.txt) or tokenizer.json.",
    ),
    seq_len: int = typer.Option(..., "--seq-len", min=1, help="Tokens per training sequence."),
    sft: bool = typer.Option(
        False, "--sft", help="Chat packing with the loss on assistant turns only (default: pretraining)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output directory; without it the result goes to the cache."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_ROOT_HELP),
    max_records: int | None = typer.Option(
        None, "--max-records", min=1, help="Read at most N records per split."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
) -> None:
    """Tokenize and pack a run's splits into Megatron-format token shards (+ loss mask, domains, manifest)."""
    from moeforge.tokens.tokenize import tokenize_run

    with Bars(console, transient=True) as bars:

        def progress(split: str, done: int, total: int) -> None:
            bars.update(split, f"tokenize {split}", done, total)

        res = tokenize_run(
            run_dir,
            tokenizer,
            seq_len=seq_len,
            mode="sft" if sft else "pretrain",
            out=out,
            cache_root=cache_dir,
            max_records=max_records,
            overwrite=overwrite,
            progress=progress,
        )
    table = Table(title=f"{res.manifest['name']} ({res.manifest['mode']}, seq_len {res.manifest['seq_len']})")
    for col in ("split", "records", "samples", "tokens", "loss tokens", "efficiency", "truncated", "dropped"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, s in res.manifest["splits"].items():
        table.add_row(
            split,
            f"{s['records']:,}",
            f"{s['samples']:,}",
            f"{s['tokens']:,}",
            f"{s['loss_tokens']:,}",
            f"{100 * s['packing_efficiency']:.1f}%",
            f"{s['truncated']:,}",
            f"{s['dropped_too_long'] + s['dropped_empty']:,}",
        )
    console.print(table)
    state = "built" if res.built else "cache hit (nothing to do)"
    console.print(f"{state}: {escape(str(res.path))}")


@cache_app.command("list")
def cache_list(
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_ROOT_HELP),
    verify: bool = typer.Option(False, "--verify", help="Check every shard's sha256 (slower)."),
) -> None:
    """Every cache entry with its size, date and status."""
    from moeforge.tokens.cache import cache_root, list_entries

    entries = list_entries(cache_dir, deep=verify)
    if not entries:
        console.print(f"the cache at {escape(str(cache_root(cache_dir)))} is empty")
        return
    table = Table(title=str(cache_root(cache_dir)))
    for col in ("name", "size", "modified", "status"):
        table.add_column(col, overflow="fold")
    for e in entries:
        colour = "green" if e.ok else "red"
        when = dt.datetime.fromtimestamp(e.modified).strftime("%Y-%m-%d %H:%M")
        table.add_row(escape(e.name), human_bytes(e.bytes), when, f"[{colour}]{escape(e.status)}[/]")
    console.print(table)


@cache_app.command("info")
def cache_info(
    name: str = typer.Argument(..., help="Entry name as `list` shows it."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_ROOT_HELP),
) -> None:
    """An entry's manifest (fingerprint, inputs, tokenizer, per-split counts) and a full sha256 check."""
    from moeforge.tokens.cache import CacheError, cache_root, check_entry, sanitize

    root = cache_root(cache_dir)
    if sanitize(name, 200) != name or not (root / name).is_dir():
        raise CacheError(f"no cache entry named {name!r} in {root}; see `moeforge data cache list`")
    path = root / name
    problems = check_entry(path, deep=True)
    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else {}
    typer.echo(json.dumps({"path": str(path), "problems": problems, "manifest": manifest}, indent=2))
    if problems:
        raise typer.Exit(1)


@cache_app.command("clean")
def cache_clean(
    names: list[str] = typer.Argument(None, help="Entries to remove (default: all, with --all)."),
    all_: bool = typer.Option(False, "--all", help="Remove every entry."),
    older_than: float | None = typer.Option(None, "--older-than", help="Only entries older than N days."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_ROOT_HELP),
) -> None:
    """Remove cache entries by name, or all of them with --all (optionally only old ones)."""
    from moeforge.tokens.cache import clean

    if not names and not all_ and older_than is None:
        raise typer.BadParameter("name the entries to remove, or pass --all or --older-than DAYS")
    removed = clean(cache_dir, names=names or None, older_than_days=older_than)
    console.print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}")
    for n in removed:
        console.print(f"  {escape(n)}")


@cache_app.command("clean-invalid")
def cache_clean_invalid(cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_ROOT_HELP)) -> None:
    """Remove entries with missing or corrupt shards (sha256 checked) or unfinished writes; nothing else."""
    from moeforge.tokens.cache import clean_invalid

    removed = clean_invalid(cache_dir)
    console.print(f"removed {len(removed)} invalid entr{'y' if len(removed) == 1 else 'ies'}")
    for n in removed:
        console.print(f"  {escape(n)}")
