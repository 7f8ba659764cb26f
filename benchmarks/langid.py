"""Language ID: py3langid vs lingua on real English and Russian text, for moeforge's langid step —
accuracy by paragraph length, throughput on one core (the detectors interleaved round by round),
confidence of right and wrong labels, cold start and installed size.

Corpora (from ``$MOEFORGE_REAL_DATA``, else ``../shared/data`` beside the project root):

- ``shakespeare`` (en): ``tinyshakespeare/input.txt`` split into paragraphs on blank lines (speaker turns);
- ``gsm8k`` (en): the ``question`` field of ``gsm8k/test.jsonl``;
- ``ruslit`` (ru): ``ruslit/<author>/*.txt``, one paragraph per line (the files put single newlines
  between paragraphs; the rare blank lines only separate sections).

Paragraphs with no letter at all (``* * *``, page numbers) are left out: no detector can be right on them.
So are RusLit paragraphs whose letters are mostly not Cyrillic (chapter numerals ``XIV``, the French and
German letters quoted by Pushkin): their true language is not Russian; the count is reported as ``excluded``.

Detectors, each called once per document, single-threaded, returning ``(code, confidence)`` (ISO 639-1,
except that py3langid has some ISO 639-3 labels such as ``pcm``, and ``zxx``):

- ``py3langid``: ``LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)``, all its labels;
- ``lingua``: ``LanguageDetectorBuilder.from_all_languages().build()``, top entry of
  ``compute_language_confidence_values`` (``und`` when every value is 0, i.e. the text has no letters);
- with ``--restricted``, also both restricted to ``en, ru, uk, bg, de, fr, es`` (labelled ``[7 langs]``).

Timing (``_harness.interleave``): after a warm-up on the first 20 documents (lingua loads its models
lazily), each detector labels a whole corpus once per round over ``--rounds`` rounds, the order rotated
every round; docs/s and MB/s (UTF-8) are at the median, with the spread; the throughput ratio of
py3langid to lingua is the median of the per-round ratios (per corpus, and over all corpora with each
round's times summed). Output checks before any time is reported: each detector gives the same labels
every round; each detector's labels against py3langid's (a different model, so a difference is expected
and stated as how many documents they agree on); accuracy (share labelled with the corpus's language)
overall and per length bucket (<50, 50–200, >200 characters). Then: each detector's cold start (a fresh
interpreter: import, build, one English and one Russian call) and installed size; the confidence of
right and wrong labels and what each min-confidence threshold would keep and drop; the acceptance check
(>200-character paragraphs of RusLit labelled ``ru`` and of Shakespeare labelled ``en``, both ≥ 99%,
a goal for py3langid, which moeforge uses).

Run: ``python benchmarks/langid.py [--limit N] [--restricted] [--rounds 3]`` (by default at most 10,000
paragraphs per corpus, seed 0; ``--limit 0`` for all). ``--markdown`` also prints the tables;
``--quick`` samples a few hundred paragraphs per corpus, one round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Results, Timing, add_common_args, check_same, cpu_hog, interleave, paired_ratio
from moeforge.data.langid import LangIdConfig

SEED = 0
DEFAULT_LIMIT = 10_000  # RusLit alone has 28k paragraphs
QUICK_LIMIT = 300
BUCKETS = ("<50", "50-200", ">200")
ACCEPT_MIN = 0.99
RESTRICTED = ("en", "ru", "uk", "bg", "de", "fr", "es")
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Cold-start probes: one English and one Russian sentence, so both scripts' models get loaded.
PROBE_EN = "Before we proceed any further, hear me speak. You are all resolved rather to die than to famish?"
PROBE_RU = "В бытность мою в уезде мне часто приходилось бывать на огородах у огородника Саввы Стукача."

Detect = Callable[[str], tuple[str, float]]


@dataclass(frozen=True)
class Corpus:
    name: str
    lang: str
    docs: list[str]
    excluded: int = 0  # paragraphs left out as not in ``lang`` (before sampling)


@dataclass(frozen=True)
class Library:
    name: str
    module: str  # import name, to check it is installed
    dist: str  # distribution name, for version and installed size
    make: Callable[[], Detect]


@dataclass
class Result:
    library: str
    corpus: Corpus
    labels: list[str]  # of the last round
    confidences: list[float]
    timing: Timing
    rounds: list[list[str]] = field(default_factory=list)  # the labels of every round

    @property
    def correct(self) -> list[bool]:
        return [lab == self.corpus.lang for lab in self.labels]


# --- data -------------------------------------------------------------------------------------------


def data_dir() -> Path:
    env = os.environ.get("MOEFORGE_REAL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _has_letter(text: str) -> bool:
    return any(c.isalpha() for c in text)


def load_shakespeare(root: Path) -> list[str]:
    text = (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if _has_letter(p)]


def load_gsm8k(root: Path) -> list[str]:
    with (root / "gsm8k" / "test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["question"].strip() for line in f if line.strip()]


def _mostly_cyrillic(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return sum("\u0400" <= c <= "\u04ff" for c in letters) * 2 > len(letters)


def load_ruslit(root: Path) -> tuple[list[str], int]:
    """RusLit paragraphs, and how many were left out for being mostly Latin script: the French and
    German letters quoted in Pushkin's history of Pugachev are not Russian, whatever the folder says."""
    docs: list[str] = []
    for path in sorted((root / "ruslit").glob("*/*.txt")):
        lines = path.read_text(encoding="utf-8").splitlines()
        docs.extend(line.strip() for line in lines if _has_letter(line))
    russian = [d for d in docs if _mostly_cyrillic(d)]
    return russian, len(docs) - len(russian)


