"""`moeforge data …`: the dataset contract and, as the pipeline lands, run / verify / report."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moeforge.data.contract import record_json_schema
from moeforge.io import atomic_write_json

app = typer.Typer(help="Datasets: the record contract (schema).", no_args_is_help=True)


@app.command("schema")
def schema(
    out: Path | None = typer.Option(None, "--out", help="Write the schema to this file instead of stdout."),
) -> None:
    """Print the JSON Schema of one dataset record (see docs/DATASET_CONTRACT.md)."""
    s = record_json_schema()
    if out is None:
        typer.echo(json.dumps(s, indent=2, sort_keys=True))
    else:
        atomic_write_json(out, s)
        typer.echo(f"wrote {out}")
