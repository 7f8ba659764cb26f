"""The sections of :mod:`moeforge.data.report`, in page order: one ``<section>`` of HTML each.

Run-level sections (overview, counts per split × family × lang × domain, lengths) come first, then one
per pipeline stage (drops per reason, PII placeholders, language-ID confidence, exact and near duplicate
cluster sizes, decontamination hits, the mixture's target vs achieved shares), then the gate table and
sample records. Each is built from the manifest and the :class:`~moeforge.data.report.scan.Scan`; a
section whose data is absent from the run (a stage that did not run) says "not run" instead of
disappearing. :func:`page_sections` returns them all, in the order of :data:`NAV`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from moeforge.data.report.html import (
    SPLIT_COLOURS,
    escape,
    fmt_int,
    fmt_kib,
    fmt_share,
    hbar_chart,
    html_table,
    section,
    vhist,
)
from moeforge.data.report.scan import CONF_BINS, EXAMPLES, LENGTH_BINS, SAMPLE_CHARS, SAMPLES, Key, Scan
from moeforge.data.split import SPLITS

__all__ = ["NAV", "NOT_RUN", "TOKENS_NOTE", "page_sections"]

NOT_RUN = "not run"
TOKENS_NOTE = (
    "≈tokens: an approximation until a tokenizer exists, ceil(4/3 × whitespace words) + 1 per text or "
    "turn, times meta.extra.mix_repeat (as manifest.json counts them)"
)
_CHART_ROWS = 30  # categorical charts show the largest rows; the tables list all of them

# (anchor, link text) of every section, in page order
NAV = (
    ("overview", "overview"),
    ("counts", "counts"),
    ("lengths", "lengths"),
    ("drops", "drops"),
    ("pii", "PII"),
    ("langid", "language ID"),
    ("exact-dedup", "exact dups"),
    ("near-dedup", "near dups"),
    ("decontamination", "decontamination"),
    ("mixture", "mixture"),
    ("gates", "gates"),
    ("samples", "samples"),
)


def page_sections(manifest: Mapping[str, Any], scan: Scan) -> list[str]:
    """Every section of the page, as HTML, in the order of :data:`NAV`."""
    return [
        _overview(manifest, scan),
        _counts(scan),
        _lengths(scan),
        _drops(manifest),
        _pii(manifest, scan),
        _langid(manifest, scan),
        _exact_dedup(manifest, scan),
        _near_dedup(manifest),
        _decontamination(manifest),
        _mixture(manifest, scan),
        _gates(manifest),
        _samples(scan),
    ]


def _not_run(why: str) -> str:
    return f'<p class="not-run"><strong>{NOT_RUN}</strong>: {escape(why)}</p>'


# ----------------------------------------------------------------------------- run-level sections


def _overview(manifest: Mapping[str, Any], scan: Scan) -> str:
    records = manifest.get("records") or {}
    total = sum(int(v) for v in records.values())
    review = sum(int(r.get("records", 0)) for r in manifest.get("review") or [])
    quarantined = int((manifest.get("quarantine") or {}).get("records", 0))
    inputs = manifest.get("inputs") or []
    gates = manifest.get("gates") or []
    failed = [g.get("gate") for g in gates if g.get("verdict") == "FAIL"]
    recipe = manifest.get("recipe") or {}
    facts = [
        ("run", escape(manifest.get("name", "?"))),
        ("description", escape(recipe.get("description") or "—")),
        ("format", f"{escape(manifest.get('format'))}, contract v{escape(manifest.get('contract_version'))}"),
        ("moeforge", escape(manifest.get("moeforge_version", "?"))),
        ("recipe sha256", f"<code>{escape(manifest.get('recipe_sha256', '?'))}</code>"),
        (
            "inputs",
            f"{fmt_int(len(inputs))} files, {fmt_int(sum(int(i.get('size') or 0) for i in inputs))} bytes",
        ),
        (
            "records",
            f"{fmt_int(total)}: " + ", ".join(f"{escape(s)} {fmt_int(records.get(s, 0))}" for s in SPLITS),
        ),
        ("held for PII review", fmt_int(review)),
        ("quarantined", fmt_int(quarantined)),
        (
            "gates",
            NOT_RUN
            if not gates
            else (f'<span class="FAIL">{len(failed)} failed</span>: {escape(", ".join(map(str, failed)))}')
            if failed
            else '<span class="pass">all pass</span>',
        ),
    ]
    body = "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    counts = manifest.get("counts") or []
    expected = Counter({(c["split"], c["family"], c["lang"], c["domain"]): int(c["records"]) for c in counts})
    expected_tokens = Counter(
        {(c["split"], c["family"], c["lang"], c["domain"]): int(c["tokens"]) for c in counts if "tokens" in c}
    )
    warnings = []
    if scan.n_problems:
        more = (
            f" (+{scan.n_problems - len(scan.problems)} more)" if scan.n_problems > len(scan.problems) else ""
        )
        warnings.append("records the report could not read: " + "; ".join(map(escape, scan.problems)) + more)
    tokens_differ = len(expected_tokens) == len(counts) and +expected_tokens != +scan.tokens
    if +expected != +scan.records or tokens_differ:
        warnings.append(
            "the files hold different records or ≈tokens per split × family × lang × domain than "
            "manifest.json says; "
            "run <code>moeforge data verify</code> on this directory"
        )
    body += "".join(f'<p class="warn">{w}</p>' for w in warnings)
    return section("overview", "Overview", body)


def _counts(scan: Scan) -> str:
    if not scan.records:
        return section(
            "counts", "Records and ≈tokens per split × family × lang × domain", "<p>no records</p>"
        )
    groups = sorted({k[1:] for k in scan.records})

    def rows(c: Counter[Key]) -> list[tuple[str, list[float]]]:
        r = [(" / ".join(g), [float(c[(s, *g)]) for s in SPLITS]) for g in groups]
        return sorted(r, key=lambda t: (-sum(t[1]), t[0]))[:_CHART_ROWS]

    colours = [SPLIT_COLOURS[s] for s in SPLITS]
    more = f" (the {_CHART_ROWS} largest of {len(groups)})" if len(groups) > _CHART_ROWS else ""
    body = (
        f'<p class="note">{escape(TOKENS_NOTE)}. Rows are family / lang / domain{more}; '
        '"und": no language label.</p><div class="row">'
        f"<figure><figcaption>records</figcaption>"
        f"{hbar_chart(rows(scan.records), SPLITS, 'records per family / lang / domain', colours=colours)}"
        "</figure><figure><figcaption>≈tokens</figcaption>"
        f"{hbar_chart(rows(scan.tokens), SPLITS, '≈tokens per family / lang / domain', colours=colours)}"
        "</figure></div>"
    )
    table = [
        [escape(x) for x in k] + [fmt_int(c[k]) for c in (scan.records, scan.tokens, scan.words, scan.chars)]
        for k in sorted(scan.records, key=lambda k: (SPLITS.index(k[0]), k[1:]))
    ]
    table.append(
        ["<strong>total</strong>", "", "", ""]
        + [
            f"<strong>{fmt_int(sum(c.values()))}</strong>"
            for c in (scan.records, scan.tokens, scan.words, scan.chars)
        ]
    )
    body += html_table(
        ["split", "family", "lang", "domain", "records", "≈tokens", "words", "characters"],
        table,
        (4, 5, 6, 7),
    )
    return section("counts", "Records and ≈tokens per split × family × lang × domain", body)


def _lengths(scan: Scan) -> str:
    labels = ["0"] + [fmt_kib(1 << (i + 3)) for i in range(1, LENGTH_BINS - 1)] + [f"{fmt_kib(1 << 20)}+"]
    charts, stats = [], []
    for s in SPLITS:
        n = sum(scan.lengths[s])
        chars = sum(v for k, v in scan.chars.items() if k[0] == s)
        charts.append(
            f"<figure><figcaption>{escape(s)}: {fmt_int(n)} records</figcaption>"
            + vhist(
                labels,
                [s],
                [scan.lengths[s]],
                f"characters per record ({s})",
                every=2,
                colours=[SPLIT_COLOURS[s]],
            )
            + "</figure>"
        )
        stats.append([escape(s), fmt_int(n), fmt_int(chars / n if n else 0), fmt_int(scan.longest[s])])
    body = (
        '<p class="note">Bins are powers of two: the bar at 64 counts records of 64–127 characters '
        "(all turns of a chat together).</p>"
        f'<div class="row">{"".join(charts)}</div>'
        + html_table(["split", "records", "mean characters", "longest"], stats, (1, 2, 3))
    )
    return section("lengths", "Characters per record", body)


# ----------------------------------------------------------------------------- one per stage


def _drops(manifest: Mapping[str, Any]) -> str:
    stages = manifest.get("stages")
    if not stages:
        return section(
            "drops", "Drops per reason per stage", _not_run("the manifest has no stage accounting")
        )
    table = [
        [
            escape(st.get("stage")),
            fmt_int(st.get("in", 0)),
            fmt_int(st.get("out", 0)),
            escape(", ".join(f"{r} {n:,}" for r, n in sorted((st.get("dropped") or {}).items())) or "0"),
            fmt_int(st.get("quarantined", 0)),
        ]
        for st in stages
    ]
    drops = [
        (f"{st.get('stage')}: {reason}", [float(n)])
        for st in stages
        for reason, n in sorted((st.get("dropped") or {}).items())
    ]
    drops += [
        (f"{st.get('stage')}: quarantined", [float(st["quarantined"])])
        for st in stages
        if st.get("quarantined")
    ]
    chart = (
        hbar_chart(drops, ["records"], "records dropped per stage and reason", colours=["#e45756"])
        if drops
        else "<p>no record was dropped or quarantined</p>"
    )
    body = chart + html_table(["stage", "in", "out", "dropped (by reason)", "quarantined"], table, (1, 2, 4))
    return section("drops", "Drops per reason per stage", body)


def _pii(manifest: Mapping[str, Any], scan: Scan) -> str:
    title = "PII placeholders per type"
    if not ((manifest.get("recipe") or {}).get("pii") or {}).get("enabled", True):
        return section("pii", title, _not_run("PII scrubbing is disabled in the recipe (pii.enabled: false)"))
    review = sum(int(r.get("records", 0)) for r in manifest.get("review") or [])
    rows = [(k, [float(v)]) for k, v in sorted(scan.pii.items(), key=lambda t: (-t[1], t[0]))]
    chart = (
        hbar_chart(rows, ["placeholders"], "PII placeholders per type", colours=["#b279a2"])
        if rows
        else "<p>no PII found in the output records</p>"
    )
    status = ", ".join(f"{escape(k)} {fmt_int(v)}" for k, v in sorted(scan.pii_status.items()))
    body = (
        f"{chart}<p>Output records per <code>pii_status</code>: {status or '—'}. "
        f"Held out for review (<code>review/</code>, in no split): {fmt_int(review)}.</p>"
    )
    return section("pii", title, body)


def _langid(manifest: Mapping[str, Any], scan: Scan) -> str:
    title = "Language-ID confidence"
    if not ((manifest.get("recipe") or {}).get("langid") or {}).get("enabled", True):
        return section(
            "langid", title, _not_run("language ID is disabled in the recipe (langid.enabled: false)")
        )
    labelled = sum(sum(scan.confidence[s]) for s in SPLITS)
    if not labelled:
        return section("langid", title, _not_run("no output record has meta.lang_confidence"))
    labels = [f"{i / CONF_BINS:.2f}" for i in range(CONF_BINS)]
    chart = vhist(
        labels,
        SPLITS,
        [scan.confidence[s] for s in SPLITS],
        "records per language-ID confidence (bins of 0.05)",
        every=4,
        colours=[SPLIT_COLOURS[s] for s in SPLITS],
    )
    unl = sum(scan.unlabelled.values())
    body = f"{chart}<p>{fmt_int(labelled)} labelled records; {fmt_int(unl)} without a label (e.g. code).</p>"
    return section("langid", title, body)


def _size_bin(size: int) -> int:
    """Cluster sizes 1, 2, 3–4, 5–8, 9–16, … → 0, 1, 2, 3, 4, …"""
    return (size - 1).bit_length()


def _size_label(b: int) -> str:
    return str(b + 1) if b < 2 else f"{(1 << (b - 1)) + 1}–{1 << b}"


def _cluster_chart(sizes: Mapping[int, int], label: str) -> str:
    bins: Counter[int] = Counter()
    for size, n in sizes.items():
        bins[_size_bin(size)] += n
    rows = [(_size_label(b), [float(bins[b])]) for b in sorted(bins)]
    note = '<p class="note">Rows: cluster size (power-of-two bins); bars: number of clusters.</p>'
    return note + hbar_chart(rows, ["clusters"], label, colours=["#72b7b2"])


def _exact_dedup(manifest: Mapping[str, Any], scan: Scan) -> str:
    title = "Exact duplicates: cluster sizes"
    if not ((manifest.get("recipe") or {}).get("dedup") or {}).get("enabled", True):
        return section(
            "exact-dedup", title, _not_run("exact dedup is disabled in the recipe (dedup.enabled: false)")
        )
    dropped = sum(
        int(n)
        for st in manifest.get("stages") or []
        for r, n in (st.get("dropped") or {}).items()
        if r == "dedup:exact"
    )
    if not scan.exact_copies:
        return section(
            "exact-dedup",
            title,
            f"<p>no exact duplicates among the output records (dropped: {dropped:,})</p>",
        )
    clusters = sum(scan.exact_copies.values())
    removed = sum((k - 1) * n for k, n in scan.exact_copies.items())
    body = (
        f"<p>{fmt_int(clusters)} output records stand for more than one copy "
        "(<code>meta.extra.exact_copies</code>); "
        f"largest cluster {fmt_int(max(scan.exact_copies))}; copies removed behind them {fmt_int(removed)} "
        f"(the dedup stage dropped {fmt_int(dropped)}).</p>"
        + _cluster_chart(scan.exact_copies, "exact-duplicate clusters per size (copies)")
    )
    return section("exact-dedup", title, body)


def _near_dedup(manifest: Mapping[str, Any]) -> str:
    title = "Near duplicates: cluster sizes"
    sizes = (manifest.get("near_dedup") or {}).get("cluster_sizes")
    if sizes is None:
        return section("near-dedup", title, _not_run("the manifest has no near_dedup.cluster_sizes"))
    parsed = {int(k): int(v) for k, v in sizes.items()}
    if not parsed:
        return section("near-dedup", title, "<p>no near-duplicate clusters</p>")
    body = (
        f"<p>{fmt_int(sum(parsed.values()))} clusters, largest {fmt_int(max(parsed))} documents.</p>"
        + _cluster_chart(parsed, "near-duplicate clusters per size (documents)")
        + html_table(
            ["cluster size", "clusters"], [[fmt_int(k), fmt_int(parsed[k])] for k in sorted(parsed)], (0, 1)
        )
    )
    return section("near-dedup", title, body)


def _example(x: object) -> str:
    """One decontamination example: a string, or a dict shown as ``key: value`` pairs; at most 240 chars."""
    if isinstance(x, dict):
        s = " · ".join(f"{k}: {v}" for k, v in sorted(x.items()))
    else:
        s = x if isinstance(x, str) else json.dumps(x, ensure_ascii=False, sort_keys=True)
    return escape(s if len(s) <= 240 else s[:240] + " …")


def _decontamination(manifest: Mapping[str, Any]) -> str:
    title = "Decontamination hits per benchmark"
    benchmarks = (manifest.get("decontamination") or {}).get("benchmarks")
    if benchmarks is None:
        return section("decontamination", title, _not_run("the manifest has no decontamination.benchmarks"))
    if not benchmarks:
        return section("decontamination", title, "<p>no benchmarks were checked</p>")
    names = sorted(benchmarks)
    series = ["items matched", "documents affected"]
    rows = [
        (n, [float(benchmarks[n].get("items_matched", 0)), float(benchmarks[n].get("documents_affected", 0))])
        for n in names
    ]
    chart = hbar_chart(rows, series, title, stacked=False)
    # dropped / cut split "affected" by what was done; shown when the manifest has them
    actions = [a for a in ("documents_dropped", "documents_cut") if any(a in benchmarks[n] for n in names)]
    table = []
    for name in names:
        b = benchmarks[name]
        items, matched = int(b.get("items", 0)), int(b.get("items_matched", 0))
        examples = "".join(
            f"<li><code>{_example(x)}</code></li>" for x in list(b.get("examples") or [])[:EXAMPLES]
        )
        table.append(
            [
                escape(name),
                fmt_int(items),
                f"{fmt_int(matched)} ({fmt_share(matched / items) if items else '—'})",
                fmt_int(b.get("documents_affected", 0)),
                *(fmt_int(b[a]) if a in b else "—" for a in actions),
                f"<ul>{examples}</ul>" if examples else "—",
            ]
        )
    headers = ["benchmark", "items", "items matched", "documents affected"]
    headers += [a.replace("_", " ") for a in actions] + ["examples"]
    body = chart + html_table(headers, table, tuple(range(1, 4 + len(actions))))
    return section("decontamination", title, body)


def _mixture(manifest: Mapping[str, Any], scan: Scan) -> str:
    title = "Mixture: target vs achieved"
    mix = manifest.get("mixture")
    if mix is None:
        return section("mixture", title, _not_run("the manifest has no mixture"))
    by = str(mix.get("by", "group"))
    # "available" (the shares before mixing) is optional: shown between the two when the manifest has it
    series = [s for s in ("target", "available", "achieved") if s in mix]
    shares = {s: mix.get(s) or {} for s in series}
    factors = mix.get("factors") or {}
    keys = sorted(set().union(*shares.values()))
    rows = [(k, [float(shares[s].get(k, 0.0)) for s in series]) for k in keys]
    colours = [{"target": "#9d755d", "available": "#bab0ac", "achieved": "#4c78a8"}[s] for s in series]
    chart = hbar_chart(rows, series, f"share per {by}", stacked=False, fmt=fmt_share, colours=colours)
    table = []
    for k in keys:
        t, a = float(shares.get("target", {}).get(k, 0.0)), float(shares.get("achieved", {}).get(k, 0.0))
        factor = f"{float(factors[k]):.3f}" if k in factors else "—"
        table.append(
            [
                escape(k),
                *(fmt_share(float(shares[s].get(k, 0.0))) for s in series),
                f"{(a - t) * 100:+.1f} pp",
                factor,
            ]
        )
    unit = f", counted in {escape(mix['unit'])}" if mix.get("unit") else ""
    body = (
        f"<p>Shares of train by <code>{escape(by)}</code>{unit}. Records repeated by the mix "
        f"(<code>meta.extra.mix_repeat</code> &gt; 1): {fmt_int(scan.repeated)}, adding "
        f"{fmt_int(scan.extra_passes)} passes.</p>"
        + chart
        + html_table([by, *series, "achieved − target", "factor"], table, tuple(range(1, len(series) + 3)))
    )
    return section("mixture", title, body)


# ----------------------------------------------------------------------------- gates and samples


def _gates(manifest: Mapping[str, Any]) -> str:
    gates = manifest.get("gates")
    if not gates:
        return section("gates", "Gates", _not_run("the manifest has no gate results"))
    rows = [
        [
            escape(g.get("gate")),
            f'<span class="{escape(g.get("verdict"))}">{escape(g.get("verdict"))}</span>',
            escape(g.get("evidence")),
        ]
        for g in gates
    ]
    return section("gates", "Gates", html_table(["gate", "verdict", "evidence"], rows))


def _samples(scan: Scan) -> str:
    parts = []
    for s in SPLITS:
        recs = "".join(
            f'<p class="family">{escape(fam)}</p><pre>{escape(text)}</pre>'
            for fam, text in sorted(scan.samples[s].items())
        )
        parts.append(f"<h3>{escape(s)}</h3>{recs or '<p>no records</p>'}")
    note = (
        f'<p class="note">The first record of each family in each split (at most {SAMPLES} families per '
        f"split), cut at {SAMPLE_CHARS} characters.</p>"
    )
    return section("samples", "Sample records", note + "".join(parts))
