"""The generate run: sample in chunks with per-reply seeds, keep each finished chunk on disk (resumable),
then pair and write the pair set."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.data.pairgen.build import Builder, Reply
from moeforge.data.pairgen.config import GenerateConfig, PairGenError
from moeforge.data.pairgen.items import Item, load_items
from moeforge.data.pairgen.judge import judge_reply, require_sandbox
from moeforge.data.pairset import PairSetError, write_pair_set
from moeforge.data.preference import ModelRef, PreferencePair
from moeforge.io import atomic_write_json, sha256_file

__all__ = [
    "GenerateResult",
    "SampleRequest",
    "Sampler",
    "generate_pairs",
    "sample_seed",
]

log = logging.getLogger(__name__)


# ---- the sampler --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRequest:
    """One reply to sample: ChatML ``messages`` (the system turn first when there is one, ending with a user
    turn) and the sampling settings, with the reply's own ``seed``."""

    messages: list[dict[str, str]]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


Sampler = Callable[[Sequence[SampleRequest]], list[str]]
"""Replies (the assistant's text, without the end-of-turn marker) to a list of requests, in order."""


def sample_seed(seed: int, index: int, sample: int) -> int:
    """Reply ``sample`` of dataset item ``index``'s seed: 63 bits of sha256 over the three."""
    digest = hashlib.sha256(f"moeforge-pairgen:{seed}:{index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    """What a generate run did. ``outcomes``: prompts by how their pairs were made (or why none were);
    ``pairs_made``: pairs built, by ``chosen/rejected`` side kind, before the pair set's cleaning."""

    out: Path
    manifest: dict[str, Any]
    prompts: int
    samples: int
    passed: int
    empty: int
    outcomes: dict[str, int]
    pairs_made: dict[str, int]
    chunks: int
    chunks_resumed: int
    quarantined: int


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(all)"]


def _open_partial(partial: Path, key: dict[str, Any], restart: bool) -> list[dict[str, Any]]:
    """The finished chunks in ``partial`` (creating it), after checking it holds samples of ``key``."""
    config_path, samples_path = partial / "config.json", partial / "samples.jsonl"
    if restart and partial.exists():
        log.info("%s: --restart, discarding the samples there", partial)
        shutil.rmtree(partial)
    if partial.exists() and not config_path.is_file():
        shutil.rmtree(partial)  # config.json is written before any sample: nothing is lost
    if not partial.exists():
        partial.mkdir(parents=True)
        atomic_write_json(config_path, key)
        return []
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PairGenError(
            f"{config_path}: unreadable ({exc}); pass --restart to discard {partial}"
        ) from None
    if saved != key:
        diff = ", ".join(_differences(saved, key)[:8])
        raise PairGenError(
            f"{partial} holds samples of another configuration (different: {diff}); rerun with the same "
            "configuration to resume, or pass --restart to discard them"
        )
    done: list[dict[str, Any]] = []
    good_bytes = 0
    if samples_path.is_file():
        with samples_path.open("rb") as fh:
            for raw in fh:
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("no newline")
                    record = json.loads(raw)
                except ValueError:
                    log.warning("%s: dropping a torn last line (%d bytes)", samples_path, len(raw))
                    break
                done.append(record)
                good_bytes += len(raw)
        with samples_path.open("r+b") as fh:
            fh.truncate(good_bytes)
    return done


def _run_chunk(cfg: GenerateConfig, number: int, chunk: list[Item], sampler: Sampler) -> dict[str, Any]:
    requests = [
        SampleRequest(
            messages=[m.model_dump() for m in item.prompt],
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            seed=sample_seed(cfg.seed, item.index, j),
        )
        for item in chunk
        for j in range(cfg.samples)
    ]
    texts = sampler(requests)
    if len(texts) != len(requests):
        raise PairGenError(f"the sampler returned {len(texts)} replies for {len(requests)} requests")
    out = []
    for k, item in enumerate(chunk):
        replies = []
        for j in range(cfg.samples):
            text = texts[k * cfg.samples + j]
            ok, note = judge_reply(cfg, item, text)
            replies.append({"seed": requests[k * cfg.samples + j].seed, "text": text, "ok": ok, "note": note})
        out.append({"index": item.index, "replies": replies})
    return {"chunk": number, "items": out}


def generate_pairs(
    cfg: GenerateConfig,
    out: str | os.PathLike[str],
    sampler: Sampler,
    *,
    restart: bool = False,
    overwrite: bool = False,
    allow_code_execution: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> GenerateResult:
    """Sample, judge, pair and write a pair set to ``out`` as :mod:`moeforge.data.pairgen` describes.

    ``sampler`` is called once per chunk; ``progress(done_prompts, total_prompts)`` after each chunk is on
    disk (and once at the start), so an exception it raises stops the run resumably. HumanEval needs
    ``allow_code_execution``. Raises :class:`PairGenError` (and ``PairSetError`` from the write, with the
    samples kept for a rerun), ``FileExistsError`` for an existing ``out`` without ``overwrite``.
    """
    target = Path(out)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    if cfg.dataset == "humaneval":
        require_sandbox(allow_code_execution)
    weights = Path(cfg.checkpoint) / "model.safetensors"
    if not weights.is_file():
        raise PairGenError(f"{cfg.checkpoint}: no model.safetensors there; give a checkpoint directory")
    model = ModelRef(name=cfg.checkpoint, sha256=sha256_file(weights))
    items, quarantined, sources = load_items(cfg)
    if not items:
        raise PairGenError(
            f"{cfg.path}: no usable item from offset {cfg.offset} (limit {cfg.limit}); "
            f"{len(quarantined)} quarantined"
        )
    per_chunk = max(1, cfg.batch_size // cfg.samples)
    chunks = [items[i : i + per_chunk] for i in range(0, len(items), per_chunk)]
    partial = target.with_name(target.name + ".partial")
    key = {"config": cfg.sampling_key(), "checkpoint_sha256": model.sha256, "sources": sources}
    done = _open_partial(partial, key, restart)
    for c, record in enumerate(done):
        if (
            c >= len(chunks)
            or record.get("chunk") != c
            or [s["index"] for s in record["items"]] != [it.index for it in chunks[c]]
        ):
            raise PairGenError(
                f"{partial / 'samples.jsonl'}: chunk {c} does not match this configuration's prompts; "
                "pass --restart to discard the samples"
            )
    resumed = len(done)
    if resumed:
        log.info("%s: resuming after %d of %d chunk(s)", partial, resumed, len(chunks))

    def prompts_done() -> int:
        return sum(len(c) for c in chunks[: len(done)])

    if progress is not None:
        progress(prompts_done(), len(items))
    with (partial / "samples.jsonl").open("a", encoding="utf-8") as fh:
        for c in range(resumed, len(chunks)):
            record = _run_chunk(cfg, c, chunks[c], sampler)
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done.append(record)
            log.debug("chunk %d/%d done", c + 1, len(chunks))
            if progress is not None:
                progress(prompts_done(), len(items))

    replies = {
        s["index"]: [Reply(r["text"], r["ok"], r["note"], r["seed"]) for r in s["replies"]]
        for record in done
        for s in record["items"]
    }
    builder = Builder(cfg, model)
    pairs: list[PreferencePair] = []
    outcomes: Counter[str] = Counter()
    for item in items:
        made, outcome = builder.build(item, replies[item.index])
        pairs += made
        outcomes[outcome] += 1
    pairs_made = Counter(f"{p.chosen_source.kind}/{p.rejected_source.kind}" for p in pairs)
    inputs = [
        {
            "dataset": cfg.path,
            "sources": sources,
            "checkpoint": cfg.checkpoint,
            "checkpoint_sha256": model.sha256,
            "config": cfg.model_dump(mode="json"),
        }
    ]
    try:
        manifest = write_pair_set(
            pairs, target, cfg.pairs, quarantine=quarantined, inputs=inputs, overwrite=overwrite
        )
    except PairSetError as exc:
        raise PairSetError(
            f"{exc} (the samples stay in {partial}: a rerun with other `pairs` settings reuses them)"
        ) from None
    shutil.rmtree(partial)
    all_replies = [r for rs in replies.values() for r in rs]
    return GenerateResult(
        out=target,
        manifest=manifest,
        prompts=len(items),
        samples=len(all_replies),
        passed=sum(r.ok for r in all_replies),
        empty=sum(not r.text.strip() for r in all_replies),
        outcomes=dict(sorted(outcomes.items())),
        pairs_made=dict(sorted(pairs_made.items())),
        chunks=len(chunks),
        chunks_resumed=resumed,
        quarantined=len(quarantined),
    )
