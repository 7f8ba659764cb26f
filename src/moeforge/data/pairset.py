"""A pair set: preference pairs cleaned, split by prompt, gated and written with a manifest.

This is what ``moeforge data pairs import`` and ``moeforge data pairs generate`` write and what a
preference training run (``objective: dpo|ipo|simpo`` with ``data.pairs``) reads. The steps, in order:

1. **PII** (``pii: true``): every turn is scrubbed (:func:`moeforge.data.pii.scrub_text`); a changed pair
   gets a new id and its counts in ``meta.pii``; one whose sides differed only in PII is dropped
   (``pair:identical_after_pii``).
2. **Decontamination** (``decontamination``, the recipe section): a pair any of whose turns holds a
   benchmark n-gram is dropped as ``decontam:<benchmark>``.
3. **Exact duplicates**: a pair id seen before is dropped (``pair:duplicate``); two pairs with one prompt
   and the same two sides swapped contradict each other and both are dropped (``pair:contradiction``).
4. **Split by prompt**: a pair's unit is its prompt's near-duplicate cluster — prompts whose MinHash band
   keys collide (``near_dup``, on the turns after any system turn) are joined by union-find and the
   cluster is named by its smallest ``prompt_hash`` — placed by :func:`moeforge.data.split.assign_split`;
   every pair of one prompt, and of near-identical prompts, lands in one split.
5. **Gates** (:func:`pair_gates`): leakage (no prompt hash and no near-dup cluster in two splits), pair
   balance (no prompt holds more than ``max_pairs_per_prompt`` pairs), length bias (the mean chosen ÷
   rejected length ratio within ``length_ratio``), duplicates (none left), and each eval split's size.

Layout of the directory (published atomically)::

    manifest.json        kind, version, config, counts, per-split pair_stats, gates, sha256 of every file
    train.jsonl          one PreferencePair JSON per line, sorted by id
    valid.jsonl, test.jsonl
    dropped.jsonl        {"id", "reason", "prompt_hash"} for every pair dropped in steps 1–3
    quarantine.jsonl     input items that are not pairs, with the reason

:func:`read_pairs` reads a split back, checking the file's sha256 against the manifest first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, ValidationError

from moeforge.config import StrictModel
from moeforge.data.contract import Message, content_hash
from moeforge.data.decontam.config import DecontamConfig
from moeforge.data.dedup.minhash.config import MinHashConfig
from moeforge.data.dedup.unionfind import flatten, union
from moeforge.data.gates import GateResult
from moeforge.data.preference import PreferencePair, leakage, pair_stats
from moeforge.data.recipe import SplitConfig
from moeforge.data.sources import Quarantined
from moeforge.data.split import SPLITS, assign_split, check_split_sizes
from moeforge.io import atomic_directory, sha256_file

__all__ = [
    "PAIRSET_KIND",
    "PairSetConfig",
    "PairSetError",
    "load_pairset_manifest",
    "pair_gates",
    "read_pairs",
    "verify_pair_set",
    "write_pair_set",
]

log = logging.getLogger(__name__)

PAIRSET_KIND = "moeforge.preference_pairs"
_VERSION = 1


class PairSetError(ValueError):
    """A pair set that cannot be written or read; the message names the file and what to do."""


class PairSetConfig(StrictModel):
    """How a pair set is cleaned, split and gated (the ``pairs:`` section of ``moeforge data pairs``)."""

    split: SplitConfig = Field(
        default_factory=lambda: SplitConfig(train=0.9, valid=0.1, test=0.0, min_eval_records=4),
        description="ratios by prompt cluster; min_eval_records counts pairs",
    )
    near_dup: MinHashConfig = Field(
        default_factory=lambda: MinHashConfig(enabled=True, ngram=3, bands=16, rows=4),
        description="near-identical prompts share a split (word 3-grams; LSH of 16 bands × 4 rows)",
    )
    pii: bool = Field(default=True, description="scrub PII from every turn")
    decontamination: DecontamConfig = Field(default_factory=DecontamConfig)
    max_pairs_per_prompt: int = Field(default=16, ge=1, description="pair-balance gate")
    length_ratio: tuple[float, float] = Field(
        default=(0.5, 2.0), description="length-bias gate: bounds of the mean chosen/rejected length ratio"
    )


def _scrub(pair: PreferencePair) -> PreferencePair | None:
    """``pair`` with PII replaced by placeholders (a new id when anything changed); None when scrubbing made
    chosen and rejected the same (they differed only in PII)."""
    from moeforge.data.pii import scrub_text

    counts: dict[str, int] = dict(pair.meta.pii)
    changed = False

    def turns(ts: list[Message]) -> list[Message]:
        nonlocal changed
        out = []
        for m in ts:
            text, c = scrub_text(m.content)
            if c:
                changed = True
                for k, v in c.items():
                    counts[k] = counts.get(k, 0) + v
            out.append(Message(role=m.role, content=text) if text != m.content else m)
        return out

    prompt, chosen, rejected = turns(pair.prompt), turns(pair.chosen), turns(pair.rejected)
    if not changed:
        return pair
    if content_hash(messages=chosen) == content_hash(messages=rejected):
        return None
    meta = pair.meta.model_copy(update={"pii": counts, "pii_status": "scrubbed"})
    return PreferencePair.create(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        meta=meta,
        chosen_source=pair.chosen_source,
        rejected_source=pair.rejected_source,
    )


def _text(turns: Sequence[Message]) -> str:
    return "\n".join(m.content for m in turns)


def _prompt_clusters(pairs: Sequence[PreferencePair], cfg: MinHashConfig) -> list[str]:
    """Each pair's split unit: the smallest prompt hash among the prompts near-identical to its own.

    Prompts are compared by their user/assistant turns: a system prompt shared by many pairs (an identity
    prompt) would otherwise make every prompt under it look near-identical to every other. A prompt with no
    word to shingle has the empty signature, which every such prompt shares; it joins no cluster."""
    hashes = sorted({p.prompt_hash for p in pairs})
    index = {h: i for i, h in enumerate(hashes)}
    if not cfg.enabled or len(hashes) < 2:
        return [p.prompt_hash for p in pairs]
    from moeforge.data.dedup.minhash.hashing import minhash_band_keys

    text_of = {p.prompt_hash: _text([m for m in p.prompt if m.role != "system"]) for p in pairs}
    keys = minhash_band_keys((text_of[h] for h in hashes), cfg)  # [prompts, bands]
    empty = minhash_band_keys([""], cfg)[0]
    has_words = ~(keys == empty).all(axis=1)
    parent = np.arange(len(hashes), dtype=np.int64)
    candidates = np.flatnonzero(has_words)
    for b in range(keys.shape[1]):
        col = keys[candidates, b]
        order = candidates[np.argsort(col, kind="stable")]
        same = keys[order[1:], b] == keys[order[:-1], b]
        union(parent, order[:-1][same], order[1:][same])
    flatten(parent)
    return [hashes[int(parent[index[p.prompt_hash]])] for p in pairs]


def _clean(
    pairs: Iterable[PreferencePair], cfg: PairSetConfig
) -> tuple[list[PreferencePair], list[dict[str, str]]]:
    index = None
    if cfg.decontamination.enabled:
        from moeforge.data.decontam.index import cached_index

        index = cached_index(cfg.decontamination)
    kept: dict[str, PreferencePair] = {}
    dropped: list[dict[str, str]] = []
    for pair in pairs:
        if cfg.pii:
            scrubbed = _scrub(pair)
            if scrubbed is None:
                dropped.append(
                    {"id": pair.id, "reason": "pair:identical_after_pii", "prompt_hash": pair.prompt_hash}
                )
                continue
            pair = scrubbed
        if index is not None and pair.meta.family not in cfg.decontamination.exempt_families:
            hit = next(
                (m for t in (pair.prompt, pair.chosen, pair.rejected) for m in index.find(_text(t))), None
            )
            if hit is not None:
                dropped.append(
                    {"id": pair.id, "reason": f"decontam:{hit.benchmark}", "prompt_hash": pair.prompt_hash}
                )
                continue
        if pair.id in kept:
            dropped.append({"id": pair.id, "reason": "pair:duplicate", "prompt_hash": pair.prompt_hash})
            continue
        kept[pair.id] = pair
    # contradictions: one prompt, the same two sides in both orders
    sides = {
        (p.prompt_hash, content_hash(messages=p.chosen), content_hash(messages=p.rejected)): p.id
        for p in kept.values()
    }
    contradicted = {i for (h, c, r), i in sides.items() if (h, r, c) in sides}
    for i in sorted(contradicted):
        p = kept.pop(i)
        dropped.append({"id": i, "reason": "pair:contradiction", "prompt_hash": p.prompt_hash})
    return sorted(kept.values(), key=lambda p: p.id), dropped


def pair_gates(
    splits: dict[str, list[PreferencePair]], units: dict[str, str], cfg: PairSetConfig
) -> list[GateResult]:
    """The pair set's gates (see the module docstring); ``units`` maps pair id → its split unit."""
    out: list[GateResult] = []
    leaks = leakage(splits)
    unit_splits: dict[str, set[str]] = {}
    for name, ps in splits.items():
        for p in ps:
            unit_splits.setdefault(units[p.id], set()).add(name)
    near = sorted(u for u, s in unit_splits.items() if len(s) > 1)
    out.append(
        GateResult(
            "pairs:leakage",
            not leaks and not near,
            f"{len(leaks)} prompt(s) and {len(near)} near-duplicate prompt cluster(s) in more than one split"
            + (f", e.g. {next(iter(leaks))}" if leaks else ""),
        )
    )
    stats = pair_stats(p for ps in splits.values() for p in ps)
    top = stats["pairs_per_prompt_max"]
    out.append(
        GateResult(
            "pairs:balance",
            top <= cfg.max_pairs_per_prompt,
            f"at most {top} pair(s) per prompt (limit {cfg.max_pairs_per_prompt}); "
            f"{stats['pairs']} pairs over {stats['prompts']} prompts",
        )
    )
    ratio = stats["length_ratio_mean"]
    lo, hi = cfg.length_ratio
    out.append(
        GateResult(
            "pairs:length_bias",
            ratio is not None and lo <= ratio <= hi,
            f"mean chosen/rejected length ratio {ratio if ratio is None else round(ratio, 3)} "
            f"(bounds {lo}–{hi}); chosen is longer in {stats['chosen_longer_share'] or 0:.0%} of pairs",
        )
    )
    dups = stats["duplicate_pairs"] + stats["duplicate_prompt_pairs"]
    out.append(
        GateResult(
            "pairs:duplicates",
            dups == 0,
            f"{stats['duplicate_pairs']} duplicate pair(s), {stats['duplicate_prompt_pairs']} contradiction(s)",
        )
    )
    return out


