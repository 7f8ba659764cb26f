"""`moeforge data …`: run a recipe, verify a run, print the record schema."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeforge.cli._progress import Bars
from moeforge.cli._util import EXIT_GATES_FAILED, gate_table
from moeforge.data.contract import record_json_schema
from moeforge.io import atomic_write_json

app = typer.Typer(
    help="Datasets: run a recipe, verify the result, tokenize it into shards, manage the token cache.",
    no_args_is_help=True,
)
console = Console()

EXIT_QUARANTINED = 3


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


@app.command("run")
def run(
    recipe_path: Path = typer.Argument(
        ..., metavar="RECIPE", help="Recipe YAML, e.g. configs/data/demo.yaml."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory; an unfinished run there is resumed."),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Processes for the per-file tasks."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a recipe value: key.path=value (repeatable)."
    ),
    force: bool = typer.Option(False, "--force", help="Discard a run of a different recipe in --out."),
) -> None:
    """Run a data recipe: read, clean, label, decontaminate, scrub, dedup, split, mix, write, verify.

    Writes records, manifest.json and report.html into --out, then runs the gates.

    Exit codes: 0 all gates pass; 3 all gates pass but some input was quarantined (see
    OUT/quarantine/quarantine.jsonl); 1 a gate failed; 2 a usage or recipe error.
    """
    from moeforge.data.pipeline import run_pipeline
    from moeforge.data.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    with Bars(Console(stderr=True), transient=True) as bars:
        labels = {"map": "read/clean/label tasks", "write": "dedup + split + write"}

        def progress(stage: str, done: int, total: int) -> None:
            bars.update(stage, labels.get(stage, stage), done, total)

        result = run_pipeline(recipe, out, workers=workers, progress=progress, force=force)
    from moeforge.data.report import write_report

    report_path = write_report(out)
    stages = Table(title=f"{recipe.name}: per-stage accounting")
    for col in ("stage", "in", "out", "dropped", "quarantined"):
        stages.add_column(col, justify="left" if col in ("stage", "dropped") else "right")
    for s in result.stages:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(s.dropped.items())) or "0"
        stages.add_row(s.stage, str(s.inputs), str(s.out), escape(dropped), str(s.quarantined))
    console.print(stages)
    records = result.manifest["records"]
    console.print(
        f"records: train {records['train']}, valid {records['valid']}, test {records['test']} → {escape(str(out))}"
        f"  (tasks run {result.tasks_run}, resumed {result.tasks_skipped})"
    )
    console.print(f"report: {escape(str(report_path))}")
    console.print(gate_table(result.manifest["gates"]))
    if not result.gates_passed:
        console.print("[bold red]a gate failed[/]: the dataset breaks its contract (see the table)")
        raise typer.Exit(EXIT_GATES_FAILED)
    if result.quarantined:
        console.print(
            f"[yellow]completed with {result.quarantined} quarantined input(s)[/]: "
            f"{escape(str(out / 'quarantine' / 'quarantine.jsonl'))}"
        )
        raise typer.Exit(EXIT_QUARANTINED)


@app.command("report")
def report(
    run_dir: Path = typer.Argument(
        ..., metavar="DIR", help="A run directory written by `moeforge data run`."
    ),
) -> None:
    """Write DIR/report.html: one self-contained page that opens offline in any browser.

    Charts of counts, lengths, drops, PII, language, dedup, decontamination, mixture and the gates.
    """
    from moeforge.data.report import write_report

    console.print(f"wrote {escape(str(write_report(run_dir)))}")


@app.command("verify")
def verify(
    location: str = typer.Argument(
        ...,
        metavar="DIR|URL",
        help="A run directory (`moeforge data run`), a pair set (`data pairs …`), or where `data export` put "
        "one (s3://BUCKET/PREFIX/run).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the gate results as JSON."),
    workers: int = typer.Option(
        0, "--workers", "-w", min=0, help="Processes reading the output shards (0: one per CPU)."
    ),
) -> None:
    """Re-check a dataset against its contract from the files alone; exit 1 when any gate fails.

    Gates: schema, accounting, coverage, leakage, split_ratios, lang_balance, pii_residue, provenance, hash.
    A pair set: pairs:hash (every file against its sha256), pairs:leakage, pairs:balance,
    pairs:length_bias, pairs:duplicates. An exported URL is first streamed into a local cache, every file
    checked against the export's manifest (sha256), then gated like a local run.
    """
    from moeforge.data.gates import run_gates
    from moeforge.data.manifest import load_manifest
    from moeforge.data.pairset import PAIRSET_KIND, verify_pair_set
    from moeforge.data.recipe import Recipe
    from moeforge.storage.fetch import fetch_export
    from moeforge.storage.urls import StorageError, is_remote

    if is_remote(location):
        try:
            run_dir = fetch_export(location)
        except StorageError as exc:
            Console(stderr=True).print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from exc
        if not as_json:
            console.print(
                f"{escape(location)}: every file matches the export manifest → {escape(str(run_dir))}"
            )
    else:
        run_dir = Path(location)

    try:  # a pair set (`data pairs import|generate`) has its own gates
        kind = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind == PAIRSET_KIND:
        gates = [g.to_json() for g in verify_pair_set(run_dir)]
    else:
        manifest = load_manifest(run_dir)
        recipe = Recipe.model_validate(manifest["recipe"])
        from moeforge.data.executors import LocalExecutor

        executor = LocalExecutor(workers or os.cpu_count() or 1)
        try:
            gates = [g.to_json() for g in run_gates(run_dir, manifest, recipe, executor)]
        finally:
            executor.close()
    passed = all(g["passed"] for g in gates)
    if as_json:
        sys.stdout.write(json.dumps({"passed": passed, "gates": gates}, indent=2) + "\n")
    else:
        console.print(gate_table(gates))
        console.print("[green]all gates pass[/]" if passed else "[bold red]verification failed[/]")
    if not passed:
        raise typer.Exit(EXIT_GATES_FAILED)


def _register_token_commands() -> None:
    from moeforge.cli import tokens as tokens_cli

    app.command("tokenize")(tokens_cli.tokenize)
    app.add_typer(tokens_cli.cache_app, name="cache")


_register_token_commands()


def _register_pair_commands() -> None:
    from moeforge.cli import pairs as pairs_cli

    app.add_typer(pairs_cli.app, name="pairs")


_register_pair_commands()


def _register_storage_commands() -> None:
    from moeforge.cli import storage as storage_cli

    app.command("export")(storage_cli.export)


_register_storage_commands()


def _register_inventory_command() -> None:
    from moeforge.cli import inventory as inventory_cli

    app.command("inventory")(inventory_cli.inventory)


_register_inventory_command()