def load_corpora(root: Path, limit: int | None) -> list[Corpus]:
    """The three corpora, each sampled down to ``limit`` docs (fixed seed, original order kept)."""
    ruslit, not_russian = load_ruslit(root)
    corpora = [
        Corpus("shakespeare", "en", load_shakespeare(root)),
        Corpus("gsm8k", "en", load_gsm8k(root)),
        Corpus("ruslit", "ru", ruslit, excluded=not_russian),
    ]
    if limit is None:
        return corpora
    rng = random.Random(SEED)
    out = []
    for c in corpora:
        keep = sorted(rng.sample(range(len(c.docs)), limit)) if len(c.docs) > limit else range(len(c.docs))
        out.append(Corpus(c.name, c.lang, [c.docs[i] for i in keep], c.excluded))
    return out


def bucket(text: str) -> str:
    n = len(text)
    return "<50" if n < 50 else "50-200" if n <= 200 else ">200"


# --- detectors --------------------------------------------------------------------------------------


def make_py3langid(langs: Sequence[str] = ()) -> Detect:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident: Any = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    if langs:
        ident.set_languages(list(langs))

    def detect(text: str) -> tuple[str, float]:
        lang, conf = ident.classify(text)
        return str(lang), float(conf)

    return detect


def make_lingua(langs: Sequence[str] = ()) -> Detect:
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    if langs:
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(
            *(IsoCode639_1.from_str(code) for code in langs)
        )
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    detector = builder.build()

    def detect(text: str) -> tuple[str, float]:
        values = detector.compute_language_confidence_values(text)
        if not values or values[0].value <= 0.0:  # no letters: all zeros, in arbitrary order
            return "und", 0.0
        top = values[0]
        return top.language.iso_code_639_1.name.lower(), float(top.value)

    return detect


def libraries(restricted: bool) -> list[Library]:
    libs = [
        Library("py3langid", "py3langid", "py3langid", make_py3langid),
        Library("lingua", "lingua", "lingua-language-detector", make_lingua),
    ]
    if restricted:
        tag = f"[{len(RESTRICTED)} langs]"
        libs += [
            Library(f"py3langid{tag}", "py3langid", "py3langid", lambda: make_py3langid(RESTRICTED)),
            Library(f"lingua{tag}", "lingua", "lingua-language-detector", lambda: make_lingua(RESTRICTED)),
        ]
    return libs


# --- measurements -----------------------------------------------------------------------------------


def cold_start_child(name: str) -> None:
    """In a fresh interpreter: build ``name``'s detector and run the two probes; print the timings."""
    lib = next(lib for lib in libraries(restricted=True) if lib.name == name)
    t0 = time.perf_counter()
    detect = lib.make()
    t1 = time.perf_counter()
    detect(PROBE_EN)
    detect(PROBE_RU)
    t2 = time.perf_counter()
    print(
        json.dumps({"load_s": t1 - t0, "first_calls_s": t2 - t1, "cold_s": t2 - t0, "rss_mb": _peak_rss_mb()})
    )


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not ``getrusage``: Linux carries ``ru_maxrss`` over ``exec``, so a child
    would report its parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cold_start(name: str) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cold-start-child", name]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {k: round(v, 3) if k != "rss_mb" else round(v) for k, v in json.loads(out).items()}


