"""Export a directory (a data run, token shards, a checkpoint) to an object store, and delete the local
copy only once the remote one is proven.

The order is the guarantee:

1. every file is digested locally (sha256, and the ETag S3 will compute for it);
2. each is uploaded unless the remote object already verifies (a rerun skips finished work; a partial
   multipart upload from an interrupted run is aborted and redone);
3. each remote object is verified: size, the sha256 in its metadata, and the ETag the server computed
   from the bytes it received (S3) — plus, with ``verify="read-back"`` (or on stores whose HEAD proves
   nothing), its bytes streamed back through sha256;
4. the directory's own top-level ``manifest.json`` (a data run's) goes up after everything it lists, and
   ``export-manifest.json`` — every file's key, size and sha256 — is written last: its presence means the
   export is complete;
5. only then, and only with ``delete_local``, are the local files that verified deleted. A failure anywhere
   before step 5 deletes nothing, and the rerun of the same command finishes the job.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moeforge.io import DirectoryLock
from moeforge.storage.objects import DEFAULT_PART_SIZE, LocalFile, ObjectStore, digest_file, open_store
from moeforge.storage.urls import StorageError, is_remote, locate, storage_errors

__all__ = [
    "EXPORT_KIND",
    "EXPORT_MANIFEST",
    "ExportSummary",
    "VerifyMode",
    "export_directory",
    "local_files",
]

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "export-manifest.json"
EXPORT_KIND = "moeforge-export"
VerifyMode = Literal["head", "read-back"]
_LAST = ("manifest.json",)  # a run's own manifest lists the other files: it goes up after them


@dataclass
class ExportSummary:
    """What an export did, file by file. ``kept`` maps a local file that was not deleted to why."""

    destination: str
    files: int = 0
    bytes_total: int = 0
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already there and verified
    verified: list[str] = field(default_factory=list)
    read_back: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    not_exported: dict[str, str] = field(default_factory=dict)  # symlinked directories, and why
    aborted_uploads: int = 0
    bytes_uploaded: int = 0
    complete: bool = False  # every file verified and export-manifest.json written

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "complete": self.complete,
            "files": self.files,
            "bytes_total": self.bytes_total,
            "bytes_uploaded": self.bytes_uploaded,
            "uploaded": self.uploaded,
            "skipped": self.skipped,
            "verified": self.verified,
            "read_back": self.read_back,
            "deleted": self.deleted,
            "kept": self.kept,
            "failed": self.failed,
            "not_exported": self.not_exported,
            "aborted_uploads": self.aborted_uploads,
        }


def _exported(name: str) -> bool:
    # the run's lock and the temp names atomic writes use (.NAME.XXXX.tmp) are not part of the run
    return not (
        name == ".lock" or (name.startswith(".") and (name.endswith(".tmp") or name.endswith(".lock")))
    )


# top-level names that belong to the export itself, never to the exported directory: a directory copied
# back from an export, or a fetch cache, holds them, and uploading them would clobber the new manifest
RESERVED = frozenset({"export-manifest.json", ".fetched.json"})


def local_files(root: Path, links: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """(key, path) of every regular file under ``root``, keys with ``/``, sorted, the run's own
    ``manifest.json`` last. Symlinked directories are not followed; they go into ``links`` (key → why)."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for d in dirnames:
            if (here / d).is_symlink() and links is not None:
                links[(here / d).relative_to(root).as_posix()] = (
                    "a symlinked directory: not followed, not exported; export its target separately"
                )
        dirnames[:] = sorted(d for d in dirnames if _exported(d) and not (here / d).is_symlink())
        for name in filenames:
            p = here / name
            key = p.relative_to(root).as_posix()
            if _exported(name) and key not in RESERVED and p.is_file():
                found.append((key, p))
    found.sort(key=lambda kp: (kp[0] in _LAST, kp[0]))
    yield from found


def _check_remote(
    store: ObjectStore, f: LocalFile, verify: VerifyMode, progress: Callable[[int], None]
) -> str | None:
    """None when the remote copy of ``f`` is proven; else why not (a sentence)."""
    obj = store.head(f.key)
    if obj is None:
        return "not in the store"
    if obj.size != f.size:
        return f"remote size {obj.size} bytes, local {f.size}"
    if store.attests_content:
        if obj.sha256 is not None and obj.sha256 != f.sha256:
            return f"remote sha256 metadata {obj.sha256[:12]}…, local {f.sha256[:12]}…"
        if obj.sha256 is None:
            return "remote object has no sha256 metadata (not written by moeforge export)"
        if obj.etag_is_md5 and obj.etag != f.etag and verify != "read-back":
            return (
                f"the store's digest of the bytes it holds (ETag {obj.etag}) differs from the local file's "
                f"({f.etag}): the upload was altered in transit or written in other part sizes (a store "
                "whose ETag is not an MD5 needs --verify read-back)"
            )
        if not obj.etag_is_md5 and verify != "read-back":
            return "the store's ETag is not a digest of the content (SSE-KMS/SSE-C); verify with --verify read-back"
    if verify == "read-back" or not store.attests_content:
        n, sha = store.read_back(f.key, progress)
        if n != f.size or sha != f.sha256:
            return f"read back {n} bytes with sha256 {sha[:12]}…, local {f.size} bytes {f.sha256[:12]}…"
    return None


