"""Preference training data: the loader over a pair set's encoded train split, its reference, its evaluation.

The pair set is read and encoded by :func:`moeforge.tokens.pairs.open_pair_data` (a pair that cannot be
model input is left out and counted by reason; the run's ``config.json`` records the counts).
:class:`PairLoader` walks the train pairs in a seeded order per epoch
(a pure function of seed, epoch and position, like the token loader) and resumes from its
``state_dict``. :func:`reference_for` gives a split's reference log-probabilities from the run's cache,
computed by the model as it is (the ``init_from`` weights, before any step) when the cache does not match.

Evaluation (:func:`evaluate_pairs`) reports the objective's metrics over held-out pairs — loss, implicit
reward accuracy and margin, the policy's log-probabilities of each side — and :func:`kl_to_reference`
the exact per-token KL(π ‖ π_ref) over the vocabulary at the completion positions of held-out chosen
answers: how far the policy has moved from the reference on prompts it never trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeforge.tokens.pairs import PairData, PairSplit, collate_pairs
from moeforge.train import fsdp
from moeforge.train.distributed import DistInfo, all_reduce_sum_tensor, barrier
from moeforge.train.objectives import Objective, autocast
from moeforge.train.reference import cached_reference_logps, reference_logps

__all__ = ["PairLoader", "attach_references", "evaluate_pairs", "kl_to_reference", "reference_for"]

log = logging.getLogger(__name__)


def reference_for(
    split: PairSplit,
    model: torch.nn.Module,
    cache_dir: Path,
    *,
    model_sha256: str,
    pad: int,
    batch_pairs: int,
    info: DistInfo | None = None,
) -> torch.Tensor:
    """``split``'s reference log-probs from ``cache_dir/<split>.safetensors``, computed by ``model`` (which
    must hold the reference weights now) on the main process when the cache does not match; the other
    processes read the main process's file."""

    def compute() -> torch.Tensor:
        log.info("reference log-probs of %d %s pairs: computing once", len(split.pairs), split.name)
        return reference_logps(model, split.pairs, pad_id=pad, batch_pairs=batch_pairs)

    path = cache_dir / f"{split.name}.safetensors"
    if info is None or not info.enabled:
        return cached_reference_logps(path, split.pairs, model_sha256=model_sha256, compute=compute)
    ref = (
        cached_reference_logps(path, split.pairs, model_sha256=model_sha256, compute=compute)
        if info.is_main
        else None
    )
    barrier(info)
    if ref is None:
        ref = cached_reference_logps(path, split.pairs, model_sha256=model_sha256, compute=compute)
    return ref


def attach_references(
    data: PairData,
    model: torch.nn.Module,
    cache_dir: Path,
    *,
    model_sha256: str,
    batch_pairs: int,
    info: DistInfo | None = None,
) -> None:
    """Set every split's reference log-probs (:func:`reference_for`), computed by ``model``, which must hold
    the reference weights (the ``init_from`` checkpoint, before any step)."""
    for split in data.splits.values():
        split.ref = reference_for(
            split,
            model,
            cache_dir,
            model_sha256=model_sha256,
            pad=data.pad,
            batch_pairs=batch_pairs,
            info=info,
        )