def installed_mb(dist: str) -> float:
    files = metadata.files(dist) or []
    total = 0
    for f in files:
        path = Path(str(f.locate()))
        if path.is_file():
            total += path.stat().st_size
    return round(total / 1e6, 1)


def run(detectors: dict[str, Detect], corpus: Corpus, rounds: int) -> tuple[list[Result], dict[str, Timing]]:
    """Label every doc of ``corpus`` with each detector once per round, interleaved (``_harness``); the
    labels of every round are kept for the check that they do not change."""
    for detect in detectors.values():
        for doc in corpus.docs[:20]:  # warm-up: lazy model loads stay out of the timing
            detect(doc)
    outputs: dict[str, list[list[tuple[str, float]]]] = {name: [] for name in detectors}

    def contender(name: str) -> Callable[[], None]:
        detect, docs, out = detectors[name], corpus.docs, outputs[name]

        def call() -> None:
            out.append([detect(doc) for doc in docs])

        return call

    timings = interleave({name: contender(name) for name in detectors}, rounds, warmup=0)
    results = []
    for name, rs in outputs.items():
        last = rs[-1]
        results.append(
            Result(
                name,
                corpus,
                [lab for lab, _ in last],
                [conf for _, conf in last],
                timings[name],
                [[lab for lab, _ in r] for r in rs],
            )
        )
    return results, timings


def _rate(x: float) -> float:
    return round(x, 4)


def summarize(res: Result) -> dict[str, Any]:
    docs = res.corpus.docs
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    correct = res.correct
    by_bucket: dict[str, dict[str, Any]] = {}
    for b in BUCKETS:
        idx = [i for i, d in enumerate(docs) if bucket(d) == b]
        hits = sum(correct[i] for i in idx)
        by_bucket[b] = {"n": len(idx), "accuracy": _rate(hits / len(idx)) if idx else None}
    wrong = Counter(lab for lab, ok in zip(res.labels, correct, strict=True) if not ok)
    t = res.timing
    return {
        "kind": "result",
        "library": res.library,
        "corpus": res.corpus.name,
        "expected": res.corpus.lang,
        "docs": len(docs),
        "excluded": res.corpus.excluded,
        "mb": round(mb, 3),
        "accuracy": _rate(sum(correct) / len(docs)),
        "by_length": by_bucket,
        "wrong_labels": dict(wrong.most_common(6)),
        "docs_per_s": round(len(docs) / t.median, 1),
        "mb_per_s": round(mb / t.median, 3),
        **t.as_dict(4),
    }


def _quantiles(xs: list[float], qs: Sequence[float]) -> dict[str, float | None]:
    s = sorted(xs)
    return {f"p{round(q * 100)}": (round(s[min(len(s) - 1, int(q * len(s)))], 3) if s else None) for q in qs}


def confidence_report(name: str, results: list[Result]) -> dict[str, Any]:
    """Confidence of right vs wrong labels (all corpora pooled) and what each threshold keeps and drops."""
    triples = [
        (bucket(d), c, ok)
        for r in results
        for d, c, ok in zip(r.corpus.docs, r.confidences, r.correct, strict=True)
    ]
    right = [c for _, c, ok in triples if ok]
    wrong = [c for _, c, ok in triples if not ok]
    right_by = {b: [c for bb, c, ok in triples if ok and bb == b] for b in BUCKETS}

    def share_below(xs: list[float], t: float) -> float | None:
        return _rate(sum(c < t for c in xs) / len(xs)) if xs else None

    rows = []
    for t in THRESHOLDS:
        rows.append(
            {
                "min_confidence": t,
                "right_dropped": share_below(right, t),
                "right_dropped_by_length": {b: share_below(xs, t) for b, xs in right_by.items()},
                "wrong_dropped": share_below(wrong, t),
                "wrong_kept_gt200": sum(c >= t and not ok for b, c, ok in triples if b == ">200"),
            }
        )
    return {
        "kind": "confidence",
        "library": name,
        "n_right": len(right),
        "n_wrong": len(wrong),
        "right": _quantiles(right, (0.01, 0.05, 0.1, 0.25, 0.5)),
        "wrong": _quantiles(wrong, (0.5, 0.75, 0.9, 0.95, 0.99)),
        "thresholds": rows,
    }


