"""The pretokenized cache: one directory per (inputs, tokenizer, settings) fingerprint.

Layout: ``ROOT/<name>/`` holds a tokenized output (``manifest.json`` + shard files), where ``<name>`` is
readable and ends in the fingerprint's first 8 hex digits, e.g.
``openai_gsm8k_main_tok-3f2a9c1d_1024_9e8d7c6b``. The fingerprint covers everything that changes the
bytes — the input run's manifest sha256 (which itself holds the sha256 of every record shard), the
tokenizer files' sha256, seq_len, packing mode, sample limits and the format version — so a changed
input can never be served stale tokens: it gets a new entry.

Writes are safe under concurrency: a writer takes ``ROOT/.locks/<name>.lock`` (``flock``), builds the
entry in ``ROOT/.tmp-<name>-<pid>-<random>/`` and renames it into place (``manifest.json`` is written last
inside it, so an entry directory always is complete). A second process asking for the same entry waits
on the lock and then finds the finished entry. A crash leaves only a ``.tmp-*`` directory, which
``clean_invalid`` removes once no live process holds its lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.io import cache_base, fsync_dir, fsync_tree
from moeforge.tokens.shards import verify_files

__all__ = [
    "CacheEntry",
    "CacheError",
    "build_entry",
    "cache_root",
    "check_entry",
    "clean",
    "clean_invalid",
    "entry_name",
    "fingerprint",
    "list_entries",
    "sanitize",
]

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class CacheError(ValueError):
    """A cache operation cannot be done as asked; the message says why."""


def cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, else ``$MOEFORGE_CACHE_DIR/tokens``, else ``~/.cache/moeforge/tokens``."""
    if root is not None:
        return Path(root)
    return cache_base() / "tokens"


def fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts`` (sorted keys, no whitespace)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def sanitize(part: str, max_len: int = 48) -> str:
    """A name component that cannot escape the cache root: runs of anything but ``[A-Za-z0-9._-]``
    become ``_``; leading dots and dashes go (no ``..``, no hidden names, no option-like names)."""
    s = _UNSAFE.sub("_", part).lstrip(".-_")
    s = s.replace("..", "_")[:max_len].rstrip("._-")
    return s or "x"


