"""`moeforge data inventory ROOT`: list a data root, assign objects to dataset families, report coverage."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeforge.cli._progress import Bars
from moeforge.cli._util import human_bytes

__all__ = ["EXIT_INCOMPLETE", "inventory"]

console = Console()
err_console = Console(stderr=True)

EXIT_ERROR = 2  # what `moeforge` gives every user error (see cli/main.py)
EXIT_INCOMPLETE = 3  # --require-complete and some family is partial or missing

_COLOURS = {"present": "green", "partial": "yellow", "missing": "bold red"}


def _family_table(coverage: dict[str, Any]) -> Table:
    table = Table(title=f"coverage of {escape(coverage['root'])}")
    for col in ("family", "stage", "status", "objects", "bytes", "reasons"):
        table.add_column(col, justify="right" if col in ("objects", "bytes") else "left", overflow="fold")
    for f in coverage["families"]:
        table.add_row(
            escape(f["name"]),
            escape(f["stage"]),
            f"[{_COLOURS[f['status']]}]{f['status']}[/]",
            str(f["objects"]),
            human_bytes(f["bytes"]),
            escape("; ".join(f["reasons"])),
        )
    return table


def inventory(
    root: str = typer.Argument(
        ...,
        metavar="ROOT",
        help="Local directory or fsspec URL to list: s3://bucket/prefix, gs://…, an https:// listing.",
    ),
    families: Path = typer.Option(
        ...,
        "--families",
        "-f",
        help="Families YAML: per family a name, the stage that needs it and key globs "
        "(** crosses '/', * does not); optional required globs, min_objects, min_bytes.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output directory; an interrupted inventory there is resumed."
    ),
    compute_sha256: bool = typer.Option(
        False,
        "--hash",
        help="Record sha256 too: hash local files (reads every byte), read the sha256 metadata of S3 "
        "objects (one HEAD each).",
    ),
    restart: bool = typer.Option(
        False, "--restart", help="Discard an inventory of another root or families file in --out."
    ),
    require_complete: bool = typer.Option(
        False, "--require-complete", help="Exit 3 when any family is partial or missing."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print coverage.json to stdout instead of a table."),
) -> None:
    """List every object under ROOT and report which dataset families are present, partial or missing.

    Each object goes to the first family (in file order) whose globs match its key; the rest are
    unmatched. Writes into --out: inventory.json (every object: key, size, etag, sha256 with --hash,
    family), coverage.json and coverage.html (per family its status, stage, objects, bytes and the reasons
    it is partial or missing; overlaps; unmatched keys) and unmatched.jsonl. The listing streams (one
    page at a time) and is resumable: rerun the same command after an interruption.

    Exit codes: 0 inventory written (coverage gaps are reported, not failures); 2 a usage or input error
    (no such root, a bad families file, another inventory in --out); 3 with --require-complete, some
    family is not present.
    """
    from moeforge.config import ConfigError
    from moeforge.data.inventory import COVERAGE_HTML, run_inventory
    from moeforge.storage.urls import StorageError

    try:
        with Bars(Console(stderr=True), transient=True) as bars:

            def progress(objects: int, size: int) -> None:
                bars.update("list", "list objects", objects, None, _rate=human_bytes(size))

            result = run_inventory(
                root, families, out, compute_sha256=compute_sha256, restart=restart, progress=progress
            )
    except (StorageError, ConfigError, ValueError, OSError) as exc:
        err_console.print("[bold red]error:[/]", escape(str(exc)), soft_wrap=True, highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    coverage = result.coverage
    if as_json:
        sys.stdout.write(json.dumps(coverage, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    else:
        console.print(_family_table(coverage))
        totals, unmatched = coverage["totals"], coverage["unmatched"]
        resumed = f" (resumed after {result.resumed_objects})" if result.resumed_objects else ""
        console.print(
            f"{totals['objects']} object(s), {human_bytes(totals['bytes'])}{resumed}: families "
            f"{totals['present']} present, {totals['partial']} partial, {totals['missing']} missing; "
            f"{unmatched['objects']} unmatched object(s), {len(coverage['overlaps'])} overlap(s)"
        )
        console.print(f"report: {escape(str(out / COVERAGE_HTML))}")
    if require_complete and incomplete(coverage):
        raise typer.Exit(EXIT_INCOMPLETE)


def incomplete(coverage: dict[str, Any]) -> bool:
    """True when any family of a coverage document is not present."""
    return any(f["status"] != "present" for f in coverage["families"])
