"""Stream the objects under a root — a local directory, an S3 prefix or any fsspec URL — in key order.

An inventory of a data lake can hold millions of keys, so nothing here builds a full listing: S3 is read
one ``list_objects_v2`` page at a time, a local tree or another fsspec filesystem one directory at a time.
Every backend yields keys in the same order — ascending UTF-8 byte order of the key relative to the root,
the order S3 itself lists in — so a caller that records the last key it finished can resume with
``start_after=`` on any backend and get exactly the objects it has not seen yet.

For a walk to come out in key order, a directory ``name`` sorts among its siblings as ``name + "/"``:
every key below it starts with that string, so ``a-b`` (``-`` < ``/``) comes before ``a/x`` and ``a0``
(``0`` > ``/``) after it, exactly as the flat keys compare. The same rule lets the walk skip a whole
subtree that ends before ``start_after`` without listing it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from moeforge.storage.objects import SHA256_META
from moeforge.storage.urls import Location, StorageError, locate

__all__ = ["ObjectInfo", "head_sha256", "iter_objects"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a root: ``key`` relative to the root with ``/`` separators, ``size`` in bytes,
    the store's ``etag`` (S3's, quotes stripped; None where the backend has none), ``sha256`` when
    already known (the lister never computes it: reading every byte is the caller's choice), and
    ``modified`` as ISO-8601 UTC when the backend reports it."""

    key: str
    size: int
    etag: str | None = None
    sha256: str | None = None
    modified: str | None = None


def _iso(value: Any) -> str | None:
    """A modification time (POSIX seconds or a datetime) as ISO-8601 UTC; None when unknown."""
    if value is None:
        return None
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat()
    return str(value)


def _subtree_before(prefix: str, start_after: str | None) -> bool:
    """True when every key starting with ``prefix`` is <= ``start_after`` (the subtree was all seen).

    ``start_after`` beyond ``prefix`` yet not inside it differs from it within ``prefix``'s length, so
    it is greater than every key that starts with ``prefix``."""
    return start_after is not None and start_after > prefix and not start_after.startswith(prefix)


