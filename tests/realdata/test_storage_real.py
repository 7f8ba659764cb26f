"""The shared public data sets through the storage path: exported to a real S3 API (moto server), read
back verified, and inventoried against dataset families — the same coverage as the local copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeforge.data.inventory import run_inventory
from moeforge.storage.export import export_directory, local_files
from moeforge.storage.fetch import fetch_export
from s3_server import S3

pytestmark = pytest.mark.realdata

FAMILIES = """
families:
  - {name: gsm8k, stage: sft, patterns: ["gsm8k/**"], required: ["gsm8k/train.jsonl", "gsm8k/test.jsonl"]}
  - {name: humaneval, stage: eval, patterns: ["humaneval/**"], required: ["humaneval/HumanEval.jsonl*"]}
  - {name: ruslit, stage: pretrain, patterns: ["ruslit/**"], min_objects: 200}
  - {name: shakespeare, stage: pretrain, patterns: ["tinyshakespeare/**"]}
  - {name: ultrafeedback, stage: dpo, patterns: ["ultrafeedback/**"]}
"""


def test_shared_data_exports_reads_back_and_inventories_like_the_local_copy(
    s3: S3, real_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    src = shutil.copytree(real_data, tmp_path / "data")  # the export locks its source: not the shared copy
    summary = export_directory(src, s3.url("corpora"))
    assert summary.complete and len(summary.verified) == len(list(local_files(src))) > 100
    copy = fetch_export(s3.url("corpora"))
    assert all((copy / k).read_bytes() == p.read_bytes() for k, p in local_files(src))

    families = tmp_path / "families.yaml"
    families.write_text(FAMILIES)
    here = run_inventory(str(src), families, tmp_path / "inv-local").coverage
    there = run_inventory(s3.url("corpora"), families, tmp_path / "inv-s3").coverage
    status = {f["name"]: f["status"] for f in there["families"]}
    assert status == {
        "gsm8k": "present",
        "humaneval": "present",
        "ruslit": "partial",  # 104 texts, fewer than the 200 asked for
        "shakespeare": "present",
        "ultrafeedback": "missing",
    }
    ruslit = next(f for f in there["families"] if f["name"] == "ruslit")
    assert ruslit["objects"] == 104 and "fewer than min_objects 200" in ruslit["reasons"][0]
    counts = {f["name"]: (f["objects"], f["bytes"]) for f in there["families"]}
    assert counts == {f["name"]: (f["objects"], f["bytes"]) for f in here["families"]}
    # beyond the families: the export's own manifest on S3, the export's lock file locally
    assert set(there["unmatched"]["keys"]) - {"export-manifest.json"} == set(here["unmatched"]["keys"]) - {
        ".lock"
    }
    assert there["totals"]["matched_bytes"] == here["totals"]["matched_bytes"]