class PairLoader:
    """Batches of ``batch_pairs`` train pairs per process: each epoch a permutation drawn from
    ``(seed, epoch)``, cut into global batches of ``batch_pairs × world_size`` (an incomplete last batch
    is dropped), rank ``r`` taking every ``world_size``-th pair of each. Resumable exactly."""

    def __init__(
        self, split: PairSplit, *, batch_pairs: int, seed: int, pad: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.split = split
        self.batch_pairs = batch_pairs
        self.seed = seed
        self.pad = pad
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_pairs * world_size
        if len(split.pairs) < self.global_batch:
            raise ValueError(
                f"the train split has {len(split.pairs)} usable pairs, fewer than one batch of "
                f"{self.global_batch} (micro_batch × processes); lower micro_batch or add pairs"
            )
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.split.pairs))

    def next_indices(self) -> list[int]:
        if self.position + self.global_batch > len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        chunk = self._order[self.position : self.position + self.global_batch]
        self.position += self.global_batch
        return [int(i) for i in chunk[self.rank :: self.world_size]]

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.split.batch(self.next_indices(), self.pad)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "pairs": len(self.split.pairs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("pairs", -1)) != len(self.split.pairs):
            raise ValueError(
                f"the checkpoint's loader walked {state.get('pairs')} pairs, this run has {len(self.split.pairs)}: "
                "resume with the same pair set, tokenizer and seq_len"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def _eval_chunks(
    n: int, batch_pairs: int, max_batches: int | None, info: DistInfo | None
) -> Iterator[list[int]]:
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    idx = list(range(n))
    if max_batches is not None:
        idx = idx[: max_batches * batch_pairs * world]
    mine = idx[rank::world]
    for a in range(0, len(mine), batch_pairs):
        yield mine[a : a + batch_pairs]


@torch.no_grad()
def evaluate_pairs(
    model: torch.nn.Module,
    objective: Objective,
    split: PairSplit,
    *,
    pad: int,
    batch_pairs: int,
    max_batches: int | None = None,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """The objective's scalars averaged over ``split``'s pairs (weighted by pairs), in eval mode, plus
    ``pairs`` (how many). Deterministic: the first ``max_batches × batch_pairs × processes`` pairs."""
    was_training = model.training
    model.eval()
    names = list(objective.scalar_names)
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)
    sharded = info is not None and info.enabled and fsdp.is_sharded(model)
    chunks = _eval_chunks(len(split.pairs), batch_pairs, max_batches, info)
    try:
        for chunk in fsdp.lockstep(chunks, info.device) if sharded and info is not None else chunks:
            if chunk is None:  # out of pairs: forwards as long as the other processes run theirs
                objective(model, split.batch([0], pad))
                continue
            res = objective(model, split.batch(chunk, pad))
            for j, k in enumerate(names):
                sums[j] += float(res.scalars[k]) * len(chunk)
            sums[-1] += len(chunk)
    finally:
        model.train(was_training)
    if info is not None:
        sums = all_reduce_sum_tensor(sums, info).cpu()
    n = float(sums[-1])
    out = {k: float(sums[j]) / n for j, k in enumerate(names)} if n else {}
    out["pairs"] = n
    return out


def kl_to_reference(
    model: torch.nn.Module,
    reference: Path,
    split: PairSplit,
    *,
    pad: int,
    batch_pairs: int,
    max_pairs: int,
    device: torch.device,
    precision: str = "fp32",
) -> float:
    """Mean over the completion positions of the first ``max_pairs`` chosen answers of
    KL(π(·|prefix) ‖ π_ref(·|prefix)), summed over the vocabulary, in nats per token; π_ref is the
    checkpoint ``reference``, loaded for this call only (a model of ``model``'s config)."""
    from moeforge.model.transformer import MoETransformer
    from moeforge.train.checkpoint import load_checkpoint

    ref_model = MoETransformer(model.cfg).to(device)  # type: ignore[arg-type]
    load_checkpoint(reference, ref_model, None, restore_rng_state=False)
    return _kl(model, ref_model, split, pad, batch_pairs, max_pairs, device, precision)


@torch.no_grad()
def _kl(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    split: PairSplit,
    pad: int,
    batch_pairs: int,
    max_pairs: int,
    device: torch.device,
    precision: str,
) -> float:
    was = model.training, reference.training
    model.eval()
    reference.eval()
    total = 0.0
    count = 0
    try:
        n = min(max_pairs, len(split.pairs))
        for a in range(0, n, batch_pairs):
            part = [split.pairs[i] for i in range(a, min(n, a + batch_pairs))]
            batch = collate_pairs(part, pad_id=pad)
            rows = len(part)  # the chosen rows
            ids = batch["input_ids"][:rows].to(device)
            mask = batch["labels"][:rows].to(device) != -100
            with autocast(device, precision):
                lp = torch.log_softmax(model(ids).logits.float(), -1)
                lq = torch.log_softmax(reference(ids).logits.float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # [rows, T]
            total += float(kl[mask].double().sum())
            count += int(mask.sum())
    finally:
        model.train(was[0])
        reference.train(was[1])
    return total / count if count else float("nan")
