"""Near-duplicate detection: moeforge's MinHash LSH against datasketch and datatrove.

**(a) Quality** on a planted set built from the shared real data (``$MOEFORGE_REAL_DATA`` or
``<project>/../shared/data``): Shakespeare speaker turns grouped into 1–3 KB documents, RusLit
paragraphs grouped the same way, GSM8K problems one per document; exact repeats removed. A sample of
them gets one planted copy each, the variant cycling through: 5 / 10 / 20 / 30 % of words edited
(substituted, deleted or inserted at random positions), sentences shuffled, or a passage of another
document (~20 % of the length) inserted. Ground truth: each original and its copy. Scores are over
pairs of documents put in one cluster: precision = planted pairs among them, recall = planted pairs
found; recall is also given per variant, with the mean true Jaccard (word 5-grams) of that variant,
so the S-curve can be read off. Predicted pairs outside the planted ones are checked for true Jaccard
≥ 0.5 (natural near-duplicates in the sources, not LSH errors). All systems use word 5-grams and
16 bands × 8 rows (128 permutations), and again word 3-grams with 32 × 4 (threshold 0.42, for the
heavier edits): ``moeforge``, ``moeforge+verify`` (candidate pairs below true Jaccard 0.8, resp. 0.3,
dropped), ``datasketch`` (``MinHashLSH(params=(b, r))`` over ``MinHash`` objects of exactly moeforge's
shingle sets, so only the hashing and banding differ; clusters by union-find over ``query`` results)
and ``datatrove`` (the first three steps of its MinHash pipeline, its own text normalisation,
whitespace words after it).

**(b) Throughput and memory** on a ≥ ``--size-mb`` MB JSONL corpus in 8 shards: the pipeline
benchmark's corpus (``/tmp/moeforge-bench-pipeline/corpus-v1-<size>mb-8x``) when it exists, else one
built here the same way (seeded; 5 % exact and 5 % near copies). Each system runs alone in a child
process, one task at a time (one core); the parent samples the child's process tree every 0.05 s for
peak RSS. Everything from reading the JSONL to the clusters is timed:

- ``moeforge``: per shard read → :func:`minhash_band_keys` → :func:`write_task_keys`; then
  :func:`find_clusters` and :func:`choose_survivors` (keep_first). Also run on the first half of the
  shards, so the RSS growth per document can be read off (``rss_per_doc_b``).
- ``datasketch``: words by regex (moeforge's definition), 5-gram strings, ``MinHash.generator``
  (affine32 scheme, sha1) → ``MinHashLSH.insert``, then ``query`` per document → union-find.
- ``datatrove_ws``: ``JsonlReader`` → ``MinhashDedupSignature`` (whitespace word tokenizer after its
  ``simplify_text``, which already strips punctuation) → ``MinhashDedupBuckets`` (16 tasks) →
  ``MinhashDedupCluster``, ``LocalPipelineExecutor(workers=1)``. Its fourth step (re-read and filter
  the corpus) is left out, as moeforge's counterpart (the reduce's rewrite) is.
- ``datatrove``: the same with its default English word tokenizer (spaCy), with ``--spacy``.

Each line printed is JSON: one per quality system, one per throughput system (docs, MB, seconds,
CPU seconds, docs/s, MB/s, peak RSS, clusters, documents removed, agreement with moeforge's removed
set), and a final ``{"ratio": ...}`` line: moeforge's docs/s over each peer's, and recall
differences at the precision each reached. ``--markdown`` also prints the tables. The machine's load
average is printed at the start and the end.

Run: ``python benchmarks/near_dedup.py [--quick] [--markdown] [--size-mb 100] [--spacy]``. Needs
``datasketch==2.0.0`` and ``datatrove==0.10.1`` (+ ``spacy`` for its default tokenizer); a missing
peer is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

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
EDIT_RATES = {"edit5": 0.05, "edit10": 0.10, "edit20": 0.20, "edit30": 0.30}
SHARDS = 8
RESULT_TAG = "@@near-dedup@@ "
PIPELINE_CORPUS = Path("/tmp/moeforge-bench-pipeline")
MB = 1e6
WORD_RE = re.compile(r"[^\W_]+")  # letters and digits: moeforge's word definition (less combining marks)
CFG = MinHashConfig(enabled=True)  # the defaults: word 5-grams, 16 bands × 8 rows, threshold 0.707
# a recall-oriented operating point for the quality table: word 3-grams, 32 × 4, threshold 0.420
LOW = MinHashConfig(enabled=True, ngram=3, bands=32, rows=4)


def data_root() -> Path:
    """``$MOEFORGE_REAL_DATA`` if set, else ``<project>/../shared/data``."""
    env = os.environ.get("MOEFORGE_REAL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def load_avg() -> float:
    return os.getloadavg()[0]


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


def planted_set(rng: random.Random, n_base: int, n_copies: int) -> tuple[list[str], np.ndarray, list[str]]:
    """``(texts, family, variant)``: originals then copies, shuffled together; ``family[i]`` is the index
    of the original a document was made from (itself for originals), ``variant[i]`` "" for originals."""
    pools = base_documents(rng)
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


def true_jaccard(a: str, b: str) -> float:
    x, y = shingles(a, CFG), shingles(b, CFG)
    inter = len(np.intersect1d(x, y, assume_unique=True))
    union = len(x) + len(y) - inter
    return inter / union if union else 0.0


def score(
    name: str, roots: np.ndarray, family: np.ndarray, variant: list[str], texts: list[str], seconds: float
) -> dict[str, Any]:
    """Pair precision / recall of a clustering against the planted families (see the module docstring)."""
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
        found = [roots[i] == roots[family[i]] for i in idx]
        per_variant[v] = {
            "recall": round(float(np.mean(found)), 4) if idx else None,
            "jaccard": round(float(np.mean([true_jaccard(texts[i], texts[family[i]]) for i in idx])), 3)
            if idx
            else None,
        }
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
        "part": "quality",
        "system": name,
        "docs": n,
        "planted_pairs": truth,
        "predicted_pairs": predicted,
        "true_pairs": true_pos,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0,
        "other_pairs_natural_share": round(natural / len(sample), 3) if sample else None,
        "per_variant": per_variant,
        "seconds": round(seconds, 2),
    }


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


def average(name: str, label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of several seeds' scores (LSH is random: one seed's recall moves by a few points)."""
    out = json.loads(json.dumps(runs[0])) | {"system": name + label, "seeds": len(runs)}
    for key in ("predicted_pairs", "true_pairs", "precision", "recall", "f1", "seconds"):
        out[key] = round(float(np.mean([r[key] for r in runs])), 4)
    for v in VARIANTS:
        out["per_variant"][v]["recall"] = round(
            float(np.mean([r["per_variant"][v]["recall"] for r in runs])), 4
        )
    shares = [r["other_pairs_natural_share"] for r in runs if r["other_pairs_natural_share"] is not None]
    out["other_pairs_natural_share"] = round(float(np.mean(shares)), 3) if shares else None
    return out


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


