"""Gates: checks a finished run must pass; ``moeforge data verify DIR`` runs them again from the files.

One streaming pass per output shard — a job each on the run's executor, so shards are read in parallel —
reads every output record and returns a small summary (counters, a few examples, 16 bytes per record for
the leakage check); the summaries, merged in shard order, feed all record-level gates; the others read
the manifest and the files' bytes.

==============  ==========================================================================================
schema          every output line is a valid Record (including id = content hash)
accounting      per stage in = out + dropped + quarantined; each stage's in is the previous stage's out;
                the files hold exactly the records the manifest and the last stage say
coverage        every family of the recipe has records in the output
leakage         no id twice (so none in two splits); held-out families only in test; a duplicate cluster
                in one split only; ``meta.split`` matches the directory; with near_dedup on, MinHash
                clusters recomputed over all outputs never span two splits
split_ratios    over the non-held-out pool: train share and valid/test shares within the recipe's bounds
lang_balance    per configured language, its share of train (approximate tokens × mix weight, or
                records) within bounds
mixture         when mixing ran, each group's achieved share of train within ``gates.mix_tolerance``
decontamination when configured, no train record contains an n-gram of a benchmark item
pii_residue     the PII detectors find nothing of the scrubbed types in the outputs
provenance      every record names its source, its source sha256 is a manifest input, and its recipe hash
                is the manifest's
hash            every file's sha256 matches the manifest and no unlisted file sits among the outputs
==============  ==========================================================================================
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from pydantic import ValidationError

from moeforge.data.contract import Record
from moeforge.data.executors import Executor, InlineExecutor, TaskFailed
from moeforge.data.mix import approx_tokens
from moeforge.data.pii import scrub_text
from moeforge.data.recipe import Recipe
from moeforge.data.split import SPLITS
from moeforge.data.store import iter_lines
from moeforge.io import sha256_file

__all__ = ["GATES", "GateResult", "run_gates"]

GATES = (
    "schema", "accounting", "coverage", "leakage", "split_ratios", "lang_balance", "mixture", "decontamination",
    "pii_residue", "provenance", "hash",
)  # fmt: skip
_EXAMPLES = 3


@dataclass
class GateResult:
    gate: str
    passed: bool
    evidence: str
    skipped: bool = False

    @property
    def verdict(self) -> str:
        return "skip" if self.skipped else ("pass" if self.passed else "FAIL")

    def to_json(self) -> dict[str, Any]:
        return {"gate": self.gate, "verdict": self.verdict, "passed": self.passed, "evidence": self.evidence}


@dataclass
class _Scan:
    records: Counter[str]
    schema_errors: list[str]
    n_schema_errors: int
    ids: dict[str, np.ndarray]
    clusters: dict[str, set[str]]
    holdout_outside_test: list[str]
    split_mismatch: list[str]
    families: Counter[str]
    pool: Counter[str]
    train_langs: Counter[str]
    pii_hits: Counter[str]
    pii_examples: list[str]
    provenance_errors: list[str]
    n_provenance_errors: int
    unlabelled: int = 0
    near_dir: Path | None = None
    contaminated: int = 0
    near_files: list[Path] = field(default_factory=list)
    near_splits: list[int] = field(default_factory=list)
    contaminated_examples: list[str] = field(default_factory=list)
    train_mix: Counter[str] = field(default_factory=Counter)
    pii_trusted: int = 0


@dataclass
class _ShardScan:
    """What one output shard contributes to the gates (small: counters, a few examples, id prefixes)."""

    split: str
    records: int = 0
    schema_errors: list[str] = field(default_factory=list)
    n_schema_errors: int = 0
    ids: bytes = b""
    clusters: set[str] = field(default_factory=set)
    holdout_outside_test: list[str] = field(default_factory=list)
    split_mismatch: list[str] = field(default_factory=list)
    families: Counter[str] = field(default_factory=Counter)
    pool: int = 0
    train_langs: Counter[str] = field(default_factory=Counter)
    train_mix: Counter[str] = field(default_factory=Counter)
    unlabelled: int = 0
    pii_hits: Counter[str] = field(default_factory=Counter)
    pii_examples: list[str] = field(default_factory=list)
    provenance_errors: list[str] = field(default_factory=list)
    n_provenance_errors: int = 0
    contaminated: int = 0
    contaminated_examples: list[str] = field(default_factory=list)
    near_file: str | None = None
    near_count: int = 0
    pii_trusted: int = 0


def _scan_shard(
    root: str,
    rel: str,
    split: str,
    recipe_data: dict[str, Any],
    input_shas: frozenset[str],
    recipe_sha: str,
    near_file: str | None,
    trust_clean: bool = False,
) -> _ShardScan:
    """Read one output shard and validate every record in it (runs on the executor, one job per shard).

    ``trust_clean`` (a run's own gates, never ``data verify``): a record the pii step found clean is not
    scanned again — the detectors are deterministic, they found nothing in this very text, and no step
    after pii changes text (the reduce rewrites metadata only; the id, a hash of the content, is checked
    above). A record the pii step changed is rescanned in full: a placeholder must not have made new PII."""
    recipe = Recipe.model_validate(recipe_data)
    holdout = set(recipe.split.holdout_families)
    scrubbed = list(recipe.pii.types) if recipe.pii.enabled else []
    decon_index = None
    if recipe.decontamination.enabled:
        from moeforge.data.decontam import cached_index

        decon_index = cached_index(recipe.decontamination)
    s = _ShardScan(split)
    prefixes: list[bytes] = []
    shard_texts: list[str] = []
    for line_no, line in _safe_lines(Path(root) / rel, rel, s):
        where = f"{rel}:{line_no}"
        try:
            rec = Record.model_validate_json(line)
        except ValidationError as exc:
            s.n_schema_errors += 1
            if len(s.schema_errors) < _EXAMPLES:
                s.schema_errors.append(f"{where}: {exc.errors()[0]['msg']}")
            continue
        s.records += 1
        meta = rec.meta
        contents = rec.contents()
        if near_file is not None:
            shard_texts.append("\n".join(contents))
        prefixes.append(bytes.fromhex(rec.id[7:39]))
        if meta.cluster:
            s.clusters.add(meta.cluster)
        if meta.family in holdout and split != "test" and len(s.holdout_outside_test) < _EXAMPLES:
            s.holdout_outside_test.append(f"{where} ({meta.family})")
        if meta.split != split and len(s.split_mismatch) < _EXAMPLES:
            s.split_mismatch.append(f"{where}: meta.split={meta.split}")
        s.families[meta.family] += 1
        if meta.family not in holdout:
            s.pool += 1
        if split == "train":
            repeat = int(meta.extra.get("mix_repeat", 1))
            if decon_index is not None and any(decon_index.contains_any(t) for t in contents):
                s.contaminated += 1
                if len(s.contaminated_examples) < _EXAMPLES:
                    s.contaminated_examples.append(where)
            size = approx_tokens(contents) * repeat
            lang_size = size if recipe.gates.language_unit == "tokens" else 1
            s.train_langs[meta.lang or "und"] += lang_size
            if recipe.mix.enabled:
                by = recipe.mix.by
                group = (meta.lang or "und") if by == "lang" else getattr(meta, by)
                s.train_mix[group] += size if recipe.mix.unit == "tokens" else repeat
        if meta.lang is None and meta.domain not in recipe.langid.skip_domains:
            s.unlabelled += 1
        if scrubbed and trust_clean and meta.pii_status == "clean" and "pii" in meta.provenance.steps:
            s.pii_trusted += 1
        elif scrubbed:
            for t in contents:
                _, hits = scrub_text(t, scrubbed)
                if hits:
                    s.pii_hits.update(hits)
                    if len(s.pii_examples) < _EXAMPLES:
                        s.pii_examples.append(f"{where}: {dict(hits)}")
        problem = None
        if meta.provenance.source_sha256 not in input_shas:
            problem = "source sha256 is not a manifest input"
        elif meta.provenance.recipe_hash != recipe_sha:
            problem = "recipe hash differs from the manifest's"
        if problem:
            s.n_provenance_errors += 1
            if len(s.provenance_errors) < _EXAMPLES:
                s.provenance_errors.append(f"{where}: {problem}")
    s.ids = b"".join(prefixes)
    if near_file is not None and shard_texts:
        from moeforge.data.dedup.minhash import minhash_band_keys, write_task_keys

        f = Path(near_file)
        write_task_keys(f, minhash_band_keys(shard_texts, recipe.near_dedup))
        if recipe.near_dedup.verify_jaccard is not None:  # the texts, for the Jaccard check
            with open(f.with_suffix(".jsonl"), "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in shard_texts)
        s.near_file, s.near_count = near_file, len(shard_texts)
    return s


def _capped(into: list[str], more: list[str]) -> None:
    into.extend(more[: max(0, _EXAMPLES - len(into))])


def _scan(
    root: Path, manifest: dict[str, Any], recipe: Recipe, executor: Executor | None, trust_clean: bool
) -> _Scan:
    """Every output shard scanned (on ``executor``, one job per shard) and the results merged in shard
    order, so the evidence is the same whichever executor ran the jobs."""
    s = _Scan(
        Counter(), [], 0, {}, defaultdict(set), [], [], Counter(), Counter(), Counter(), Counter(), [], [], 0
    )
    near_dir = Path(tempfile.mkdtemp(prefix="moeforge-near-gate-")) if recipe.near_dedup.enabled else None
    s.near_dir = near_dir
    data = recipe.resolved()
    shas = frozenset(i["sha256"] for i in manifest["inputs"])
    jobs: list[tuple[Any, ...]] = []
    for split in SPLITS:
        for shard in manifest["outputs"].get(split, []):
            if not (root / shard["path"]).exists():
                continue  # the hash gate reports it
            near = str(near_dir / f"{len(jobs):05d}.npy") if near_dir is not None else None
            jobs.append(
                (str(root), shard["path"], split, data, shas, manifest["recipe_sha256"], near, trust_clean)
            )
    runner = executor or InlineExecutor()
    try:
        parts = sorted(runner.map(_scan_shard, jobs), key=lambda ir: ir[0])
    except TaskFailed as exc:
        raise exc.cause from None
    prefixes: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    for _, p in parts:
        s.records[p.split] += p.records
        s.n_schema_errors += p.n_schema_errors
        _capped(s.schema_errors, p.schema_errors)
        prefixes[p.split].append(p.ids)
        for c in p.clusters:
            s.clusters[c].add(p.split)
        _capped(s.holdout_outside_test, p.holdout_outside_test)
        _capped(s.split_mismatch, p.split_mismatch)
        s.families.update(p.families)
        s.pool[p.split] += p.pool
        s.train_langs.update(p.train_langs)
        s.train_mix.update(p.train_mix)
        s.unlabelled += p.unlabelled
        s.pii_hits.update(p.pii_hits)
        _capped(s.pii_examples, p.pii_examples)
        s.pii_trusted += p.pii_trusted
        s.n_provenance_errors += p.n_provenance_errors
        _capped(s.provenance_errors, p.provenance_errors)
        s.contaminated += p.contaminated
        _capped(s.contaminated_examples, p.contaminated_examples)
        if p.near_file is not None:
            s.near_files.append(Path(p.near_file))
            s.near_splits.extend([SPLITS.index(p.split)] * p.near_count)
    for split in SPLITS:
        joined = b"".join(prefixes[split])
        s.ids[split] = np.frombuffer(joined, dtype="V16") if joined else np.empty(0, "V16")
    return s


def _safe_lines(path: Path, rel: str, s: _ShardScan) -> Iterator[tuple[int, str]]:
    """The shard's lines; a corrupt or undecodable file counts as a schema error instead of raising."""
    try:
        yield from iter_lines(path)
    except (zstandard.ZstdError, UnicodeDecodeError, OSError, EOFError) as exc:
        s.n_schema_errors += 1
        if len(s.schema_errors) < _EXAMPLES:
            s.schema_errors.append(f"{rel}: unreadable ({type(exc).__name__}: {exc})")


def _fmt(examples: list[str], n: int) -> str:
    more = f" (+{n - len(examples)} more)" if n > len(examples) else ""
    return "; ".join(examples) + more


def _accounting(manifest: dict[str, Any], scan: _Scan) -> GateResult:
    problems = []
    prev_out = None
    for st in manifest["stages"]:
        dropped = sum(st["dropped"].values())
        if st["in"] != st["out"] + dropped + st["quarantined"]:
            problems.append(
                f"{st['stage']}: in {st['in']} != out {st['out']} + dropped {dropped} + quarantined {st['quarantined']}"
            )
        if prev_out is not None and st["in"] != prev_out:
            problems.append(f"{st['stage']}: in {st['in']} != previous stage's out {prev_out}")
        prev_out = st["out"]
    total = sum(scan.records.values())
    if prev_out is not None and total + scan.n_schema_errors != prev_out:
        problems.append(f"outputs hold {total + scan.n_schema_errors} records, last stage says {prev_out}")
    for split, n in manifest["records"].items():
        if scan.records[split] + 0 != n and not scan.n_schema_errors:
            problems.append(f"{split}: files hold {scan.records[split]} records, manifest says {n}")
    quarantined = sum(st["quarantined"] for st in manifest["stages"])
    if manifest["quarantine"]["records"] != quarantined:
        problems.append(
            f"quarantine file has {manifest['quarantine']['records']} entries, stages say {quarantined}"
        )
    first = manifest["stages"][0] if manifest["stages"] else {"in": 0}
    if problems:
        return GateResult("accounting", False, "; ".join(problems))
    return GateResult(
        "accounting",
        True,
        f"{first['in']} inputs = {total} records out + dropped + {quarantined} quarantined, per stage",
    )


def _ratios(recipe: Recipe, scan: _Scan, manifest: dict[str, Any]) -> GateResult:
    counts: dict[str, int] = {s: scan.pool[s] for s in SPLITS}
    note = ""
    if recipe.mix.enabled:  # mixing down-samples train on purpose: judge the assignment before it
        counts = {s: int(manifest.get("split_pool", {}).get(s, 0)) for s in SPLITS}
        note = " (before mixing, from the manifest)"
        if counts["valid"] != scan.pool["valid"] or counts["test"] != scan.pool["test"]:
            return GateResult(
                "split_ratios", False, "valid/test in the files differ from the manifest's split_pool"
            )
    pool = sum(counts.values())
    if pool == 0:
        return GateResult("split_ratios", False, "no records outside held-out families")
    shares = {s: counts[s] / pool for s in SPLITS}
    problems = []
    lo, hi = recipe.gates.train_ratio
    if recipe.split.train > 0 and not lo <= shares["train"] <= hi:
        problems.append(f"train {shares['train']:.3f} outside [{lo}, {hi}]")
    lo, hi = recipe.gates.eval_ratio
    for s in ("valid", "test"):
        ratio = getattr(recipe.split, s)
        if ratio > 0 and not lo <= shares[s] <= hi:
            problems.append(f"{s} {shares[s]:.3f} outside [{lo}, {hi}]")
        if ratio == 0 and counts[s]:
            problems.append(f"{s} has {counts[s]} pool records but its ratio is 0")
    evidence = ", ".join(f"{s} {counts[s]} ({shares[s]:.3f})" for s in SPLITS) + f" of {pool}{note}"
    return GateResult("split_ratios", not problems, "; ".join(problems) or evidence)


def _lang_balance(recipe: Recipe, scan: _Scan) -> GateResult:
    bounds = recipe.gates.language_shares
    problems, parts = [], []
    if recipe.gates.require_lang and scan.unlabelled:
        problems.append(f"{scan.unlabelled} record(s) have no language label (gates.require_lang)")
    if not bounds:
        if problems:
            return GateResult("lang_balance", False, "; ".join(problems))
        return GateResult("lang_balance", True, "no language bounds configured", skipped=True)
    total = sum(scan.train_langs.values())
    for lang, (lo, hi) in sorted(bounds.items()):
        share = scan.train_langs[lang] / total if total else 0.0
        parts.append(f"{lang} {share:.3f} in [{lo}, {hi}]")
        if not lo <= share <= hi:
            problems.append(f"{lang} {share:.3f} outside [{lo}, {hi}]")
    unit = "approx tokens" if recipe.gates.language_unit == "tokens" else "records"
    evidence = ", ".join(parts) + f" of {total} train {unit}"
    return GateResult("lang_balance", not problems, "; ".join(problems) or evidence)


def _decontamination(recipe: Recipe, scan: _Scan) -> GateResult:
    cfg = recipe.decontamination
    if not cfg.enabled:
        return GateResult("decontamination", True, "decontamination not configured", skipped=True)
    names = ", ".join(b.name for b in cfg.benchmarks)
    if scan.contaminated:
        found = _fmt(scan.contaminated_examples, scan.contaminated)
        return GateResult(
            "decontamination", False, f"{scan.contaminated} train record(s) contain {names} n-grams: {found}"
        )
    return GateResult("decontamination", True, f"no train record contains a {cfg.ngram}-gram of {names}")


def _mixture(recipe: Recipe, scan: _Scan) -> GateResult:
    mix = recipe.mix
    if not mix.enabled:
        return GateResult("mixture", True, "mixing not configured", skipped=True)
    total = sum(scan.train_mix.values())
    tol = recipe.gates.mix_tolerance
    problems, parts = [], []
    for group in sorted(set(mix.target) | set(scan.train_mix)):
        share = scan.train_mix[group] / total if total else 0.0
        target = mix.target.get(group, 0.0)
        parts.append(f"{group} {share:.3f} (target {target:g})")
        if abs(share - target) > tol:
            problems.append(f"{group} {share:.3f} vs target {target:g} (tolerance {tol:g})")
    return GateResult("mixture", not problems, "; ".join(problems) or f"{mix.by}: " + ", ".join(parts))


def _leakage(recipe: Recipe, scan: _Scan) -> GateResult:
    all_ids = np.concatenate([scan.ids[s] for s in SPLITS])
    problems = []
    if len(all_ids):
        srt = np.sort(all_ids.view([("a", ">u8"), ("b", ">u8")]), order=("a", "b"))
        dups = int((srt[1:] == srt[:-1]).sum())
        if dups:
            problems.append(f"{dups} id(s) occur more than once across splits")
    crossing = [c for c, splits in scan.clusters.items() if len(splits) > 1]
    near = _near_leaks(recipe, scan)
    if near:
        problems.append(near)
    if crossing:
        problems.append(f"{len(crossing)} duplicate cluster(s) span splits, e.g. {crossing[0]}")
    if scan.holdout_outside_test:
        problems.append("held-out family outside test: " + "; ".join(scan.holdout_outside_test))
    if scan.split_mismatch:
        problems.append("meta.split differs from the directory: " + "; ".join(scan.split_mismatch))
    holdout = recipe.split.holdout_families
    evidence = f"{len(all_ids)} unique ids, {len(scan.clusters)} clusters each in one split" + (
        f"; held-out {holdout} only in test" if holdout else ""
    )
    return GateResult("leakage", not problems, "; ".join(problems) or evidence)


class _TextShingles:
    """``shingles_of`` for the recomputed clusters: the texts the scan saved beside each key file."""

    def __init__(self, key_files: list[Path], recipe: Recipe) -> None:
        self.files = [f.with_suffix(".jsonl") for f in key_files]
        self.cfg = recipe.near_dedup
        self.starts = [0]
        for f in self.files:
            with open(f, "rb") as fh:
                self.starts.append(self.starts[-1] + sum(1 for _ in fh))

    def __call__(self, indices: list[int]) -> dict[int, np.ndarray]:
        from moeforge.data.dedup.minhash import shingles

        want = sorted(set(indices))
        out: dict[int, np.ndarray] = {}
        for t, f in enumerate(self.files):
            lo, hi = self.starts[t], self.starts[t + 1]
            local = {i - lo for i in want if lo <= i < hi}
            if not local:
                continue
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if i in local:
                        out[lo + i] = shingles(json.loads(line), self.cfg)
        return out


def _near_leaks(recipe: Recipe, scan: _Scan) -> str | None:
    """Recompute MinHash clusters over every output record; a cluster with members in two splits leaks."""
    if scan.near_dir is None:
        return None
    try:
        if not scan.near_files:
            return None
        from moeforge.data.dedup.minhash import find_clusters

        of = _TextShingles(scan.near_files, recipe) if recipe.near_dedup.verify_jaccard is not None else None
        root = np.asarray(find_clusters(scan.near_files, recipe.near_dedup, scan.near_dir / "work", of).root)
        split = np.asarray(scan.near_splits, dtype=np.int8)
        order = np.lexsort((split, root))
        r, sp = root[order], split[order]
        start = np.ones(len(r), dtype=bool)
        start[1:] = r[1:] != r[:-1]
        lo = np.minimum.reduceat(sp, np.nonzero(start)[0])
        hi = np.maximum.reduceat(sp, np.nonzero(start)[0])
        crossing = int((lo != hi).sum())
        if crossing:
            return f"{crossing} near-duplicate cluster(s) (MinHash, recomputed from the outputs) span splits"
        return None
    finally:
        shutil.rmtree(scan.near_dir, ignore_errors=True)


def _hashes(root: Path, manifest: dict[str, Any]) -> GateResult:
    files = [f for infos in manifest["outputs"].values() for f in infos] + list(manifest["review"])
    files.append(manifest["quarantine"])
    problems = []
    for f in files:
        path = root / f["path"]
        if not path.exists():
            problems.append(f"{f['path']}: missing")
        elif sha256_file(path) != f["sha256"]:
            problems.append(f"{f['path']}: sha256 differs from the manifest (file changed after the run)")
    listed = {f["path"] for f in files}
    for sub in ("records", "review", "quarantine"):
        for p in sorted((root / sub).rglob("*")) if (root / sub).exists() else []:
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel not in listed:
                problems.append(f"{rel}: not in the manifest")
    return GateResult(
        "hash", not problems, "; ".join(problems[:5]) or f"{len(files)} files match their sha256"
    )


def run_gates(
    root: str | Path,
    manifest: dict[str, Any],
    recipe: Recipe | None = None,
    executor: Executor | None = None,
    *,
    trust_clean: bool = False,
) -> list[GateResult]:
    """Run every gate on the run directory ``root``; never raises for a bad dataset, only reports.

    The record-level scan reads each output shard in a job of its own on ``executor`` (the pipeline's
    executor during a run, worker processes for ``data verify``; default: this process); what the jobs
    return is small and merged in shard order, so the results do not depend on the executor. ``trust_clean`` (the pipeline's own gates)
    skips the PII rescan of records its pii step found clean (see :func:`_scan_shard`); ``data verify``
    rescans everything."""
    root = Path(root)
    recipe = recipe or Recipe.model_validate(manifest["recipe"])
    scan = _scan(root, manifest, recipe, executor, trust_clean)
    total = sum(scan.records.values())
    missing = sorted(set(recipe.families()) - set(scan.families))
    pii = sum(scan.pii_hits.values())
    return [
        GateResult(
            "schema",
            scan.n_schema_errors == 0,
            _fmt(scan.schema_errors, scan.n_schema_errors)
            if scan.n_schema_errors
            else f"{total} records valid",
        ),
        _accounting(manifest, scan),
        GateResult(
            "coverage",
            not missing,
            f"no records of {missing}"
            if missing
            else f"{len(scan.families)} families: "
            + ", ".join(f"{f} {n}" for f, n in sorted(scan.families.items())),
        ),
        _leakage(recipe, scan),
        _ratios(recipe, scan, manifest),
        _lang_balance(recipe, scan),
        _mixture(recipe, scan),
        _decontamination(recipe, scan),
        GateResult(
            "pii_residue",
            pii == 0,
            f"{pii} hit(s): " + _fmt(scan.pii_examples, pii) if pii else "no PII of the scrubbed types",
            skipped=not recipe.pii.enabled,
        ),
        GateResult(
            "provenance",
            scan.n_provenance_errors == 0,
            _fmt(scan.provenance_errors, scan.n_provenance_errors)
            if scan.n_provenance_errors
            else f"{total} records trace to {len(manifest['inputs'])} inputs",
        ),
        _hashes(root, manifest),
    ]
