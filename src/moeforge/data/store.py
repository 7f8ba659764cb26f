"""Record shards on disk: zstd-compressed JSON Lines, one record per line (``zstdcat`` reads them).

Writers produce the same bytes for the same records (single-threaded zstd at a fixed level, compact
JSON in field order) and never leave a half-written file under its final name: each shard is written
to a temporary name, fsynced and renamed when closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from moeforge.data.contract import Record
from moeforge.faults import point

__all__ = ["ShardInfo", "ShardWriter", "iter_line_bytes", "iter_lines", "read_records", "write_jsonl_line"]


@dataclass
class ShardInfo:
    """A finished shard: its path, record count, size and sha256."""

    path: Path
    records: int
    bytes: int
    sha256: str


class _AtomicZstdFile:
    """One zstd JSONL file written under a temporary name and renamed on close."""

    def __init__(self, path: Path, level: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self._tmp = Path(tmp)
        self._raw: IO[bytes] = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        sink = _HashingSink(self._raw, self._hash, self)
        self._zw = zstandard.ZstdCompressor(level=level, threads=0).stream_writer(sink, closefd=False)
        self.records = 0

    def _count(self, n: int) -> None:
        self._size += n

    def write_line(self, line: str) -> None:
        self._zw.write(line.encode("utf-8"))
        self._zw.write(b"\n")
        self.records += 1

    def close(self) -> ShardInfo:
        point("shard")
        self._zw.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.chmod(self._tmp, 0o644)
        point("shard-rename")
        os.replace(self._tmp, self.path)
        return ShardInfo(self.path, self.records, self._size, self._hash.hexdigest())

    def abort(self) -> None:
        try:
            self._raw.close()
        finally:
            self._tmp.unlink(missing_ok=True)


class _HashingSink(io.RawIOBase):
    def __init__(self, raw: IO[bytes], h: Any, owner: _AtomicZstdFile) -> None:
        self._raw, self._h, self._owner = raw, h, owner

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._raw.write(data)
        self._h.update(data)
        self._owner._count(len(data))
        return len(data)


class ShardWriter:
    """Write records into ``directory/part-00000.jsonl.zst``, ``part-00001`` … of ``shard_records`` each."""

    def __init__(
        self,
        directory: Path,
        shard_records: int = 50_000,
        level: int = 3,
        prefix: str = "part",
        first: int = 0,
    ) -> None:
        self.directory = directory
        self.shard_records = shard_records
        self.level = level
        self.prefix = prefix
        self.first = first  # the number of the first shard (a writer of one shard of a larger set)
        self.shards: list[ShardInfo] = []
        self._cur: _AtomicZstdFile | None = None

    def write(self, record: Record) -> None:
        self.write_json(record.model_dump_json())

    def write_json(self, line: str) -> None:
        """Write one already-serialized record line (no newline)."""
        if self._cur is None:
            name = f"{self.prefix}-{self.first + len(self.shards):05d}.jsonl.zst"
            self._cur = _AtomicZstdFile(self.directory / name, self.level)
        self._cur.write_line(line)
        if self._cur.records >= self.shard_records:
            self.shards.append(self._cur.close())
            self._cur = None

    def close(self) -> list[ShardInfo]:
        if self._cur is not None:
            self.shards.append(self._cur.close())
            self._cur = None
        return self.shards

    def abort(self) -> None:
        if self._cur is not None:
            self._cur.abort()
            self._cur = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextlib.contextmanager
def _raw_stream(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """The decompressed bytes of a ``.zst`` file, or the file itself."""
    p = Path(path)
    with open(p, "rb") as fh:
        if p.name.endswith(".zst"):
            yield zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)  # type: ignore[misc]
        else:
            yield fh


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of a ``.jsonl.zst`` (or plain ``.jsonl``) file, streamed."""
    with _raw_stream(path) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
        for n, line in enumerate(text, 1):
            line = line.rstrip("\n")
            if line:
                yield n, line


def iter_line_bytes(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The non-empty lines of a ``.jsonl.zst`` (or plain ``.jsonl``) file as raw UTF-8 bytes, newline
    included: for fast JSON parsers that take bytes (no decode to ``str`` and back)."""
    with _raw_stream(path) as stream:
        for line in io.BufferedReader(stream, 1 << 20):  # type: ignore[arg-type]
            if line.strip():
                yield line


def read_records(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Validate and yield every record of a shard (the id is checked against the content)."""
    for _, line in iter_lines(path):
        yield Record.model_validate_json(line)


def write_jsonl_line(fh: IO[str], obj: Any) -> None:
    """One compact JSON line (for quarantine and other plain JSONL files)."""
    fh.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True))
    fh.write("\n")