def _entry(f: LocalFile) -> dict[str, Any]:
    return {"key": f.key, "size": f.size, "sha256": f.sha256, "etag": f.etag}


def _manifest_bytes(src: Path, entries: list[dict[str, Any]], part_size: int) -> bytes:
    doc = {
        "kind": EXPORT_KIND,
        "version": 1,
        "source": src.name,
        "part_size": part_size,
        "files": sorted(entries, key=lambda e: e["key"]),
        "bytes": sum(e["size"] for e in entries),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _overlap(src: Path, destination: str) -> str | None:
    """Why a local destination cannot take ``src`` (the same directory, or one inside the other), else None."""
    loc = locate(destination)
    if loc.remote:
        return None
    a, b = os.path.realpath(src), os.path.realpath(loc.path)
    if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
        return f"{destination} overlaps the source {src}: export to a directory outside it"
    return None


def export_directory(
    source: str | os.PathLike[str],
    destination: str,
    *,
    delete_local: bool = False,
    verify: VerifyMode = "head",
    part_size: int = DEFAULT_PART_SIZE,
    overwrite: bool = False,
    on_file: Callable[[str, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> ExportSummary:
    """Upload every file under ``source`` to ``destination`` (see the module docstring for the order that
    makes it safe). Never raises for a single file's failure: it lands in ``summary.failed``, nothing is
    deleted, and ``summary.complete`` is False. Raises :class:`StorageError` for an unusable source or
    destination, and for a destination holding an earlier export whose files differ (unless
    ``overwrite``: then that export's manifest is removed first, so the prefix never claims completeness
    for objects that are being replaced)."""
    src = Path(source)
    if is_remote(os.fspath(source)):
        raise StorageError(f"{source}: the export source must be a local directory")
    if not src.is_dir():
        raise StorageError(f"{src}: no such directory; pass a data run, token shard or checkpoint directory")
    if verify not in ("head", "read-back"):
        raise StorageError(f"--verify must be head or read-back, got {verify!r}")
    if why := _overlap(src, destination):
        raise StorageError(why)
    progress = on_bytes or (lambda _n: None)
    store = open_store(destination, part_size)
    summary = ExportSummary(destination)
    try:  # keep a moeforge run from writing into the directory while it is exported
        lock: DirectoryLock | None = DirectoryLock(src, "this directory (being exported)")
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        if delete_local:
            raise StorageError(
                f"{src}: not writable, so its files cannot be deleted; drop --delete-local"
            ) from None
        lock = None  # a read-only source (another team's corpus, a read-only mount) is exported as it is
    try:
        files = [digest_file(path, key, part_size) for key, path in local_files(src, summary.not_exported)]
        stats = {f.key: _stat(Path(f.path)) for f in files}
        with storage_errors(f"reading {destination}/{EXPORT_MANIFEST}"):
            carried = _carry_prior(store, files, summary, overwrite=overwrite)
        if not files and not carried:
            raise StorageError(f"{src}: nothing to export (no files)")
        summary.files = len(files)
        summary.bytes_total = sum(f.size for f in files)
        proven = _upload_all(store, files, verify, summary, progress, on_file)
        if not summary.failed:
            try:
                data = _manifest_bytes(src, [*map(_entry, files), *carried], part_size)
                store.put_bytes(EXPORT_MANIFEST, data)
                if store.get_bytes(EXPORT_MANIFEST) != data:
                    raise StorageError(f"{EXPORT_MANIFEST} read back differs from what was written")
                summary.complete = True
            except Exception as exc:
                summary.failed[EXPORT_MANIFEST] = f"{exc.__class__.__name__}: {exc}"
        for f in files:
            path = Path(f.path)
            if not delete_local:
                summary.kept[f.key] = "--delete-local not given"
            elif not summary.complete:
                summary.kept[f.key] = "the export is incomplete; nothing is deleted until every file verifies"
            elif f.key not in proven:  # cannot happen when complete; kept as the invariant's last guard
                summary.kept[f.key] = "remote copy not verified"
            elif _stat(path) != stats[f.key]:  # written to by something else since it was digested
                summary.kept[f.key] = (
                    "changed since it was exported; rerun the export to upload the new content"
                )
            else:
                path.unlink()
                summary.deleted.append(f.key)
    finally:
        if lock is not None:
            lock.release()
    if summary.deleted:
        _remove_emptied_dirs(src, {Path(f.path).parent for f in files})
    for key, why in summary.failed.items():
        log.warning("%s: %s", key, why)
    return summary


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _upload_all(
    store: ObjectStore,
    files: list[LocalFile],
    verify: VerifyMode,
    summary: ExportSummary,
    progress: Callable[[int], None],
    on_file: Callable[[str, int], None] | None,
) -> set[str]:
    """Upload what is not already proven, verify it; returns the keys whose remote copy is proven."""
    proven: set[str] = set()
    for f in files:
        if on_file:
            on_file(f.key, f.size)
        try:
            why = _check_remote(store, f, verify, lambda _n: None)
            if why is None:
                summary.skipped.append(f.key)
                proven.add(f.key)
                progress(f.size)
                continue
            summary.aborted_uploads += store.abort_incomplete(f.key)
            store.upload(f, progress)
            summary.uploaded.append(f.key)
            summary.bytes_uploaded += f.size
            why = _check_remote(store, f, verify, lambda _n: None)
            if why is not None:
                summary.failed[f.key] = f"uploaded, but the remote copy does not verify: {why}"
                continue
            summary.verified.append(f.key)
            if verify == "read-back" or not store.attests_content:
                summary.read_back.append(f.key)
            proven.add(f.key)
        except StorageError as exc:
            summary.failed[f.key] = str(exc)
        except Exception as exc:  # the client's many network/HTTP error types; the file stays local
            summary.failed[f.key] = f"{exc.__class__.__name__}: {exc}"
    return proven


def _carry_prior(
    store: ObjectStore, files: list[LocalFile], summary: ExportSummary, *, overwrite: bool
) -> list[dict[str, Any]]:
    """What an earlier export's manifest at the destination means for this one.

    An entry whose key this export also has with other content is a different export (or a changed run):
    refused unless ``overwrite``, which removes the old manifest before any object is replaced. An entry
    whose local file is gone (deleted by that export once complete, or by a run killed while deleting) is
    carried into the new manifest when its remote copy still matches; one that does not cannot be repaired
    from here and is reported."""
    raw = store.get_bytes(EXPORT_MANIFEST)
    if raw is None:
        return []
    try:
        prior = json.loads(raw)
        entries = [
            {"key": str(e["key"]), "size": int(e["size"]), "sha256": str(e["sha256"]), "etag": e.get("etag")}
            for e in prior["files"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(
            f"{store.location.url}/{EXPORT_MANIFEST}: unreadable ({exc}); it is not a moeforge export "
            "manifest — export to an empty prefix"
        ) from exc
    local = {f.key: f for f in files}
    changed = [e["key"] for e in entries if e["key"] in local and local[e["key"]].sha256 != e["sha256"]]
    if changed and not overwrite:
        raise StorageError(
            f"{store.location.url} holds an earlier export whose files differ from this directory's "
            f"({len(changed)}, e.g. {changed[0]}); export to another prefix, or pass --overwrite to replace it"
        )
    if changed:
        store.delete(EXPORT_MANIFEST)
        log.info("replacing the earlier export at %s (%d files differ)", store.location.url, len(changed))
    carried = []
    for e in entries:
        if e["key"] in local:
            continue
        obj = store.head(e["key"])
        ok = obj is not None and obj.size == e["size"]
        if ok and store.attests_content:
            ok = (
                obj is not None
                and obj.sha256 == e["sha256"]
                and (not obj.etag_is_md5 or obj.etag == e["etag"])
            )
        elif ok:
            n, sha = store.read_back(e["key"])
            ok = n == e["size"] and sha == e["sha256"]
        if ok:
            carried.append(e)
            summary.skipped.append(e["key"])
        else:
            summary.failed[e["key"]] = (
                "listed by the previous export, no local copy, and the remote copy no longer matches its "
                "size/sha256; restore it from another copy"
            )
    return carried


def _remove_emptied_dirs(root: Path, parents: set[Path]) -> None:
    """Remove the directories the deletion emptied (deepest first), never ``root`` itself, and the
    export's own lock file in ``root`` once nothing else is left."""
    for d in sorted(parents, key=lambda p: -len(p.parts)):
        while d != root and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent
    if [c.name for c in root.iterdir()] == [".lock"]:
        (root / ".lock").unlink(missing_ok=True)
