"""Readers: files, directories and globs → a stream of raw items, or quarantine entries for bad input.

Every reader streams (memory stays flat as inputs grow) and never raises for bad *content*: a line that
is not valid UTF-8 or not valid JSON, a JSON value that is not an object, a blank line, a truncated
compressed stream — each becomes a :class:`Quarantined` item with the file, line, the raw text (cut to
``RAW_LIMIT`` characters) and the reason, and reading goes on with the next line (or, for a stream that
cannot continue, the next file). Problems with the *request* — a path that matches nothing, an unknown
format, a remote URI without the optional dependency — raise :class:`SourceError` before any reading.

Formats (``format="auto"`` picks by extension): ``jsonl`` (``.jsonl``, ``.ndjson``, also ``.gz`` /
``.zst``), ``json`` (a top-level array of objects, parsed incrementally), ``txt`` (``file``: the whole
file is one item; ``paragraphs``: split on blank lines; ``lines``: one item per non-blank line), ``csv``
(header row → dict per row) and ``parquet`` (streamed by row group; needs ``pyarrow``).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import io
import json
import logging
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import msgspec

__all__ = [
    "Format",
    "Quarantined",
    "RawItem",
    "SourceError",
    "TxtMode",
    "detect_format",
    "expand_inputs",
    "read_source",
]

log = logging.getLogger(__name__)

Format = Literal["auto", "jsonl", "json", "txt", "csv", "parquet"]
TxtMode = Literal["file", "paragraphs", "lines"]
RAW_LIMIT = 2000
_JSON_CHUNK = 1 << 16
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


class SourceError(ValueError):
    """The input request cannot be served (nothing matches, unknown format, missing dependency)."""


@dataclass
class RawItem:
    """One input unit: a parsed object (JSON, CSV, Parquet) or a text (TXT), with its position."""

    data: dict[str, Any] | str
    uri: str
    line: int | None = None
    offset: int | None = None


@dataclass
class Quarantined:
    """Input that could not be read as an item: kept with its position, raw text and the reason."""

    uri: str
    error: str
    raw: str = ""
    line: int | None = None
    offset: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "line": self.line,
            "offset": self.offset,
            "error": self.error,
            "raw": self.raw,
        }


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def expand_inputs(spec: str | os.PathLike[str]) -> list[str]:
    """A file, a directory (all files below it, recursively) or a glob → sorted list of file paths.

    Remote URIs (``s3://``, ``https://``) are returned as they are. Raises SourceError when a local spec
    matches no file.
    """
    s = str(spec)
    if _is_remote(s):
        return [s]
    p = Path(s.removeprefix("file://"))
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise SourceError(f"{p}: directory has no files")
        return files
    matches = sorted(m for m in glob.glob(s, recursive=True) if os.path.isfile(m))
    if not matches:
        raise SourceError(f"{s}: no such file, directory or glob match; check the path in the recipe")
    return matches


def _suffixes(path: str) -> list[str]:
    name = path.rsplit("/", 1)[-1].lower()
    parts = name.split(".")[1:]
    return ["." + p for p in parts]


def detect_format(path: str) -> Format:
    """Format from the extension, looking through one compression suffix (``.jsonl.gz`` → jsonl)."""
    suf = _suffixes(path)
    if suf and suf[-1] in (*_COMPRESSED, ".zst"):
        suf = suf[:-1]
    ext = suf[-1] if suf else ""
    table: dict[str, Format] = {
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
        ".json": "json",
        ".txt": "txt",
        ".md": "txt",
        ".csv": "csv",
        ".parquet": "parquet",
    }
    if ext not in table:
        raise SourceError(
            f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; set format: to one of "
            "jsonl, json, txt, csv, parquet"
        )
    return table[ext]


def _open_binary(path: str) -> IO[bytes]:
    """Open a local or remote file for binary reading, decompressing by extension."""
    if _is_remote(path):
        try:
            import fsspec
        except ImportError as exc:
            raise SourceError(f"{path}: remote inputs need fsspec: pip install 'moeforge[s3]'") from exc
        raw: IO[bytes] = fsspec.open(path, "rb").open()
    else:
        raw = open(path.removeprefix("file://"), "rb")  # noqa: SIM115 - returned to the caller
    ext = _suffixes(path)[-1] if _suffixes(path) else ""
    if ext in _COMPRESSED:
        return _COMPRESSED[ext](raw)  # type: ignore[no-any-return]
    if ext == ".zst":
        import zstandard

        # the zstd reader has no line iteration of its own: buffer it
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))  # type: ignore[arg-type]
    return raw


def _cut(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text if len(text) <= RAW_LIMIT else text[:RAW_LIMIT] + f"… ({len(text)} characters)"


def _decode(line: bytes) -> tuple[str | None, str | None]:
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start}"


def _stream_errors(path: str, exc: Exception, line: int) -> Quarantined:
    return Quarantined(uri=path, error=f"unreadable stream after line {line}: {exc}", line=line + 1)


_json_bytes = msgspec.json.Decoder().decode  # bytes in, no str copy; the same objects as json.loads


def _read_jsonl(path: str) -> Iterator[RawItem | Quarantined]:
    n = 0
    try:
        with _open_binary(path) as fh:
            for n, raw in enumerate(fh, start=1):
                # the common line, an object: parsed straight from the bytes; anything it refuses
                # (bad UTF-8 or JSON, NaN, 1e400, a lone surrogate, not an object) takes the path
                # below, which accepts what json.loads accepts and names what it does not
                try:
                    fast = _json_bytes(raw)
                except Exception:  # every refusal is re-parsed and reported below
                    fast = None
                if type(fast) is dict:
                    yield RawItem(data=fast, uri=path, line=n)
                    continue
                text, err = _decode(raw)
                if err or text is None:
                    yield Quarantined(uri=path, error=err or "undecodable", raw=_cut(raw), line=n)
                    continue
                if not text.strip():
                    yield Quarantined(uri=path, error="empty line", raw="", line=n)
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield Quarantined(
                        uri=path,
                        error=f"invalid JSON: {exc.msg} at column {exc.colno}",
                        raw=_cut(text),
                        line=n,
                    )
                    continue
                except Exception as exc:  # nesting too deep (RecursionError), a 5,000-digit number …
                    yield Quarantined(
                        uri=path,
                        error=f"unparsable JSON: {type(exc).__name__}: {exc}",
                        raw=_cut(text),
                        line=n,
                    )
                    continue
                if not isinstance(obj, dict):
                    kind = type(obj).__name__ if obj is not None else "null"
                    yield Quarantined(
                        uri=path, error=f"expected a JSON object, got {kind}", raw=_cut(text), line=n
                    )
                    continue
                yield RawItem(data=obj, uri=path, line=n)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        yield _stream_errors(path, exc, n)


def _read_json_array(path: str) -> Iterator[RawItem | Quarantined]:
    """Incrementally parse ``[obj, obj, …]`` without loading the whole file."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, index, started = "", 0, 0, False
    try:
        with _open_binary(path) as fh:
            eof = False
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if not started:
                    if pos < len(buf):
                        if buf[pos] != "[":
                            yield Quarantined(
                                uri=path,
                                error="expected a JSON array of objects at the top level",
                                raw=_cut(buf[pos:]),
                                offset=0,
                            )
                            return
                        started, pos = True, pos + 1
                        continue
                elif pos < len(buf) and buf[pos] == "]":
                    return
                elif pos < len(buf):
                    try:
                        obj, end = decoder.raw_decode(buf, pos)
                    except json.JSONDecodeError as exc:
                        if not eof:
                            obj = None
                            end = -1
                        else:
                            yield Quarantined(
                                uri=path,
                                error=f"invalid or truncated JSON in array element {index}: {exc.msg}",
                                raw=_cut(buf[pos:]),
                                offset=index,
                            )
                            return
                    except Exception as exc:  # nesting too deep, a 5,000-digit number …
                        yield Quarantined(
                            uri=path,
                            error=f"array element {index}: unparsable JSON ({type(exc).__name__}: {exc}); "
                            "where it ends cannot be told, so the rest of the file is not read",
                            raw=_cut(buf[pos:]),
                            offset=index,
                        )
                        return
                    if end >= 0 and (end < len(buf) or eof):
                        if isinstance(obj, dict):
                            yield RawItem(data=obj, uri=path, offset=index)
                        else:
                            yield Quarantined(
                                uri=path,
                                error=f"array element {index}: expected a JSON object",
                                raw=_cut(buf[pos:end]),
                                offset=index,
                            )
                        index += 1
                        buf, pos = buf[end:], 0
                        continue
                if eof:
                    if not started:
                        yield Quarantined(uri=path, error="empty file: expected a JSON array", offset=0)
                    else:
                        yield Quarantined(
                            uri=path, error=f"truncated JSON array after element {index}", offset=index
                        )
                    return
                # read at least as much as is pending, so one huge element costs O(size), not O(size²)
                chunk = fh.read(max(_JSON_CHUNK, len(buf) - pos))
                if not chunk:
                    eof = True
                    buf += utf8.decode(b"", final=True)
                else:
                    buf += utf8.decode(chunk)
    except UnicodeDecodeError as exc:
        yield Quarantined(
            uri=path, error=f"invalid UTF-8 near array element {index}: {exc.reason}", offset=index
        )
    except (OSError, EOFError, lzma.LZMAError) as exc:
        yield Quarantined(
            uri=path, error=f"unreadable stream near array element {index}: {exc}", offset=index
        )


def _read_txt(path: str, mode: TxtMode) -> Iterator[RawItem | Quarantined]:
    n = 0
    para: list[str] = []
    start = 0
    try:
        with _open_binary(path) as fh:
            if mode == "file":
                data = fh.read()
                text, err = _decode(data)
                if err or text is None:
                    yield Quarantined(uri=path, error=err or "undecodable", raw=_cut(data), offset=0)
                elif not text.strip():
                    yield Quarantined(uri=path, error="empty file", offset=0)
                else:
                    yield RawItem(data=text, uri=path, line=1)
                return
            for n, raw in enumerate(fh, start=1):
                text, err = _decode(raw)
                if err or text is None:
                    yield Quarantined(uri=path, error=err or "undecodable", raw=_cut(raw), line=n)
                    continue
                if mode == "lines":
                    if text.strip():
                        yield RawItem(data=text.rstrip("\r\n"), uri=path, line=n)
                    continue
                if text.strip():
                    if not para:
                        start = n
                    para.append(text)
                elif para:
                    yield RawItem(data="".join(para).rstrip("\r\n"), uri=path, line=start)
                    para = []
            if para:
                yield RawItem(data="".join(para).rstrip("\r\n"), uri=path, line=start)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        yield _stream_errors(path, exc, n)


def _read_csv(path: str) -> Iterator[RawItem | Quarantined]:
    try:
        with _open_binary(path) as fh:
            text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
            reader = csv.DictReader(text)
            try:
                for row in reader:
                    line = reader.line_num
                    if None in row:
                        yield Quarantined(
                            uri=path, error="more fields than the header", raw=_cut(str(row)), line=line
                        )
                    elif any(v is None for v in row.values()):
                        yield Quarantined(
                            uri=path, error="fewer fields than the header", raw=_cut(str(row)), line=line
                        )
                    else:
                        yield RawItem(data=dict(row), uri=path, line=line)
            except UnicodeDecodeError as exc:
                yield Quarantined(
                    uri=path,
                    error=f"invalid UTF-8 after line {reader.line_num}: {exc.reason}",
                    line=reader.line_num + 1,
                )
            except csv.Error as exc:
                yield Quarantined(uri=path, error=f"malformed CSV: {exc}", line=reader.line_num)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        yield _stream_errors(path, exc, 0)


def _read_parquet(path: str) -> Iterator[RawItem | Quarantined]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise SourceError(f"{path}: Parquet inputs need pyarrow: pip install pyarrow") from exc
    try:
        with _open_binary(path) as fh:
            pf = pq.ParquetFile(fh)
            row = 0
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    yield RawItem(data=rec, uri=path, offset=row)
                    row += 1
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        yield Quarantined(uri=path, error=f"unreadable Parquet file: {exc}", offset=0)


def read_source(
    spec: str | os.PathLike[str], fmt: Format = "auto", txt_mode: TxtMode = "paragraphs"
) -> Iterator[RawItem | Quarantined]:
    """Stream every item of every file that ``spec`` names, in sorted file order.

    Raises SourceError for an impossible request (checked for all files before the first item); bad
    content is yielded as :class:`Quarantined`.
    """
    files = expand_inputs(spec)
    plan = [(f, detect_format(f) if fmt == "auto" else fmt) for f in files]
    for f, kind in plan:
        if kind == "jsonl":
            reader = _read_jsonl(f)
        elif kind == "json":
            reader = _read_json_array(f)
        elif kind == "txt":
            reader = _read_txt(f, txt_mode)
        elif kind == "csv":
            reader = _read_csv(f)
        elif kind == "parquet":
            reader = _read_parquet(f)
        else:  # pragma: no cover - Literal keeps this unreachable
            raise SourceError(f"unknown format {kind!r}")
        yield from _guarded(reader, f)


def _guarded(reader: Iterator[RawItem | Quarantined], path: str) -> Iterator[RawItem | Quarantined]:
    """``reader``'s items; an exception a reader did not expect from its content ends that file with a
    quarantine record naming it and the position reached, instead of aborting the whole run."""
    last: RawItem | Quarantined | None = None
    try:
        for item in reader:
            last = item
            yield item
    except SourceError:
        raise
    except Exception as exc:
        where = f"after line {last.line}" if last is not None and last.line else "while reading"
        log.warning("%s: reading stopped %s: %s: %s", path, where, type(exc).__name__, exc)
        yield Quarantined(
            uri=path,
            error=f"reading stopped {where}: {type(exc).__name__}: {exc}",
            line=(last.line + 1) if last is not None and last.line else None,
            offset=0 if last is None or not last.line else None,
        )
