"""The HTML report: self-contained, escaped, deterministic, every section present, "not run" when absent."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from moeforge.data.manifest import ManifestError
from moeforge.data.pipeline import run_pipeline
from moeforge.data.recipe import Recipe
from moeforge.data.report import NOT_RUN, REPORT_NAME, TOKENS_NOTE, build_report, write_report

XSS = "<script>alert(1)</script>"
SECTIONS = (
    "overview", "counts", "lengths", "drops", "pii", "langid", "exact-dedup", "near-dedup", "decontamination",
    "mixture", "gates", "samples",
)  # fmt: skip
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "maple", "cedar", "amber", "coral"]


def _question(i: int) -> str:
    w = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6))
    return f"Problem {i}: {XSS} if {w} costs {i} coins and {i % 13} more, what is the total?"


def make_run(root: Path, *, langid: bool = False) -> Path:
    """A finished run over 200 QA records that all contain ``<script>``; 5 duplicates and 3 e-mails."""
    src = root / "in.jsonl"
    lines = [{"question": _question(i), "answer": f"{i} + {i % 13} = {i + i % 13}"} for i in range(200)]
    lines += lines[:5]  # exact duplicates
    for i in range(3):
        lines[10 + i]["answer"] += f" (mail me at user{i}@example.com)"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "sources": [{"path": str(src), "kind": "qa", "family": "f", "domain": "math"}],
            "langid": {"enabled": langid},
            "pii": {"review_density": 50.0},  # one e-mail in a short record is scrubbed, not held for review
            "split": {"min_eval_records": 3},
            "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.1]},
        }
    )
    out = root / "run"
    result = run_pipeline(recipe, out, workers=1)
    assert result.gates_passed, result.manifest["gates"]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page(run_dir: Path) -> str:
    return build_report(run_dir)


def section(html_text: str, anchor: str) -> str:
    m = re.search(rf'<section id="{anchor}">(.*?)</section>', html_text, re.S)
    assert m, f"no section {anchor}"
    return m.group(1)


def _edit_manifest(src: Path, dst: Path, **fields: Any) -> Path:
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.update(fields)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    return dst


def test_report_is_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert re.search(r"""\b(?:src|href|action|xlink:href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", page, re.I) is None
    assert [h for h in re.findall(r'href="([^"]*)"', page) if not h.startswith("#")] == []
    for tag in ("<script", "<link", "<img", "<iframe", "<object", "<embed", "@import", "url("):
        assert tag not in page.lower(), tag
    assert 'http-equiv="Content-Security-Policy" content="default-src \'none\';' in page


def test_report_has_every_section_and_labels_the_token_approximation(page: str) -> None:
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
        assert f'href="#{anchor}"' in page  # the navigation links to it
    assert TOKENS_NOTE in section(page, "counts")
    for anchor in ("counts", "lengths", "drops", "pii", "exact-dedup"):
        assert "<svg" in section(page, anchor), anchor
    gates = section(page, "gates")
    for gate in ("schema", "accounting", "leakage", "hash"):
        assert f"<td>{gate}</td>" in gates


def test_record_text_with_a_script_tag_is_escaped(page: str) -> None:
    assert XSS not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section(page, "samples")


def test_report_shows_the_runs_numbers(page: str, run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    total = sum(manifest["records"].values())
    assert total == 200
    counts = section(page, "counts")
    assert f"<strong>{total:,}</strong>" in counts
    assert "dedup:exact" in section(page, "drops")
    assert ">email<" in section(page, "pii")
    assert "5 output records stand for more than one copy" in section(page, "exact-dedup")
    assert 'class="warn"' not in section(page, "overview")  # files and manifest agree


def test_token_counts_match_the_manifest(page: str, run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    tokens = sum(c["tokens"] for c in manifest["counts"])
    assert f"<strong>{tokens:,}</strong>" in section(page, "counts")


def test_a_mixed_run_shows_target_available_and_achieved_shares(tmp_path: Path) -> None:
    src_a, src_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    src_a.write_text(
        "".join(json.dumps({"text": f"alpha document number {i} " * 3}) + "\n" for i in range(400))
    )
    src_b.write_text("".join(json.dumps({"text": f"beta text {i} " * 2}) + "\n" for i in range(200)))
    recipe = Recipe.model_validate(
        {
            "name": "mix",
            "sources": [
                {"path": str(src_a), "kind": "text", "family": "fa", "domain": "prose"},
                {"path": str(src_b), "kind": "text", "family": "fb", "domain": "code"},
            ],
            "langid": {"enabled": False},
            "filters": {"quality_domains": []},
            "split": {"min_eval_records": 3},
            "mix": {"enabled": True, "by": "family", "target": {"fa": 0.4, "fb": 0.6}, "max_repeat": 3},
            "gates": {"train_ratio": [0.5, 0.97], "eval_ratio": [0.01, 0.2]},
        }
    )
    result = run_pipeline(recipe, tmp_path / "run", workers=1)
    assert result.gates_passed, result.manifest["gates"]
    page = build_report(tmp_path / "run")
    mix = section(page, "mixture")
    assert NOT_RUN not in mix and "<svg" in mix
    assert "available" in mix and "factor" in mix and "40.0%" in mix and "60.0%" in mix
    assert re.search(r"mix_repeat</code> &gt; 1\): [1-9]", mix)  # the scarce family was repeated
    assert "<td>mix</td>" in section(page, "drops")
    assert 'class="warn"' not in section(page, "overview")  # ≈tokens × repeats agree with the manifest


def test_same_run_dir_gives_the_same_bytes(page: str, run_dir: Path) -> None:
    assert build_report(run_dir) == page
    path = write_report(run_dir)
    first = path.read_bytes()
    assert path == run_dir / REPORT_NAME
    assert first == page.encode("utf-8")
    assert write_report(run_dir).read_bytes() == first


def test_absent_optional_data_says_not_run(page: str) -> None:
    for anchor in ("near-dedup", "decontamination", "mixture", "langid"):  # langid is disabled in the recipe
        assert NOT_RUN in section(page, anchor), anchor
    for anchor in ("overview", "counts", "lengths", "drops", "pii", "exact-dedup", "gates", "samples"):
        assert NOT_RUN not in section(page, anchor), anchor


def test_optional_sections_render_from_the_manifest(run_dir: Path, tmp_path: Path) -> None:
    run = _edit_manifest(
        run_dir,
        tmp_path / "run",
        near_dedup={"cluster_sizes": {"2": 7, "3": 2, "40": 1}},
        decontamination={
            "benchmarks": {
                "gsm8k": {
                    "items": 1319,
                    "items_matched": 4,
                    "documents_affected": 5,
                    "examples": [XSS, "q2"],
                },
                "humaneval": {
                    "items": 164,
                    "items_matched": 1,
                    "documents_affected": 2,
                    "documents_dropped": 1,
                    "documents_cut": 1,
                    "examples": [{"item_id": "HumanEval/7", "ngram": "def f(x): <b>", "action": "cut"}],
                },
            }
        },
        mixture={"by": "domain", "target": {"math": 0.7, "code": 0.3}, "achieved": {"math": 1.0}},
    )
    page = build_report(run)
    assert XSS not in page
    for anchor in ("near-dedup", "decontamination", "mixture"):
        body = section(page, anchor)
        assert NOT_RUN not in body, anchor
        assert "<svg" in body, anchor
    assert "33–64" in section(page, "near-dedup")  # the cluster of 40 falls in its power-of-two bin
    decon = section(page, "decontamination")
    assert "gsm8k" in decon and "humaneval" in decon and "&lt;script&gt;" in decon
    assert "documents dropped" in decon and "item_id: HumanEval/7 · ngram: def f(x): &lt;b&gt;" in decon
    mix = section(page, "mixture")
    assert "70.0%" in mix and "100.0%" in mix and "-30.0 pp" in mix


def test_language_confidence_histogram_when_langid_ran(tmp_path: Path) -> None:
    body = section(build_report(make_run(tmp_path, langid=True)), "langid")
    assert NOT_RUN not in body
    assert "<svg" in body and "labelled records" in body


def test_strings_from_the_manifest_are_escaped(run_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    manifest["gates"][0]["evidence"] = XSS
    manifest["stages"][0]["dropped"] = {XSS: 1}
    run = _edit_manifest(run_dir, tmp_path / "run", gates=manifest["gates"], stages=manifest["stages"])
    page = build_report(run)
    assert XSS not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3


def test_a_missing_shard_is_reported_not_raised(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "records" / "valid" / "part-00000.jsonl.zst").unlink()
    overview = section(build_report(run), "overview")
    assert "records/valid/part-00000.jsonl.zst: missing" in overview
    assert "moeforge data verify" in overview


def test_a_directory_without_a_manifest_raises_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        ManifestError, match=r"manifest\.json: missing; .* not a finished `moeforge data run`"
    ):
        build_report(tmp_path)
    with pytest.raises(ManifestError, match="no such directory"):
        write_report(tmp_path / "nope")
    assert not (tmp_path / REPORT_NAME).exists()
