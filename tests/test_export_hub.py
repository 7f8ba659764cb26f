"""`moeforge export hub` against a stand-in Hub on 127.0.0.1 (tests/hub_standin.py): every uploaded file is
checked against the Hub's listing at the new commit — sha256 for LFS files, git blob id for the rest — and a
corrupted, missing or misreported file fails the upload by name, with the local files untouched."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("huggingface_hub")
pytest.importorskip("fastapi")

from hub_standin import HubStandin, blob_id, hub_standin_fixture  # noqa: F401
from moeforge.cli.main import app
from moeforge.export import (
    ExportError,
    HubVerificationError,
    export_checkpoint,
    file_digests,
    upload_to_hub,
)
from moeforge.model.config import load_model_config
from moeforge.model.transformer import MoETransformer
from moeforge.tokens.tokenizer import load_tokenizer
from moeforge.train.checkpoint import save_checkpoint

REPO = "me/tiny-moe"


@pytest.fixture(scope="module")
def export_dir(token_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `moeforge export hf` directory of a tiny random MoE checkpoint; tests must not modify it."""
    root = tmp_path_factory.mktemp("hub-export")
    vocab = load_tokenizer(token_tokenizer).get_vocab_size()
    cfg = load_model_config("tiny", [f"vocab_size={vocab}"])
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    run = root / "run"
    shutil.copytree(token_tokenizer, run / "tokenizer")
    state = {"model_config": cfg.model_dump(mode="json"), "config": {"name": "hub-test"}}
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(run, step=1, model=model, optimizer=opt, state=state, keep_last=1)
    return export_checkpoint(run, root / "hf")


def _local(export_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(export_dir.iterdir())}


def test_an_upload_verifies_every_file_against_the_listing_at_its_commit(
    export_dir: Path, hub_standin: HubStandin
) -> None:
    local = _local(export_dir)
    result = upload_to_hub(export_dir, REPO, token="test", endpoint=hub_standin.endpoint)

    assert dict(result) == {name: len(data) for name, data in local.items()}  # still (name, bytes) pairs
    assert result.commit == hub_standin.repos[REPO].head
    assert result.url == f"{hub_standin.endpoint}/{REPO}"
    assert set(result.verified) == set(local)  # every file, none skipped
    weights = local["model.safetensors"]
    assert result.verified["model.safetensors"] == f"sha256 {hashlib.sha256(weights).hexdigest()}"
    assert result.verified["README.md"] == f"blob {blob_id(local['README.md'])}"
    assert all(v.startswith("blob ") for k, v in result.verified.items() if k != "model.safetensors")
    stored = hub_standin.files(REPO)
    assert {k: v.data for k, v in stored.items() if k != ".gitattributes"} == local
    assert stored["model.safetensors"].lfs and not stored["config.json"].lfs
    # the weights went over the LFS basic transfer, and the listing read was the upload's own commit
    assert f"PUT /lfs-objects/{hashlib.sha256(weights).hexdigest()}" in hub_standin.requests
    assert f"GET /api/models/{REPO}/tree/{result.commit}" in hub_standin.requests
    assert not any("xet" in r for r in hub_standin.requests)
    assert set(hub_standin.tokens) == {"test"}


def test_file_digests_are_the_sha256_and_git_blob_id(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"Hello, World!")
    sha, blob = file_digests(f)
    assert sha == hashlib.sha256(b"Hello, World!").hexdigest()
    assert blob == "b45ef6fec89518d314f546fd6c3025367b721684"  # `git hash-object`


def test_a_corrupted_lfs_file_fails_by_name_and_a_rerun_repairs_it(
    export_dir: Path, hub_standin: HubStandin
) -> None:
    before = _local(export_dir)
    expected = hashlib.sha256(before["model.safetensors"]).hexdigest()
    hub_standin.corrupt.add("model.safetensors")
    with pytest.raises(HubVerificationError) as info:
        upload_to_hub(export_dir, REPO, token="test", endpoint=hub_standin.endpoint)
    msg = str(info.value)
    got = hashlib.sha256(hub_standin.files(REPO)["model.safetensors"].data).hexdigest()
    assert got != expected
    assert f"model.safetensors: sha256 expected {expected}" in msg and f"got {got}" in msg
    assert "1 of" in msg and "README.md" not in msg and "config.json" not in msg
    assert "untouched" in msg and "rerun `moeforge export hub" in msg
    assert _local(export_dir) == before

    hub_standin.corrupt.clear()  # the rerun the message asks for uploads the file again and verifies
    result = upload_to_hub(export_dir, REPO, token="test", endpoint=hub_standin.endpoint)
    assert result.verified["model.safetensors"] == f"sha256 {expected}"
    assert hub_standin.files(REPO)["model.safetensors"].data == before["model.safetensors"]