def acceptance(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for s in summaries:
        if s["corpus"] in ("ruslit", "shakespeare"):
            share = s["by_length"][">200"]["accuracy"]
            out.append(
                {
                    "kind": "acceptance",
                    "library": s["library"],
                    "corpus": s["corpus"],
                    "check": f"{s['corpus']} >200 chars labelled {s['expected']}",
                    "n": s["by_length"][">200"]["n"],
                    "share": share,
                    "pass": share is not None and share >= ACCEPT_MIN,
                }
            )
    return out


def ratio(timings: dict[str, dict[str, Timing]], num: str, den: str) -> dict[str, Any]:
    """Throughput of ``num`` over ``den``: the median of the per-round ratios per corpus, and over all
    corpora with each round's times summed (the same docs on both sides, so the time ratio)."""
    out: dict[str, Any] = {"kind": "ratio", "numerator": num, "denominator": den, "docs_per_s": {}}
    for corpus, by_lib in timings.items():
        out["docs_per_s"][corpus] = paired_ratio(by_lib[num], by_lib[den]).as_dict()

    def total(lib: str) -> Timing:
        per_round = zip(*(by_lib[lib].samples for by_lib in timings.values()), strict=True)
        return Timing(lib, [sum(xs) for xs in per_round])

    out["docs_per_s"]["all"] = paired_ratio(total(num), total(den)).as_dict()
    return out


# --- output -----------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def tables(
    summaries: list[dict[str, Any]],
    libs: list[dict[str, Any]],
    conf: list[dict[str, Any]],
    accept: list[dict[str, Any]],
    ratios: list[dict[str, Any]],
    rounds: int,
) -> list[tuple[str, list[str], list[list[Any]]]]:
    """The report's tables: (caption, columns, rows)."""
    out = []
    rows = []
    for s in summaries:
        cells = [f"{_pct(s['by_length'][b]['accuracy'])} (n={s['by_length'][b]['n']:,})" for b in BUCKETS]
        rows.append(
            [
                s["library"],
                f"{s['corpus']} ({s['expected']})",
                s["docs"],
                _pct(s["accuracy"]),
                *cells,
                s["docs_per_s"],
                s["spread"],
                s["mb_per_s"],
            ]
        )
    out.append(
        (
            f"Accuracy (share labelled with the corpus's language) by paragraph length; docs/s on one core, "
            f"median of {rounds} round{'s' if rounds > 1 else ''}",
            [
                "library",
                "corpus",
                "docs",
                "accuracy",
                "<50 chars",
                "50–200",
                ">200 chars",
                "docs/s",
                "spread",
                "MB/s",
            ],
            rows,
        )
    )
    names = list(dict.fromkeys(a["library"] for a in accept))
    rows = []
    for check in dict.fromkeys(a["check"] for a in accept):
        row = {a["library"]: a for a in accept if a["check"] == check}
        rows.append(
            [f"{check} (≥ {ACCEPT_MIN:.0%})"]
            + [f"{_pct(row[n]['share'])} {'✓' if row[n]['pass'] else '✗'}" if n in row else "" for n in names]
        )
    out.append(("Acceptance: long paragraphs labelled with their language", ["check", *names], rows))
    rows = [
        [
            m["library"],
            m["version"],
            m["installed_mb"],
            f"{m['cold_start']['cold_s']:.2f} ({m['cold_start']['load_s']:.2f} + {m['cold_start']['first_calls_s']:.2f})",
            m["cold_start"]["rss_mb"],
        ]
        for m in libs
    ]
    out.append(
        (
            "Libraries: installed size; cold start in a fresh interpreter (import and build + the first English "
            "and Russian calls) and its peak RSS",
            ["library", "version", "installed MB", "cold start s (load + first calls)", "peak RSS MB"],
            rows,
        )
    )
    for c in conf:
        rows = [
            [
                t["min_confidence"],
                _pct(t["right_dropped"]),
                *(_pct(t["right_dropped_by_length"][b]) for b in BUCKETS),
                _pct(t["wrong_dropped"]),
                t["wrong_kept_gt200"],
            ]
            for t in c["thresholds"]
        ]
        out.append(
            (
                f"{c['library']}: what a min_confidence threshold drops ({c['n_right']:,} right labels, "
                f"{c['n_wrong']:,} wrong, all corpora)",
                [
                    "min_confidence",
                    "right dropped",
                    "right dropped <50",
                    "50–200",
                    ">200",
                    "wrong dropped",
                    "wrong kept >200",
                ],
                rows,
            )
        )
    rows = [
        [f"{r['numerator']} ÷ {r['denominator']}", corpus, v["ratio"], v["ratio_low"], v["ratio_high"]]
        for r in ratios
        for corpus, v in r["docs_per_s"].items()
    ]
    if rows:
        out.append(
            (
                "Throughput ratio (docs/s), the median of the per-round ratios with the lowest and highest round",
                ["detectors", "corpus", "ratio", "lowest round", "highest round"],
                rows,
            )
        )
    return out


