"""File helpers shared by every stage: atomic writes and content hashing.

Anything a crash could leave half-written goes through :func:`atomic_write_bytes` /
:func:`atomic_directory`: data lands in a temporary name beside the target, is fsynced, then renamed
over the target in one step, so readers see the old file or the new one and never a torn one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moeforge.faults import point

__all__ = [
    "DirectoryLock",
    "DirectoryLockedError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_base",
    "save_safetensors",
    "sha256_file",
    "verify_checksums",
    "write_checksums",
]

_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_base() -> Path:
    """Where moeforge keeps what it can rebuild (token cache, peak FLOP/s, fetched exports):
    ``$MOEFORGE_CACHE_DIR``, else ``~/.cache/moeforge``."""
    root = os.environ.get("MOEFORGE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "moeforge"


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            point("write")
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        point("rename")
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if exc.filename is None:  # a failed write() names no file; a full disk should say which one
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
    point("written")
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for the same object)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (not the directories themselves)."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _readable_modes(path: Path) -> None:
    """Give every file and directory under ``path`` the mode the umask allows (0644 / 0755 under 022):
    some writers create owner-only files (safetensors writes 0600), which would make weights the one
    part of a run another user or a serving container cannot read."""
    mask = _umask()
    for f in path.rglob("*"):
        if f.is_symlink():
            continue
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike[str],
    overwrite: bool = False,
    guard: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when the block succeeds.

    Yields the temporary directory to write into. If the block raises, the temporary directory is
    removed and ``path`` is untouched. Files and directories in it get the umask's modes before the
    rename, whatever mode their writer chose. With ``overwrite``, an existing ``path`` is replaced;
    without it, an existing ``path`` raises :class:`FileExistsError` before any work is done. With
    ``guard``, the rename runs inside ``guard()``, which may refuse it by raising (a run's fence).
    Without ``overwrite``, a ``path`` that appeared while the block ran (another process) is not replaced
    either: :class:`FileExistsError`, and the other process's directory stays as it was.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (or --overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        point("directory")
        yield tmp
        point("directory-built")
        _readable_modes(tmp)
        fsync_tree(tmp)
        with guard() if guard is not None else contextlib.nullcontext():
            if target.exists() and not overwrite:
                raise FileExistsError(
                    f"{target} appeared while this output was being built (another process wrote it); "
                    "left it as it is — pass overwrite=True (or --overwrite) to replace it"
                )
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            fsync_dir(target.parent)
        point("directory-renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` with the same bytes for the same tensors in every process.

    safetensors keeps the header's ``__metadata__`` in a hash map, so with two or more keys their order —
    and the file's sha256 — changed from one process to the next. The header is rewritten in place with
    the keys sorted (same length: only their order changes). A fault point of the write paths."""
    from safetensors.torch import save_file

    target = Path(path)
    point("weights")
    save_file(tensors, str(target), metadata=metadata)
    if metadata and len(metadata) > 1:
        with open(target, "r+b") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
            meta = header.pop("__metadata__")
            head = json.dumps(
                {"__metadata__": dict(sorted(meta.items())), **header},
                separators=(",", ":"),
                ensure_ascii=False,
            )
            raw = head.encode("utf-8").ljust(size, b" ")  # safetensors pads its header with spaces
            if len(raw) != size:  # cannot happen with plain string metadata; never corrupt the file
                raise ValueError(
                    f"{target}: a canonical safetensors header does not fit ({len(raw)} > {size})"
                )
            fh.seek(8)
            fh.write(raw)
    return target


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (flat memory for any size). ``path`` may be an
    fsspec URI (``s3://…``, ``https://…``; needs the ``s3`` extra's fsspec)."""
    if "://" in str(path):
        import fsspec

        with fsspec.open(str(path), "rb") as fh:
            return _sha256_stream(fh)
    with open(path, "rb") as fh:
        return _sha256_stream(fh)


def _sha256_stream(fh: Any) -> str:
    h = hashlib.sha256()
    while chunk := fh.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


CHECKSUMS = "checksums.json"


def write_checksums(directory: str | os.PathLike[str]) -> Path:
    """Write ``DIR/checksums.json``: the size and sha256 of every other file under ``DIR``.

    Written last, inside the temporary directory of :func:`atomic_directory`, so a directory that has it
    is complete, and any later change to any byte is found by :func:`verify_checksums`."""
    d = Path(directory)
    files = {
        p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }
    return atomic_write_json(d / CHECKSUMS, {"algorithm": "sha256", "files": files})


def verify_checksums(directory: str | os.PathLike[str]) -> list[str]:
    """Problems found comparing ``DIR`` with its ``checksums.json`` (empty: every byte as written).

    Names each listed file that is missing or has another size or sha256 (files added later are not
    checked); a missing or unreadable ``checksums.json`` is itself a problem."""
    d = Path(directory)
    try:
        listed = json.loads((d / CHECKSUMS).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return [f"{d / CHECKSUMS}: missing (written by an older moeforge, or the directory is incomplete)"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{d / CHECKSUMS}: unreadable ({exc})"]
    problems = []
    for rel, want in sorted(listed.items()):
        p = d / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, {want['size']} when written")
        elif sha256_file(p) != want["sha256"]:
            problems.append(f"{p}: sha256 differs from when it was written (the file is corrupt)")
    return problems


class DirectoryLockedError(ValueError):
    """Another process holds the directory's lock; the message names the directory and the holder."""


class DirectoryLock:
    """An exclusive ``flock`` on ``DIR/.lock``, held until :meth:`release` (or the process ends — the
    kernel drops the lock with the process, so a killed holder never leaves a stale lock). The holder's
    pid is written into the file for the message another process gets. Raises
    :class:`DirectoryLockedError` when the lock is held.

    With ``beside=True`` the lock file is ``PARENT/.NAME.lock`` next to ``DIR``, for an output directory
    that must not exist until it is complete (one built by :func:`atomic_directory`)."""

    def __init__(
        self, directory: str | os.PathLike[str], what: str = "this directory", *, beside: bool = False
    ) -> None:
        import fcntl

        d = Path(directory)
        if beside:  # an output that does not exist yet (atomic_directory renames it into place at the end)
            d.parent.mkdir(parents=True, exist_ok=True)
            self.path = d.parent / f".{d.name}.lock"
        else:
            d.mkdir(parents=True, exist_ok=True)
            self.path = d / ".lock"
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise DirectoryLockedError(
                f"{d}: {what} is in use by another process (pid {holder}); wait for it to finish, or use "
                "another directory"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh: Any = fh

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
