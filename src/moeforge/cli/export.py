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
) -> None:
    """Upload an export to the Hugging Face Hub (needs a token and network; --dry-run needs neither)."""
    from moeforge.export import upload_to_hub

    files = upload_to_hub(directory, repo, token=token, private=private, dry_run=dry_run)
    verb = "would upload" if dry_run else "uploaded"
    for name, size in files:
        console.print(f"  {escape(name):40} {human_bytes(size):>10}")
    console.print(f"{verb} {len(files)} files to https://huggingface.co/{escape(repo)}")
