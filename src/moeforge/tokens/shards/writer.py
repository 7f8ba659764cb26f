"""The writer of token shards (:class:`IndexedShardWriter`) and :func:`verify_files` for a manifest's files.

The layout is described in :mod:`moeforge.tokens.shards`; import the writer from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import DTypeLike

from moeforge.faults import point
from moeforge.io import atomic_write_bytes, sha256_file
from moeforge.tokens.shards.format import CODE_OF, HEADER, MAGIC, VERSION, shard_paths

__all__ = ["IndexedShardWriter", "verify_files"]

log = logging.getLogger(__name__)


def _file_info(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class _HashedTemp:
    """A file written under a temporary name beside its target, hashed and counted as it is written."""

    def __init__(self, target: Path) -> None:
        self.target = target
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        self.tmp = Path(tmp)
        self.fh: IO[bytes] = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def finish(self) -> None:
        """Flush and fsync, leaving the file under its temporary name."""
        point("token-shard")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.chmod(self.tmp, 0o644)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


class IndexedShardWriter:
    """Stream samples into ``PREFIX.bin/.idx`` (plus ``.mask``/``.dom`` when asked) without holding tokens.

    Call :meth:`add_segment` for each piece of a sample, then :meth:`end_sample`; :meth:`close` publishes
    the files and returns their counts and hashes for the manifest. As a context manager, a clean exit
    closes and an exception aborts, leaving neither final nor temporary files behind.
    """

    def __init__(
        self, prefix: str | Path, dtype: DTypeLike, *, loss_mask: bool = False, domains: bool = False
    ) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF or self.dtype.kind not in "iu":
            raise ValueError(f"token dtype must be an integer Megatron dtype (uint16, int32, …), got {dtype}")
        self.paths = shard_paths(prefix)
        self.paths[".bin"].parent.mkdir(parents=True, exist_ok=True)
        self._max_id = int(np.iinfo(self.dtype).max)
        self._bin = _HashedTemp(self.paths[".bin"])
        self._mask = _HashedTemp(self.paths[".mask"]) if loss_mask else None
        self._domains: array[int] | None = array("H") if domains else None
        self._lengths: array[int] = array("i")
        self._doc_index: array[int] = array("q", [0])
        self._tokens = 0
        self._open = True
        self.info: dict[str, Any] | None = None  # what close() returned, for context-manager users

    def add_segment(
        self, tokens: np.ndarray | Sequence[int], loss_mask: np.ndarray | Sequence[int] | None = None
    ) -> None:
        """Append one segment (a Megatron sequence) to the current sample.

        ``loss_mask`` (0/1 per token, 1 = train on this token) is required exactly when the writer was
        made with ``loss_mask=True``. Raises ValueError for an empty segment, ids outside the dtype's
        range, or a mask of the wrong length or with values other than 0 and 1.
        """
        self._check_open()
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"a segment must be a non-empty 1-D array of token ids, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"a segment of {arr.size} tokens does not fit Megatron's int32 lengths")
        self._write(arr, loss_mask, "segment")
        self._lengths.append(int(arr.size))
        self._tokens += int(arr.size)

    def add_sample(
        self,
        tokens: np.ndarray,
        segment_lengths: np.ndarray | Sequence[int],
        loss_mask: np.ndarray | None = None,
        domain: int = 0,
    ) -> None:
        """Append a whole sample at once: ``tokens`` concatenated over its segments, their lengths, and
        the mask when the writer has one. Same checks as :meth:`add_segment` + :meth:`end_sample`, done
        once per sample — the packer's fast path."""
        self._check_open()
        if len(self._lengths) != self._doc_index[-1]:
            raise ValueError("add_sample() called with an unfinished sample; call end_sample() first")
        arr = np.asarray(tokens)
        lens = np.asarray(segment_lengths, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise ValueError(f"a sample must be a non-empty 1-D integer array, got {arr.dtype} {arr.shape}")
        if lens.ndim != 1 or lens.size == 0 or int(lens.min()) < 1 or int(lens.sum()) != arr.size:
            raise ValueError(
                f"segment lengths {lens.tolist()[:8]} must be positive and sum to the sample's {arr.size} tokens"
            )
        self._write(arr, loss_mask, "sample")
        self._lengths.extend(lens.astype(np.int32).tolist())
        self._tokens += int(arr.size)
        self.end_sample(domain)

    def _write(self, arr: np.ndarray, loss_mask: Any, what: str) -> None:
        """Check ids against the dtype's range (skipped when the array already has the shard's dtype) and
        the mask against the tokens, then append both."""
        if arr.dtype != self.dtype:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > self._max_id:
                raise ValueError(
                    f"token id out of range for {self.dtype.name} shard {self.paths['.bin']}: min {lo}, max {hi} "
                    f"(allowed 0..{self._max_id}); choose the dtype with token_dtype(vocab_size)"
                )
        if (loss_mask is None) != (self._mask is None):
            want = "requires" if self._mask is not None else "was created without loss_mask=True and takes no"
            raise ValueError(f"the writer for {self.paths['.bin']} {want} a loss mask per {what}")
        if self._mask is not None:
            m = np.asarray(loss_mask)
            if m.shape != arr.shape:
                raise ValueError(f"loss mask has shape {m.shape} but the {what} has {arr.shape}")
            if m.size and (int(m.min()) < 0 or int(m.max()) > 1):
                raise ValueError("loss mask values must be 0 or 1")
            self._mask.write(m.astype(np.uint8, copy=False).tobytes())
        self._bin.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())

    def end_sample(self, domain: int = 0) -> None:
        """Close the current sample (Megatron document); it must hold at least one segment."""
        self._check_open()
        if len(self._lengths) == self._doc_index[-1]:
            raise ValueError("end_sample() called on an empty sample; add_segment() first")
        if self._domains is None:
            if domain != 0:
                raise ValueError(f"domain {domain} given but the writer was created without domains=True")
        else:
            if not 0 <= domain <= 0xFFFF:
                raise ValueError(f"domain id {domain} does not fit uint16")
            self._domains.append(domain)
        self._doc_index.append(len(self._lengths))

    def close(self) -> dict[str, Any]:
        """Publish the shard; returns ``{"samples", "segments", "tokens", "dtype", "files"}``.

        ``files`` maps each file name to its ``bytes`` and ``sha256`` (hashed while writing). Stale
        sidecars of the same prefix that this shard does not have are removed so a reader cannot pick
        up a mask or domain file from an older run.
        """
        self._check_open()
        if len(self._lengths) != self._doc_index[-1]:
            self.abort()
            raise ValueError(
                f"segments were added after the last end_sample(); the shard {self.paths['.bin']} was not "
                "written. Call end_sample() before close()"
            )
        self._open = False
        lengths = np.array(self._lengths, dtype="<i4")
        pointers = np.zeros(len(lengths), dtype="<i8")
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_index = np.array(self._doc_index, dtype="<i8")
        header = HEADER.pack(MAGIC, VERSION, CODE_OF[self.dtype], len(lengths), len(doc_index))
        idx_bytes = b"".join([header, lengths.tobytes(), pointers.tobytes(), doc_index.tobytes()])
        streamed = [t for t in (self._bin, self._mask) if t is not None]
        files: dict[str, dict[str, Any]] = {}
        try:
            for t in streamed:
                t.finish()
            # The old index goes first: from here until the new one lands, the prefix reads as incomplete.
            self.paths[".idx"].unlink(missing_ok=True)
            for t in streamed:
                os.replace(t.tmp, t.target)
                files[t.target.name] = {"bytes": t.bytes, "sha256": t.sha.hexdigest()}
            if self._mask is None:
                self.paths[".mask"].unlink(missing_ok=True)
            if self._domains is None:
                self.paths[".dom"].unlink(missing_ok=True)
            else:
                dom_bytes = np.array(self._domains, dtype="<u2").tobytes()
                atomic_write_bytes(self.paths[".dom"], dom_bytes)
                files[self.paths[".dom"].name] = _file_info(dom_bytes)
            atomic_write_bytes(self.paths[".idx"], idx_bytes)
        except BaseException:
            for t in streamed:
                t.discard()
            raise
        files[self.paths[".idx"].name] = _file_info(idx_bytes)
        info = {
            "samples": len(doc_index) - 1,
            "segments": len(lengths),
            "tokens": self._tokens,
            "dtype": self.dtype.name,
            "files": dict(sorted(files.items())),
        }
        log.debug("wrote shard %s: %s", self.paths[".idx"].with_suffix(""), info)
        self.info = info
        return info

    def abort(self) -> None:
        """Drop everything written so far (temporary files only; existing final files are untouched)."""
        if not self._open:
            return
        self._open = False
        for t in (self._bin, self._mask):
            if t is not None:
                t.discard()

    def _check_open(self) -> None:
        if not self._open:
            raise ValueError(f"the writer for {self.paths['.bin']} is already closed")

    def __enter__(self) -> IndexedShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._open:  # close() may already have been called inside the block
            self.close()


def verify_files(directory: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """Problems with the files a manifest lists (``{name: {"bytes", "sha256"}}``); empty when all match.

    Sizes are compared first so a truncated file is reported without hashing it.
    """
    problems: list[str] = []
    for name, want in sorted(files.items()):
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if "bytes" in want and size != int(want["bytes"]):
            problems.append(f"{path}: {size} bytes, the manifest says {want['bytes']}")
            continue
        if "sha256" in want and (got := sha256_file(path)) != want["sha256"]:
            problems.append(f"{path}: sha256 {got[:12]}…, the manifest says {str(want['sha256'])[:12]}…")
    return problems
