"""`moeforge data inventory`: streamed listings in key order, family coverage, resume, S3, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moeforge.cli.main import app
from moeforge.config import ConfigError
from moeforge.data.coverage import glob_regex, load_families
from moeforge.data.inventory import (
    COVERAGE_HTML,
    COVERAGE_JSON,
    INVENTORY_JSON,
    UNMATCHED_JSONL,
    InventoryError,
    run_inventory,
)
from moeforge.storage.listing import head_sha256, iter_objects
from moeforge.storage.urls import StorageError
from s3_server import S3

runner = CliRunner()
OUTPUTS = (INVENTORY_JSON, COVERAGE_JSON, COVERAGE_HTML, UNMATCHED_JSONL)
EXAMPLE = (
    Path(__file__).resolve().parents[2]
    / "src"
    / "moeforge"
    / "configs"
    / "data"
    / "families"
    / "example.yaml"
)

# key → size. gsm8k is complete; code is partial (no test file, one empty file); wiki is missing;
# "notes/…", "a-b", "a.b" match nothing; "gsm8k/extra/x.py" is matched by gsm8k and by code (overlap).
TREE = {
    "a-b": 3,
    "a.b": 4,
    "a/b": 5,
    "a/c/d": 6,
    "code/py/lib.py": 100,
    "code/py/empty.py": 0,
    "gsm8k/extra/x.py": 7,
    "gsm8k/test.jsonl": 600,
    "gsm8k/train.jsonl": 900,
    "notes/readme.md": 11,
    "é/z": 2,
}
FAMILIES = {
    "families": [
        {
            "name": "gsm8k",
            "stage": "sft",
            "patterns": ["gsm8k/**"],
            "required": ["gsm8k/train*.jsonl", "gsm8k/test*.jsonl"],
            "min_objects": 2,
            "min_bytes": 1000,
        },
        {
            "name": "code",
            "stage": "pretrain",
            "patterns": ["code/**", "**/*.py"],
            "required": ["code/**/test_*.py"],
        },
        {"name": "wiki", "stage": "pretrain", "patterns": ["wiki/**"]},
        {"name": "ab", "stage": "pretrain", "patterns": ["a/*"]},
    ]
}


def utf8_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode("utf-8"))


def make_tree(root: Path, tree: dict[str, int] = TREE) -> Path:
    for key, size in tree.items():
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes(i % 251 for i in range(size)))
    return root


def write_families(path: Path, data: dict = FAMILIES) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def local(tmp_path: Path) -> tuple[Path, Path]:
    return make_tree(tmp_path / "root"), write_families(tmp_path / "families.yaml")


def outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


# ------------------------------------------------------------------------------------------- globs


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("gsm8k/**", "gsm8k/a/b.jsonl", True),
        ("gsm8k/*", "gsm8k/a/b.jsonl", False),
        ("gsm8k/*.jsonl", "gsm8k/train.jsonl", True),
        ("**/*.py", "lib.py", True),
        ("**/*.py", "a/b/lib.py", True),
        ("a/**/b", "a/b", True),
        ("a/?", "a/bc", False),
        ("a/[!x]", "a/y", True),
        ("a/[!x]", "a/x", False),
        ("a.b", "a-b", False),
    ],
)
def test_glob_semantics(pattern: str, key: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).fullmatch(key)) is matches


# ----------------------------------------------------------------------------------------- listing


def test_local_listing_is_in_utf8_key_order_and_resumes_after_any_key(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    keys = [o.key for o in iter_objects(str(root))]
    assert keys == utf8_sorted(list(TREE))  # "a-b" < "a.b" < "a/b" < "a/c/d": a directory sorts as "a/"
    assert [o.size for o in iter_objects(str(root))] == [TREE[k] for k in keys]
    probes = [*keys, "", "a", "a/", "a/bb", "a/c", "a/c/", "zzz", "gsm8k/", "gsm8k/extra/y"]
    for after in probes:
        assert [o.key for o in iter_objects(str(root), start_after=after)] == [k for k in keys if k > after]


def test_fsspec_listing_matches_the_local_one(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/inventory-{os.getpid()}"
    for key, size in TREE.items():
        fs.pipe(f"{base}/{key}", b"x" * size)
    try:
        objs = list(iter_objects(f"memory://{base}"))
        assert [o.key for o in objs] == utf8_sorted(list(TREE))
        assert [o.size for o in objs] == [TREE[o.key] for o in objs]
        assert [o.key for o in iter_objects(f"memory://{base}", start_after="a/b")] == [
            k for k in utf8_sorted(list(TREE)) if k > "a/b"
        ]
    finally:
        fs.rm(base, recursive=True)


def test_missing_or_wrong_roots_raise_a_clear_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such directory"):
        list(iter_objects(str(tmp_path / "nope")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        list(iter_objects(str(tmp_path / "file")))
    with pytest.raises(StorageError, match="no such directory"):
        list(iter_objects("memory:///definitely-not-here"))


# ---------------------------------------------------------------------------------------- coverage


def test_local_inventory_counts_statuses_overlaps_and_unmatched(
    local: tuple[Path, Path], tmp_path: Path
) -> None:
    root, families = local
    out = tmp_path / "out"
    result = run_inventory(str(root), families, out)
    cov = json.loads((out / COVERAGE_JSON).read_text())
    assert cov == result.coverage | {}  # the file is the document returned
    fams = {f["name"]: f for f in cov["families"]}
    assert [f["name"] for f in cov["families"]] == ["gsm8k", "code", "wiki", "ab"]

    assert fams["gsm8k"]["status"] == "present"
    assert (fams["gsm8k"]["objects"], fams["gsm8k"]["bytes"]) == (3, 1507)
    assert fams["gsm8k"]["reasons"] == []

    assert fams["code"]["status"] == "partial"
    assert (fams["code"]["objects"], fams["code"]["bytes"]) == (2, 100)
    assert fams["code"]["reasons"] == [
        "required 'code/**/test_*.py' matches no object",
        "1 zero-byte object(s)",
    ]

    assert fams["wiki"]["status"] == "missing"
    assert (fams["wiki"]["objects"], fams["wiki"]["bytes"]) == (0, 0)
    assert fams["ab"]["status"] == "present" and fams["ab"]["objects"] == 1  # "a/b", not "a/c/d"

    assert cov["overlaps"] == [{"family": "gsm8k", "also_matched": "code", "objects": 1}]
    unmatched = ["a-b", "a.b", "a/c/d", "notes/readme.md", "é/z"]
    assert cov["unmatched"] == {"objects": 5, "bytes": 26, "keys": unmatched, "keys_truncated": False}
    assert cov["totals"] == {
        "objects": 11,
        "bytes": sum(TREE.values()),
        "matched_objects": 6,
        "matched_bytes": sum(TREE.values()) - 26,
        "present": 2,
        "partial": 1,
        "missing": 1,
    }
    assert cov["stages"]["pretrain"] == {"present": 1, "partial": 1, "missing": 1, "objects": 3, "bytes": 105}

    inv = json.loads((out / INVENTORY_JSON).read_text())
    assert inv["root"] == str(root) and inv["count"] == 11
    assert [o["key"] for o in inv["objects"]] == utf8_sorted(list(TREE))
    by_key = {o["key"]: o for o in inv["objects"]}
    assert by_key["gsm8k/extra/x.py"]["family"] == "gsm8k"  # the first family in file order
    assert by_key["notes/readme.md"]["family"] is None
    assert all(o["sha256"] is None for o in inv["objects"])
    assert inv["families_sha256"] == hashlib.sha256(families.read_bytes()).hexdigest()
    lines = [json.loads(line) for line in (out / UNMATCHED_JSONL).read_text().splitlines()]
    assert [u["key"] for u in lines] == unmatched
    assert sorted(p.name for p in out.iterdir() if "partial" in p.name) == []  # staging is removed


def test_an_empty_root_gives_every_family_missing_and_valid_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_inventory(str(tmp_path / "empty"), write_families(tmp_path / "f.yaml"), tmp_path / "out")
    assert {f["status"] for f in result.coverage["families"]} == {"missing"}
    inv = json.loads((tmp_path / "out" / INVENTORY_JSON).read_text())
    assert inv["objects"] == [] and inv["count"] == 0
    assert (tmp_path / "out" / UNMATCHED_JSONL).read_bytes() == b""


def test_hash_computes_sha256_of_local_files(local: tuple[Path, Path], tmp_path: Path) -> None:
    root, families = local
    run_inventory(str(root), families, tmp_path / "out", compute_sha256=True)
    inv = json.loads((tmp_path / "out" / INVENTORY_JSON).read_text())
    for o in inv["objects"]:
        assert o["sha256"] == hashlib.sha256((root / o["key"]).read_bytes()).hexdigest()


def test_unmatched_keys_in_coverage_are_capped_but_all_are_streamed(tmp_path: Path, monkeypatch) -> None:
    import moeforge.data.inventory as inventory

    monkeypatch.setattr(inventory, "UNMATCHED_KEPT", 3)
    root = make_tree(tmp_path / "root", {f"junk/{i:02d}": 1 for i in range(7)})
    run_inventory(str(root), write_families(tmp_path / "f.yaml"), tmp_path / "out")
    cov = json.loads((tmp_path / "out" / COVERAGE_JSON).read_text())
    assert cov["unmatched"]["keys"] == ["junk/00", "junk/01", "junk/02"]
    assert cov["unmatched"]["keys_truncated"] is True and cov["unmatched"]["objects"] == 7
    assert len((tmp_path / "out" / UNMATCHED_JSONL).read_text().splitlines()) == 7


# ------------------------------------------------------------------------------------------ resume


class Interrupt(Exception):
    pass


def interrupt_after(n: int):
    def progress(objects: int, _bytes: int) -> None:
        if objects >= n:
            raise Interrupt

    return progress


@pytest.mark.parametrize("stop_after", [1, 4, 5, 10])
def test_resume_after_an_interruption_is_byte_identical(
    local: tuple[Path, Path], tmp_path: Path, stop_after: int
) -> None:
    root, families = local
    run_inventory(str(root), families, tmp_path / "clean", page_size=2)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_inventory(str(root), families, out, page_size=2, progress=interrupt_after(stop_after))
    assert not (out / INVENTORY_JSON).exists()
    result = run_inventory(str(root), families, out, page_size=2)
    assert result.resumed_objects == (stop_after // 2) * 2  # the pages whose state was recorded
    assert outputs(out) == outputs(tmp_path / "clean")


def test_interrupted_twice_then_finished_is_byte_identical(local: tuple[Path, Path], tmp_path: Path) -> None:
    root, families = local
    run_inventory(str(root), families, tmp_path / "clean", page_size=3, compute_sha256=True)
    out = tmp_path / "resumed"
    for n in (4, 8):
        with pytest.raises(Interrupt):
            run_inventory(
                str(root), families, out, page_size=3, compute_sha256=True, progress=interrupt_after(n)
            )
    run_inventory(str(root), families, out, page_size=3, compute_sha256=True)
    assert outputs(out) == outputs(tmp_path / "clean")


def test_a_finished_inventory_reruns_from_the_start(local: tuple[Path, Path], tmp_path: Path) -> None:
    root, families = local
    out = tmp_path / "out"
    first = outputs(run_inventory(str(root), families, out).out)
    (root / "wiki").mkdir()
    (root / "wiki" / "page").write_bytes(b"hello")
    result = run_inventory(str(root), families, out)
    assert result.resumed_objects == 0 and result.objects == 12
    assert outputs(out) != first
    assert {f["name"]: f["status"] for f in result.coverage["families"]}["wiki"] == "present"


def test_a_changed_families_file_or_root_is_refused_without_restart(
    local: tuple[Path, Path], tmp_path: Path
) -> None:
    root, families = local
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        run_inventory(str(root), families, out, page_size=2, progress=interrupt_after(3))
    changed = write_families(tmp_path / "other.yaml", {"families": FAMILIES["families"][:2]})
    with pytest.raises(InventoryError, match="--restart"):
        run_inventory(str(root), changed, out)
    with pytest.raises(InventoryError, match="--restart"):
        run_inventory(str(make_tree(tmp_path / "root2")), families, out)
    with pytest.raises(InventoryError, match="--restart"):
        run_inventory(str(root), families, out, compute_sha256=True)
    result = run_inventory(str(root), changed, out, restart=True)
    assert result.resumed_objects == 0
    assert [f["name"] for f in result.coverage["families"]] == ["gsm8k", "code"]
    with pytest.raises(InventoryError, match="--restart"):  # a finished inventory of another file too
        run_inventory(str(root), families, out)


# ---------------------------------------------------------------------------------- families errors


@pytest.mark.parametrize(
    ("family", "needle"),
    [
        ({"name": "x", "stage": "sft", "patterns": ["x/**"], "min_objects": -1}, "families.0.min_objects"),
        ({"name": "x", "stage": "sft"}, "families.0.patterns"),
        ({"name": "x", "stage": "sft", "patterns": []}, "families.0.patterns"),
        ({"name": "x", "stage": "sft", "patterns": ["x"], "colour": "red"}, "families.0.colour"),
        ({"name": "x", "stage": "sft", "patterns": ["/abs/**"]}, "families.0.patterns"),
        ({"name": "x", "stage": "sft", "patterns": ["x"], "required": ["[z-a]"]}, "families.0.required"),
        ({"name": "", "stage": "sft", "patterns": ["x"]}, "families.0.name"),
    ],
)
def test_malformed_families_file_names_the_file_and_field(tmp_path: Path, family: dict, needle: str) -> None:
    path = write_families(tmp_path / "bad.yaml", {"families": [family]})
    with pytest.raises(ConfigError) as err:
        load_families(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_duplicate_family_names_and_bad_yaml_are_refused(tmp_path: Path) -> None:
    fam = {"name": "x", "stage": "sft", "patterns": ["x"]}
    with pytest.raises(ConfigError, match="'x' is used twice"):
        load_families(write_families(tmp_path / "dup.yaml", {"families": [fam, fam]}))
    bad = tmp_path / "broken.yaml"
    bad.write_text("families: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_families(bad)


def test_the_shipped_example_families_file_validates() -> None:
    spec = load_families(EXAMPLE)
    assert [f.name for f in spec.families][:2] == ["gsm8k", "humaneval"]


def test_a_missing_root_is_a_storage_error_and_leaves_no_output(
    local: tuple[Path, Path], tmp_path: Path
) -> None:
    _, families = local
    with pytest.raises(StorageError, match="no such directory"):
        run_inventory(str(tmp_path / "nope"), families, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- S3


def upload(s3: S3, prefix: str, tree: dict[str, int] = TREE) -> dict[str, str]:
    """Upload ``tree`` under ``prefix``, each object with the sha256 metadata `moeforge export` writes."""
    client = s3.client()
    shas = {}
    for key, size in tree.items():
        body = bytes(i % 251 for i in range(size))
        shas[key] = hashlib.sha256(body).hexdigest()
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}{key}", Body=body, Metadata={"sha256": shas[key]})
    client.put_object(Bucket=s3.bucket, Key=f"{prefix}notes/", Body=b"")  # a console "folder" marker
    client.put_object(Bucket=s3.bucket, Key="elsewhere/x", Body=b"outside the root")
    return shas


def test_s3_listing_pages_in_key_order_with_etags_and_start_after(s3: S3) -> None:
    upload(s3, "lake/")
    objs = list(iter_objects(s3.url("lake"), page_size=2))
    assert [o.key for o in objs] == utf8_sorted(list(TREE))  # no "notes/" marker, nothing outside
    assert all(o.etag and not o.etag.startswith('"') for o in objs)
    assert [o.size for o in objs] == [TREE[o.key] for o in objs]
    assert [o.key for o in iter_objects(s3.url("lake"), start_after="a/b", page_size=2)] == [
        k for k in utf8_sorted(list(TREE)) if k > "a/b"
    ]
    assert head_sha256(s3.url("lake"), "a/b") == hashlib.sha256(bytes(range(5))).hexdigest()


def test_s3_missing_bucket_or_empty_prefix_is_a_clear_error(s3: S3) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        list(iter_objects(f"s3://{s3.bucket}-missing/x"))
    with pytest.raises(StorageError, match="no objects under this prefix"):
        list(iter_objects(s3.url("nothing-here")))


def test_s3_inventory_with_hash_resumes_byte_identical(s3: S3, tmp_path: Path) -> None:
    shas = upload(s3, "lake/")
    families = write_families(tmp_path / "families.yaml")
    clean = run_inventory(s3.url("lake"), families, tmp_path / "clean", page_size=2, compute_sha256=True)
    inv = json.loads((tmp_path / "clean" / INVENTORY_JSON).read_text())
    assert inv["root"] == s3.url("lake")
    assert {o["key"]: o["sha256"] for o in inv["objects"]} == shas
    assert all(o["etag"] for o in inv["objects"])
    assert {f["name"]: f["status"] for f in clean.coverage["families"]} == {
        "gsm8k": "present",
        "code": "partial",
        "wiki": "missing",
        "ab": "present",
    }
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_inventory(
            s3.url("lake"), families, out, page_size=2, compute_sha256=True, progress=interrupt_after(5)
        )
    result = run_inventory(s3.url("lake"), families, out, page_size=2, compute_sha256=True)
    assert result.resumed_objects == 4
    assert outputs(out) == outputs(tmp_path / "clean")


# --------------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_report_and_prints_the_family_table(local: tuple[Path, Path], tmp_path: Path) -> None:
    root, families = local
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["data", "inventory", str(root), "--families", str(families), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    for name in ("gsm8k", "code", "wiki", "present", "partial", "missing"):
        assert name in result.stdout
    page = (out / COVERAGE_HTML).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in page
    for fam in FAMILIES["families"]:
        assert f"<td>{fam['name']}</td>" in page
    assert "notes/readme.md" in page  # the unmatched keys are listed


def test_cli_json_and_require_complete(local: tuple[Path, Path], tmp_path: Path) -> None:
    root, families = local
    args = ["data", "inventory", str(root), "-f", str(families), "-o", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["objects"] == 11
    assert runner.invoke(app, [*args, "--require-complete"]).exit_code == 3
    complete = write_families(tmp_path / "complete.yaml", {"families": FAMILIES["families"][:1]})
    ok = [
        "data",
        "inventory",
        str(root),
        "-f",
        str(complete),
        "-o",
        str(tmp_path / "out2"),
        "--require-complete",
    ]
    assert runner.invoke(app, ok).exit_code == 0


def test_cli_user_errors_are_one_line_and_exit_2(local: tuple[Path, Path], tmp_path: Path) -> None:
    root, families = local
    missing = runner.invoke(
        app, ["data", "inventory", str(tmp_path / "nope"), "-f", str(families), "-o", str(tmp_path / "o")]
    )
    assert missing.exit_code == 2
    assert "no such directory" in missing.stderr and "Traceback" not in missing.output
    bad = write_families(
        tmp_path / "bad.yaml",
        {"families": [{"name": "x", "stage": "s", "patterns": ["x"], "min_bytes": "lots"}]},
    )
    result = runner.invoke(app, ["data", "inventory", str(root), "-f", str(bad), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "families.0.min_bytes" in result.stderr
    out = tmp_path / "o2"
    assert (
        runner.invoke(app, ["data", "inventory", str(root), "-f", str(families), "-o", str(out)]).exit_code
        == 0
    )
    other = write_families(tmp_path / "other.yaml", {"families": FAMILIES["families"][:1]})
    refused = runner.invoke(app, ["data", "inventory", str(root), "-f", str(other), "-o", str(out)])
    assert refused.exit_code == 2 and "--restart" in refused.stderr
    restarted = runner.invoke(
        app, ["data", "inventory", str(root), "-f", str(other), "-o", str(out), "--restart"]
    )
    assert restarted.exit_code == 0, restarted.output
