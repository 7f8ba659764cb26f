"""Training batches from token shards: deterministic, resumable to the sample, and split across ranks.

Everything runs in the calling process: a sample is a slice of a memory map, and a batch is built with a
handful of numpy operations over the whole batch and one ``torch.from_numpy`` per field, which is far
cheaper than a training step, so worker processes would only add start-up time and state to resume.

Batch fields (``B`` rows, ``T = seq_len``), all ``torch.long``:

- ``input_ids [B, T]`` and ``labels [B, T]``: a sample's tokens padded with ``pad_id`` to ``T + 1``, then
  shifted by one. ``labels[t]`` is ``-100`` when token ``t + 1`` is padding or its loss mask is 0.
  A target that starts a new segment is kept (Megatron-style packing); the packer zeroes its mask bit if
  it should not be trained on.
- ``doc_ids [B, T]``: index of the segment each position belongs to within its row (0, 1, …), and ``-1``
  for padding. Padding thus forms one extra "document": under document masking a padded query sees only
  padded keys (at least itself, so no softmax row is empty), and a real token never sees padding.
- ``positions [B, T]``: position inside the position's own segment, restarting at 0 for each segment
  and for the padding run, for RoPE under document masking.
- ``domain [B]``: the sample's domain id, an index into ``TokenLoader.domains``.

Sampling: each dataset has a :class:`ResumableSampler` (a seeded permutation per epoch, split across
ranks) and a :class:`MixtureSampler` interleaves datasets by smooth weighted round-robin. Resuming is
exact: ``state_dict()`` is a small JSON-able dict, identical on every rank, and after
``load_state_dict()`` the loader yields exactly the batches an uninterrupted run would have yielded.

The samplers live in :mod:`moeforge.tokens.sampling`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeforge.tokens.sampling import MixtureSampler
from moeforge.tokens.shards import IndexedShard, ShardError, verify_files

__all__ = ["TokenDataset", "TokenLoader", "build_batch"]

log = logging.getLogger(__name__)

FORMAT = "moeforge.tokens/1"
IGNORE_INDEX = -100
PAD_DOC_ID = -1
_STATE_VERSION = 1


class TokenDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """One split of a tokenized output directory (``manifest.json`` + Megatron shards), map-style.

    Raises FileNotFoundError for a missing directory or manifest and :class:`ShardError` for a manifest
    without the split, an unknown format, or shards that disagree with it (a size or sha256 other than the
    manifest's ``files`` list, sample count, a sample longer than ``seq_len + 1``, a domain id without a
    name). The sha256 of every file of the split is checked on open (about 1 s per GB).
    """

    def __init__(self, directory: str | Path, split: str) -> None:
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: token directory not found; pack the data first")
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; the directory is not a finished token output, pack it again"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ShardError(f"{path}: not valid JSON ({exc}); pack the data again") from exc
        if self.manifest.get("format") != FORMAT:
            raise ShardError(f"{path}: format is {self.manifest.get('format')!r}, expected {FORMAT!r}")
        splits = self.manifest.get("splits") or {}
        if split not in splits:
            raise ShardError(f"{path}: no split {split!r}; it has {sorted(splits)}")
        entry = splits[split]
        try:
            self.seq_len = int(self.manifest["seq_len"])
            self.pad_id = int(self.manifest["tokenizer"]["pad_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{path}: seq_len and tokenizer.pad_id must be integers ({exc!r})") from exc
        if self.seq_len < 1:
            raise ShardError(f"{path}: seq_len must be positive, got {self.seq_len}")
        self.split = split
        self.domains: list[str] = [str(d) for d in self.manifest.get("domains") or []]
        problems = verify_files(self.directory, entry.get("files") or {})
        if problems:  # one flipped byte must stop a run before it trains on it
            raise ShardError(
                f"{path}: the {split} split's files differ from the manifest — {'; '.join(problems[:4])}. "
                "The token directory is corrupt: delete it and tokenize again (for a cache entry, "
                "`moeforge data cache clean-invalid` removes it)"
            )
        self.shard = IndexedShard(self.directory / str(entry.get("prefix", split)))
        if "samples" in entry and int(entry["samples"]) != len(self.shard):
            raise ShardError(
                f"{self.shard.prefix}.idx: {len(self.shard)} samples but {path} says {entry['samples']}; "
                "the shard and manifest come from different runs — pack again"
            )
        self._check_shard(path)

    def _check_shard(self, manifest_path: Path) -> None:
        """Reject what would otherwise fail (or silently truncate) in the middle of training."""
        s = self.shard
        if s.num_samples == 0:
            return
        ends = np.zeros(s.num_segments + 1, dtype=np.int64)
        np.cumsum(s.sequence_lengths, dtype=np.int64, out=ends[1:])
        per_sample = ends[s.document_indices[1:]] - ends[s.document_indices[:-1]]
        if int(per_sample.min()) == 0:
            raise ShardError(
                f"{s.prefix}.idx: sample {int(per_sample.argmin())} has no tokens; pack the data again"
            )
        longest = int(per_sample.max())
        if longest > self.seq_len + 1:
            raise ShardError(
                f"{s.prefix}.idx: sample {int(per_sample.argmax())} has {longest} tokens but {manifest_path} "
                f"sets seq_len {self.seq_len} (at most seq_len + 1 per sample)"
            )
        dom = s.domains_array
        if dom is not None and int(dom.max()) >= max(1, len(self.domains)):
            raise ShardError(
                f"{s.prefix}.dom: domain id {int(dom.max())} but {manifest_path} names {len(self.domains)} domains"
            )

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(
                f"sample {i} out of range for {self.directory} ({self.split}: {len(self)} samples)"
            )
        i = i % len(self)
        batch = build_batch([self], np.zeros(1, np.int64), np.array([i], np.int64), self.seq_len)
        return {k: v[0] for k, v in batch.items()}


def build_batch(
    datasets: Sequence[TokenDataset],
    dataset_index: np.ndarray,
    sample_index: np.ndarray,
    seq_len: int,
    domain_maps: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Stack samples ``(datasets[dataset_index[b]], sample_index[b])`` into one batch (fields: module doc).

    ``domain_maps[k]`` maps dataset ``k``'s domain ids to the caller's numbering (identity when omitted).
    Rows are built per dataset with whole-batch array operations (:func:`_rows`); no loop over rows.
    """
    B, L = len(sample_index), seq_len + 1
    dataset_index = np.asarray(dataset_index, dtype=np.int64)
    sample_index = np.asarray(sample_index, dtype=np.int64)
    present = np.unique(dataset_index).tolist()
    if len(present) == 1:  # the common case: fill nothing, use the arrays as built
        k = present[0]
        block, target, doc_ids, positions = _rows(datasets[k], sample_index, L)
        domain = _domains(datasets[k], sample_index, None if domain_maps is None else domain_maps[k])
    else:
        block = np.empty((B, L), dtype=np.int64)
        target = np.empty((B, L), dtype=np.bool_)
        doc_ids = np.empty((B, L - 1), dtype=np.int64)
        positions = np.empty((B, L - 1), dtype=np.int64)
        domain = np.empty(B, dtype=np.int64)
        for k in present:
            rows = dataset_index == k
            idx = sample_index[rows]
            block[rows], target[rows], doc_ids[rows], positions[rows] = _rows(datasets[k], idx, L)
            domain[rows] = _domains(datasets[k], idx, None if domain_maps is None else domain_maps[k])
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(block[:, :-1])),
        "labels": torch.from_numpy(np.where(target[:, 1:], block[:, 1:], IGNORE_INDEX)),
        "doc_ids": torch.from_numpy(doc_ids),
        "positions": torch.from_numpy(positions),
        "domain": torch.from_numpy(domain),
    }