def markdown(table_list: list[tuple[str, list[str], list[list[Any]]]]) -> str:
    lines: list[str] = []
    for caption, columns, rows in table_list:
        lines += [caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += [
            "| " + " | ".join(f"{x:,}" if isinstance(x, int) else str(x) for x in r) + " |" for r in rows
        ]
        lines.append("")
    return "\n".join(lines)


def show_errors(results: list[Result], n: int) -> None:
    """Print up to ``n`` wrong labels of >200-character docs per detector × corpus to stderr."""
    for r in results:
        bad = [
            (lab, conf, d)
            for d, lab, conf, ok in zip(r.corpus.docs, r.labels, r.confidences, r.correct, strict=True)
            if not ok and bucket(d) == ">200"
        ]
        for lab, conf, d in bad[:n]:
            snippet = " ".join(d.split())[:160]
            print(f"[{r.library} {r.corpus.name}] {lab} {conf:.3f}: {snippet}", file=sys.stderr)


def check_labels(results_out: Results, results: list[Result]) -> None:
    """Before any time is reported: every detector labels the same every round; each detector's labels
    against py3langid's (another model: the difference is allowed and stated as agreement)."""
    for name in dict.fromkeys(r.library for r in results):
        mine = [r for r in results if r.library == name]
        verdicts = {
            r.corpus.name: check_same({f"round {i + 1}": x for i, x in enumerate(r.rounds)}, "round 1")
            for r in mine
        }
        same = all(set(v.values()) <= {"same"} for v in verdicts.values())
        results_out.check(
            f"{name}: the same labels every round",
            ("same" if len(mine[0].rounds) > 1 else "one round") if same else verdicts,
        )
    by = {(r.library, r.corpus.name): r for r in results}
    names = list(dict.fromkeys(r.library for r in results))
    if "py3langid" not in names or len(names) < 2:
        return
    corpora = list(dict.fromkeys(r.corpus.name for r in results))
    labels = {n: [lab for c in corpora for lab in by[(n, c)].labels] for n in names}
    others = [n for n in names if n != "py3langid"]
    verdict = check_same(labels, "py3langid", allowed={n: "another model" for n in others})
    for n in others:
        agree = sum(a == b for a, b in zip(labels[n], labels["py3langid"], strict=True))
        per = ", ".join(
            f"{c} {sum(a == b for a, b in zip(by[(n, c)].labels, by[('py3langid', c)].labels, strict=True)):,}"
            f"/{len(by[(n, c)].labels):,}"
            for c in corpora
        )
        verdict[n] = (
            f"{verdict[n].split(':')[0]}: labels agree on {agree:,} of {len(labels[n]):,} documents ({per}); "
            "accuracy against the corpus's language in the table"
            if verdict[n] != "same"
            else "same"
        )
    results_out.check("labels against py3langid's", verdict)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"sample at most N docs per corpus, seed {SEED} (default {DEFAULT_LIMIT}, --quick {QUICK_LIMIT}; 0: all)",
    )
    p.add_argument("--restricted", action="store_true", help=f"also run both restricted to {RESTRICTED}")
    p.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    p.add_argument("--show-errors", type=int, default=0, metavar="N", help="print N wrong >200-char labels")
    p.add_argument("--cold-start-child", help=argparse.SUPPRESS)
    add_common_args(p, rounds=3)
    args = p.parse_args(argv)
    if args.cold_start_child:
        cold_start_child(args.cold_start_child)
        return 0
    given = list(argv) if argv is not None else sys.argv[1:]
    if args.quick and not any(a.startswith("--rounds") for a in given):
        args.rounds = 1
    if args.limit is None:
        args.limit = QUICK_LIMIT if args.quick else DEFAULT_LIMIT
    if args.limit < 0:
        p.error("--limit must be 0 (all docs) or more")

    root = data_dir()
    needed = [root / "tinyshakespeare" / "input.txt", root / "gsm8k" / "test.jsonl", root / "ruslit"]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        print(f"skipped: real data missing: {', '.join(missing)} (set MOEFORGE_REAL_DATA to shared/data)")
        return 0
    libs = []
    skipped = []
    for lib in libraries(args.restricted):
        if importlib.util.find_spec(lib.module) is None:
            why = f"{lib.dist} is not installed (pip install {lib.dist}, or moeforge[bench])"
            print(f"skipped {lib.name}: {why}", file=sys.stderr)
            skipped.append(f"`{lib.name}` was not run: {why}.")
        else:
            libs.append(lib)
    if not libs:
        print("skipped: neither py3langid nor lingua-language-detector is installed")
        return 0

    corpora = load_corpora(root, args.limit or None)
    lib_rows = [
        {
            "kind": "library",
            "library": lib.name,
            "version": metadata.version(lib.dist),
            "installed_mb": installed_mb(lib.dist),
            "cold_start": cold_start(lib.name),
        }
        for lib in libs
    ]
    detectors = {lib.name: lib.make() for lib in libs}
    results_out = Results("langid", args, title="Language ID: py3langid vs lingua")
    with cpu_hog(args.busy):
        timed = {c.name: run(detectors, c, args.rounds) for c in corpora}
    results = [r for name in detectors for rs, _ in timed.values() for r in rs if r.library == name]
    timings = {c: {name: t for name, t in tt.items()} for c, (_, tt) in timed.items()}

    check_labels(results_out, results)  # before any time is reported
    summaries = [summarize(r) for r in results]
    conf = [
        confidence_report(lib.name, [r for r in results if r.library == lib.name])
        for lib in libs
        if lib.name in ("py3langid", "lingua")
    ]
    accept = acceptance(summaries)
    names = {lib.name for lib in libs}
    ratios = [
        ratio(timings, a, b)
        for a, b in (
            ("py3langid", "lingua"),
            (f"py3langid[{len(RESTRICTED)} langs]", f"lingua[{len(RESTRICTED)} langs]"),
        )
        if a in names and b in names
    ]
    if args.show_errors:
        show_errors(results, args.show_errors)
    for row in [*summaries, *lib_rows, *conf, *accept, *ratios]:
        results_out.row(**row)
    for a in accept:
        if a["library"] == "py3langid" and a["share"] is not None:
            results_out.goal(
                f"py3langid: {a['check']} (n={a['n']:,})", 100 * a["share"], 100 * ACCEPT_MIN, unit="%"
            )
    table_list = tables(summaries, lib_rows, conf, accept, ratios, args.rounds)
    for caption, columns, rows in table_list:
        results_out.table(caption, columns, rows)
    for note in [*skipped, *notes(corpora, summaries, conf)]:
        results_out.note(note)
    results_out.write()
    if args.markdown:
        print(markdown(table_list))
    return 0


