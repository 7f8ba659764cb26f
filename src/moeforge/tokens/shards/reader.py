"""Read-only, memory-mapped access to token shards (:class:`IndexedShard`), validated on open.

The layout is described in :mod:`moeforge.tokens.shards`; import the reader from there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moeforge.tokens.shards.format import DTYPE_CODES, HEADER, MAGIC, VERSION, ShardError, shard_paths

__all__ = ["IndexedShard"]


def _map(path: Path, dtype: np.dtype | str, count: int, offset: int = 0) -> np.ndarray:
    """A read-only memmap of ``count`` items at ``offset``; numpy cannot map zero bytes, so empty → array."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    # A plain ndarray view of the map: slicing np.memmap itself costs microseconds of subclass overhead.
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).view(np.ndarray)


class IndexedShard:
    """Read-only, memory-mapped view of a shard written by :class:`IndexedShardWriter` (or Megatron).

    Opening validates the header and every size against the files on disk and raises :class:`ShardError`
    naming the file; afterwards ``sample(i)`` is a few array lookups and returns views into the map.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        paths = shard_paths(prefix)
        idx_path, bin_path = paths[".idx"], paths[".bin"]
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise ShardError(
                    f"{p}: shard file is missing (an absent .idx means the shard was never finished)"
                )
        idx_size = idx_path.stat().st_size
        with open(idx_path, "rb") as fh:
            head = fh.read(HEADER.size)
        if len(head) < HEADER.size:
            raise ShardError(f"{idx_path}: truncated header ({idx_size} bytes); rebuild the shard")
        magic, version, code, n_seq, n_doc = HEADER.unpack(head)
        if magic != MAGIC:
            raise ShardError(f"{idx_path}: not a Megatron indexed-dataset index (magic {magic!r})")
        if version != VERSION:
            raise ShardError(f"{idx_path}: index version {version} is not supported (only {VERSION})")
        if code not in DTYPE_CODES:
            raise ShardError(f"{idx_path}: unknown dtype code {code}")
        self.dtype: np.dtype = DTYPE_CODES[code]
        expected = HEADER.size + 12 * n_seq + 8 * n_doc
        if idx_size != expected or n_doc < 1:
            raise ShardError(
                f"{idx_path}: {idx_size} bytes but the header ({n_seq} sequences, {n_doc} document indices) "
                f"implies {expected}; the file is truncated or corrupt — rebuild the shard"
            )
        off = HEADER.size
        self.sequence_lengths = _map(idx_path, "<i4", n_seq, off)
        self.sequence_pointers = _map(idx_path, "<i8", n_seq, off + 4 * n_seq)
        self.document_indices = _map(idx_path, "<i8", n_doc, off + 12 * n_seq)
        doc = self.document_indices
        if doc[0] != 0 or doc[-1] != n_seq or (n_doc > 1 and bool(np.any(np.diff(doc) < 0))):
            raise ShardError(f"{idx_path}: document index is not a non-decreasing run from 0 to {n_seq}")

        item = self.dtype.itemsize
        bin_size = bin_path.stat().st_size
        if bin_size % item:
            raise ShardError(
                f"{bin_path}: {bin_size} bytes is not a whole number of {self.dtype.name} tokens"
            )
        self.num_tokens = bin_size // item
        if n_seq:
            lens, ptrs = self.sequence_lengths, self.sequence_pointers
            if int(lens.min()) < 0 or int(ptrs.min()) < 0 or int(ptrs.max()) % item:
                raise ShardError(f"{idx_path}: negative or misaligned sequence lengths/pointers")
            need = int((ptrs + lens.astype(np.int64) * item).max())
            if need > bin_size:
                raise ShardError(
                    f"{bin_path}: {bin_size} bytes but {idx_path.name} points up to byte {need}; "
                    "the .bin is truncated — rebuild the shard"
                )
            # Our writer lays sequences out back to back; then a sample is one slice (a zero-copy view).
            self._contiguous = ptrs[0] == 0 and bool(
                np.array_equal(ptrs[1:], ptrs[:-1] + lens[:-1].astype(np.int64) * item)
            )
        else:
            self._contiguous = True
        self._bin = _map(bin_path, self.dtype.newbyteorder("<"), self.num_tokens)
        self.num_samples = n_doc - 1
        self.num_segments = n_seq

        self._mask: np.ndarray | None = None
        if paths[".mask"].is_file():
            size = paths[".mask"].stat().st_size
            if size != self.num_tokens:
                raise ShardError(
                    f"{paths['.mask']}: {size} bytes but {bin_path.name} holds {self.num_tokens} tokens"
                )
            self._mask = _map(paths[".mask"], np.uint8, size)
        self._dom: np.ndarray | None = None
        if paths[".dom"].is_file():
            size = paths[".dom"].stat().st_size
            if size != 2 * self.num_samples:
                raise ShardError(
                    f"{paths['.dom']}: {size} bytes but the index has {self.num_samples} samples (2 bytes each)"
                )
            self._dom = _map(paths[".dom"], "<u2", self.num_samples)

    @property
    def has_loss_mask(self) -> bool:
        return self._mask is not None

    @property
    def has_domains(self) -> bool:
        return self._dom is not None

    @property
    def tokens_array(self) -> np.ndarray:
        """Every token of the ``.bin`` (memmapped, little-endian), for vectorized gathers."""
        return self._bin

    @property
    def mask_array(self) -> np.ndarray | None:
        """The per-token loss mask (memmapped uint8, parallel to :attr:`tokens_array`), or None."""
        return self._mask

    @property
    def domains_array(self) -> np.ndarray | None:
        """The per-sample domain ids (memmapped uint16), or None without a ``.dom`` file."""
        return self._dom

    def __len__(self) -> int:
        return self.num_samples

    def __reduce__(self) -> tuple[type[IndexedShard], tuple[Path]]:
        return IndexedShard, (self.prefix,)  # reopen in another process instead of pickling the map

    def _check(self, i: int, n: int, what: str) -> int:
        if not -n <= i < n:
            raise IndexError(f"{what} {i} out of range for {self.prefix} ({n} {what}s)")
        return i + n if i < 0 else i

    def segment(self, j: int) -> np.ndarray:
        """Tokens of sequence ``j`` (a view into the map)."""
        j = self._check(j, self.num_segments, "segment")
        start = int(self.sequence_pointers[j]) // self.dtype.itemsize
        return self._bin[start : start + int(self.sequence_lengths[j])]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(tokens, loss_mask or None, segment_lengths)`` of sample ``i``; views into the map when possible."""
        i = self._check(i, self.num_samples, "sample")
        a, b = int(self.document_indices[i]), int(self.document_indices[i + 1])
        seg_lens = self.sequence_lengths[a:b]
        if self._contiguous:
            if b == a:
                return self._bin[:0], (self._mask[:0] if self._mask is not None else None), seg_lens
            item = self.dtype.itemsize
            start = int(self.sequence_pointers[a]) // item
            stop = int(self.sequence_pointers[b - 1]) // item + int(self.sequence_lengths[b - 1])
            tokens = self._bin[start:stop]
            mask = self._mask[start:stop] if self._mask is not None else None
            return tokens, mask, seg_lens
        starts = [int(p) // self.dtype.itemsize for p in self.sequence_pointers[a:b]]
        spans = [slice(s, s + int(n)) for s, n in zip(starts, seg_lens, strict=True)]
        tokens = np.concatenate([self._bin[s] for s in spans]) if spans else self._bin[:0]
        mask = None
        if self._mask is not None:
            mask = np.concatenate([self._mask[s] for s in spans]) if spans else self._mask[:0]
        return tokens, mask, seg_lens

    def domain(self, i: int) -> int:
        """Domain id of sample ``i`` (0 when the shard has no ``.dom`` file)."""
        i = self._check(i, self.num_samples, "sample")
        return int(self._dom[i]) if self._dom is not None else 0