def run_quality(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    n_base, n_copies = (1500, 300) if args.quick else (6000, 1200)
    texts, family, variant = planted_set(rng, n_base, n_copies)
    shards = [texts[i::SHARDS] for i in range(SHARDS)]
    order = np.concatenate([np.arange(i, len(texts), SHARDS) for i in range(SHARDS)])
    remap = np.empty(len(texts), dtype=np.int64)
    remap[order] = np.arange(len(texts))
    fam = remap[family[order]]
    var = [variant[i] for i in order]
    flat = [texts[i] for i in order]
    rows = []
    corpus = work / "quality-corpus"
    corpus.mkdir(parents=True)
    for i, shard in enumerate(shards):
        with (corpus / f"shard-{i:04d}.jsonl").open("w") as fh:
            for j, t in enumerate(shard):
                fh.write(json.dumps({"id": f"{i}-{j}", "text": t}, ensure_ascii=False) + "\n")
    seeds = range(1 if args.quick else 3)
    for label, cfg in (("", CFG), (" 3g/32×4", LOW)):
        for name, verify in (("moeforge", None), ("moeforge+verify", 0.8 if cfg is CFG else 0.3)):
            runs = []
            for seed in seeds:
                d = work / f"quality-{name}{cfg.ngram}-{seed}"
                d.mkdir(parents=True)
                run_cfg = cfg.model_copy(update={"verify_jaccard": verify, "seed": seed})
                t0 = time.perf_counter()
                roots = moeforge_clusters(shards, d, run_cfg, flat if verify else None)
                runs.append(score("", roots, fam, var, flat, time.perf_counter() - t0))
            rows.append(average(f"{name}({verify})" if verify else name, label, runs))
        if _has("datasketch"):
            runs = []
            for seed in seeds:
                t0 = time.perf_counter()
                hashes, offsets = shingle_batch(flat, cfg)
                sets = (
                    [x.tobytes() for x in np.unique(hashes[offsets[i] : offsets[i + 1]])]
                    for i in range(len(flat))
                )
                roots = datasketch_clusters(sets, len(flat), cfg, seed + 1)
                runs.append(score("", roots, fam, var, flat, time.perf_counter() - t0))
            rows.append(average("datasketch", label, runs))
        else:
            print("datasketch not installed: pip install datasketch==2.0.0", file=sys.stderr)
        if _has("datatrove"):
            files = sorted(corpus.glob("shard-*.jsonl"))
            runs = []
            for seed in seeds:
                t0 = time.perf_counter()
                with open(os.devnull, "w") as sink, redirect_stdout(sink), redirect_stderr(sink):  # its stats
                    roots, _ = run_datatrove(
                        files, work / f"qdt{cfg.ngram}", "whitespace", [len(s) for s in shards], cfg, seed + 1
                    )
                runs.append(score("", roots, fam, var, flat, time.perf_counter() - t0))
            rows.append(average("datatrove", label, runs))
    return rows


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
    """Run one system in a child process; return its report plus wall, CPU and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
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
    docs, mb = report["docs"], report["text_bytes"] / MB
    return {
        "part": "throughput",
        "system": system,
        "docs": docs,
        "mb": round(mb, 1),
        "seconds": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "docs_per_s": round(docs / wall, 1),
        "mb_per_s": round(mb / wall, 2),
        "peak_rss_mb": round(peak / 1024, 1),
        **{k: v for k, v in report.items() if k not in ("docs", "text_bytes")},
    }


def agreement(a: Path, b: Path) -> float:
    """Jaccard of the sets of documents two systems remove (not a cluster's lowest index)."""
    ra, rb = np.load(a), np.load(b)
    idx = np.arange(len(ra))
    sa, sb = ra != idx, rb != idx
    union = int((sa | sb).sum())
    return round(int((sa & sb).sum()) / union, 4) if union else 1.0


def markdown(quality: list[dict[str, Any]], speed: list[dict[str, Any]], load: tuple[float, float]) -> str:
    curve, low = lsh_curve(CFG.bands, CFG.rows), lsh_curve(LOW.bands, LOW.rows)
    lines = [
        f"Defaults: word 5-grams, {CFG.bands} bands × {CFG.rows} rows (threshold {curve.threshold:.3f}); "
        f"rows marked 3g/32×4: word 3-grams, 32 × 4 (threshold {low.threshold:.3f}). "
        "J≈ is the variant's mean true Jaccard of word 5-grams. "
        f"Load average {load[0]:.2f} at the start, {load[1]:.2f} at the end.",
        "",
        "| system | docs | precision | recall | F1 | "
        + " | ".join(f"{v} (J≈)" for v in VARIANTS)
        + " | other pairs natural | s |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(VARIANTS) + "---:|---:|",
    ]
    for q in quality:
        pv = q["per_variant"]
        cells = " | ".join(f"{pv[v]['recall']:.2f} ({pv[v]['jaccard']:.2f})" for v in VARIANTS)
        natural = q["other_pairs_natural_share"]
        lines.append(
            f"| {q['system']} | {q['docs']} | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} | "
            f"{cells} | {'–' if natural is None else f'{natural:.2f}'} | {q['seconds']:.1f} |"
        )
    lines += [
        "",
        "| system | docs | MB | wall s | CPU s | docs/s | MB/s | peak RSS MB | clusters | removed | "
        "agreement | stages (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in speed:
        stages = ", ".join(f"{k} {v}" for k, v in s["stages_s"].items())
        lines.append(
            f"| {s['system']} | {s['docs']} | {s['mb']} | {s['seconds']} | {s['cpu_s']} | "
            f"{s['docs_per_s']} | {s['mb_per_s']} | {s['peak_rss_mb']} | {s['clusters']} | {s['removed']} | "
            f"{s.get('agreement', '–')} | {stages} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small planted set, 16 MB corpus, no spaCy run")
    p.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    p.add_argument("--size-mb", type=int, default=None, help="throughput corpus size (default 100, quick 16)")
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

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    load_start = load_avg()
    print(json.dumps({"loadavg_start": load_start, "cpus": os.cpu_count()}), flush=True)

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        quality = [] if "quality" in skip else run_quality(args, Path(tmp))
    for q in quality:
        print(json.dumps(q), flush=True)

    size = args.size_mb or (16 if args.quick else 100)
    files = throughput_corpus(work, size)
    systems = ["moeforge_half", "moeforge", "datasketch", "datatrove_ws"]
    if args.spacy and _has("spacy"):
        systems.append("datatrove")
    speed = []
    for system in systems:
        if system in skip or (system.startswith("datatrove") and not _has("datatrove")):
            continue
        if system == "datasketch" and not _has("datasketch"):
            print("datasketch not installed: skipped", file=sys.stderr)
            continue
        chosen = files[: len(files) // 2] if system == "moeforge_half" else files
        row = run_child(system, chosen, work / "runs" / system, logs)
        if system not in ("moeforge", "moeforge_half"):
            row["agreement"] = agreement(
                work / "runs/moeforge/roots.npy", work / "runs" / system / "roots.npy"
            )
        speed.append(row)
        print(json.dumps(row), flush=True)

    by = {s["system"]: s for s in speed}
    ratio: dict[str, Any] = {}
    if "moeforge" in by:
        ours = by["moeforge"]
        for peer in ("datasketch", "datatrove_ws", "datatrove"):
            if peer in by:
                ratio[f"docs_per_s_vs_{peer}"] = round(ours["docs_per_s"] / by[peer]["docs_per_s"], 2)
                ratio[f"cpu_s_vs_{peer}"] = round(by[peer]["cpu_s"] / ours["cpu_s"], 2)
        if "moeforge_half" in by:
            half = by["moeforge_half"]
            ratio["rss_per_doc_b"] = round(
                (ours["peak_rss_mb"] - half["peak_rss_mb"]) * 2**20 / max(ours["docs"] - half["docs"], 1), 1
            )
    qs = {q["system"]: q for q in quality}
    if "moeforge" in qs:
        for peer in ("datasketch", "datatrove"):
            if peer in qs:
                ratio[f"recall_minus_{peer}"] = round(qs["moeforge"]["recall"] - qs[peer]["recall"], 4)
                ratio[f"precision_minus_{peer}"] = round(
                    qs["moeforge"]["precision"] - qs[peer]["precision"], 4
                )
    load_end = load_avg()
    ratio["loadavg"] = [round(load_start, 2), round(load_end, 2)]
    print(json.dumps({"ratio": ratio}), flush=True)
    if args.markdown:
        print(markdown(quality, speed, (load_start, load_end)))


if __name__ == "__main__":
    main()