def _domains(ds: TokenDataset, idx: np.ndarray, mapping: Sequence[int] | None) -> np.ndarray:
    dom = ds.shard.domains_array
    d = np.zeros(len(idx), dtype=np.int64) if dom is None else dom[idx].astype(np.int64)
    return d if mapping is None else np.asarray(mapping, dtype=np.int64)[d]


def _rows(ds: TokenDataset, idx: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens [R, L], is_target [R, L], doc_ids [R, L-1], positions [R, L-1])`` for samples ``idx``.

    Each row is a list of *runs*: its segments, then one padding run (possibly empty) so that the runs
    of every row sum to exactly ``L``. One ``np.repeat`` of the run table over all positions gives each
    position its run; position-in-run, segment id and the source offset in the ``.bin`` follow from it,
    and the tokens (and mask bits) are one gather. Works for any pointer layout, contiguous or not.
    """
    s = ds.shard
    R = len(idx)
    first = s.document_indices[idx]
    n_seg = s.document_indices[idx + 1] - first
    runs_per_row = n_seg + 1
    row_first_run = np.cumsum(runs_per_row) - runs_per_row
    n_runs = int(runs_per_row.sum())
    local = np.arange(n_runs) - np.repeat(row_first_run, runs_per_row)  # 0..n_seg within each row
    is_pad = local == np.repeat(n_seg, runs_per_row)
    seg = (np.repeat(first, runs_per_row) + local)[~is_pad]  # global sequence index of each real run

    run_len = np.zeros(n_runs, dtype=np.int64)
    run_len[~is_pad] = s.sequence_lengths[seg]
    ends = np.cumsum(run_len)
    row_tokens = ends[row_first_run + n_seg] - ends[row_first_run] + run_len[row_first_run]
    run_len[is_pad] = L - row_tokens
    run_src = np.zeros(n_runs, dtype=np.int64)
    run_src[~is_pad] = s.sequence_pointers[seg] // s.dtype.itemsize
    run_id = np.where(is_pad, PAD_DOC_ID, local)

    run_of_pos = np.repeat(np.arange(n_runs), run_len)
    positions = np.arange(R * L) - (np.cumsum(run_len) - run_len)[run_of_pos]
    pad_pos = is_pad[run_of_pos]
    src = run_src[run_of_pos] + positions
    src[pad_pos] = 0  # any valid offset; overwritten below (every dataset has ≥ 1 token, checked on open)
    tokens = s.tokens_array[src].astype(np.int64)
    tokens[pad_pos] = ds.pad_id
    target = ~pad_pos
    if (mask := s.mask_array) is not None:
        np.logical_and(target, mask[src], out=target)
    # Only inputs need ids and positions: gathering through a [R, L - 1] view gives them contiguous.
    doc_ids = run_id[run_of_pos.reshape(R, L)[:, :-1]]
    return (
        tokens.reshape(R, L),
        target.reshape(R, L),
        doc_ids,
        np.ascontiguousarray(positions.reshape(R, L)[:, :-1]),
    )


def _merge_domains(datasets: Sequence[TokenDataset]) -> tuple[list[str], list[list[int]]]:
    """One domain numbering for all datasets: theirs when they agree, else the union in first-seen order."""
    if all(ds.domains == datasets[0].domains for ds in datasets):
        names = datasets[0].domains
        return list(names), [list(range(max(1, len(names))))] * len(datasets)
    merged: list[str] = []
    maps: list[list[int]] = []
    for ds in datasets:
        own = ds.domains or ["unknown"]  # a dataset without domain names labels every sample 0
        for name in own:
            if name not in merged:
                merged.append(name)
        maps.append([merged.index(name) for name in own])
    return merged, maps


class TokenLoader:
    """Infinite, resumable training batches over one or more :class:`TokenDataset` (fields: module doc).

    ``weights`` default to the datasets' sample counts (as if they were concatenated). Every rank builds
    the same loader with its own ``rank``; batches then hold ``batch_size`` samples per rank, disjoint
    across ranks within an epoch of each dataset.
    """

    def __init__(
        self,
        datasets: TokenDataset | Sequence[TokenDataset],
        *,
        batch_size: int,
        seed: int,
        weights: Sequence[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.datasets = [datasets] if isinstance(datasets, TokenDataset) else list(datasets)
        if not self.datasets:
            raise ValueError("TokenLoader needs at least one dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        lens = {ds.seq_len for ds in self.datasets}
        if len(lens) != 1:
            where = ", ".join(f"{ds.directory} ({ds.split}): {ds.seq_len}" for ds in self.datasets)
            raise ValueError(f"datasets in one loader must share seq_len; got {where}")
        self.seq_len = lens.pop()
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.domains, self._domain_maps = _merge_domains(self.datasets)
        sizes = [len(ds) for ds in self.datasets]
        self.sampler = MixtureSampler(
            sizes,
            weights if weights is not None else sizes,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            drop_last=True,
        )

    def next_batch(self) -> dict[str, torch.Tensor]:
        comp, idx = self.sampler.take(self.batch_size)
        return build_batch(self.datasets, comp, idx, self.seq_len, self._domain_maps)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Infinite; continues from (and advances) the current state."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position of the loader; the same on every rank."""
        return {"version": _STATE_VERSION, "mixture": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {_STATE_VERSION}")
        self.sampler.load_state_dict(state["mixture"])

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """One unshuffled pass over this rank's share of every dataset (for evaluation); state untouched.

        Rank ``r`` gets samples ``r, r + world_size, …`` of each dataset in turn, so the ranks together
        see every sample exactly once; their batch counts may differ by one and the last batch may be
        smaller, so reduce eval sums across ranks once at the end, not per batch.
        """
        shares = [np.arange(self.rank, len(ds), self.world_size) for ds in self.datasets]
        comp = np.repeat(np.arange(len(shares)), [len(s) for s in shares])
        idx = np.concatenate(shares)
        for a in range(0, len(idx), self.batch_size):
            b = a + self.batch_size
            yield build_batch(self.datasets, comp[a:b], idx[a:b], self.seq_len, self._domain_maps)