def write_pair_set(
    pairs: Iterable[PreferencePair],
    out: str | os.PathLike[str],
    cfg: PairSetConfig | None = None,
    *,
    quarantine: Iterable[Quarantined] = (),
    inputs: Sequence[dict[str, Any]] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Clean, split, gate and write ``pairs`` to ``out`` (see the module docstring); returns the manifest.
    Raises :class:`PairSetError` when no pair is left or an eval split would be too small, and
    ``FileExistsError`` for an existing ``out`` without ``overwrite``."""
    cfg = cfg or PairSetConfig()
    target = Path(out)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    kept, dropped = _clean(pairs, cfg)
    if not kept:
        raise PairSetError(f"{target}: no pair left to write ({len(dropped)} dropped); see the reasons above")
    units = dict(zip((p.id for p in kept), _prompt_clusters(kept, cfg.near_dup), strict=True))
    splits: dict[str, list[PreferencePair]] = {s: [] for s in SPLITS}
    for p in kept:
        split = assign_split(units[p.id], cfg.split)
        splits[split].append(p.model_copy(update={"meta": p.meta.model_copy(update={"split": split})}))
    try:
        check_split_sizes({k: len(v) for k, v in splits.items()}, len(kept), cfg.split)
    except ValueError as exc:  # its counts are pairs here; split.min_eval_records keeps its name
        message = str(exc).replace(" record(s) ", " pair(s) ").replace(" records after", " pairs after")
        raise PairSetError(f"{target}: {message}") from None
    gates = pair_gates(splits, units, cfg)
    quarantined = list(quarantine)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        files: dict[str, Any] = {}
        for split, ps in splits.items():
            path = tmp / f"{split}.jsonl"
            path.write_text("".join(p.model_dump_json() + "\n" for p in ps), encoding="utf-8")
        (tmp / "dropped.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dropped), encoding="utf-8")
        (tmp / "quarantine.jsonl").write_text(
            "".join(json.dumps(q.to_json(), ensure_ascii=False) + "\n" for q in quarantined), encoding="utf-8"
        )
        for f in sorted(tmp.glob("*.jsonl")):
            n = len(splits.get(f.stem, ())) if f.stem in SPLITS else None
            files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size, "pairs": n}
        reasons: dict[str, int] = {}
        for d in dropped:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        for q in quarantined:
            key = q.error.split(": ", 1)[0][:60]  # "pair:<reason>" for a PairProblem
            reasons[key] = reasons.get(key, 0) + 1
        manifest = {
            "kind": PAIRSET_KIND,
            "version": _VERSION,
            "config": cfg.model_dump(mode="json"),
            "inputs": list(inputs),
            "counts": {
                "pairs": len(kept),
                "dropped": len(dropped),
                "quarantined": len(quarantined),
                "reasons": dict(sorted(reasons.items())),
                **{s: len(ps) for s, ps in splits.items()},
            },
            "splits": {
                s: {k: v for k, v in pair_stats(ps).items() if k != "examples"} for s, ps in splits.items()
            },
            "gates": [g.to_json() for g in gates],
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "%s: %d pairs (%s); %d dropped",
        target,
        len(kept),
        ", ".join(f"{s} {len(v)}" for s, v in splits.items()),
        len(dropped),
    )
    return manifest


def load_pairset_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """A pair set's manifest; PairSetError naming the path when it is not one."""
    path = Path(root) / "manifest.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PairSetError(
            f"{path} not found: {root} is not a pair set (write one with `moeforge data pairs import` or "
            "`moeforge data pairs generate`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise PairSetError(f"{path}: unreadable ({exc})") from None
    if not isinstance(m, dict) or m.get("kind") != PAIRSET_KIND:
        raise PairSetError(
            f"{path}: not a pair set manifest (kind {m.get('kind') if isinstance(m, dict) else None!r})"
        )
    return m


def read_pairs(root: str | os.PathLike[str], split: str) -> list[PreferencePair]:
    """The pairs of ``split``, after checking the file's sha256 against the manifest; PairSetError names the
    file (and line) of anything that does not hold."""
    m = load_pairset_manifest(root)
    name = f"{split}.jsonl"
    entry = m["files"].get(name)
    path = Path(root) / name
    if entry is None or not path.is_file():
        raise PairSetError(f"{path}: missing from the pair set (splits: {', '.join(SPLITS)})")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise PairSetError(
            f"{path}: sha256 {digest[:12]}… does not match the manifest's {entry['sha256'][:12]}…; the file was "
            "changed or damaged after it was written — write the pair set again"
        )
    out = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            try:
                out.append(PreferencePair.model_validate_json(line))
            except ValidationError as exc:
                raise PairSetError(f"{path} line {i}: not a valid pair ({exc.errors()[0]['msg']})") from None
    return out


def verify_pair_set(root: str | os.PathLike[str]) -> list[GateResult]:
    """Re-check a written pair set from its files alone (``moeforge data verify`` on a pair set): every
    split's sha256 and records (``pairs:hash``), then the gates of :func:`pair_gates` recomputed with the
    manifest's config — a file edited after the write, or pairs moved between splits, fail here."""
    m = load_pairset_manifest(root)
    cfg = PairSetConfig.model_validate(m["config"])
    splits: dict[str, list[PreferencePair]] = {}
    problems = []
    for split in SPLITS:
        try:
            splits[split] = read_pairs(root, split)
        except PairSetError as exc:
            problems.append(str(exc))
    counts = {s: len(v) for s, v in splits.items()}
    expected = {s: m["counts"].get(s) for s in SPLITS}
    if not problems and counts != expected:
        problems.append(f"pairs per split {counts} differ from the manifest's {expected}")
    out = [GateResult("pairs:hash", not problems, "; ".join(problems) or "every file matches its sha256")]
    if problems:
        return out
    kept = [p for ps in splits.values() for p in ps]
    units = dict(zip((p.id for p in kept), _prompt_clusters(kept, cfg.near_dup), strict=True))
    return out + pair_gates(splits, units, cfg)