def notes(corpora: list[Corpus], summaries: list[dict[str, Any]], conf: list[dict[str, Any]]) -> list[str]:
    """Sentences derived from this run's figures."""
    out = []
    excluded = {c.name: c.excluded for c in corpora if c.excluded}
    if excluded:
        out.append(
            "Left out as not in the corpus's language (mostly non-Cyrillic letters): "
            + ", ".join(f"{k} {v:,} paragraphs" for k, v in excluded.items())
            + "."
        )
    short = [s for s in summaries if s["corpus"] == "ruslit" and s["by_length"]["<50"]["n"]]
    if short:
        out.append(
            "RusLit paragraphs under 50 characters labelled ru: "
            + ", ".join(f"{s['library']} {_pct(s['by_length']['<50']['accuracy'])}" for s in short)
            + "."
        )
    default = LangIdConfig().min_confidence
    for c in conf:
        row = next((t for t in c["thresholds"] if t["min_confidence"] == default), None)
        if row is None:
            continue
        out.append(
            f"{c['library']} at moeforge's default min_confidence {default}: drops {_pct(row['wrong_dropped'])} "
            f"of its wrong labels and {_pct(row['right_dropped_by_length']['>200'])} of its right labels over "
            f"200 characters ({_pct(row['right_dropped_by_length']['50-200'])} of those of 50–200). Confidence "
            "of right labels "
            + ", ".join(f"{k} {v}" for k, v in c["right"].items())
            + "; of wrong labels "
            + ", ".join(f"{k} {v}" for k, v in c["wrong"].items())
            + "."
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
