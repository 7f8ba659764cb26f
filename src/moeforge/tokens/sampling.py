"""Deterministic, resumable sample order: per-dataset seeded permutations split across ranks, and
weighted mixing of several datasets by smooth weighted round-robin.

Used by :class:`moeforge.tokens.loader.TokenLoader`. States are small
JSON-able dicts, identical on every rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["MixtureSampler", "ResumableSampler"]

log = logging.getLogger("moeforge.tokens.loader")  # the loader's logger, whatever the module

_SETUP = ("num_samples", "seed", "world_size", "shuffle", "drop_last")  # what a sampler state is valid for


class ResumableSampler:
    """Dataset indices for one rank: a seeded permutation per epoch, iterated forever across epochs.

    Epoch ``e`` uses ``np.random.default_rng([seed, e]).permutation(num_samples)`` (identity without
    ``shuffle``); rank ``r`` takes positions ``r, r + world_size, …`` of it. Every rank gets the same
    count per epoch: with ``drop_last`` the last ``num_samples % world_size`` positions are dropped (a
    different tail each shuffled epoch), otherwise the order is wrapped cyclically to a multiple of
    ``world_size`` (some samples are seen twice). The state ``(epoch, position)`` is the same on every
    rank, so one saved state resumes all of them.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.per_rank = num_samples // world_size if drop_last else math.ceil(num_samples / world_size)
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset; check the split's sample count")
        if self.per_rank == 0:
            raise ValueError(
                f"{num_samples} samples leave none for each of {world_size} ranks; use drop_last=False"
            )
        self.epoch = 0
        self.position = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Indices per epoch for this rank."""
        return self.per_rank

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in order (cached for the current epoch)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        order = np.resize(order, self.per_rank * self.world_size)  # truncates or wraps cyclically
        mine = np.ascontiguousarray(order[self.rank :: self.world_size])
        self._cached = (epoch, mine)
        return mine

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` indices (crossing into later epochs as needed); advances the state."""
        parts: list[np.ndarray] = []
        while n > 0:
            order = self.epoch_order(self.epoch)
            chunk = order[self.position : self.position + n]
            parts.append(chunk)
            self.position += len(chunk)
            n -= len(chunk)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def __iter__(self) -> Iterator[int]:
        """Infinite; continues from (and advances) the current state."""
        while True:
            yield int(self.take(1)[0])

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``position`` plus the setup they are valid for (checked on load)."""
        return {"epoch": self.epoch, "position": self.position, **{k: getattr(self, k) for k in _SETUP}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; the sampling setup must match the one that saved the state (else ValueError)."""
        for key in _SETUP:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                    "resume with the same data, seed and number of ranks"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.per_rank:
            raise ValueError(f"sampler state epoch={epoch}, position={position} is out of range")
        self.epoch, self.position = (epoch + 1, 0) if position == self.per_rank else (epoch, position)


class MixtureSampler:
    """``(dataset_index, sample_index)`` draws mixing several datasets by weight, deterministically.

    Components are chosen by smooth weighted round-robin (nginx's algorithm): each draw adds every
    normalized weight to its component's credit, picks the largest credit (lowest index on ties) and
    charges it 1. After ``n`` draws each component has been picked ``n·w ± 1`` times, so every batch has
    (almost) the target mixture — lower variance than random choices — and the state is just the credits.
    Within a component, samples come from its own :class:`ResumableSampler` (seed derived from
    ``(seed, component)``), which cycles through epochs independently of the others.
    """

    def __init__(
        self,
        num_samples: Sequence[int],
        weights: Sequence[float] | None = None,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if not num_samples:
            raise ValueError("a mixture needs at least one dataset")
        self.weights = _normalized(
            weights if weights is not None else [1.0] * len(num_samples), len(num_samples)
        )
        split = {"rank": rank, "world_size": world_size, "shuffle": shuffle, "drop_last": drop_last}
        self.samplers = [
            ResumableSampler(n, seed=int(np.random.SeedSequence([seed, k]).generate_state(1)[0]), **split)
            for k, n in enumerate(num_samples)
        ]
        self._credit = [0.0] * len(self.weights)

    def choose(self, n: int) -> np.ndarray:
        """The components of the next ``n`` draws; advances the round-robin state."""
        if len(self.weights) == 1:
            return np.zeros(n, dtype=np.int64)
        credit, weights, ks = self._credit, self.weights, range(len(self.weights))
        out = np.empty(n, dtype=np.int64)
        for j in range(n):
            for k in ks:
                credit[k] += weights[k]
            best = max(ks, key=credit.__getitem__)
            credit[best] -= 1.0
            out[j] = best
        return out

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset_index, sample_index)`` arrays of the next ``n`` draws."""
        comp = self.choose(n)
        idx = np.empty(n, dtype=np.int64)
        for k, sampler in enumerate(self.samplers):
            sel = comp == k
            if count := int(sel.sum()):
                idx[sel] = sampler.take(count)
        return comp, idx

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while True:
            comp, idx = self.take(1)
            yield int(comp[0]), int(idx[0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": list(self.weights),
            "credit": list(self._credit),
            "components": [s.state_dict() for s in self.samplers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        comps = state["components"]
        if len(comps) != len(self.samplers):
            raise ValueError(
                f"mixture state has {len(comps)} datasets but this mixture has {len(self.samplers)}"
            )
        if [float(w) for w in state.get("weights", self.weights)] != self.weights:
            log.info("mixture weights changed on resume: %s -> %s", state.get("weights"), self.weights)
        for k, (sampler, s) in enumerate(zip(self.samplers, comps, strict=True)):
            try:
                sampler.load_state_dict(s)
            except ValueError as exc:
                raise ValueError(f"mixture dataset {k}: {exc}") from exc
        self._credit = [float(c) for c in state["credit"]]


def _normalized(weights: Sequence[float], n: int) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{len(w)} mixture weights for {n} datasets")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"mixture weights must be finite, non-negative and not all zero, got {w}")
    total = sum(w)
    return [x / total for x in w]
