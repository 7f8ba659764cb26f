"""``manifest.json``: everything needed to audit a dataset run, written last (it marks a finished run).

Fields: the format and contract versions, the moeforge version, the resolved recipe and its sha256,
every input (uri, size, sha256, source, task), every output shard per split (path relative to the run
directory, records, bytes, sha256), the review and quarantine files, record counts per split and records
and approximate tokens per split × family × lang × domain, the achieved mixture when mixing ran, per-stage accounting (``in = out + dropped + quarantined``) and the gate
results. Nothing in it depends on the clock or the machine, so a resumed run writes the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeforge import __version__
from moeforge.data.contract import CONTRACT_VERSION
from moeforge.data.store import ShardInfo

if TYPE_CHECKING:
    from moeforge.data.recipe import Recipe
    from moeforge.data.reduce import ReduceResult
    from moeforge.data.steps import StageCount

__all__ = ["MANIFEST_FORMAT", "ManifestError", "build_manifest", "load_manifest"]

MANIFEST_FORMAT = "moeforge.dataset/v1"


class ManifestError(ValueError):
    """A run directory has no readable manifest."""


def _shard(info: ShardInfo, root: Path) -> dict[str, Any]:
    return {
        "path": info.path.relative_to(root).as_posix(),
        "records": info.records,
        "bytes": info.bytes,
        "sha256": info.sha256,
    }


def build_manifest(
    recipe: Recipe,
    recipe_sha: str,
    task_stats: list[dict[str, Any]],
    stages: list[StageCount],
    red: ReduceResult,
    root: Path,
) -> dict[str, Any]:
    outputs, table = red.outputs, red.table
    decon = None
    for st in task_stats:
        if st.get("decontamination"):
            from moeforge.data.decontam import DecontamReport

            part = DecontamReport.from_json(st["decontamination"])
            if decon is None:
                decon = part
            else:
                decon.merge(part)
    inputs = [
        {
            "source": st["source"],
            "task": st["task"],
            "uri": i["uri"],
            "size": i["size"],
            "sha256": i["sha256"],
        }
        for st in task_stats
        for i in st["inputs"]
    ]
    return {
        "format": MANIFEST_FORMAT,
        "contract_version": CONTRACT_VERSION,
        "moeforge_version": __version__,
        "name": recipe.name,
        "recipe_sha256": recipe_sha,
        "recipe": recipe.resolved(),
        "inputs": inputs,
        "outputs": {split: [_shard(i, root) for i in infos] for split, infos in outputs.items()},
        "review": [_shard(i, root) for i in red.review],
        "quarantine": red.quarantine,
        "records": {split: sum(i.records for i in infos) for split, infos in outputs.items()},
        "token_unit": "approx_words",
        "counts": [
            {
                "split": s,
                "family": f,
                "lang": lang,
                "domain": d,
                "records": n,
                "tokens": red.tokens[(s, f, lang, d)],
            }
            for (s, f, lang, d), n in sorted(table.items())
        ],
        "stages": [s.to_json() for s in stages],
        "split_pool": red.split_pool,
        **({"near_dedup": red.near["near"]} if "near" in red.near else {}),
        **({"semantic_dedup": red.near["semantic"]} if "semantic" in red.near else {}),
        **({"mixture": red.mixture} if red.mixture is not None else {}),
        **({"decontamination": decon.to_json()} if decon is not None else {}),
    }


def load_manifest(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run_dir/manifest.json`` with errors a user can act on."""
    path = Path(run_dir) / "manifest.json"
    if not Path(run_dir).is_dir():
        raise ManifestError(f"{run_dir}: no such directory")
    if not path.exists():
        raise ManifestError(
            f"{path}: missing; {run_dir} is not a finished `moeforge data run` output (run it, or resume it)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: not a moeforge dataset manifest (format {MANIFEST_FORMAT} expected)")
    return data
