"""Decontamination: recall and precision on benchmark items planted in real prose, against datatrove's
``NGramsDecontFilter`` and a plain-Python reference of the same rule, then index build and detection
throughput, the systems interleaved round by round.

Corpus (from ``$MOEFORGE_REAL_DATA``, else ``../shared/data`` beside the project root): Shakespeare
(``tinyshakespeare/input.txt``, paragraphs on blank lines) and RusLit (``ruslit/<author>/*.txt``, one
paragraph per line), grouped into documents of about ``DOC_CHARS`` characters. Benchmarks: GSM8K test
(``gsm8k/test.jsonl``, question + answer) and HumanEval (``humaneval/HumanEval.jsonl.gz``, prompt +
canonical solution).

Planting (seed 0): a share ``PLANT_SHARE`` of the documents each receives one item of GSM8K (70%) or
HumanEval (30%), inserted between two words at a random position, as one of four variants:

- ``whole``: the item's full text (question + answer; prompt + solution);
- ``question``: GSM8K's question alone, HumanEval's prompt alone;
- ``excerpt30``: a run of 30 consecutive words (whitespace tokens) of the item;
- ``excerpt12``: a run of 12 words — shorter than the 13-gram, so no n-gram method at n = 13 can find it;
  reported on its own and left out of the overall recall;

each lightly re-formatted at random: case (upper, lower, title), whitespace (newlines → spaces, spaces
doubled, re-wrapped at 60 columns, or code re-indented with tabs), punctuation (commas and periods
dropped, quotes made typographic, "?" → "."). A share ``DECOY_SHARE`` of the other documents gets a
GSM8K *train* item instead, which is not contamination (a decoy). The ground truth is which document
holds which item.

Systems, each asked "which benchmark does this document contain?":

- ``moeforge``: :class:`moeforge.data.decontam.DecontamIndex` (``find``, and ``contains_any`` for speed);
- ``reference``: a plain-Python implementation of the same rule (per-character normalization with
  :mod:`unicodedata`, n-gram tuples in a dict) — a cross-check of the hashing, not a competitor: its
  verdicts must equal moeforge's on every document, or the run stops;
- ``datatrove``: ``NGramsDecontFilter`` run as is, on an index made by ``NGramsDecontIndexer``'s own
  ``compute_hashes`` (query = question/prompt, label = answer/solution, query and overlap n-grams on,
  n = 13). The indexer step itself cannot be used offline: constructing it requires ``lighteval``, and
  its ``run`` loads the tasks from the Hugging Face Hub. It runs in a child process that stays up for
  the whole run (``--datatrove-python`` picks its interpreter; by default this one), so its index build
  and its passes over the documents are timed in the same rounds as the others'.

Timing goes through ``benchmarks/_harness.py``: the index builds, then full passes over the documents,
``--rounds`` rounds each, the systems interleaved with the order rotated (after an untimed warm-up on a
few documents); medians, spread and per-round ratios; CPU seconds per pass beside the wall time (the
machine is shared). Every system's verdicts are checked to be the same in every round, and against
moeforge's, before any time is reported. Index memory comes from separate untimed builds under
tracemalloc (moeforge, reference) and from the child's peak RSS (datatrove).

Prints JSON lines and writes ``benchmarks/results/decontam.json`` (``--json``), which
``benchmarks/report.py`` renders; ``--markdown`` also prints the tables; ``--quick`` uses a quarter of the
corpus and of the benchmark items. Run: ``python benchmarks/decontam.py [--quick] [--rounds 3]
[--datatrove-python PY] [--no-reference] [--show-misses N] [--busy N] [--markdown]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness

SEED = 0
DOC_CHARS = 3000
PLANT_SHARE = 0.15
DECOY_SHARE = 0.10  # of the other documents: a GSM8K *train* item, which is not contamination
NGRAM = 13
MIN_ITEM_WORDS = 8
MAX_ITEM_FREQUENCY = 10
VARIANTS = ("whole", "question", "excerpt30", "excerpt12")
SCORED_VARIANTS = ("whole", "question", "excerpt30")  # excerpt12 is shorter than the n-gram
CHUNK = 200  # documents per timing turn


@dataclass(frozen=True)
class Item:
    benchmark: str
    item_id: str
    query: str  # GSM8K question / HumanEval prompt
    label: str  # GSM8K answer / HumanEval canonical solution

    @property
    def text(self) -> str:
        return self.query + "\n" + self.label


@dataclass
class Doc:
    text: str
    source: str
    planted: Item | None = None
    decoy: Item | None = None
    variant: str | None = None
    reformat: list[str] = field(default_factory=list)


# --- data -------------------------------------------------------------------------------------------


def data_dir() -> Path:
    env = os.environ.get("MOEFORGE_REAL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_gsm8k(root: Path, split: str) -> list[Item]:
    items = []
    with (root / "gsm8k" / f"{split}.jsonl").open(encoding="utf-8") as f:
        for no, line in enumerate(f, start=1):
            if line.strip():
                row = json.loads(line)
                items.append(Item("gsm8k", f"{split}.jsonl:{no}", row["question"], row["answer"]))
    return items


def load_items(root: Path) -> list[Item]:
    items = load_gsm8k(root, "test")
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                items.append(Item("humaneval", row["task_id"], row["prompt"], row["canonical_solution"]))
    return items


def _group(paragraphs: list[str], source: str, sep: str) -> list[Doc]:
    docs, buf, size = [], [], 0
    for p in paragraphs:
        buf.append(p)
        size += len(p)
        if size >= DOC_CHARS:
            docs.append(Doc(sep.join(buf), source))
            buf, size = [], 0
    if buf:
        docs.append(Doc(sep.join(buf), source))
    return docs


def load_corpus(root: Path) -> list[Doc]:
    text = (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    docs = _group([p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()], "shakespeare", "\n\n")
    for path in sorted((root / "ruslit").glob("*/*.txt")):
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        docs.extend(_group(lines, f"ruslit/{path.parent.name}/{path.stem}", "\n"))
    return docs


# --- planting ---------------------------------------------------------------------------------------


def _excerpt(text: str, n_words: int, rng: random.Random) -> str:
    tokens = text.split()
    if len(tokens) <= n_words:
        return " ".join(tokens)
    start = rng.randrange(len(tokens) - n_words + 1)
    return " ".join(tokens[start : start + n_words])


def _reformat(text: str, code: bool, rng: random.Random) -> tuple[str, list[str]]:
    applied = []
    case = rng.choice(["upper", "lower", "title", "keep"])
    if case != "keep":
        text = getattr(text, case)()
        applied.append(case)
    space = rng.choice(["join_lines", "double_spaces", "rewrap", "tabs" if code else "keep"])
    if space == "join_lines":
        text = re.sub(r"\s*\n\s*", " ", text)
    elif space == "double_spaces":
        text = text.replace(" ", "  ")
    elif space == "rewrap":
        words, lines, line = text.split(), [], ""
        for w in words:
            if len(line) + len(w) > 60:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        text = "\n".join([*lines, line])
    elif space == "tabs":
        text = text.replace("    ", "\t")
    if space != "keep":
        applied.append(space)
    punct = rng.choice(["drop_commas_periods", "curly_quotes", "question_to_period", "keep"])
    if punct == "drop_commas_periods":
        text = re.sub(r"[,.](\s|$)", r"\1", text)
    elif punct == "curly_quotes":
        text = text.replace("'", "’").replace('"', "“")
    elif punct == "question_to_period":
        text = text.replace("?", ".")
    if punct != "keep":
        applied.append(punct)
    return text, applied


def _insert(doc: Doc, body: str, rng: random.Random) -> None:
    gaps = [m.start() for m in re.finditer(r"\s", doc.text)] or [len(doc.text)]
    at = rng.choice(gaps)
    doc.text = doc.text[:at] + "\n" + body + "\n" + doc.text[at:]


def plant(docs: list[Doc], items: list[Item], decoys: list[Item], rng: random.Random) -> None:
    by_bench = defaultdict(list)
    for it in items:
        by_bench[it.benchmark].append(it)
    for doc in docs:
        if rng.random() >= PLANT_SHARE:
            if rng.random() < DECOY_SHARE:
                doc.decoy = rng.choice(decoys)
                body, doc.reformat = _reformat(doc.decoy.text, False, rng)
                _insert(doc, body, rng)
            continue
        item = rng.choice(by_bench["gsm8k" if rng.random() < 0.7 else "humaneval"])
        variant = rng.choice(VARIANTS)
        body = {
            "whole": item.text,
            "question": item.query,
            "excerpt30": _excerpt(item.text, 30, rng),
            "excerpt12": _excerpt(item.text, 12, rng),
        }[variant]
        body, applied = _reformat(body, item.benchmark == "humaneval", rng)
        _insert(doc, body, rng)
        doc.planted, doc.variant, doc.reformat = item, variant, applied


# --- systems ----------------------------------------------------------------------------------------

Detect = Callable[[str], set[str]]  # document text → the benchmarks it contains


@cache
def _ref_char(c: str) -> str:
    if c.isspace():
        return " "
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", c).casefold())
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] in "LN")


def ref_words(text: str) -> list[str]:
    return "".join(map(_ref_char, text)).split()


class Reference:
    """The rule of moeforge.data.decontam written plainly: word tuples in a dict, no hashing."""

    def __init__(self, items: list[Item]) -> None:
        owners: dict[tuple[str, ...], set[int]] = defaultdict(set)
        for k, it in enumerate(items):
            words = ref_words(it.text)
            if len(words) >= NGRAM:
                for i in range(len(words) - NGRAM + 1):
                    owners[tuple(words[i : i + NGRAM])].add(k)
            elif len(words) >= MIN_ITEM_WORDS:
                owners[tuple(words)].add(k)
        self.grams = {
            g: {items[k].benchmark for k in ks} for g, ks in owners.items() if len(ks) <= MAX_ITEM_FREQUENCY
        }
        self.lengths = sorted({len(g) for g in self.grams}, reverse=True)

    def detect(self, text: str) -> set[str]:
        words = ref_words(text)
        found: set[str] = set()
        for n in self.lengths:
            for i in range(len(words) - n + 1):
                hit = self.grams.get(tuple(words[i : i + n]))
                if hit:
                    found |= hit
        return found


def _moeforge_cfg() -> Any:
    from moeforge.data.decontam import DecontamConfig

    return DecontamConfig(ngram=NGRAM, min_item_words=MIN_ITEM_WORDS, max_item_frequency=MAX_ITEM_FREQUENCY)


def build_moeforge(items: list[Item]) -> Any:
    from moeforge.data.decontam import BenchmarkItem, DecontamIndex

    return DecontamIndex.from_items(
        [BenchmarkItem(it.benchmark, it.item_id, it.text) for it in items], _moeforge_cfg()
    )


def traced(build: Callable[[], Any]) -> tuple[Any, int, int]:
    """``build()`` under tracemalloc (untimed: it slows allocation): (result, peak bytes, bytes alive)."""
    tracemalloc.start()
    out = build()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, peak, current


# --- datatrove (in its own interpreter, one process for the whole run) -------------------------------


def datatrove_child(job_path: str) -> None:
    """Serve commands on stdin, one JSON line each, answering one JSON line on stdout: ``build`` (its
    index: NGramsDecontIndexer.compute_hashes, written and loaded by NGramsDecontFilter; of the first
    ``limit`` items only, for a warm-up), ``run``
    (NGramsDecontFilter over the documents, or the first ``limit``), ``stats``, ``quit``."""
    from importlib.metadata import version
    from types import SimpleNamespace

    import numpy as np
    from datatrove.data import Document
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontFilter, NGramsDecontIndexer
    from datatrove.utils.hashing import create_hash_func
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    reply_to = sys.stdout
    sys.stdout = sys.stderr  # anything the libraries print goes to the log, not into the replies
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    cfg = NGramsDecontConfig(n_grams=job["ngram"], find_query_ngrams=True, find_overlap_ngrams=True)
    # NGramsDecontIndexer(...) refuses to exist without lighteval; its compute_hashes only needs these three
    shim = SimpleNamespace(
        tokenizer=load_word_tokenizer("en"), config=cfg, hash_func=create_hash_func(cfg.hash_config)
    )
    state: dict[str, Any] = {}
    folder = tempfile.TemporaryDirectory()

    def build(limit: int | None) -> dict[str, Any]:
        hashes: dict[str, set[int]] = defaultdict(set)
        for it in job["items"][:limit]:
            hashes[it["benchmark"]].update(NGramsDecontIndexer.compute_hashes(shim, it["label"], it["query"]))
        for task, hs in hashes.items():
            np.array(sorted(hs), dtype=cfg.hash_config.np_descr).tofile(
                Path(folder.name) / f"{task}.index.hashes"
            )
        filt = NGramsDecontFilter(folder.name, config=cfg, language="en")
        filt.load_index_hashes()
        state["filter"] = filt
        return {"ngrams": sum(len(h) for h in hashes.values())}

    def run(limit: int | None) -> dict[str, Any]:
        filt = state["filter"]
        results = []
        for k, text in enumerate(job["docs"][:limit]):
            doc = Document(text=text, id=str(k))
            kept = filt.filter(doc)
            results.append(None if kept is True else doc.metadata.get("contaminated_task"))
        return {"results": results}

    for line in sys.stdin:
        cmd = json.loads(line)
        c0 = time.process_time()
        if cmd["cmd"] == "build":
            out = build(cmd.get("limit"))
        elif cmd["cmd"] == "run":
            out = run(cmd.get("limit"))
        elif cmd["cmd"] == "stats":
            out = {"version": version("datatrove"), "rss_mb": _peak_rss_mb()}
        else:
            break
        out["cpu_s"] = time.process_time() - c0
        reply_to.write(json.dumps(out) + "\n")
        reply_to.flush()
    folder.cleanup()


class Datatrove:
    """The parent's end of :func:`datatrove_child`."""

    def __init__(self, py: str, items: list[Item], docs: list[Doc], tmp: Path) -> None:
        job = tmp / "datatrove-job.json"
        job.write_text(
            json.dumps(
                {
                    "ngram": NGRAM,
                    "items": [
                        {"benchmark": it.benchmark, "query": it.query, "label": it.label} for it in items
                    ],
                    "docs": [d.text for d in docs],
                }
            ),
            encoding="utf-8",
        )
        self.log_path = tmp / "datatrove.log"
        self.log: IO[str] = self.log_path.open("w")
        cmd = [py, str(Path(__file__).resolve()), "--datatrove-child", str(job)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = self.log_path.read_text(encoding="utf-8")[-3000:]
            raise RuntimeError(f"datatrove's process ended (exit {self.proc.wait()}):\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


_DATATROVE_SMOKE = (
    "import spacy; from datatrove.utils.hashing import HashConfig, create_hash_func; "
    "from datatrove.pipeline.decont.n_grams import NGramsDecontFilter; create_hash_func(HashConfig())('a b')"
)


def find_datatrove_python(arg: str | None) -> tuple[str | None, list[str]]:
    """An interpreter where datatrove's decontamination runs, and why each other candidate was refused."""
    candidates = [arg] if arg else [sys.executable, os.environ.get("DATATROVE_PYTHON")]
    refused: list[str] = []
    for py in filter(None, candidates):
        try:
            proc = subprocess.run([py, "-c", _DATATROVE_SMOKE], capture_output=True, text=True)
        except OSError as exc:
            refused.append(f"{py}: {exc}")
            continue
        if proc.returncode == 0:
            return py, refused
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        refused.append(f"{py}: {last}")
    return None, refused


# --- scoring and output -----------------------------------------------------------------------------


def score(
    system: str, docs: list[Doc], found: list[set[str]], benchmarks: Sequence[str]
) -> list[dict[str, Any]]:
    rows = []
    for bench in benchmarks:
        truth = [d.planted.benchmark if d.planted else None for d in docs]
        planted = [i for i, b in enumerate(truth) if b == bench]
        scored = [i for i in planted if docs[i].variant in SCORED_VARIANTS]
        flagged = [i for i, f in enumerate(found) if bench in f]
        true_pos = sum(1 for i in flagged if truth[i] == bench)
        by_variant = {}
        for v in VARIANTS:
            idx = [i for i in planted if docs[i].variant == v]
            by_variant[v] = {"n": len(idx), "recall": _rate(sum(bench in found[i] for i in idx), len(idx))}
        decoys = [i for i, d in enumerate(docs) if d.decoy and d.decoy.benchmark == bench]
        rows.append(
            {
                "kind": "accuracy",
                "system": system,
                "benchmark": bench,
                "decoys": len(decoys),
                "decoys_flagged": sum(bench in found[i] for i in decoys),
                "planted": len(scored),
                "found": sum(bench in found[i] for i in scored),
                "recall": _rate(sum(bench in found[i] for i in scored), len(scored)),
                "by_variant": by_variant,
                "flagged": len(flagged),
                "false_positives": len(flagged) - true_pos,
                "precision": _rate(true_pos, len(flagged)),
            }
        )
    return rows


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def misses(docs: list[Doc], found: list[set[str]], n: int) -> list[dict[str, Any]]:
    out = []
    for d, f in zip(docs, found, strict=True):
        if d.planted and d.variant in SCORED_VARIANTS and d.planted.benchmark not in f:
            out.append({"item": d.planted.item_id, "variant": d.variant, "reformat": d.reformat})
    return out[:n]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _same_every_round(name: str, outputs: list[Any]) -> None:
    """A system's verdicts must not change between rounds (else the rounds did not do the same work)."""
    _harness.check_same({f"round {i + 1}": o for i, o in enumerate(outputs)}, "round 1")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    _harness.add_common_args(p, rounds=3)
    p.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    p.add_argument(
        "--datatrove-python", help="interpreter with datatrove + spacy installed (default: this one)"
    )
    p.add_argument("--no-reference", action="store_true", help="skip the plain-Python reference")
    p.add_argument("--show-misses", type=int, default=0, metavar="N", help="print N missed plants to stderr")
    p.add_argument("--datatrove-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.datatrove_child:
        datatrove_child(args.datatrove_child)
        return 0

    root = data_dir()
    needed = [root / "tinyshakespeare/input.txt", root / "ruslit", root / "gsm8k/test.jsonl"]
    needed.append(root / "humaneval/HumanEval.jsonl.gz")
    missing = [str(x) for x in needed if not x.exists()]
    if missing:
        print(f"skipped: real data missing: {', '.join(missing)} (set MOEFORGE_REAL_DATA to shared/data)")
        return 0
    rounds = min(args.rounds, 2) if args.quick else args.rounds
    rng = random.Random(SEED)
    items = load_items(root)
    docs = load_corpus(root)
    train = load_gsm8k(root, "train")
    if args.quick:
        docs = [d for d in docs if rng.random() < 0.25]
        items = [it for it in items if rng.random() < 0.25]
    plant(docs, items, train, rng)
    benchmarks = ("gsm8k", "humaneval")
    mb = sum(len(d.text.encode("utf-8")) for d in docs) / 1e6
    results = _harness.Results("decontam", args, title="Decontamination")
    results.row(
        part="corpus",
        docs=len(docs),
        mb=round(mb, 2),
        items={b: sum(it.benchmark == b for it in items) for b in benchmarks},
        planted=sum(d.planted is not None for d in docs),
        decoys=sum(d.decoy is not None for d in docs),
    )

    py, refused = find_datatrove_python(args.datatrove_python)
    if py is None:
        reason = (
            "no interpreter runs datatrove's decontamination ("
            + "; ".join(refused or ["datatrove + spacy not installed"])
            + "); pass --datatrove-python (a venv with pip install datatrove==0.10.1 spacy)"
        )
        print(f"datatrove skipped: {reason}", file=sys.stderr)
        results.check("datatrove", f"skipped: {reason}")
    with tempfile.TemporaryDirectory() as tmp, _harness.cpu_hog(args.busy):
        dt = Datatrove(py, items, docs, Path(tmp)) if py else None
        try:
            measure(args, items, docs, train, benchmarks, mb, rounds, dt, results)
        finally:
            if dt is not None:
                dt.close()
    results.write()
    if args.markdown:
        print(results.markdown())
    return 0


def measure(
    args: argparse.Namespace,
    items: list[Item],
    docs: list[Doc],
    train: list[Item],
    benchmarks: Sequence[str],
    mb: float,
    rounds: int,
    dt: Datatrove | None,
    results: _harness.Results,
) -> None:
    # --- index memory from untimed builds under tracemalloc (which also warm up imports and caches)
    _, moeforge_peak, _ = traced(lambda: build_moeforge(items))
    peaks = {"moeforge": moeforge_peak / 1e6}
    ref_alive = None
    if not args.no_reference:
        _, ref_peak, ref_alive = traced(lambda: Reference(items))
        peaks["reference"] = ref_peak / 1e6

    # --- index builds, interleaved; their n-gram counts compared
    built: dict[str, Any] = {}
    builders: dict[str, Callable[[], None]] = {
        "moeforge": lambda: built.__setitem__("moeforge", build_moeforge(items))
    }
    if not args.no_reference:
        builders["reference"] = lambda: built.__setitem__("reference", Reference(items))
    if dt is not None:
        dt.call(cmd="build", limit=20)  # warm-up (its tokenizer's first calls), untimed
        builders["datatrove"] = lambda: built.__setitem__("datatrove", dt.call(cmd="build"))
    build_t = _harness.interleave(builders, rounds, warmup=0)
    index, ref = built["moeforge"], built.get("reference")
    memory = {"moeforge": index.stats()["bytes"] / 1e6}
    if ref_alive is not None:
        memory["reference"] = ref_alive / 1e6
    ngrams = {"moeforge": index.stats()["ngrams"]}
    if ref is not None:
        ngrams["reference"] = len(ref.grams)
    if dt is not None:
        ngrams["datatrove"] = built["datatrove"]["ngrams"]
    why = {"datatrove": "its own words (spaCy), numbers normalized to 0, query and label n-grams"}
    same = _harness.check_same(ngrams, "moeforge", allowed=why)
    if same:
        results.check(
            "index, distinct n-grams against moeforge's",
            {
                k: ("same" if v == "same" else f"differs ({why[k]})")
                + f": {ngrams[k]:,} against {ngrams['moeforge']:,}"
                for k, v in same.items()
            },
        )
    # --- detection passes, interleaved (after an untimed warm-up on a few documents)
    texts = [d.text for d in docs]
    found: dict[str, list[list[Any]]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)

    def local(name: str, detect: Callable[[str], Any]) -> Callable[[], None]:
        def run() -> None:
            c0 = time.process_time()
            out = [detect(t) for t in texts]
            cpu[name].append(time.process_time() - c0)
            found[name].append(out)

        return run

    detectors: dict[str, Callable[[], None]] = {
        "moeforge": local("moeforge", lambda t: {m.benchmark for m in index.find(t)}),
        "moeforge (contains_any)": local("moeforge (contains_any)", index.contains_any),
    }
    if ref is not None:
        detectors["reference"] = local("reference", ref.detect)
    for t in texts[:5]:
        index.find(t)
        index.contains_any(t)
        if ref is not None:
            ref.detect(t)
    if dt is not None:

        def datatrove_pass() -> None:
            out = dt.call(cmd="run")
            cpu["datatrove"].append(out["cpu_s"])
            found["datatrove"].append([set() if r is None else {r} for r in out["results"]])

        detectors["datatrove"] = datatrove_pass
        dt.call(cmd="run", limit=5)
    pass_t = _harness.interleave(detectors, rounds, warmup=0)

    # --- outputs, before any time: every round the same, then against moeforge's
    for name, outs in found.items():
        _same_every_round(name, [[sorted(f) if isinstance(f, set) else f for f in o] for o in outs])
    ours = found["moeforge"][0]
    results.check(
        "detection, every system's verdicts round to round", dict.fromkeys(found, "the same in every round")
    )
    verdict = _harness.check_same(
        {"moeforge": [bool(f) for f in ours], "moeforge (contains_any)": found["moeforge (contains_any)"][0]},
        "moeforge",
    )
    if ref is not None:
        verdict |= _harness.check_same(
            {"moeforge": [sorted(f) for f in ours], "reference": [sorted(f) for f in found["reference"][0]]},
            "moeforge",
        )
    if dt is not None:
        theirs = found["datatrove"][0]
        # datatrove names one benchmark per document (the first it meets); compare which documents are flagged
        only_ours = sum(bool(a) and not b for a, b in zip(ours, theirs, strict=True))
        only_theirs = sum(bool(b) and not a for a, b in zip(ours, theirs, strict=True))
        both = sum(bool(a) and bool(b) for a, b in zip(ours, theirs, strict=True))
        reason = "its own normalization (numbers → 0) and tokenizer"
        same = _harness.check_same(
            {"moeforge": [bool(f) for f in ours], "datatrove": [bool(f) for f in theirs]},
            "moeforge",
            allowed={"datatrove": reason},
        )
        verdict["datatrove"] = ("same" if same["datatrove"] == "same" else f"differs ({reason})") + (
            f": documents flagged by both {both}, by moeforge only {only_ours}, by datatrove only {only_theirs}"
        )
    results.check(f"detection, which of the {len(docs):,} documents are flagged, against moeforge", verdict)

    # --- against the ground truth
    final = {name: outs[0] for name, outs in found.items() if name != "moeforge (contains_any)"}
    acc_table = []
    acc: dict[tuple[str, str], dict[str, Any]] = {}
    for name, f in final.items():
        for r in score(name, docs, f, benchmarks):
            del r["kind"]
            acc[(name, r["benchmark"])] = results.row(part="accuracy", **r)
            v = r["by_variant"]
            acc_table.append(
                [name, r["benchmark"], r["planted"], _pct(r["recall"])]
                + [_pct(v[k]["recall"]) for k in VARIANTS]
                + [
                    r["flagged"],
                    r["false_positives"],
                    f"{r['decoys_flagged']} / {r['decoys']}",
                    _pct(r["precision"]),
                ]
            )
    results.table(
        f"Accuracy: {len(docs):,} documents ({mb:.1f} MB), {sum(d.planted is not None for d in docs)} with a "
        f"test item planted, {sum(d.decoy is not None for d in docs)} with a GSM8K train item (a decoy). "
        f"Recall counts the items of at least {NGRAM} words (whole, question, 30-word excerpt); the 12-word "
        "excerpt is shorter than the n-gram and shown on its own.",
        [
            "system",
            "benchmark",
            f"planted (≥ {NGRAM} words)",
            "recall",
            "whole",
            "question",
            "30-word excerpt",
            "12-word excerpt",
            "flagged",
            "false positives",
            "decoys flagged",
            "precision",
        ],
        acc_table,
    )
    right = sum(
        1
        for d in docs
        if d.planted
        and d.variant in SCORED_VARIANTS
        and any(m.item_id == d.planted.item_id for m in index.find(d.text))
    )
    scored = sum(1 for d in docs if d.planted and d.variant in SCORED_VARIANTS)
    results.row(part="item_attribution", system="moeforge", planted=scored, right_item_named=right)
    results.note(
        f"moeforge names the planted item itself (not only its benchmark) for {right} of {scored} planted documents."
    )
    for name in final:
        fp = sum(acc[(name, b)]["false_positives"] for b in benchmarks)
        decoys = sum(acc[(name, b)]["decoys_flagged"] for b in benchmarks)
        n_decoys = sum(d.decoy is not None for d in docs)
        results.note(f"{name}: {fp} false positives, {decoys} of the {n_decoys} decoy documents flagged.")
    overlap = sum(1 for it in train if any(m.benchmark == "gsm8k" for m in index.find(it.text)))
    results.row(part="train_test_overlap", gsm8k_train_items=len(train), sharing_an_ngram_with_test=overlap)
    results.note(
        f"{overlap} of the {len(train):,} GSM8K training problems share an indexed {NGRAM}-gram with "
        f"{'the sampled' if args.quick else 'the'} test problems: a decontamination step drops them."
    )

    # --- times
    n = len(docs)
    speed_table = []
    for name, t in pass_t.items():
        c = sorted(cpu[name])[len(cpu[name]) // 2]
        peer = name not in ("moeforge", "moeforge (contains_any)")
        r = _harness.paired_ratio(pass_t["moeforge"], t) if peer else None
        cpu_ratio = (
            sorted(x / o for o, x in zip(cpu["moeforge"], cpu[name], strict=True))[len(cpu[name]) // 2]
            if peer
            else None
        )
        b = build_t.get("datatrove" if name == "datatrove" else name)
        results.row(
            part="speed",
            system=name,
            docs=n,
            mb=round(mb, 3),
            **t.as_dict(4),
            docs_per_s=round(t.rate(n), 1),
            mb_per_s=round(t.rate(mb), 3),
            cpu_s=round(c, 3),
            docs_per_cpu_s=round(n / c, 1) if c else None,
            **({"moeforge_speedup": r.as_dict(), "moeforge_cpu_speedup": round(cpu_ratio, 3)} if r else {}),
        )
        speed_table.append(
            [
                name,
                round(t.rate(n), 1),
                round(t.rate(mb), 2),
                f"{100 * t.spread:.0f}%",
                round(n / c, 1) if c else "–",
                f"{r.median:.2f}× ({r.low:.2f}–{r.high:.2f})" if r else "–",
                f"{cpu_ratio:.2f}×" if cpu_ratio else "–",
                round(b.median, 3) if b and name != "moeforge (contains_any)" else "–",
            ]
        )
    for name, t in build_t.items():
        results.row(
            part="index",
            system=name,
            **t.as_dict(4),
            ngrams=ngrams[name],
            state_mb=round(memory[name], 2) if name in memory else None,
            build_peak_mb=round(peaks[name], 1) if name in peaks else None,
        )
    if dt is not None:
        stats = dt.call(cmd="stats")
        memory["datatrove"] = stats["rss_mb"]
        results.row(
            part="index", system="datatrove", version=stats["version"], process_peak_rss_mb=stats["rss_mb"]
        )
    for row in speed_table:
        row.append(
            "–" if row[0] == "moeforge (contains_any)" or row[0] not in memory else round(memory[row[0]], 2)
        )
    results.table(
        f"Speed: a full pass over the {n:,} documents ({mb:.1f} MB), one thread each, median of {rounds} "
        f"interleaved round{'s' * (rounds > 1)}; speed-up: moeforge's find over the system, the median of the "
        "per-round ratios (lowest–highest), and the same for CPU seconds. Index build: median of the same "
        "number of interleaved builds from the items in memory. Index memory: moeforge's arrays; the "
        "reference's Python objects alive after the build (tracemalloc); datatrove's whole process (peak RSS, "
        "a dict of Python ints plus spaCy).",
        [
            "system",
            "docs/s",
            "MB/s",
            "spread",
            "docs per CPU-s",
            "moeforge's speed-up",
            "CPU",
            "index build s",
            "index memory MB",
        ],
        speed_table,
    )
    if dt is not None:
        r = _harness.paired_ratio(pass_t["moeforge"], pass_t["datatrove"])
        rb = _harness.paired_ratio(build_t["moeforge"], build_t["datatrove"])
        results.note(
            f"moeforge's find is {r.median:.0f}× datatrove's docs/s (rounds {r.low:.0f}–{r.high:.0f}); its index "
            f"builds {rb.median:.0f}× faster and takes {memory['moeforge']:.2f} MB against datatrove's process at "
            f"{memory['datatrove']:.0f} MB."
        )
    if args.show_misses:
        for name, f in final.items():
            for m in misses(docs, f, args.show_misses):
                print(f"[{name} miss] {m}", file=sys.stderr)
            hits = [d for d, x in zip(docs, f, strict=True) if d.decoy and x]
            for d in hits[: args.show_misses]:
                print(f"[{name} decoy flagged] {d.decoy.item_id if d.decoy else ''}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
