"""``report.html``: one self-contained page that shows what a data run produced and what it removed.

``moeforge data report DIR`` (or :func:`write_report`) reads ``DIR/manifest.json`` and makes one streaming
pass over the output shards it lists, then writes ``DIR/report.html``:

- records, ≈tokens, words and characters per split × family × lang × domain; ≈tokens are the contract's
  approximation until a tokenizer exists (:func:`moeforge.data.mix.approx_tokens` ×
  ``meta.extra.mix_repeat``, the numbers of ``manifest["counts"]``), and the page says so;
- characters per record, a histogram per split (power-of-two bins);
- per-stage accounting and the drops per reason per stage (``manifest["stages"]``);
- PII placeholders per type (``meta.pii``) and records per ``pii_status``;
- the language-ID confidence histogram (``meta.lang_confidence``);
- exact-duplicate cluster sizes (``meta.extra.exact_copies``) and near-duplicate cluster sizes
  (``manifest["near_dedup"]["cluster_sizes"]``);
- decontamination hits per benchmark (``manifest["decontamination"]["benchmarks"]``);
- mixture target vs achieved shares (``manifest["mixture"]``);
- the gate table (``manifest["gates"]``) and the first records of each split.

The page is assembled here from :mod:`~moeforge.data.report.scan` (the streaming pass over the records)
and :mod:`~moeforge.data.report.sections` (one function per section, in page order).

A section whose data is absent from the run says "not run" instead of disappearing. Charts are inline SVG
(drawn by :mod:`~moeforge.data.report.html`), so the page needs no script, no network and no other file;
a Content-Security-Policy forbids scripts and every external load, and every string that comes from the
data is HTML-escaped (record text can hold ``<script>``). Memory stays flat: histograms have fixed bins
and the tables are keyed by categories, never by record. The bytes depend only on the run directory (no
clock, no machine data).
"""

from __future__ import annotations

import logging
from pathlib import Path

from moeforge.data.manifest import load_manifest
from moeforge.data.report.html import CSP, STYLE, escape
from moeforge.data.report.scan import scan_run
from moeforge.data.report.sections import NAV, NOT_RUN, TOKENS_NOTE, page_sections
from moeforge.io import atomic_write_text

__all__ = ["NOT_RUN", "REPORT_NAME", "TOKENS_NOTE", "build_report", "write_report"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"


def build_report(run_dir: Path) -> str:
    """The HTML of ``run_dir``'s report: one self-contained page (inline CSS and SVG, no script, nothing
    loaded from elsewhere), the same bytes for the same run directory.

    Raises :class:`moeforge.data.manifest.ManifestError` when ``run_dir`` has no readable manifest. Shards
    that are missing or unreadable do not raise: the overview lists them (``moeforge data verify`` judges).
    """
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    scan = scan_run(run_dir, manifest)
    name = escape(manifest.get("name", "?"))
    sections = page_sections(manifest, scan)
    nav = "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in NAV)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>moeforge data report: {name}</title><style>{STYLE}</style></head>\n"
        f"<body><h1>Dataset report: {name}</h1><nav>{nav}</nav>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path; errors as :func:`build_report`."""
    text = build_report(run_dir)
    path = atomic_write_text(Path(run_dir) / REPORT_NAME, text)
    log.info("report: wrote %s (%d bytes)", path, len(text.encode("utf-8")))
    return path