def iter_objects(root: str, *, start_after: str | None = None, page_size: int = 1000) -> Iterator[ObjectInfo]:
    """Every object under ``root`` with a key greater than ``start_after``, in ascending key order.

    ``root`` is a local directory, a ``file://`` URL or an fsspec URL (``s3://bucket/prefix``,
    ``gs://…``, ``memory://…``, an ``https://`` listing where fsspec supports one). S3 is listed with
    ``list_objects_v2`` pages of ``page_size`` keys and ``StartAfter``; "directory marker" keys (ending
    in ``/``) are skipped. Memory is bounded by one page, or by the directories on the current path of a
    walk. Raises :class:`StorageError` naming the root and what to do when it does not exist, cannot be
    read or lists nothing at all (an S3 prefix exists only through its objects)."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1 (got {page_size})")
    loc = locate(root)
    if not loc.remote:
        yield from _iter_local(loc, start_after)
    elif loc.is_s3:
        yield from _iter_s3(loc, start_after, page_size)
    else:
        yield from _iter_fsspec(loc, start_after)


# ----------------------------------------------------------------------------------------------- local


def _iter_local(loc: Location, start_after: str | None) -> Iterator[ObjectInfo]:
    try:
        st = os.stat(loc.path)
    except FileNotFoundError:
        raise StorageError(f"{loc.url}: no such directory; check the path (or the mount)") from None
    except PermissionError:
        raise StorageError(f"{loc.url}: permission denied; run as a user who can read it") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{loc.url}: not a directory; give the directory that holds the data")
    yield from _walk_local(loc.path, "", start_after, {(st.st_dev, st.st_ino)})


def _walk_local(
    path: str, rel: str, start_after: str | None, ancestors: set[tuple[int, int]]
) -> Iterator[ObjectInfo]:
    """One directory: list it (sorted, directories as ``name/``), then yield files and walk subdirectories
    in that order. ``ancestors`` guards against a symlink that loops back up the tree."""
    entries: list[tuple[str, str, bool]] = []  # (sort key, name, is a directory)
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    name = entry.name.encode("utf-8").decode("utf-8")
                except UnicodeEncodeError:  # surrogate-escaped bytes: no UTF-8 key can name it
                    log.warning("skipping %r: its name is not valid UTF-8", os.path.join(path, entry.name))
                    continue
                try:
                    is_dir = entry.is_dir()
                    if not is_dir and not entry.is_file():  # sockets, fifos, dangling links
                        continue
                except OSError:
                    continue
                entries.append((name + "/" if is_dir else name, name, is_dir))
    except PermissionError:
        raise StorageError(f"{path}: permission denied while listing; fix its permissions") from None
    except FileNotFoundError:  # removed while the walk ran
        log.warning("%s: vanished while listing; skipped", path)
        return
    entries.sort(key=lambda e: e[0].encode("utf-8"))
    for sort_key, name, is_dir in entries:
        key = rel + sort_key
        child = os.path.join(path, name)
        if is_dir:
            if _subtree_before(key, start_after):
                continue
            try:
                st = os.stat(child)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in ancestors:
                log.warning("%s: a symlink loop back to a parent directory; skipped", child)
                continue
            inner = start_after if start_after is not None and start_after > key else None
            yield from _walk_local(child, key, inner, ancestors | {ident})
        elif start_after is None or key > start_after:
            try:
                st = os.stat(child)
            except FileNotFoundError:
                continue
            yield ObjectInfo(key, st.st_size, modified=_iso(st.st_mtime))


# -------------------------------------------------------------------------------------------------- S3


def _s3_error(loc: Location, exc: BaseException) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        bucket = loc.path.split("/", 1)[0]
        return StorageError(
            f"{loc.url}: bucket {bucket!r} does not exist ({exc}); check the URL and the endpoint"
        )
    if isinstance(exc, PermissionError):
        return StorageError(
            f"{loc.url}: permission denied ({exc}); check the credentials (AWS_PROFILE, "
            "AWS_ACCESS_KEY_ID) allow s3:ListBucket / s3:GetObject on it"
        )
    return StorageError(
        f"{loc.url}: cannot list ({type(exc).__name__}: {exc}); check the URL, endpoint and network"
    )


def _s3_call(loc: Location, fs: Any, method: str, **kwargs: Any) -> dict[str, Any]:
    try:
        return dict(fs.call_s3(method, **kwargs))
    except StorageError:
        raise
    except Exception as exc:  # s3fs raises OSError subclasses; botocore its own (no credentials, endpoint)
        raise _s3_error(loc, exc) from exc


def _iter_s3(loc: Location, start_after: str | None, page_size: int) -> Iterator[ObjectInfo]:
    fs = loc.filesystem()
    bucket, _, prefix = loc.path.partition("/")
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    if start_after is not None:
        kwargs["StartAfter"] = prefix + start_after
    seen_any = False
    while True:
        page = _s3_call(loc, fs, "list_objects_v2", **kwargs)
        for obj in page.get("Contents", ()):
            seen_any = True
            key = str(obj["Key"])[len(prefix) :]
            if not key or key.endswith("/"):  # a console-made "folder": no data
                continue
            etag = str(obj.get("ETag") or "").strip('"') or None
            yield ObjectInfo(key, int(obj["Size"]), etag=etag, modified=_iso(obj.get("LastModified")))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            break
        kwargs.pop("StartAfter", None)  # the token carries the position from here on
        kwargs["ContinuationToken"] = token
    if not seen_any and start_after is None:
        raise StorageError(
            f"{loc.url}: no objects under this prefix (an S3 prefix exists only through its objects); "
            "check the URL — a root names a prefix (a 'directory'), not one object"
        )


def head_sha256(root: str, key: str) -> str | None:
    """The ``sha256`` user metadata of S3 object ``key`` under ``root`` (one HEAD request; what
    ``moeforge export`` writes as ``x-amz-meta-sha256``), or None when the object carries none.

    S3's ETag is an MD5 only for single-part uploads, so a content hash must come from metadata.
    Raises :class:`StorageError` for a root that is not on S3 or an object that cannot be read."""
    loc = locate(root)
    if not loc.is_s3:
        raise StorageError(f"{root}: object metadata is read only from s3:// roots")
    bucket, _, prefix = loc.path.partition("/")
    full = f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key
    head = _s3_call(loc, loc.filesystem(), "head_object", Bucket=bucket, Key=full)
    meta = {str(k).lower(): v for k, v in (head.get("Metadata") or {}).items()}
    value = meta.get(SHA256_META)
    return str(value) if value else None


# ------------------------------------------------------------------------------------- other fsspec


def _iter_fsspec(loc: Location, start_after: str | None) -> Iterator[ObjectInfo]:
    fs = loc.filesystem()
    base = str(fs._strip_protocol(loc.url)).rstrip("/")
    try:
        if not fs.isdir(base):
            hint = "not a directory" if fs.exists(base) else "no such directory"
            raise StorageError(f"{loc.url}: {hint}; give the directory (prefix) that holds the data")
    except PermissionError as exc:
        raise StorageError(f"{loc.url}: permission denied ({exc}); check the credentials") from exc
    except (OSError, ValueError) as exc:
        raise StorageError(f"{loc.url}: cannot read ({exc}); check the URL and the network") from exc
    yield from _walk_fsspec(loc, fs, base, "", start_after, 0)


def _walk_fsspec(
    loc: Location, fs: Any, path: str, rel: str, start_after: str | None, depth: int
) -> Iterator[ObjectInfo]:
    if depth > 256:  # a listing that links back to itself (HTTP index pages can)
        log.warning("%s: deeper than 256 levels; not followed further", path)
        return
    try:
        listing = fs.ls(path, detail=True)
    except PermissionError as exc:
        raise StorageError(
            f"{loc.url}: permission denied listing {path} ({exc}); check the credentials"
        ) from exc
    except FileNotFoundError:
        log.warning("%s: vanished while listing; skipped", path)
        return
    except OSError as exc:
        raise StorageError(f"{loc.url}: cannot list {path} ({exc})") from exc
    fs.invalidate_cache(path)  # gcsfs and others cache every listing: memory would grow with the tree
    entries: list[tuple[str, str, dict[str, Any]]] = []  # (sort key, name, info)
    prefix = path.rstrip("/") + "/"
    for info in listing:
        full = str(fs._strip_protocol(str(info["name"]))).rstrip("/")
        if not full.startswith(prefix):  # the directory itself, or a link out of the tree
            continue
        name = full[len(prefix) :]
        if not name or "/" in name:
            continue
        is_dir = info.get("type") == "directory"
        entries.append((name + "/" if is_dir else name, name, info))
    entries.sort(key=lambda e: e[0].encode("utf-8"))
    for sort_key, name, info in entries:
        key = rel + sort_key
        if sort_key.endswith("/"):
            if _subtree_before(key, start_after):
                continue
            inner = start_after if start_after is not None and start_after > key else None
            yield from _walk_fsspec(loc, fs, prefix + name, key, inner, depth + 1)
        elif start_after is None or key > start_after:
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"') or None
            modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
            yield ObjectInfo(key, int(info.get("size") or 0), etag=etag, modified=_iso(modified))
