"""``moeforge data inventory``: list every object under a root, assign each to a dataset family, and
report which families the curriculum needs are present, partial or missing.

Outputs in ``OUT``:

- ``inventory.json`` — the root, the families file and its sha256, and ``objects``: every object
  ``{key, size, etag, sha256, modified, family}`` in key order;
- ``coverage.json`` / ``coverage.html`` — per family its status, stage, counts, bytes and reasons
  (:mod:`moeforge.data.coverage`), totals, overlaps, and the first :data:`UNMATCHED_KEPT` unmatched keys;
- ``unmatched.jsonl`` — every object no family matched, one per line.

A root can hold millions of keys, so nothing holds the listing: objects stream from
:func:`moeforge.storage.listing.iter_objects` into staging JSONL files, and ``inventory.json`` is written
at the end by copying the staging file line by line. After every page the staging files are fsynced and
a state file records the last key, the staging byte offsets and the running counts. A rerun after an
interruption truncates the staging files to those offsets (dropping the lines of a page whose state was
never recorded), continues the listing after the last key, and so writes the same bytes as a run that
was never interrupted. The state names the root, the families file's sha256 and ``--hash``; a rerun with
another of those refuses unless ``restart``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from moeforge.data.coverage import (
    FamiliesFile,
    FamilyMatcher,
    Tally,
    coverage_html,
    coverage_report,
    load_families,
)
from moeforge.io import DirectoryLock, atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from moeforge.storage.listing import ObjectInfo, head_sha256, iter_objects
from moeforge.storage.urls import Location, StorageError, locate

__all__ = [
    "COVERAGE_HTML",
    "COVERAGE_JSON",
    "INVENTORY_JSON",
    "STATE_FILE",
    "UNMATCHED_JSONL",
    "UNMATCHED_KEPT",
    "InventoryError",
    "InventoryResult",
    "run_inventory",
]

log = logging.getLogger(__name__)

INVENTORY_JSON = "inventory.json"
COVERAGE_JSON = "coverage.json"
COVERAGE_HTML = "coverage.html"
UNMATCHED_JSONL = "unmatched.jsonl"
STATE_FILE = "inventory.state.json"
_STAGING = "inventory.partial.jsonl"
_UNMATCHED_STAGING = "unmatched.partial.jsonl"
UNMATCHED_KEPT = 1000  # unmatched keys listed in coverage.json; all of them are in unmatched.jsonl
_KIND = "moeforge-inventory"
_VERSION = 1

Progress = Callable[[int, int], None]


class InventoryError(ValueError):
    """An inventory that cannot go on as asked (``OUT`` holds another inventory, a damaged state file);
    the message says what to do. A ValueError, so the CLI prints it as a user error."""


@dataclass(frozen=True)
class InventoryResult:
    """What :func:`run_inventory` did: the output directory, the coverage document, the totals, and
    how many objects came from an interrupted earlier run (0 for a fresh run)."""

    out: Path
    coverage: dict[str, Any]
    objects: int
    bytes: int
    resumed_objects: int


def _line(obj: ObjectInfo, family: str | None, *, with_family: bool = True) -> bytes:
    """One object as a compact, key-sorted JSON line: the same bytes for the same object in every run."""
    row: dict[str, Any] = {
        "key": obj.key,
        "size": obj.size,
        "etag": obj.etag,
        "sha256": obj.sha256,
        "modified": obj.modified,
    }
    if with_family:
        row["family"] = family
    return (json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _stream_write(target: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``target`` atomically (a temporary name beside it, fsync, rename): the
    streaming sibling of :func:`moeforge.io.atomic_write_bytes`, for files too large to hold."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def _inventory_chunks(header: dict[str, Any], staging: Path) -> Iterator[bytes]:
    """``inventory.json``: the header fields, then ``objects`` one line each, copied from the staging
    file with one line of look-ahead (to leave the comma off the last)."""
    yield b"{\n"
    for k, v in header.items():
        yield f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False, sort_keys=True)},\n".encode()
    yield b'  "objects": ['
    with open(staging, "rb") as fh:
        prev = fh.readline()
        yield b"\n" if prev else b""
        while prev:
            line = fh.readline()
            yield b"    " + prev.rstrip(b"\n") + (b",\n" if line else b"\n")
            prev = line
    yield b"  ]\n}\n"


def _first_keys(path: Path, limit: int) -> list[str]:
    keys: list[str] = []
    with open(path, "rb") as fh:
        for line in fh:
            if len(keys) >= limit:
                break
            keys.append(json.loads(line)["key"])
    return keys


def _read_state(out: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InventoryError(f"{out / STATE_FILE}: unreadable ({exc}); pass --restart to list again") from exc
    if not isinstance(state, dict) or state.get("version") != _VERSION:
        raise InventoryError(
            f"{out / STATE_FILE}: not a state this moeforge writes; pass --restart to list again"
        )
    return state


def _open_staging(path: Path, offset: int) -> BinaryIO:
    """A staging file opened for appending at ``offset``: the lines written after the last recorded
    page (an interrupted run's tail) are cut off so the page is listed once."""
    try:
        fh = open(path, "r+b")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise InventoryError(f"{path}: missing, though the state file counts on it; pass --restart") from None
    size = os.fstat(fh.fileno()).st_size
    if size < offset:
        fh.close()
        raise InventoryError(f"{path}: {size} bytes, shorter than the {offset} recorded; pass --restart")
    fh.truncate(offset)
    fh.seek(offset)
    return fh


def _sha256_of(loc: Location, key: str) -> str | None:
    if not loc.remote:
        return sha256_file(loc.child(key))
    if loc.is_s3:
        return head_sha256(loc.url, key)
    return None


def run_inventory(
    root: str,
    families_path: Path,
    out: Path,
    *,
    compute_sha256: bool = False,
    restart: bool = False,
    page_size: int = 1000,
    progress: Progress | None = None,
) -> InventoryResult:
    """Inventory ``root`` against the families file into ``out`` (see the module docstring).

    ``compute_sha256`` hashes local files and reads the ``sha256`` metadata of S3 objects (one HEAD
    each); other filesystems get none. ``progress(objects, bytes)`` is called after every object. An
    unfinished inventory in ``out`` of the same root, families file and ``compute_sha256`` is resumed; a
    finished one is listed again from the start (a root changes); another inventory's state refuses
    with :class:`InventoryError` unless ``restart``. Raises :class:`StorageError` for a root that
    cannot be listed and :class:`moeforge.config.ConfigError` for a bad families file."""
    families_path = Path(families_path)
    spec = load_families(families_path)
    families_sha = sha256_file(families_path)
    loc = locate(root)
    root_id = loc.url if loc.remote else loc.path
    identity = {"root": root_id, "families_sha256": families_sha, "hash": compute_sha256}
    out = Path(out)
    created = not out.exists()
    lock = DirectoryLock(out, "this inventory directory")
    try:
        return _run(loc, spec, families_path, out, identity, restart, page_size, progress)
    except StorageError:
        if created and not (out / STATE_FILE).exists():  # a root that cannot be listed: leave no litter
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.release()


def _run(
    loc: Location,
    spec: FamiliesFile,
    families_path: Path,
    out: Path,
    identity: dict[str, Any],
    restart: bool,
    page_size: int,
    progress: Progress | None,
) -> InventoryResult:
    matcher = FamilyMatcher(spec)
    state = None if restart else _read_state(out)
    if state is not None and {k: state.get(k) for k in identity} != identity:
        raise InventoryError(
            f"{out} holds an inventory of {state.get('root')} (families sha256 "
            f"{str(state.get('families_sha256'))[:12]}…, hash {state.get('hash')}); this run is of "
            f"{identity['root']} (families sha256 {identity['families_sha256'][:12]}…, hash "
            f"{identity['hash']}): pass --restart to replace it, or use another --out"
        )
    staging, unmatched_staging = out / _STAGING, out / _UNMATCHED_STAGING
    if state is not None and not state.get("complete"):
        try:
            tally = Tally.from_json(spec, state["tally"])
            last_key: str | None = state["last_key"]
            offsets = int(state["staging_offset"]), int(state["unmatched_offset"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InventoryError(
                f"{out / STATE_FILE}: damaged ({exc}); pass --restart to list again"
            ) from exc
        inv = _open_staging(staging, offsets[0])
        try:
            unm = _open_staging(unmatched_staging, offsets[1])
        except BaseException:
            inv.close()
            raise
        log.info(
            "inventory: resuming %s after %r (%d objects already listed)", loc.url, last_key, tally.objects
        )
    else:
        tally, last_key = Tally.new(spec), None
        inv, unm = open(staging, "wb"), open(unmatched_staging, "wb")  # noqa: SIM115 - closed below
    resumed = tally.objects

    def flush() -> None:
        for fh in (inv, unm):
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_json(
            out / STATE_FILE,
            {
                "version": _VERSION,
                **identity,
                "complete": False,
                "last_key": last_key,
                "staging_offset": inv.tell(),
                "unmatched_offset": unm.tell(),
                "tally": tally.to_json(),
            },
        )

    try:
        pending = 0
        for obj in iter_objects(
            loc.url if loc.remote else loc.path, start_after=last_key, page_size=page_size
        ):
            if last_key is not None and obj.key <= last_key:  # resuming relies on the order; never guess
                raise StorageError(
                    f"{loc.url}: listed {obj.key!r} after {last_key!r}; the store lists out of order"
                )
            if identity["hash"]:
                obj = replace(obj, sha256=_sha256_of(loc, obj.key))
            fam = tally.add(matcher, obj.key, obj.size)
            inv.write(_line(obj, None if fam is None else spec.families[fam].name))
            if fam is None:
                unm.write(_line(obj, None, with_family=False))
            last_key = obj.key
            pending += 1
            if pending >= page_size:
                flush()
                pending = 0
            if progress is not None:  # after the flush: an interrupt here loses no finished page
                progress(tally.objects, tally.bytes)
        flush()
    finally:
        inv.close()
        unm.close()

    header = {
        "kind": _KIND,
        "version": _VERSION,
        "root": identity["root"],
        "families_file": str(families_path.resolve()),
        "families_sha256": identity["families_sha256"],
        "hash": identity["hash"],
    }
    report = coverage_report(
        spec, tally, header=header, unmatched_keys=_first_keys(unmatched_staging, UNMATCHED_KEPT)
    )
    _stream_write(
        out / INVENTORY_JSON,
        _inventory_chunks({**header, "count": tally.objects, "bytes": tally.bytes}, staging),
    )
    _stream_write(out / UNMATCHED_JSONL, _file_chunks(unmatched_staging))
    atomic_write_json(out / COVERAGE_JSON, report)
    atomic_write_text(out / COVERAGE_HTML, coverage_html(report))
    atomic_write_json(
        out / STATE_FILE, {"version": _VERSION, **identity, "complete": True, "last_key": last_key}
    )
    for p in (staging, unmatched_staging):
        p.unlink(missing_ok=True)
    log.info("inventory: %d objects, %d bytes → %s", tally.objects, tally.bytes, out)
    return InventoryResult(out, report, tally.objects, tally.bytes, resumed)


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk
