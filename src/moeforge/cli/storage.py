"""`moeforge data export`: ship a finished run (or token shards, or a checkpoint) to an object store."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeforge.cli._progress import Bars
from moeforge.cli._util import human_bytes

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_INCOMPLETE = 1  # some file did not verify: nothing was deleted; rerun to finish
EXIT_USAGE = 2


class Verify(StrEnum):
    head = "head"
    read_back = "read-back"


def export(
    run_dir: Path = typer.Argument(
        ..., metavar="RUN_DIR", help="A data run, token shard directory or checkpoint directory."
    ),
    dest: str = typer.Argument(
        ...,
        metavar="DEST_URL",
        help="Where it goes: s3://BUCKET/PREFIX (AWS, MinIO, GCS's S3 endpoint via AWS_ENDPOINT_URL), "
        "gs://…, or a local path.",
    ),
    delete_local: bool = typer.Option(
        False,
        "--delete-local",
        help="Delete each local file once the whole export has completed and its remote copy verified. "
        "Nothing is deleted when any file fails.",
    ),
    verify: Verify = typer.Option(
        Verify.head,
        "--verify",
        help="head: size, sha256 metadata and the server's own digest of the bytes (ETag = MD5). "
        "read-back: also stream every remote object back through sha256. Stores other than S3 are "
        "always read back.",
    ),
    part_size_mb: int = typer.Option(
        16, "--part-size", min=5, help="Multipart part size in MiB (files above it go up in parts; S3 min 5)."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an earlier export at DEST_URL whose files differ (its export-manifest.json is removed "
        "first). Without it such a destination is refused.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Upload RUN_DIR to DEST_URL and prove every remote copy before anything local is deleted.

    Every file's sha256 goes into its object's metadata and into DEST_URL/export-manifest.json, written
    last (a run's own manifest.json goes up after the files it lists). Rerun the same command after an
    interruption or a failure: verified objects are skipped, partial ones redone. Credentials and endpoint
    come from the usual AWS variables and files (AWS_PROFILE, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL).
    """
    from moeforge.storage.export import export_directory
    from moeforge.storage.urls import StorageError

    state = {"key": "", "done": 0}
    total = [0]

    with Bars(console=Console(stderr=True), transient=True) as bars:

        def on_file(key: str, size: int) -> None:
            state["key"] = key

        def on_bytes(n: int) -> None:
            state["done"] += n
            bars.update("export", "export", state["done"], total[0] or None, _file=state["key"])

        try:
            total[0] = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
            summary = export_directory(
                run_dir,
                dest,
                delete_local=delete_local,
                verify=verify.value,  # type: ignore[arg-type]
                part_size=part_size_mb * 1024 * 1024,
                overwrite=overwrite,
                on_file=on_file,
                on_bytes=on_bytes,
            )
        except StorageError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(EXIT_USAGE) from exc
    if as_json:
        sys.stdout.write(json.dumps(summary.to_json(), indent=2) + "\n")
    else:
        table = Table(title=f"export {escape(str(run_dir))} → {escape(dest)}")
        table.add_column("files")
        table.add_column("count", justify="right")
        rows = [
            ("uploaded", len(summary.uploaded), human_bytes(summary.bytes_uploaded)),
            ("already there, verified (skipped)", len(summary.skipped), ""),
            ("verified after upload", len(summary.verified), f"{len(summary.read_back)} read back"),
            ("deleted locally", len(summary.deleted), ""),
            ("kept locally", len(summary.kept), ""),
            ("failed", len(summary.failed), ""),
        ]
        table.add_column("")
        for label, n, extra in rows:
            table.add_row(label, str(n), extra)
        console.print(table)
        if summary.aborted_uploads:
            console.print(f"aborted {summary.aborted_uploads} leftover multipart upload(s) of an earlier run")
        for key, why in summary.failed.items():
            err_console.print(f"[bold red]failed[/] {escape(key)}: {escape(why)}")
        for key, why in summary.not_exported.items():
            err_console.print(f"[yellow]not exported[/] {escape(key)}: {escape(why)}")
        kept_reasons = sorted(set(summary.kept.values()))
        for why in kept_reasons:
            n = sum(1 for v in summary.kept.values() if v == why)
            console.print(f"kept {n} local file(s): {escape(why)}")
    if not summary.complete:
        err_console.print(
            "[bold red]export incomplete[/]: no local file was deleted; rerun the same command to finish "
            "(verified objects are skipped)"
        )
        raise typer.Exit(EXIT_INCOMPLETE)
    if not as_json:
        console.print(f"[green]export complete[/]: {summary.files} files, {human_bytes(summary.bytes_total)}")
