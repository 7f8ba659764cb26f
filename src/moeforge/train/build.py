"""The pieces a training run is assembled from, each callable alone (a test, a curriculum stage, a script).

The order :class:`~moeforge.train.trainer.Trainer` uses, and what each needs:

1. :func:`check_start` — refuse early to train over an earlier run's checkpoints (before any tokenizing).
2. :func:`prepare_run` — the data-preparation step: resolve ``init_from`` once and tokenize the data run
   (through the token cache, rank 0 first) → :class:`RunInputs`.
3. :func:`open_splits` — the token splits (train; valid and test when present) and the vocabulary size.
4. :func:`build_model` — the model for a resolved :class:`ModelConfig`, initialized from the seed.
5. :func:`moeforge.train.optim.build_optimizer` — AdamW over the trainable parameters.
6. :func:`build_loader` — this rank's resumable loader over the train split.
7. :func:`restore` — model, optimizer and the loop's state from a checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from moeforge.model.config import ModelConfig
from moeforge.model.transformer import MoETransformer
from moeforge.tokens.loader import TokenDataset, TokenLoader
from moeforge.train import checkpoint as ckpt
from moeforge.train.config import TrainConfig, resolve_init_from, resolve_tokenizer
from moeforge.train.distributed import DistInfo, barrier

__all__ = [
    "Restored",
    "RunInputs",
    "TokenSplits",
    "build_loader",
    "build_model",
    "check_start",
    "open_splits",
    "optional_split",
    "prepare_run",
    "prepare_tokens",
    "read_state",
    "restore",
    "seed_everything",
    "shape_changing_overrides",
]

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RunInputs:
    """What a run trains on, fixed before it starts: the tokenized directory (language modeling) or the
    pair set (a preference objective), and the resolved ``init_from`` checkpoint (resolved once: a run
    directory's "latest" must not move between uses)."""

    tokens: Path | None
    init_from: Path | None
    pairs: Path | None = None


@dataclass
class TokenSplits:
    train: TokenDataset
    valid: TokenDataset | None
    test: TokenDataset | None
    vocab_size: int


@dataclass(frozen=True)
class Restored:
    """The loop's counters as a checkpoint left them."""

    path: Path
    step: int
    tokens_seen: int
    best_valid: float | None


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_start(run_dir: Path, *, resume: bool, overwrite: bool) -> list[tuple[int, Path]]:
    """The checkpoints of an earlier run in ``run_dir``; refuses (:class:`~moeforge.train.checkpoint.
    CheckpointError`) when there are some and neither ``resume`` nor ``overwrite`` was asked for."""
    found = ckpt.list_checkpoints(run_dir)
    if found and not resume and not overwrite:
        raise ckpt.CheckpointError(
            f"{run_dir} holds an earlier run's checkpoints (latest step {found[-1][0]}); continue it "
            "with --resume, train elsewhere with --set out_dir=DIR, or replace it with --overwrite"
        )
    return found


def _local(location: str, info: DistInfo | None) -> Path:
    """A local directory for ``location``: itself, or for an exported URL (``s3://…/run``) its verified
    local copy (:func:`moeforge.storage.fetch.fetch_export`; local rank 0 fetches, the others then find it)."""
    from moeforge.storage.urls import is_remote

    if not is_remote(location):
        return Path(location)
    from moeforge.storage.fetch import fetch_export

    if info is None or not info.enabled:
        return fetch_export(location)
    # one fetch per node (the cache is node-local); the other ranks then find it verified in the cache
    path = fetch_export(location) if info.local_rank == 0 else None
    barrier(info)
    return path if path is not None else fetch_export(location, wait=600.0)


def prepare_tokens(cfg: TrainConfig, info: DistInfo | None = None, *, checkpoint: Path | None = None) -> Path:
    """The tokenized directory for ``cfg.data``: given, or built (on rank 0) through the token cache with
    ``data.tokenizer`` or, when that is omitted, the ``init_from`` checkpoint's tokenizer (``checkpoint``:
    the already-resolved init_from)."""
    if cfg.data.tokens is not None:
        return _local(cfg.data.tokens, info)
    from moeforge.tokens.tokenize import tokenize_run

    assert cfg.data.run is not None
    run = _local(cfg.data.run, info)
    tokenizer = resolve_tokenizer(cfg, checkpoint)
    assert tokenizer is not None
    if cfg.data.tokenizer is None:
        log.info("tokenizing %s with the init_from checkpoint's tokenizer %s", cfg.data.run, tokenizer)

    def build() -> Path:
        return tokenize_run(
            run,
            tokenizer,
            seq_len=cfg.data.seq_len,
            mode=cfg.data.mode,
            cache_root=cfg.data.cache_dir,
            max_records=cfg.data.max_records,
        ).path

    if info is None or not info.enabled:
        return build()
    path = build() if info.is_main else None
    barrier(info)
    return path if path is not None else build()  # a cache hit on the other ranks


def prepare_run(cfg: TrainConfig, info: DistInfo | None = None) -> RunInputs:
    """The step before training: resolve ``init_from`` and tokenize the data (see :func:`prepare_tokens`);
    a pair set is encoded by the trainer itself (its reference log-probs need the model)."""
    init = resolve_init_from(cfg.init_from) if cfg.init_from else None
    if cfg.data.pairs is not None:
        return RunInputs(None, init, Path(cfg.data.pairs))
    return RunInputs(prepare_tokens(cfg, info, checkpoint=init), init)


def optional_split(tokens: Path, split: str) -> TokenDataset | None:
    """``split`` of a tokenized directory, or None when it has no samples."""
    m = json.loads((tokens / "manifest.json").read_text())
    s = (m.get("splits") or {}).get(split)
    if not s or not s.get("samples"):
        return None
    return TokenDataset(tokens, split)


def open_splits(tokens: Path) -> TokenSplits:
    """The splits of a tokenized directory (shards verified as they open) and its vocabulary size."""
    train = TokenDataset(tokens, "train")
    vocab = int(json.loads((tokens / "manifest.json").read_text())["tokenizer"]["vocab_size"])
    return TokenSplits(train, optional_split(tokens, "valid"), optional_split(tokens, "test"), vocab)


def build_model(model_cfg: ModelConfig, *, seed: int, device: torch.device) -> MoETransformer:
    """A freshly initialized model: the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    return MoETransformer(model_cfg).to(device)


def build_loader(train: TokenDataset, cfg: TrainConfig, info: DistInfo) -> TokenLoader:
    """This rank's loader over the train split: a pure function of seed, epoch and position."""
    return TokenLoader(
        train, batch_size=cfg.micro_batch, seed=cfg.seed, rank=info.rank, world_size=info.world_size
    )


def restore(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    parts: Mapping[str, Stateful],
    *,
    world_size: int,
    freeze: dict[str, Any] | None = None,
    local: ckpt.TensorsTransform | None = None,
) -> Restored:
    """Load ``path`` into ``model`` and ``optimizer`` (with the RNG state) and each of ``parts`` from the
    entry of the checkpoint's ``state.json`` of the same name (``loader``, ``collapse``, ``ghost``). A
    checkpoint of a run with another number of processes is refused; when the weights do not fit and the
    checkpoint was written with other ``freeze`` settings than ``freeze``, the error says so."""
    try:
        c = ckpt.load_checkpoint(path, model, optimizer, local=local)
    except ckpt.CheckpointError as exc:
        saved = read_state(path).get("config", {}).get("freeze")
        if freeze is not None and saved is not None and saved != freeze:
            raise ckpt.CheckpointError(
                f"{exc}\n{path} was written with freeze {saved}, this config has {freeze}; "
                "resume with the same freeze settings"
            ) from exc
        raise
    s = c.state
    if s.get("world_size", 1) != world_size:
        raise ckpt.CheckpointError(
            f"{path} was written by a run with {s.get('world_size')} processes; resume with the same number"
        )
    for name, part in parts.items():
        part.load_state_dict(s[name])
    log.info("resumed from %s (step %d)", path, c.step)
    return Restored(path, c.step, int(s["tokens_seen"]), s.get("best_valid"))


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json`` as a dict; empty when it is missing or unreadable."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _changed_keys(base: dict[str, Any], overrides: dict[str, Any]) -> list[tuple[list[str], Any, Any]]:
    """``(key path, old, new)`` for every leaf of ``overrides`` whose value differs from ``base``."""
    out: list[tuple[list[str], Any, Any]] = []
    for k, v in overrides.items():
        b = base.get(k)
        if isinstance(v, dict) and isinstance(b, dict):
            out.extend((([k, *path], old, new) for path, old, new in _changed_keys(b, v)))
        elif v != b:
            out.append(([k], b, v))
    return out


def _weight_shapes(model_config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """State-dict shapes of a model with this config (built on the meta device); None if it is invalid."""
    try:
        mc = ModelConfig.model_validate(model_config)
    except ValueError:
        return None
    with torch.device("meta"):
        model = MoETransformer(mc)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def shape_changing_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """``key (old → new)`` for each override that alone changes the weight shapes of ``base`` (or makes
    it invalid); every changed override when none does alone."""
    ref = _weight_shapes(base)
    changed = _changed_keys(base, overrides)
    out = []
    for path, old, new in changed:
        trial = json.loads(json.dumps(base))
        node = trial
        for part in path[:-1]:
            node = node[part]  # a dict in base: _changed_keys only descends into those
        node[path[-1]] = new
        if ref is None or _weight_shapes(trial) != ref:
            out.append(f"{'.'.join(path)} ({old!r} → {new!r})")
    return out or [f"{'.'.join(p)} ({o!r} → {n!r})" for p, o, n in changed]