def test_a_regular_file_with_other_content_fails_on_its_git_blob_id(
    export_dir: Path, hub_standin: HubStandin
) -> None:
    card = (export_dir / "README.md").read_bytes()
    hub_standin.corrupt.add("README.md")
    with pytest.raises(HubVerificationError) as info:
        upload_to_hub(export_dir, REPO, token="test", endpoint=hub_standin.endpoint)
    got = blob_id(hub_standin.files(REPO)["README.md"].data)
    assert f"README.md: git blob id expected {blob_id(card)} ({len(card)} bytes), got {got}" in str(
        info.value
    )
    assert "model.safetensors" not in str(info.value).split("did not verify")[1]


def test_a_file_missing_from_the_commit_fails(export_dir: Path, hub_standin: HubStandin) -> None:
    hub_standin.drop.add("config.json")
    with pytest.raises(HubVerificationError, match=r"config\.json: missing from the commit"):
        upload_to_hub(export_dir, REPO, token="test", endpoint=hub_standin.endpoint)
    assert "config.json" not in hub_standin.files(REPO)


def test_a_listing_that_reports_another_sha256_fails(export_dir: Path, hub_standin: HubStandin) -> None:
    hub_standin.wrong_listing.add("model.safetensors")
    with pytest.raises(HubVerificationError, match=r"model\.safetensors: sha256 expected [0-9a-f]{64}"):
        upload_to_hub(export_dir, REPO, token="test", endpoint=hub_standin.endpoint)
    # the stored bytes are right: only the listing is wrong, and the check believes the listing
    assert (
        hub_standin.files(REPO)["model.safetensors"].data == (export_dir / "model.safetensors").read_bytes()
    )


def test_no_endpoint_means_huggingface_hubs_default(
    export_dir: Path, hub_standin: HubStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # HF_ENDPOINT is read into constants.ENDPOINT when huggingface_hub is imported
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub_standin.endpoint)
    result = upload_to_hub(export_dir, REPO, token="test")
    assert result.url == f"{hub_standin.endpoint}/{REPO}" and len(result.verified) == len(result)


def test_with_xet_enabled_huggingface_hub_never_asks_for_lfs(
    export_dir: Path, hub_standin: HubStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the fixture disables Xet: with hf_xet installed, upload_folder goes to the Xet token endpoint even
    though the stand-in's preupload answer says "lfs" — and fails, clearly, when the Hub has no Xet."""
    pytest.importorskip("hf_xet")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(ExportError, match="set HF_HUB_DISABLE_XET=1") as info:
        upload_to_hub(export_dir, REPO, token="test", endpoint=hub_standin.endpoint)
    assert not isinstance(info.value, HubVerificationError)
    assert f"GET /api/models/{REPO}/xet-write-token/main" in hub_standin.requests
    assert not any("lfs/objects/batch" in r for r in hub_standin.requests)


def test_the_cli_prints_each_verified_file_and_fails_cleanly_on_a_mismatch(
    export_dir: Path, hub_standin: HubStandin
) -> None:
    runner = CliRunner()
    args = ["export", "hub", str(export_dir), "--repo", REPO, "--token", "test"]
    args += ["--endpoint", hub_standin.endpoint]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would upload {len(_local(export_dir))} files to {hub_standin.endpoint}/{REPO}" in dry.stdout
    assert REPO not in hub_standin.repos  # a dry run sends nothing

    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    sha = hashlib.sha256((export_dir / "model.safetensors").read_bytes()).hexdigest()
    assert f"verified sha256 {sha}" in ok.stdout
    n = len(_local(export_dir))
    assert f"uploaded {n} files to {hub_standin.endpoint}/{REPO}" in ok.stdout
    assert f"all {n} verified against the Hub's listing" in ok.stdout
    assert ok.stdout.count("verified blob ") == n - 1

    hub_standin.corrupt.add("tokenizer.json")  # a fresh repo: the same files again would be a no-op commit
    bad = runner.invoke(app, [*args[:4], "me/other", *args[5:]])
    assert bad.exit_code == 1, bad.output
    assert isinstance(bad.exception, SystemExit)  # typer.Exit, not an escaped ExportError
    assert "did not verify" in bad.stderr and "tokenizer.json: git blob id expected" in bad.stderr
    assert "rerun" in bad.stderr and "Traceback" not in bad.output
    assert "uploaded" not in bad.stdout

    no_hub = runner.invoke(app, [*args[:-1], "http://127.0.0.1:9"])  # nothing listens there
    assert no_hub.exit_code == 2 and "upload to me/tiny-moe failed" in no_hub.stderr
    assert "Traceback" not in no_hub.output
