"""Loading a model to serve and running the server: an engine from an HF export, a trainer checkpoint or
a run directory; the identity system prompt the model was trained with; uvicorn."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import socket
from pathlib import Path

from moeforge.serve.api import ServeError, create_app
from moeforge.serve.engine import Engine

__all__ = ["find_system_prompt", "freeze_startup_heap", "load_engine", "serve"]

log = logging.getLogger(__name__)


def load_engine(
    path: str | os.PathLike[str],
    *,
    device: str | None = None,
    max_batch: int = 8,
    fast_decode: bool | None = None,
) -> Engine:
    """An engine for a Hugging Face export directory (``config.json`` + ``*.safetensors``, with
    ``tokenizer.json`` beside them for text), a trainer checkpoint or a training run directory.
    ``fast_decode``: see :class:`Engine` (None: on where it applies)."""
    p = Path(path)
    if not p.exists():
        raise ServeError(
            f"{p}: no such file or directory; pass a checkpoint, a run or an HF export directory"
        )
    if not p.is_dir():
        raise ServeError(f"{p}: is a file; pass the directory holding model.safetensors")
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        from moeforge.model.hf_import import import_hf
        from moeforge.tokens.tokenizer import load_tokenizer

        model = import_hf(p)
        tokenizer = load_tokenizer(p) if (p / "tokenizer.json").is_file() else None
        if tokenizer is None:
            log.warning("%s: no tokenizer.json; the server takes token-id prompts only", p)
        return Engine(model, tokenizer, device=device, max_batch=max_batch, fast_decode=fast_decode)
    if (p / "state.json").is_file() or (p / "checkpoints").is_dir():
        return Engine.from_checkpoint(p, device=device, max_batch=max_batch, fast_decode=fast_decode)
    raise ServeError(
        f"{p}: neither a Hugging Face export (config.json + model.safetensors) nor a trainer checkpoint "
        "(state.json + model.safetensors) or run directory (checkpoints/)"
    )


def find_system_prompt(path: str | os.PathLike[str]) -> str | None:
    """The identity system turn the model was trained with: the ``identity.system_prompts`` (``*``, else
    ``en``) of the data recipe behind a trainer checkpoint, when its config names the pipeline run
    (``data.run``); None when it cannot be traced."""
    p = Path(path)
    candidates = [p / "state.json", *sorted((p / "checkpoints").glob("*/state.json"))[-1:]]
    for state_file in candidates:
        if not state_file.is_file():
            continue
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            run = ((state.get("config") or {}).get("data") or {}).get("run")
            if not run or not (Path(run) / "recipe.json").is_file():
                return None
            recipe = json.loads((Path(run) / "recipe.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        prompts = (recipe.get("identity") or {}).get("system_prompts") or {}
        return prompts.get("*") or prompts.get("en") or None
    return None


def serve(
    path: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    system_prompt: str | None = None,
    max_concurrency: int = 16,
    max_queue: int = 64,
    request_timeout: float = 120.0,
    device: str | None = None,
    max_batch: int = 8,
    max_batch_wait_ms: float = 10.0,
    fast_decode: bool | None = None,
    max_body_bytes: int | None = 1 << 20,
) -> None:
    """Load ``path`` (see :func:`load_engine`) and serve it with uvicorn until interrupted.
    ``system_prompt`` None means the one the model was trained with (:func:`find_system_prompt`), if
    any; ``""`` means none. The socket is bound before anything is announced: a port in use is a
    :class:`ServeError`, and the address logged is the real one (``port=0`` picks a free port)."""
    import uvicorn

    sock = bind_socket(host, port)  # first: a busy port fails in a second, not after loading the model
    engine = load_engine(path, device=device, max_batch=max_batch, fast_decode=fast_decode)
    if system_prompt is None:
        system_prompt = find_system_prompt(path)
        if system_prompt:
            log.info("default system prompt from the training data: %r", system_prompt)
    name = model_name or engine.cfg.name
    app = create_app(
        engine,
        model_name=name,
        api_key=api_key,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        request_timeout=request_timeout,
        default_system_prompt=system_prompt or None,
        max_batch_wait_ms=max_batch_wait_ms,
        max_body_bytes=max_body_bytes,
    )
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "serving %s as %r on http://%s:%d/v1 (api key %s)",
        path,
        name,
        shown,
        bound,
        "on" if api_key else "off",
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    freeze_startup_heap()
    server.run(sockets=[sock])


def freeze_startup_heap() -> int:
    """Collect garbage once, then move every object alive (modules, the model, the app: ~300k objects,
    all kept until exit) out of the collector's reach (:func:`gc.freeze`); returns how many. Otherwise
    each full collection while serving walks them all and stops every thread, the event loop included,
    for ~0.25 s on 2 CPU cores (a ``/health`` stall the server soak measured); after the freeze it walks
    only what serving allocated."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one); :class:`ServeError` naming the
    address and what to do when it cannot be bound (in use, no such interface, no permission)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        raise ServeError(f"--host {host!r}: not an address this machine has ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = "another process listens there; pick another --port (0: any free port)"
        if exc.errno != errno.EADDRINUSE:
            hint = "check --host and --port (ports below 1024 need privileges)"
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from None
    sock.set_inheritable(True)
    return sock
