"""Read an exported directory back: every file streamed from the store into a local cache through sha256
and checked against the export's manifest before anything uses it.

An export is complete only when its ``export-manifest.json`` exists (written last), so a location without
one is refused rather than half-read. The cache (``$MOEFORGE_CACHE_DIR/remote`` or
``~/.cache/moeforge/remote``, one directory per URL) keeps the files that verified, so the second
``data verify`` or training run downloads nothing; a file whose manifest entry changed is fetched again
and files the manifest no longer lists are removed. After that, a remote run is a local run: the same
gates, the same memory-mapped loader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeforge.io import DirectoryLock, DirectoryLockedError, atomic_write_json, cache_base, fsync_dir
from moeforge.storage.export import EXPORT_KIND, EXPORT_MANIFEST
from moeforge.storage.objects import open_store
from moeforge.storage.urls import StorageError, storage_errors

__all__ = ["fetch_export", "read_export_manifest"]

log = logging.getLogger(__name__)

_STATE = ".fetched.json"  # key → sha256 of the files of this cache directory that verified
_RESERVED = frozenset({_STATE, ".lock"})


def read_export_manifest(url: str) -> dict[str, Any]:
    """The export manifest at ``url``; StorageError when it is absent (an incomplete export) or unreadable."""
    with storage_errors(f"reading {url}/{EXPORT_MANIFEST}"):
        raw = open_store(url).get_bytes(EXPORT_MANIFEST)
    if raw is None:
        raise StorageError(
            f"{url}: no {EXPORT_MANIFEST} — not a complete moeforge export (it is written last; rerun "
            "`moeforge data export` to finish an interrupted one)"
        )
    try:
        doc = json.loads(raw)
        if (
            not isinstance(doc, dict)
            or doc.get("kind") != EXPORT_KIND
            or not isinstance(doc.get("files"), list)
        ):
            raise ValueError("not an export manifest")
        for e in doc["files"]:
            key = e["key"]
            parts = key.split("/") if isinstance(key, str) else []
            if (
                not parts
                or key.startswith("/")
                or any(p in ("", ".", "..") for p in parts)
                or key in _RESERVED
            ):
                raise ValueError(f"unsafe key {key!r}")
            int(e["size"]), str(e["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"{url}/{EXPORT_MANIFEST}: not a moeforge export manifest ({exc})") from exc
    return doc


def _lock(target: Path, url: str, wait: float) -> DirectoryLock:
    """The cache directory's lock, waiting up to ``wait`` seconds for another process fetching it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return DirectoryLock(target, f"the local copy of {url}")
        except DirectoryLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def fetch_export(
    url: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    on_bytes: Callable[[int], None] | None = None,
    wait: float = 0.0,
) -> Path:
    """A verified local copy of the export at ``url`` (see the module docstring); returns its directory.
    ``wait``: seconds to wait for another process fetching the same URL (the other ranks of a training
    job on this node) instead of failing at once."""
    doc = read_export_manifest(url)
    store = open_store(url)
    base = Path(cache_dir) if cache_dir is not None else cache_base() / "remote"
    target = base / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    lock = _lock(target, url, wait)
    try:
        state_path = target / _STATE
        try:
            state: dict[str, str] = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        wanted = {e["key"]: e for e in doc["files"]}
        for key in sorted(set(state) - set(wanted)):  # the export changed since: drop what it no longer has
            (target / key).unlink(missing_ok=True)
            del state[key]
        progress = on_bytes or (lambda _n: None)
        fetched = 0
        for key, e in sorted(wanted.items()):
            path = target / key
            if state.get(key) == e["sha256"] and path.is_file() and path.stat().st_size == e["size"]:
                progress(int(e["size"]))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out, storage_errors(f"reading {url}/{key}"):
                    n, sha = store.read_back(key, progress, out)
                    out.flush()
                    os.fsync(out.fileno())  # on disk before the state file can call it verified
                if n != e["size"] or sha != e["sha256"]:
                    raise StorageError(
                        f"{url}/{key}: read {n} bytes with sha256 {sha[:12]}…, but {EXPORT_MANIFEST} says "
                        f"{e['size']} bytes, sha256 {e['sha256'][:12]}… — the remote copy is damaged; "
                        "export it again from the source"
                    )
                os.replace(tmp, path)
                fsync_dir(path.parent)
            except FileNotFoundError as exc:
                raise StorageError(
                    f"{url}/{key}: listed in {EXPORT_MANIFEST} but missing from the store; export it again"
                ) from exc
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            state[key] = e["sha256"]
            atomic_write_json(state_path, state)
            fetched += 1
        atomic_write_json(state_path, state)
        log.info("%s: %d of %d files fetched and verified into %s", url, fetched, len(wanted), target)
    finally:
        lock.release()
    return target
