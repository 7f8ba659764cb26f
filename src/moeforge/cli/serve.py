"""`moeforge serve CHECKPOINT_OR_HF_DIR`: an OpenAI-compatible HTTP server for a trained model."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    path: Path = typer.Argument(
        ...,
        metavar="CHECKPOINT_OR_HF_DIR",
        help="A trainer checkpoint, a training run (its latest checkpoint) or a Hugging Face export directory.",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="MOEFORGE_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1/* (default: $MOEFORGE_API_KEY; unset: no key).",
        show_default=False,
    ),
    model_name: str | None = typer.Option(
        None, "--model-name", help="The model id clients send (default: the model config's name)."
    ),
    system_prompt: str | None = typer.Option(
        None,
        "--system-prompt",
        help="System turn for chats without one (default: the identity turn of the model's training "
        "data, when its run can be traced; '' for none).",
    ),
    max_concurrency: int = typer.Option(16, "--max-concurrency", min=1, help="Choices decoded at once."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests waiting beyond those; then 429."),
    timeout: float = typer.Option(120.0, "--timeout", min=0.001, help="Seconds per request; then 504."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 … (default: cpu)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Rows per forward pass of the engine."),
    batch_wait_ms: float = typer.Option(
        10.0, "--batch-wait-ms", min=0.0, help="How long an idle server waits for companions of a request."
    ),
    max_body_mb: float = typer.Option(
        1.0, "--max-body-mb", min=0.001, help="Largest request body accepted; above it: 413 (MB)."
    ),
    fast_decode: bool = typer.Option(
        True,
        "--fast-decode/--no-fast-decode",
        help="On CPU (float32): decode through a weight copy laid out for one-token steps, ~1.5-2x faster "
        "and 2-3x the weights' memory more. Ignored where it does not apply (GPU).",
    ),
) -> None:
    """Serve /v1/models, /v1/completions and /v1/chat/completions (OpenAI schemas, streaming), /health
    and /metrics (Prometheus). Concurrent requests are decoded in one batch."""
    from moeforge.serve.loading import serve as run_server

    run_server(
        path,
        host,
        port,
        api_key=api_key or None,
        model_name=model_name,
        system_prompt=system_prompt,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        request_timeout=timeout,
        device=device,
        max_batch=max_batch,
        max_batch_wait_ms=batch_wait_ms,
        fast_decode=None if fast_decode else False,
        max_body_bytes=int(max_body_mb * 1_000_000),
    )