def entry_name(dataset: str, tokenizer: str, seq_len: int, fp: str) -> str:
    """``<dataset>_<tokenizer>_<seq_len>_<fp8>``, each part sanitized (``openai/gsm8k`` → ``openai_gsm8k``)."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", fp):
        raise CacheError(f"fingerprint must be hex digits, got {fp!r}")
    return f"{sanitize(dataset)}_{sanitize(tokenizer, 32)}_{int(seq_len)}_{fp[:8]}"


def _inside(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if path.parent != root.resolve():
        raise CacheError(f"cache entry name {name!r} would leave the cache root {root}")
    return path


@contextlib.contextmanager
def _locked(root: Path, name: str, *, blocking: bool = True) -> Iterator[bool]:
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_entry(
    root: str | os.PathLike[str], name: str, fp: str, build: Callable[[Path], None]
) -> tuple[Path, bool]:
    """The entry ``root/name`` for fingerprint ``fp``, built with ``build(tmp_dir)`` when missing or
    invalid. Returns ``(path, built)``; ``built`` is False on a cache hit. ``build`` must write
    ``manifest.json`` (with ``"fingerprint": fp``) last."""
    root_p = Path(root)
    root_p.mkdir(parents=True, exist_ok=True)
    final = _inside(root_p, name)
    with _locked(root_p, name):
        if final.exists():
            problems = check_entry(final, expect_fingerprint=fp, deep=False)
            if not problems:
                log.info("token cache hit: %s", final)
                return final, False
            log.warning("token cache entry %s is invalid (%s); rebuilding", final, "; ".join(problems))
            _remove(final)
        tmp = root_p / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            build(tmp)
            if check_entry(tmp, expect_fingerprint=fp, deep=False):
                raise CacheError(f"the build of {name} did not write a valid manifest.json")
            fsync_tree(tmp)
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(root_p)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def _remove(path: Path) -> None:
    """Rename out of the way first, so a crash mid-delete never leaves a half-deleted entry."""
    trash = path.parent / f".tmp-trash-{path.name}-{secrets.token_hex(4)}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def check_entry(path: Path, *, expect_fingerprint: str | None = None, deep: bool = True) -> list[str]:
    """Problems of one entry (empty when valid): manifest missing or unreadable, fingerprint mismatch,
    shard files missing or of the wrong size, and with ``deep`` a sha256 mismatch."""
    m = _read_manifest(path)
    if m is None:
        return ["manifest.json is missing or unreadable (unfinished write?)"]
    problems: list[str] = []
    if expect_fingerprint is not None and m.get("fingerprint") != expect_fingerprint:
        problems.append(f"fingerprint {str(m.get('fingerprint'))[:12]} != expected {expect_fingerprint[:12]}")
    files: dict[str, dict[str, Any]] = {}
    for split in (m.get("splits") or {}).values():
        files.update(split.get("files") or {})
    if not files:
        problems.append("manifest lists no shard files")
    if deep:
        problems += verify_files(path, files)
    else:
        for fname, info in files.items():
            f = path / fname
            if not f.is_file():
                problems.append(f"{fname} is missing")
            elif f.stat().st_size != info.get("bytes"):
                problems.append(f"{fname} has {f.stat().st_size} bytes, manifest says {info.get('bytes')}")
    return problems


@dataclass
class CacheEntry:
    """One directory of the cache root, as ``list`` shows it."""

    name: str
    path: Path
    bytes: int
    modified: float
    status: str  # "ok", "invalid: …", or "unfinished"
    manifest: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_entries(root: str | os.PathLike[str] | None = None, *, deep: bool = False) -> list[CacheEntry]:
    """Every entry under ``root`` (and unfinished ``.tmp-*`` writes), sorted by name."""
    r = cache_root(root)
    if not r.is_dir():
        return []
    out: list[CacheEntry] = []
    for d in sorted(r.iterdir()):
        if not d.is_dir() or d.name == ".locks":
            continue
        if d.name.startswith(".tmp-"):
            status = "unfinished"
            manifest = None
        else:
            problems = check_entry(d, deep=deep)
            status = "ok" if not problems else "invalid: " + "; ".join(problems)
            manifest = _read_manifest(d)
        out.append(CacheEntry(d.name, d, _size(d), d.stat().st_mtime, status, manifest))
    return out


def _writer_alive(root: Path, tmp_name: str) -> bool:
    """Whether a live process still holds the lock of the entry an unfinished ``.tmp-`` dir belongs to."""
    m = re.fullmatch(r"\.tmp-(?:trash-)?(.+?)(?:-\d+)?-[0-9a-f]{8}", tmp_name)
    if not m:
        return False
    with _locked(root, m.group(1), blocking=False) as got:
        return not got


def clean_invalid(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove entries with missing or corrupt shards (sha256 checked) or no manifest, and unfinished
    writes whose writer is gone; nothing else. Returns the names removed."""
    r = cache_root(root)
    removed: list[str] = []
    for e in list_entries(r, deep=True):
        if e.ok:
            continue
        if e.status == "unfinished":
            if _writer_alive(r, e.name):
                continue
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            with _locked(r, e.name, blocking=False) as got:
                if not got:  # being rebuilt right now
                    continue
                _remove(e.path)
        removed.append(e.name)
        log.info("removed %s (%s)", e.name, e.status)
    return removed


def clean(
    root: str | os.PathLike[str] | None = None,
    *,
    names: list[str] | None = None,
    older_than_days: float | None = None,
) -> list[str]:
    """Remove the named entries (all when ``names`` is None), optionally only those not modified in
    ``older_than_days``. Unknown names are an error. Returns the names removed."""
    r = cache_root(root)
    entries = {e.name: e for e in list_entries(r)}
    if names is not None:
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise CacheError(
                f"no cache entry named {', '.join(unknown)} in {r}; see `moeforge data cache list`"
            )
        chosen = [entries[n] for n in names]
    else:
        chosen = list(entries.values())
    if older_than_days is not None:
        cutoff = time.time() - older_than_days * 86400
        chosen = [e for e in chosen if e.modified < cutoff]
    removed = []
    for e in chosen:
        if e.status == "unfinished":
            if _writer_alive(r, e.name):
                log.warning("skipping %s: a process is writing it", e.name)
                continue
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            with _locked(r, e.name, blocking=False) as got:
                if not got:
                    log.warning("skipping %s: a process is writing it", e.name)
                    continue
                if e.path.exists():
                    _remove(e.path)
        removed.append(e.name)
    return removed
