"""MinHash near-duplicate detection, moeforge against datasketch and datatrove: what each finds of planted
copies (precision and recall for every configuration, several seeds) and how fast each runs on one core,
in rounds interleaved with the order rotated.

**(a) Quality** — the output check, run before any time is reported — on a planted set built from the
shared real data (``$MOEFORGE_REAL_DATA`` or ``<project>/../shared/data``): Shakespeare speaker turns
grouped into 1–3 KB documents, RusLit paragraphs grouped the same way, GSM8K problems one per document;
exact repeats removed. A sample of them gets one planted copy each, the variant cycling through: 5 / 10
/ 20 / 30 % of words edited (substituted, deleted or inserted at random positions), sentences shuffled,
or a passage of another document (~20 % of the length) inserted. Ground truth: each original and its
copy. Scores are over pairs of documents put in one cluster: precision = planted pairs among them,
recall = planted pairs found; recall is also given per variant, with the mean true Jaccard (word
5-grams) of that variant, so the S-curve can be read off. Predicted pairs outside the planted ones are
checked for true Jaccard ≥ 0.5 (natural near-duplicates in the sources, not LSH errors). Every
configuration of the sweep — word 5-grams with 16 bands × 8 rows (the defaults), and word 3-grams with
32 × 4 (threshold 0.42, for the heavier edits) — is scored for every system over ``--seeds`` seeds
(3; ``--quick`` 1), each seed drawing its own planted set and hash seed; the tables give the mean and
the seeds' min–max. Systems: ``moeforge``, ``moeforge+verify`` (candidate pairs below true Jaccard
0.8, resp. 0.3, dropped), ``datasketch`` (``MinHashLSH(params=(b, r))`` over ``MinHash`` objects of
exactly moeforge's shingle sets, so only the hashing and banding differ; clusters by union-find over
``query`` results) and ``datatrove`` (the first three steps of its MinHash pipeline, its own text
normalisation, whitespace words after it). The implementations hash differently, so their clusters are
expected to differ a little: the differences are recorded, not raised.

**(b) Throughput and memory** on a ≥ ``--size-mb`` MB JSONL corpus in 8 shards: the pipeline
benchmark's corpus (``/tmp/moeforge-bench-pipeline/corpus-v1-<size>mb-8x``) when it exists, else one
built here the same way (seeded; 5 % exact and 5 % near copies). Each system runs in a child process,
one task at a time (one core), ``--rounds`` times, interleaved with the other systems (the order
rotated each round, no warm-up round: every run is a fresh process); the parent samples the child's
process tree every 0.05 s for peak RSS. Everything from starting the process and reading the JSONL to
the clusters is timed:

- ``moeforge``: per shard read → :func:`minhash_band_keys` → :func:`write_task_keys`; then
  :func:`find_clusters` and :func:`choose_survivors` (keep_first). Also run on the first half of the
  shards (``moeforge_half``), so the RSS growth per document can be read off.
- ``datasketch``: words by regex (moeforge's definition), 5-gram strings, ``MinHash.generator``
  (affine32 scheme, sha1) → ``MinHashLSH.insert``, then ``query`` per document → union-find.
- ``datatrove_ws``: ``JsonlReader`` → ``MinhashDedupSignature`` (whitespace word tokenizer after its
  ``simplify_text``, which already strips punctuation) → ``MinhashDedupBuckets`` (16 tasks) →
  ``MinhashDedupCluster``, ``LocalPipelineExecutor(workers=1)``. Its fourth step (re-read and filter
  the corpus) is left out, as moeforge's counterpart (the reduce's rewrite) is.
- ``datatrove``: the same with its default English word tokenizer (spaCy), with ``--spacy``.

Before the times are reported each system's clusters are checked to be the same in every round, and
the documents each peer removes are compared with moeforge's (agreement = Jaccard of the removed
sets). Speed-ups are the median of the per-round ratios (``_harness.paired_ratio``); the goal is
moeforge ≥ 2× datasketch's docs/s.

Figures go through ``benchmarks/_harness.py``: JSON lines as they come, ``benchmarks/results/
near_dedup.json`` at the end (``--json``), rendered into docs/PERFORMANCE.md by ``benchmarks/report.py``;
``--markdown`` also prints the tables. Run: ``python benchmarks/near_dedup.py [--quick] [--rounds 3]
[--seeds 3] [--size-mb 100] [--spacy] [--busy N] [--markdown]``. Needs ``datasketch==2.0.0`` and
``datatrove==0.10.1`` (+ ``spacy`` for its default tokenizer); a missing peer is skipped with a message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from moeforge.data.dedup.minhash import (
    MinHashConfig,
    choose_survivors,
    find_clusters,
    lsh_curve,
    minhash_band_keys,
    shingle_batch,
    shingles,
    write_task_keys,
)

SEED = 20241122
VARIANTS = ("edit5", "edit10", "edit20", "edit30", "reorder", "insert")
VARIANT_LABELS = {
    "edit5": "edit 5%",
    "edit10": "edit 10%",
    "edit20": "edit 20%",
    "edit30": "edit 30%",
    "reorder": "reorder",
    "insert": "insert",
}
EDIT_RATES = {"edit5": 0.05, "edit10": 0.10, "edit20": 0.20, "edit30": 0.30}
SHARDS = 8
RESULT_TAG = "@@near-dedup@@ "
PIPELINE_CORPUS = Path("/tmp/moeforge-bench-pipeline")
MB = 1e6
WORD_RE = re.compile(r"[^\W_]+")  # letters and digits: moeforge's word definition (less combining marks)
CFG = MinHashConfig(enabled=True)  # the defaults: word 5-grams, 16 bands × 8 rows, threshold 0.707
# a recall-oriented operating point: word 3-grams, 32 × 4, threshold 0.420
LOW = MinHashConfig(enabled=True, ngram=3, bands=32, rows=4)
SWEEP = (("word 5-grams, 16×8 (defaults)", CFG, 0.8), ("word 3-grams, 32×4", LOW, 0.3))  # label, cfg, verify
GOAL_VS_DATASKETCH = 2.0  # docs/s ÷ datasketch's, one core each (the target docs/PERFORMANCE.md states)
PEERS = ("datasketch", "datatrove_ws", "datatrove")


def data_root() -> Path:
    """``$MOEFORGE_REAL_DATA`` if set, else ``<project>/../shared/data``."""
    env = os.environ.get("MOEFORGE_REAL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


# ------------------------------------------------------------------------------ planted documents


def _group(paras: list[str], rng: random.Random, lo: int = 1000, hi: int = 3000) -> list[str]:
    """Consecutive paragraphs joined into documents of a random size between ``lo`` and ``hi`` bytes."""
    docs, cur, size, target = [], [], 0, rng.randint(lo, hi)
    for p in paras:
        cur.append(p)
        size += len(p.encode()) + 2
        if size >= target:
            docs.append("\n\n".join(cur))
            cur, size, target = [], 0, rng.randint(lo, hi)
    if size >= lo:
        docs.append("\n\n".join(cur))
    return docs


def base_documents(rng: random.Random) -> dict[str, list[str]]:
    """Documents per source, in source order, exact repeats removed."""
    root = data_root()
    needed = ("tinyshakespeare/input.txt", "ruslit", "gsm8k/train.jsonl", "gsm8k/test.jsonl")
    missing = [p for p in needed if not (root / p).exists()]
    if missing:
        raise SystemExit(f"real data not found under {root} (missing {missing}); set MOEFORGE_REAL_DATA")
    turns = [t.strip() for t in (root / "tinyshakespeare/input.txt").read_text("utf-8").split("\n\n")]
    out: dict[str, list[str]] = {"shakespeare": _group([t for t in turns if t], rng), "ruslit": []}
    for path in sorted((root / "ruslit").glob("*/*.txt")):
        paras = [ln.strip() for ln in path.read_text("utf-8").splitlines() if ln.strip()]
        out["ruslit"] += _group(paras, rng)
    out["gsm8k"] = []
    for split in ("train", "test"):
        for line in (root / "gsm8k" / f"{split}.jsonl").read_text("utf-8").splitlines():
            row = json.loads(line)
            out["gsm8k"].append(f"{row['question']}\n\n{row['answer']}")
    seen: set[str] = set()
    for name, docs in out.items():
        out[name] = [d for d in docs if not (d in seen or seen.add(d))]  # type: ignore[func-returns-value]
    return out


def edit_words(rng: random.Random, text: str, rate: float, vocab: list[str]) -> str:
    """Substitute, delete or insert a word at ``rate`` of the word positions, whitespace kept."""
    parts = re.split(r"(\s+)", text)
    words = [i for i in range(0, len(parts), 2) if parts[i]]
    for i in rng.sample(words, round(rate * len(words))):
        op = rng.random()
        if op < 0.5:
            parts[i] = rng.choice(vocab)
        elif op < 0.75:
            parts[i] = ""
        else:
            parts[i] = f"{parts[i]} {rng.choice(vocab)}"
    return "".join(parts)


def reorder_sentences(rng: random.Random, text: str) -> str:
    """Sentences (or lines, when there are fewer than 4 sentences) in a shuffled order."""
    units = re.split(r"(?<=[.!?])\s+", text)
    if len(units) < 4:
        units = text.splitlines()
    shuffled = units[:]
    for _ in range(10):
        rng.shuffle(shuffled)
        if shuffled != units or len(units) < 2:
            break
    return " ".join(shuffled)


def insert_passage(rng: random.Random, text: str, other: str) -> str:
    """A passage of ``other`` about a fifth of ``text``'s length, inserted at a paragraph or line break."""
    n = max(50, len(text) // 5)
    start = rng.randrange(max(1, len(other) - n))
    passage = other[start : start + n]
    breaks = [m.end() for m in re.finditer(r"\n", text)] or [len(text)]
    at = rng.choice(breaks)
    return f"{text[:at]}{passage}\n{text[at:]}"


def planted_set(
    rng: random.Random, pools: dict[str, list[str]], n_base: int, n_copies: int
) -> tuple[list[str], np.ndarray, list[str]]:
    """``(texts, family, variant)``: originals then copies, shuffled together; ``family[i]`` is the index
    of the original a document was made from (itself for originals), ``variant[i]`` "" for originals."""
    share = {"shakespeare": 0.3, "ruslit": 0.4, "gsm8k": 0.3}
    originals: list[str] = []
    for name, frac in share.items():
        originals += rng.sample(pools[name], min(len(pools[name]), round(n_base * frac)))
    vocab = sorted({w for d in originals[:2000] for w in d.split()})
    rows: list[tuple[str, int, str]] = [(t, i, "") for i, t in enumerate(originals)]
    for k, src in enumerate(rng.sample(range(len(originals)), n_copies)):
        variant = VARIANTS[k % len(VARIANTS)]
        text = originals[src]
        if variant in EDIT_RATES:
            copy = edit_words(rng, text, EDIT_RATES[variant], vocab)
        elif variant == "reorder":
            copy = reorder_sentences(rng, text)
        else:
            copy = insert_passage(rng, text, originals[rng.randrange(len(originals))])
        rows.append((copy, src, variant))
    rng.shuffle(rows)
    new_index = {}
    for i, (_, fam, var) in enumerate(rows):
        if not var:
            new_index[fam] = i
    family = np.array([new_index[fam] for _, fam, _ in rows], dtype=np.int64)
    return [r[0] for r in rows], family, [r[2] for r in rows]


# ------------------------------------------------------------------------------ quality


def true_jaccard(a: str, b: str) -> float:
    x, y = shingles(a, CFG), shingles(b, CFG)
    inter = len(np.intersect1d(x, y, assume_unique=True))
    union = len(x) + len(y) - inter
    return inter / union if union else 0.0


class Planted:
    """One seed's planted set, laid out in shard order (document ``i`` of the flat list is shard
    ``i % SHARDS``'s), with each variant's mean true Jaccard between copy and original."""

    def __init__(self, texts: list[str], family: np.ndarray, variant: list[str]) -> None:
        order = np.concatenate([np.arange(i, len(texts), SHARDS) for i in range(SHARDS)])
        remap = np.empty(len(texts), dtype=np.int64)
        remap[order] = np.arange(len(texts))
        self.shards = [texts[i::SHARDS] for i in range(SHARDS)]
        self.flat = [texts[i] for i in order]
        self.family = remap[family[order]]
        self.variant = [variant[i] for i in order]
        self.jaccard: dict[str, float | None] = {}
        for v in VARIANTS:
            idx = [i for i, x in enumerate(self.variant) if x == v]
            self.jaccard[v] = (
                float(np.mean([true_jaccard(self.flat[i], self.flat[self.family[i]]) for i in idx]))
                if idx
                else None
            )

    def write_jsonl(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True)
        for i, shard in enumerate(self.shards):
            with (folder / f"shard-{i:04d}.jsonl").open("w") as fh:
                for j, t in enumerate(shard):
                    fh.write(json.dumps({"id": f"{i}-{j}", "text": t}, ensure_ascii=False) + "\n")
        return sorted(folder.glob("shard-*.jsonl"))


def score(roots: np.ndarray, p: Planted) -> dict[str, Any]:
    """Pair precision / recall of a clustering against the planted families (see the module docstring)."""
    family, variant, texts = p.family, p.variant, p.flat
    n = len(roots)
    order = np.lexsort((family, roots))
    r, f = roots[order], family[order]
    _, cluster_sizes = np.unique(r, return_counts=True)
    predicted = int((cluster_sizes * (cluster_sizes - 1) // 2).sum())
    _, both = np.unique(np.stack([r, f], axis=1), axis=0, return_counts=True)
    true_pos = int((both * (both - 1) // 2).sum())
    _, fam_sizes = np.unique(family, return_counts=True)
    truth = int((fam_sizes * (fam_sizes - 1) // 2).sum())
    per_variant = {}
    for v in VARIANTS:
        idx = [i for i in range(n) if variant[i] == v]
        per_variant[v] = float(np.mean([roots[i] == roots[family[i]] for i in idx])) if idx else None
    # predicted pairs outside the planted families: natural near-duplicates or LSH false positives?
    rng = random.Random(0)
    false_pairs = []
    by_root = np.argsort(roots, kind="stable")
    heads = np.flatnonzero(np.diff(roots[by_root], prepend=-1) != 0)
    for members in np.split(by_root, heads[1:]):
        for a_i in range(len(members)):
            for b_i in range(a_i + 1, len(members)):
                a, b = members[a_i], members[b_i]
                if family[a] != family[b]:
                    false_pairs.append((a, b))
    sample = rng.sample(false_pairs, min(300, len(false_pairs)))
    natural = sum(true_jaccard(texts[a], texts[b]) >= 0.5 for a, b in sample)
    precision = true_pos / predicted if predicted else 1.0
    recall = true_pos / truth if truth else 1.0
    return {
        "docs": n,
        "planted_pairs": truth,
        "predicted_pairs": predicted,
        "true_pairs": true_pos,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "other_pairs": len(false_pairs),
        "other_pairs_natural_share": natural / len(sample) if sample else None,
        "per_variant": per_variant,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over seeds of each score (LSH is random: one seed's recall moves by points)."""

    def stats(xs: list[float]) -> dict[str, float]:
        return {"mean": round(float(np.mean(xs)), 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}

    out: dict[str, Any] = {"seeds": len(runs)}
    for key in ("precision", "recall", "f1", "predicted_pairs", "true_pairs", "planted_pairs"):
        out[key] = stats([float(r[key]) for r in runs])
    out["per_seed"] = {k: [round(float(r[k]), 4) for r in runs] for k in ("precision", "recall")}
    out["per_variant_recall"] = {
        v: stats([r["per_variant"][v] for r in runs if r["per_variant"][v] is not None]) for v in VARIANTS
    }
    shares = [r["other_pairs_natural_share"] for r in runs if r["other_pairs_natural_share"] is not None]
    out["other_pairs"] = int(sum(r["other_pairs"] for r in runs))
    out["other_pairs_natural_share"] = round(float(np.mean(shares)), 3) if shares else None
    return out


def _signed(x: float) -> str:
    return f"{'+' if x >= 0 else '−'}{abs(x):.3f}"


def _cell(s: dict[str, float], digits: int = 3) -> str:
    """``mean (min–max)``, or the mean alone for one seed or no spread."""
    if s["min"] == s["max"]:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


class UnionFind:
    """A plain dict-free union-find over ``n`` ids for the peers' candidate pairs (lowest id is root)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def moeforge_clusters(
    shards: list[list[str]], work: Path, cfg: MinHashConfig, verify_of: list[str] | None = None
) -> np.ndarray:
    files = []
    for t, texts in enumerate(shards):
        write_task_keys(work / f"task{t}.npy", minhash_band_keys(texts, cfg))
        files.append(work / f"task{t}.npy")
    of = None
    if verify_of is not None:
        flat = verify_of

        def of(idx: list[int]) -> dict[int, np.ndarray]:
            return {i: shingles(flat[i], cfg) for i in idx}

    return find_clusters(files, cfg, work / "reduce", shingles_of=of).root


def datasketch_clusters(
    shingle_sets: Iterator[list[bytes]], n: int, cfg: MinHashConfig, seed: int = 1
) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    sketches = []
    for i, m in enumerate(MinHash.generator(shingle_sets, num_perm=cfg.num_perm, seed=seed)):
        if not m.is_empty():
            lsh.insert(i, m, check_duplication=False)
        sketches.append(m)
    uf = UnionFind(n)
    for i, m in enumerate(sketches):
        if not m.is_empty():
            for j in lsh.query(m):
                uf.union(i, j)
    return uf.roots()


def python_shingles(text: str) -> list[bytes]:
    """moeforge's word 5-gram shingles as strings, in plain Python (datasketch's input)."""
    words = WORD_RE.findall(text.lower())
    n = CFG.ngram
    if len(words) < n:
        return [" ".join(words).encode()] if words else []
    return list({" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)})


def run_quality(args: argparse.Namespace, work: Path, results: _harness.Results, seeds: int) -> None:
    """Part (a): every system at every configuration of the sweep, ``seeds`` planted sets and hash seeds;
    rows, the quality table, one output check per configuration and the notes."""
    n_base, n_copies = (1500, 300) if args.quick else (6000, 1200)
    rng0 = random.Random(SEED)
    pools = base_documents(rng0)
    systems_of: dict[str, list[str]] = {}
    scores: dict[tuple[str, str], list[dict[str, Any]]] = {}
    found: dict[tuple[str, str], list[set[int]]] = {}  # planted copies whose pair a system found, per seed
    jaccard: dict[str, list[float]] = {v: [] for v in VARIANTS}
    has_ds, has_dt = _has("datasketch"), _has("datatrove")
    if not has_ds:
        print("datasketch not installed: pip install datasketch==2.0.0 (skipped)", file=sys.stderr)
    if not has_dt:
        print("datatrove not installed: pip install datatrove==0.10.1 (skipped)", file=sys.stderr)
    docs = 0
    for s in range(seeds):
        rng = rng0 if s == 0 else random.Random(SEED + s)
        p = Planted(*planted_set(rng, pools, n_base, n_copies))
        docs = len(p.flat)
        for v in VARIANTS:
            if p.jaccard[v] is not None:
                jaccard[v].append(p.jaccard[v])
        files = p.write_jsonl(work / f"seed{s}" / "corpus")
        copies = [i for i, v in enumerate(p.variant) if v]
        for label, cfg, verify in SWEEP:
            runs: dict[str, np.ndarray] = {}
            for name, check in (("moeforge", None), (f"moeforge+verify({verify})", verify)):
                d = work / f"seed{s}" / f"{name}-{cfg.ngram}"
                d.mkdir(parents=True)
                run_cfg = cfg.model_copy(update={"verify_jaccard": check, "seed": s})
                runs[name] = moeforge_clusters(p.shards, d, run_cfg, p.flat if check else None)
            if has_ds:
                hashes, offsets = shingle_batch(p.flat, cfg)
                sets = (
                    [x.tobytes() for x in np.unique(hashes[offsets[i] : offsets[i + 1]])]
                    for i in range(len(p.flat))
                )
                runs["datasketch"] = datasketch_clusters(sets, len(p.flat), cfg, s + 1)
            if has_dt:
                with open(os.devnull, "w") as sink, redirect_stdout(sink), redirect_stderr(sink):  # its stats
                    runs["datatrove"], _ = run_datatrove(
                        files,
                        work / f"seed{s}" / f"dt{cfg.ngram}",
                        "whitespace",
                        [len(x) for x in p.shards],
                        cfg,
                        s + 1,
                    )
            systems_of[label] = list(runs)
            for name, roots in runs.items():
                scores.setdefault((label, name), []).append(score(roots, p))
                found.setdefault((label, name), []).append(
                    {i for i in copies if roots[i] == roots[p.family[i]]}
                )

    j_mean = {v: float(np.mean(xs)) if xs else None for v, xs in jaccard.items()}
    columns = ["configuration", "system", "precision", "recall", "F1"]
    columns += [f"{VARIANT_LABELS[v]} (J≈{j_mean[v]:.2f})" for v in VARIANTS if j_mean[v] is not None]
    columns.append("other pairs (share natural)")
    table: list[list[Any]] = []
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    for label, cfg, _ in SWEEP:
        curve = lsh_curve(cfg.bands, cfg.rows, [0.6, 0.8])
        for name in systems_of.get(label, []):
            sm = summarize(scores[(label, name)])
            summaries[(label, name)] = sm
            results.row(
                part="quality",
                config=label,
                ngram=cfg.ngram,
                bands=cfg.bands,
                rows=cfg.rows,
                threshold=round(curve.threshold, 3),
                system=name,
                docs=docs,
                **sm,
                variant_jaccard={v: round(x, 3) for v, x in j_mean.items() if x is not None},
            )
            pv = sm["per_variant_recall"]
            other = sm["other_pairs"]
            share = sm["other_pairs_natural_share"]
            table.append(
                [label, name, _cell(sm["precision"]), _cell(sm["recall"]), _cell(sm["f1"])]
                + [_cell(pv[v], 2) for v in VARIANTS if j_mean[v] is not None]
                + [f"{other:,}" + ("" if share is None else f" ({share:.2f})")]
            )
        # the output check: what each side finds of the planted pairs, against moeforge
        ours = found.get((label, "moeforge"))
        if ours is None:
            continue
        verdict: dict[str, str] = {}
        m = summaries[(label, "moeforge")]
        for name in systems_of[label]:
            sm = summaries[(label, name)]
            text = f"precision {_cell(sm['precision'])}, recall {_cell(sm['recall'])}"
            if name != "moeforge":
                theirs = found[(label, name)]
                both = sum(len(a & b) for a, b in zip(ours, theirs, strict=True))
                only_ours = sum(len(a - b) for a, b in zip(ours, theirs, strict=True))
                only_theirs = sum(len(b - a) for a, b in zip(ours, theirs, strict=True))
                why = (
                    "verification drops candidate pairs below its Jaccard cut: expected"
                    if name.startswith("moeforge")
                    else "other hash functions, so other candidate pairs: expected"
                )
                text += (
                    f" (moeforge: precision {m['precision']['mean']:.3f}, recall {m['recall']['mean']:.3f}); "
                    f"planted pairs found by both {both}, by moeforge only {only_ours}, by {name} only "
                    f"{only_theirs} — differs ({why})"
                    if only_ours or only_theirs
                    else f"; the same planted pairs as moeforge ({both})"
                )
            verdict[name] = text
        results.check(
            f"quality at {label}, planted pairs found"
            + (f" (mean over {seeds} seeds, min–max)" if seeds > 1 else " (one seed)"),
            verdict,
        )
        results.note(
            f"{label}: threshold (1/b)^(1/r) = {curve.threshold:.3f}; P(candidate) = "
            f"{curve.probability[1]:.3f} at J = 0.8 and {curve.probability[0]:.3f} at J = 0.6."
        )
        for peer in ("datasketch", "datatrove"):
            if (label, peer) not in summaries:
                continue
            t = summaries[(label, peer)]
            diffs = [a - b for a, b in zip(m["per_seed"]["recall"], t["per_seed"]["recall"], strict=True)]
            mean = float(np.mean(diffs))
            if seeds > 1:
                lower = sum(d < 0 for d in diffs)
                higher = sum(d > 0 for d in diffs)
                per_seed = (
                    f"per seed {_signed(min(diffs))} to {_signed(max(diffs))}: lower in {lower}, higher in "
                    f"{higher} of {seeds} seeds"
                )
            else:
                per_seed = "one seed"
            results.note(
                f"{label}: moeforge's recall is {m['recall']['mean']:.3f} against {peer}'s "
                f"{t['recall']['mean']:.3f}, a difference of {_signed(mean)} ({per_seed}), at precision "
                f"{m['precision']['mean']:.3f} against {t['precision']['mean']:.3f}."
            )
    results.table(
        f"Quality: {docs:,} documents per seed ({n_copies:,} of them planted copies), {seeds} "
        f"seed{'s' * (seeds > 1)}, each with its own planted set and hash seed; mean over the seeds "
        "(min–max). Per-variant columns are recall; J≈ is the variant's mean true Jaccard of word 5-grams. "
        "Other pairs: predicted pairs outside the planted ones, summed over the seeds, and the share of a "
        "sample of them with true Jaccard ≥ 0.5.",
        columns,
        table,
    )


# ------------------------------------------------------------------------------ throughput corpus


def throughput_corpus(work: Path, size_mb: int) -> list[Path]:
    """The pipeline benchmark's corpus when present, else one built here (cached under ``work``)."""
    shared = PIPELINE_CORPUS / f"corpus-v1-{size_mb}mb-{SHARDS}x"
    manifest = shared / "manifest.json"
    if manifest.exists():
        meta = json.loads(manifest.read_text())
        files = [Path(f) for f in meta.get("files", [])]
        sizes = meta.get("file_sizes", [])
        if len(files) == SHARDS and all(
            f.exists() and f.stat().st_size == s for f, s in zip(files, sizes, strict=False)
        ):
            return files
    out = work / f"corpus-{size_mb}mb-{SHARDS}x"
    done = out / "done.json"
    if done.exists():
        return [Path(p) for p in json.loads(done.read_text())["files"]]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(SEED + 1)
    pools = base_documents(rng)
    kinds = list(pools)
    vocab = sorted({w for d in pools["shakespeare"][:500] for w in d.split()})
    paths = [out / f"shard-{i:04d}.jsonl" for i in range(SHARDS)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    recent: list[str] = []
    total = docs = 0
    try:
        while total < size_mb * MB:
            roll = rng.random()
            if recent and roll < 0.05:
                text = rng.choice(recent)
            elif recent and roll < 0.10:
                text = edit_words(rng, rng.choice(recent), rng.uniform(0.01, 0.1), vocab)
            else:
                pool = pools[rng.choices(kinds, weights=[0.35, 0.45, 0.2])[0]]
                k = rng.randint(1, 3)
                start = rng.randrange(len(pool) - k)
                text = "\n\n".join(pool[start : start + k])
                recent = [*recent[-4095:], text]
            line = json.dumps({"id": f"nd-{docs:08d}", "text": text}, ensure_ascii=False) + "\n"
            handles[docs % SHARDS].write(line)
            total += len(line.encode())
            docs += 1
    finally:
        for h in handles:
            h.close()
    done.write_text(json.dumps({"files": [str(p) for p in paths], "docs": docs}))
    return paths


def iter_texts(path: Path) -> Iterator[str]:
    with path.open("rb") as fh:
        for line in fh:
            yield json.loads(line)["text"]


# ------------------------------------------------------------------------------ systems (children)


def child_moeforge(files: list[Path], out: Path) -> dict[str, Any]:
    stages = {"read": 0.0, "hash": 0.0, "write": 0.0, "cluster": 0.0, "survivors": 0.0}
    key_files, lengths = [], []
    text_bytes = 0
    for t, path in enumerate(files):
        t0 = time.perf_counter()
        texts = list(iter_texts(path))
        t1 = time.perf_counter()
        keys = minhash_band_keys(texts, CFG)
        t2 = time.perf_counter()
        write_task_keys(out / f"task{t:05d}.npy", keys)
        key_files.append(out / f"task{t:05d}.npy")
        t3 = time.perf_counter()
        lengths.append(np.fromiter((len(x) for x in texts), dtype=np.int64, count=len(texts)))
        text_bytes += sum(len(x.encode()) for x in texts)
        del texts
        stages["read"] += t1 - t0
        stages["hash"] += t2 - t1
        stages["write"] += t3 - t2
    t0 = time.perf_counter()
    result = find_clusters(key_files, CFG, out / "reduce")
    t1 = time.perf_counter()
    n = len(result.root)
    keep = choose_survivors(
        result, np.concatenate(lengths), np.zeros(n), np.zeros(n, dtype=bool), "keep_first"
    )
    t2 = time.perf_counter()
    stages["cluster"], stages["survivors"] = t1 - t0, t2 - t1
    np.save(out / "roots.npy", result.root)
    return {
        "docs": n,
        "text_bytes": text_bytes,
        "stages_s": {k: round(v, 2) for k, v in stages.items()},
        "clusters": result.stats.clusters,
        "removed": int(n - keep.sum()),
        "star_pairs_all_bands": result.stats.candidate_pairs,
        "reduce_peak_bytes_estimate": result.stats.peak_bytes,
        "disk_bytes_per_doc": round(sum(f.stat().st_size for f in key_files) / max(n, 1), 1),
    }


def child_datasketch(files: list[Path], out: Path) -> dict[str, Any]:
    counts = []
    text_bytes = 0

    def sets() -> Iterator[list[bytes]]:
        nonlocal text_bytes
        for path in files:
            c = 0
            for text in iter_texts(path):
                text_bytes += len(text.encode())
                c += 1
                yield python_shingles(text)
            counts.append(c)

    t0 = time.perf_counter()
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=CFG.num_perm, params=(CFG.bands, CFG.rows))
    sketches = []
    for i, m in enumerate(MinHash.generator(sets(), num_perm=CFG.num_perm, seed=1)):
        if not m.is_empty():
            lsh.insert(i, m, check_duplication=False)
        sketches.append(m)
    t1 = time.perf_counter()
    n = len(sketches)
    uf = UnionFind(n)
    pairs = 0
    for i, m in enumerate(sketches):
        if not m.is_empty():
            for j in lsh.query(m):
                if j != i:
                    pairs += 1
                    uf.union(i, j)
    roots = uf.roots()
    t2 = time.perf_counter()
    np.save(out / "roots.npy", roots)
    return {
        "docs": n,
        "text_bytes": text_bytes,
        "stages_s": {"read+shingle+minhash+insert": round(t1 - t0, 2), "query+cluster": round(t2 - t1, 2)},
        "clusters": len(np.unique(roots[roots != np.arange(n)])),
        "removed": int((roots != np.arange(n)).sum()),
        "distinct_candidate_pairs": pairs // 2,
    }


def _whitespace_tokenizer() -> Any:
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return WhitespaceWords("en")


def _xxhash_str_shim() -> None:
    """datatrove 0.10.1 hashes ``str`` shingles with xxhash, which xxhash ≥ 4 refuses ("Strings must be
    encoded before hashing"); xxhash 3 encoded them as UTF-8 itself, so encoding here costs the same."""
    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash

    try:
        xxhash.xxh64_intdigest("")
    except TypeError:
        dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(
            data.encode() if isinstance(data, str) else data
        )
        dt_xxhash.xxhash32 = lambda data: xxhash.xxh32_intdigest(
            data.encode() if isinstance(data, str) else data
        )


def run_datatrove(
    files: list[Path],
    out: Path,
    words: str,
    shard_docs: list[int] | None = None,
    cfg: MinHashConfig = CFG,
    seed: int = 1,
) -> tuple[np.ndarray, dict[str, float]]:
    """datatrove's MinHash steps 1–3 over ``files`` (one task each); per-document roots (lowest global
    index of the cluster) and the wall seconds of each step."""
    import logging as _logging

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.logging import logger

    logger.remove()  # its per-task logs go to the logging_dir files
    _xxhash_str_shim()
    _logging.getLogger().setLevel(_logging.WARNING)
    shutil.rmtree(out, ignore_errors=True)
    config = MinhashConfig(
        n_grams=cfg.ngram,
        num_buckets=cfg.bands,
        hashes_per_bucket=cfg.rows,
        hash_config=HashConfig(precision=64),
        seed=seed,
    )
    language = _whitespace_tokenizer() if words == "whitespace" else "en"
    folder = str(files[0].parent)
    names = {f.name for f in files}
    common: dict[str, Any] = {"skip_completed": False, "workers": 1}
    stage1 = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(folder, glob_pattern="shard-*.jsonl", text_key="text", id_key="id"),
            MinhashDedupSignature(str(out / "sigs"), config=config, language=language),
        ],
        tasks=len(files),
        logging_dir=str(out / "logs/1"),
        **common,
    )
    if len(names) != len(list(files[0].parent.glob("shard-*.jsonl"))):
        raise SystemExit(f"{folder} holds other shard files than the {len(files)} to run")
    stage2 = LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=config)],
        tasks=cfg.bands,
        logging_dir=str(out / "logs/2"),
        **common,
    )
    stage3 = LocalPipelineExecutor(
        pipeline=[
            MinhashDedupCluster(
                str(out / "buckets"), str(out / "clusters"), config=config, save_cluster_id=True
            )
        ],
        tasks=1,
        logging_dir=str(out / "logs/3"),
        **common,
    )
    times = {}
    for name, stage in (("signatures", stage1), ("buckets", stage2), ("clusters", stage3)):
        t0 = time.perf_counter()
        stage.run()
        times[name] = round(time.perf_counter() - t0, 2)
    if shard_docs is None:
        shard_docs = [sum(1 for _ in f.open("rb")) for f in files]
    starts = np.concatenate([[0], np.cumsum(shard_docs)]).astype(np.int64)
    roots = np.arange(int(starts[-1]), dtype=np.int64)
    cluster_members: dict[int, list[int]] = {}
    for path in sorted((out / "clusters").glob("*.clusters")):
        rank = int(path.name.split(".")[0])
        pairs = np.fromfile(path, dtype="<u4").reshape(-1, 2)
        for doc, cid in pairs.tolist():
            cluster_members.setdefault(cid, []).append(int(starts[rank]) + doc)
    for members in cluster_members.values():
        roots[members] = min(members)
    return roots, times


def child_datatrove(files: list[Path], out: Path, words: str) -> dict[str, Any]:
    roots, times = run_datatrove(files, out / "dt", words)
    n = len(roots)
    text_bytes = sum(len(t.encode()) for f in files for t in iter_texts(f))
    np.save(out / "roots.npy", roots)
    return {
        "docs": n,
        "text_bytes": text_bytes,
        "stages_s": times,
        "clusters": len(np.unique(roots[roots != np.arange(n)])),
        "removed": int((roots != np.arange(n)).sum()),
    }


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ parent: run, measure


def _tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (kB)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_child(system: str, files: list[Path], out: Path, log_dir: Path) -> dict[str, Any]:
    """Run one system in a child process (``out`` made empty beforehand); return its report plus wall,
    CPU, peak RSS and a digest of the clusters it wrote."""
    cmd = [sys.executable, __file__, "--_child", system, "--_out", str(out), *map(str, files)]
    log = (log_dir / f"{system}.log").open("w")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    log.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{system} failed (exit {proc.returncode}); see {log_dir / f'{system}.log'}")
    report = next(
        json.loads(ln[len(RESULT_TAG) :]) for ln in stdout.splitlines() if ln.startswith(RESULT_TAG)
    )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    roots = np.load(out / "roots.npy")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": peak / 1024,
        "roots_sha256": hashlib.sha256(roots.tobytes()).hexdigest()[:16],
        **report,
    }


def removed_set(path: Path) -> np.ndarray:
    """The documents a system removes (every cluster member but the lowest index)."""
    roots = np.load(path)
    return np.flatnonzero(roots != np.arange(len(roots)))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sets of removed documents."""
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b)) / union if union else 1.0


def run_throughput(
    args: argparse.Namespace, work: Path, results: _harness.Results, rounds: int, systems: list[str]
) -> None:
    """Part (b): every system in a child process, ``rounds`` interleaved rounds; checks, rows, table,
    goal and notes."""
    size = args.size_mb or (8 if args.quick else 100)
    files = throughput_corpus(work, size)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    reports: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    outs = {s: work / "runs" / s for s in systems}

    def contender(system: str) -> Callable[[], None]:
        chosen = files[: len(files) // 2] if system == "moeforge_half" else files

        def run() -> None:
            reports[system].append(run_child(system, chosen, outs[system], logs))

        return run

    def fresh(system: str) -> None:
        shutil.rmtree(outs[system], ignore_errors=True)
        outs[system].mkdir(parents=True)

    timings = _harness.interleave({s: contender(s) for s in systems}, rounds, warmup=0, before=fresh)

    # outputs first: each system's clusters the same in every round, then each peer against moeforge
    same: dict[str, str] = {}
    for s in systems:
        digests = {f"round {i + 1}": r["roots_sha256"] for i, r in enumerate(reports[s])}
        verdict = _harness.check_same(digests, "round 1")
        same[s] = (
            "same clusters in every round" if all(v == "same" for v in verdict.values()) else str(verdict)
        )
    results.check("throughput corpus, each system round to round", same)
    removed = {s: removed_set(outs[s] / "roots.npy") for s in systems}
    agree: dict[str, float] = {}
    if "moeforge" in systems:
        verdict_peers: dict[str, str] = {}
        for s in systems:
            if s in PEERS:
                agree[s] = agreement(removed["moeforge"], removed[s])
                both = len(np.intersect1d(removed["moeforge"], removed[s]))
                verdict_peers[s] = (
                    f"removes {len(removed[s]):,} documents, moeforge {len(removed['moeforge']):,}, both "
                    f"{both:,}: agreement (Jaccard of the removed sets) {agree[s]:.3f}"
                    + (
                        " — differs (other hash functions and tokenization: expected)"
                        if agree[s] < 1.0
                        else ""
                    )
                )
        if verdict_peers:
            results.check("throughput corpus, documents removed against moeforge's", verdict_peers)

    mb = {s: reports[s][0]["text_bytes"] / MB for s in systems}
    ratios = {
        s: _harness.paired_ratio(timings["moeforge"], timings[s])
        for s in systems
        if s in PEERS and "moeforge" in systems
    }
    cpu_ratio = {
        s: statistics.median(
            t["cpu_s"] / o["cpu_s"] for o, t in zip(reports["moeforge"], reports[s], strict=True)
        )
        for s in ratios
    }
    table: list[list[Any]] = []
    for s in systems:
        rep, t = reports[s], timings[s]
        first = rep[0]
        docs = first["docs"]
        stages = {k: round(statistics.median(r["stages_s"][k] for r in rep), 2) for k in first["stages_s"]}
        extra = {
            k: v
            for k, v in first.items()
            if k not in ("docs", "text_bytes", "stages_s", "wall_s", "cpu_s", "peak_rss_mb", "roots_sha256")
        }
        row = results.row(
            part="throughput",
            system=s,
            docs=docs,
            mb=round(mb[s], 2),
            **t.as_dict(3),
            docs_per_s=round(t.rate(docs), 1),
            mb_per_s=round(t.rate(mb[s]), 3),
            cpu_s=round(statistics.median(r["cpu_s"] for r in rep), 2),
            peak_rss_mb=round(statistics.median(r["peak_rss_mb"] for r in rep), 1),
            peak_rss_mb_max=round(max(r["peak_rss_mb"] for r in rep), 1),
            stages_s=stages,
            **extra,
            **({"agreement": round(agree[s], 4)} if s in agree else {}),
            **(
                {"speedup": ratios[s].as_dict(), "cpu_speedup": round(cpu_ratio[s], 3)} if s in ratios else {}
            ),
        )
        r = ratios.get(s)
        table.append(
            [
                "moeforge, first half of the shards" if s == "moeforge_half" else s,
                docs,
                round(t.median, 2),
                f"{100 * t.spread:.0f}%",
                row["docs_per_s"],
                row["mb_per_s"],
                row["cpu_s"],
                row["peak_rss_mb"],
                f"{r.median:.2f}× ({r.low:.2f}–{r.high:.2f})" if r else "–",
                f"{cpu_ratio[s]:.2f}×" if s in cpu_ratio else "–",
                first["clusters"],
                first["removed"],
                f"{agree[s]:.3f}" if s in agree else "–",
            ]
        )
    full = reports.get("moeforge", [{}])[0]
    results.table(
        f"Throughput: {mb.get('moeforge', max(mb.values())):.1f} MB, {full.get('docs', 0):,} documents in "
        f"{SHARDS} shards; read + shingles + signatures + LSH + clusters, each system in a child process on one "
        f"core; median of {rounds} interleaved round{'s' * (rounds > 1)} (spread = (max − min) / median). "
        "Speed-up: moeforge's docs/s over the system's, the median of the per-round ratios (lowest–highest "
        "round); CPU: the same for CPU seconds. Agreement: Jaccard of the sets of documents removed, against "
        "moeforge's.",
        [
            "system",
            "docs",
            "wall s",
            "spread",
            "docs/s",
            "MB/s",
            "CPU s",
            "peak RSS MB",
            "moeforge's speed-up",
            "CPU",
            "clusters",
            "removed",
            "agreement",
        ],
        table,
    )
    if "datasketch" in ratios:
        r = ratios["datasketch"]
        results.goal(
            f"MinHash docs/s ÷ datasketch's ({size} MB, one core each)",
            r.median,
            GOAL_VS_DATASKETCH,
            spread=(r.low, r.high),
        )
    if ratios:
        parts = [
            f"{ratios[s].median:.2f}× {s}'s (rounds {ratios[s].low:.2f}–{ratios[s].high:.2f}; "
            f"{cpu_ratio[s]:.2f}× in CPU seconds)"
            for s in ratios
        ]
        results.note("moeforge's docs/s is " + ", ".join(parts) + ".")
    if "moeforge" in reports and "moeforge_half" in reports:
        ours, half = reports["moeforge"], reports["moeforge_half"]
        d_docs = ours[0]["docs"] - half[0]["docs"]
        d_rss = statistics.median(r["peak_rss_mb"] for r in ours) - statistics.median(
            r["peak_rss_mb"] for r in half
        )
        per_doc = d_rss * 2**20 / max(d_docs, 1)
        results.row(
            part="memory", rss_growth_bytes_per_doc=round(per_doc, 1), docs=[half[0]["docs"], ours[0]["docs"]]
        )
        results.note(
            f"moeforge's band keys take {ours[0]['disk_bytes_per_doc']:.0f} bytes per document on disk "
            f"(an 8-byte key and a 4-byte row number in each of {CFG.bands} bands, plus the .npy header); its "
            "median peak RSS changed by "
            f"{per_doc:+.1f} bytes per document between the first half of the shards "
            f"({half[0]['docs']:,} documents) and all of them ({ours[0]['docs']:,})."
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _harness.add_common_args(p, rounds=3)
    p.add_argument("--seeds", type=int, default=None, help="quality seeds (default 3, --quick 1)")
    p.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    p.add_argument("--size-mb", type=int, default=None, help="throughput corpus size (default 100, quick 8)")
    p.add_argument("--work", default="/tmp/moeforge-bench-neardup", help="cache dir for corpus and outputs")
    p.add_argument("--skip", default="", help="comma-separated systems to skip (or 'quality')")
    p.add_argument("--spacy", action="store_true", help="also run datatrove with its spaCy word tokenizer")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._child:
        files, out = [Path(f) for f in args.files], Path(args._out)
        if args._child.startswith("moeforge"):
            report = child_moeforge(files, out)
        elif args._child == "datasketch":
            report = child_datasketch(files, out)
        else:
            report = child_datatrove(files, out, "whitespace" if args._child == "datatrove_ws" else "spacy")
        print(RESULT_TAG + json.dumps(report), flush=True)
        return

    rounds = min(args.rounds, 2) if args.quick else args.rounds
    seeds = args.seeds or (1 if args.quick else 3)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results = _harness.Results(
        "near_dedup", args, title="MinHash near-duplicates vs datasketch and datatrove"
    )
    systems = ["moeforge_half", "moeforge", "datasketch", "datatrove_ws"]
    if args.spacy:
        if _has("spacy"):
            systems.append("datatrove")
        else:
            print("spacy not installed: datatrove with its spaCy words skipped", file=sys.stderr)
    for system in list(systems):
        missing = (
            "datasketch" if system == "datasketch" else "datatrove" if system.startswith("datatrove") else ""
        )
        if system in skip or (missing and not _has(missing)):
            if missing and system not in skip:
                print(f"{missing} not installed: {system} skipped", file=sys.stderr)
            systems.remove(system)

    with _harness.cpu_hog(args.busy):
        if "quality" not in skip:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                run_quality(args, Path(tmp), results, seeds)
        if systems:
            run_throughput(args, work, results, rounds, systems)
    results.write()
    if args.markdown:
        print(results.markdown())


if __name__ == "__main__":
    main()
