"""`moeforge export hf|hub`: a trainer checkpoint → a Hugging Face model directory → the Hub."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from moeforge.cli._util import human_bytes

app = typer.Typer(
    help="Export: a checkpoint as a Hugging Face model directory, and its upload.", no_args_is_help=True
)
console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_NOT_VERIFIED = 1  # `export hub`: uploaded, but the Hub does not hold every file as it is locally
EXIT_USAGE = 2  # as `moeforge` reports any other user error


@app.command("hf")
def hf(
    checkpoint: Path = typer.Argument(
        ..., metavar="CHECKPOINT", help="A run directory or checkpoints/step-… dir."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Directory to write (config, weights, tokenizer, card)."
    ),
    layout: str | None = typer.Option(
        None, "--layout", help="mixtral | qwen2_moe | llama (default: chosen)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    max_shard_gb: float = typer.Option(
        5.0, "--max-shard-gb", min=0.001, help="Shard the weights above this."
    ),
) -> None:
    """Write config.json, model.safetensors (sharded above 5 GB), tokenizer files with the chat template,
    generation_config.json and a model card; transformers loads the result offline."""
    from moeforge.export import export_checkpoint

    path = export_checkpoint(
        checkpoint, out, layout=layout, overwrite=overwrite, max_shard_bytes=int(max_shard_gb * 1e9)
    )
    for f in sorted(path.iterdir()):
        console.print(f"  {escape(f.name):40} {human_bytes(f.stat().st_size):>10}")
    console.print(f"exported → {escape(str(path))}")


@app.command("hub")
def hub(
    directory: Path = typer.Argument(..., metavar="DIR", help="An `moeforge export hf` output."),
    repo: str = typer.Option(..., "--repo", help="OWNER/NAME of the model repository."),
    token: str | None = typer.Option(
        None, "--token", help="Hub token (default: $HF_TOKEN or the saved login)."
    ),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded and stop."),
    endpoint: str | None = typer.Option(
        None,
        "--endpoint",
        help="A Hub mirror or a private Hub (default: $HF_ENDPOINT, else https://huggingface.co). "
        "Set HF_HUB_DISABLE_XET=1 if it does not speak the Xet protocol.",
    ),
) -> None:
    """Upload an export to the Hugging Face Hub, then check every file against the Hub's listing at the
    new commit: sha256 for LFS files, git blob id for the rest (needs a token and network; --dry-run
    needs neither). Exits 1 when a file does not match — rerun to upload again — and 2 on other errors."""
    from moeforge.export import ExportError, HubVerificationError, upload_to_hub

    try:
        result = upload_to_hub(
            directory, repo, token=token, private=private, dry_run=dry_run, endpoint=endpoint
        )
    except ExportError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_NOT_VERIFIED if isinstance(exc, HubVerificationError) else EXIT_USAGE) from exc
    for name, size in result:
        check = f"  verified {result.verified[name]}" if name in result.verified else ""
        console.print(f"  {escape(name):40} {human_bytes(size):>10}{escape(check)}", soft_wrap=True)
    if dry_run:
        console.print(f"would upload {len(result)} files to {escape(result.url)}")
    else:
        console.print(
            f"uploaded {len(result)} files to {escape(result.url)} (commit {escape(result.commit or '?')}); "
            f"all {len(result.verified)} verified against the Hub's listing",
            soft_wrap=True,
        )
