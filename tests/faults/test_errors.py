"""Faults other than a kill: a full disk at seeded write points, a read-only output directory, one flipped
byte in a record shard, a token shard or a checkpoint, a truncated ``manifest.json``, and a second
invocation started while the first is still at work. Each ends in a clear error (exit 2 or, for a
verification that found damage, 1; no traceback; the file named) or in the result of a run that was never
disturbed — never in output built from damaged input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from faultkit import (
    SEED,
    Chain,
    Exported,
    Tokens,
    Trained,
    assert_clean_error,
    cli,
    copy_tree,
    data_run_args,
    export_args,
    files_of,
    flip_byte,
    in_parallel,
    ok,
    stopped_at,
    tokenize_args,
    train_outcome,
    truncate,
)

pytestmark = pytest.mark.faults

ENOSPC_POINTS = 3  # seeded full-disk points per command
DISK_FULL = "No space left on device"


def _enospc_points(names: list[str]) -> list[int]:
    return sorted(random.Random(SEED + 1).sample(range(1, len(names) + 1), ENOSPC_POINTS))


def _records(run: Path) -> dict[str, bytes]:
    keep = ("manifest.json", "records/", "quarantine/", "review/")
    return {k: v for k, v in files_of(run).items() if k.startswith(keep)}


# ---- a full disk -----------------------------------------------------------------------------------------


def test_data_run_on_a_full_disk_stops_clearly_and_resumes_to_identical_bytes(
    chain: Chain, tmp_path: Path
) -> None:
    ref = _records(chain.run)

    def one(n: int) -> None:
        out = tmp_path / f"e{n:03d}"
        full = cli(data_run_args(chain.recipe, out), faults=f"enospc@{n}")
        assert_clean_error(full, DISK_FULL)
        ok(data_run_args(chain.recipe, out))
        assert _records(out) == ref, f"enospc@{n}: the resumed dataset differs"

    in_parallel(one, _enospc_points(chain.run_points))


def test_tokenize_on_a_full_disk_leaves_no_output_and_a_rerun_is_identical(
    chain: Chain, tokens: Tokens, tmp_path: Path
) -> None:
    ref = files_of(tokens.path)

    def one(n: int) -> None:
        out = tmp_path / f"e{n:03d}" / "tokens"
        full = cli(tokenize_args(chain, out), faults=f"enospc@{n}")
        assert_clean_error(full, DISK_FULL)
        assert not out.exists() or files_of(out) == ref, f"enospc@{n}: a partial token directory"
        ok([*tokenize_args(chain, out), "--overwrite"])
        assert files_of(out) == ref

    in_parallel(one, _enospc_points(tokens.points))


def test_train_on_a_full_disk_stops_clearly_and_resumes_bit_exactly(trained: Trained, tmp_path: Path) -> None:
    ref = train_outcome(trained.run)

    def one(n: int) -> None:
        out = tmp_path / f"e{n:03d}"
        full = cli(trained.args(out), faults=f"enospc@{n}")
        assert_clean_error(full, DISK_FULL)
        ok(trained.args(out, "--resume"))
        got = train_outcome(out)
        assert {k: v for k, v in got.items() if k != "checkpoints"} == {
            k: v for k, v in ref.items() if k != "checkpoints"
        }, f"enospc@{n}: the resumed run differs"
        assert set(ref["checkpoints"]) <= set(got["checkpoints"])
        ok(["train", "verify", str(out)])

    in_parallel(one, _enospc_points(trained.points))


def test_export_on_a_full_disk_leaves_no_output_and_a_rerun_is_identical(
    trained: Trained, exported: Exported, tmp_path: Path
) -> None:
    ref = files_of(exported.path)

    def one(n: int) -> None:
        out = tmp_path / f"e{n:03d}" / "hf"
        full = cli(export_args(trained, out), faults=f"enospc@{n}")
        assert_clean_error(full, DISK_FULL)
        assert not out.exists() or files_of(out) == ref, f"enospc@{n}: a partial export"
        ok(export_args(trained, out, "--overwrite"))
        assert files_of(out) == ref

    in_parallel(one, _enospc_points(exported.points))


# ---- a read-only output directory ----------------------------------------------------------------------


def test_every_command_refuses_a_read_only_output_directory_by_name(
    chain: Chain, trained: Trained, readonly_dir: Path
) -> None:
    runs = {
        "data run": data_run_args(chain.recipe, readonly_dir / "run"),
        "tokenize": tokenize_args(chain, readonly_dir / "tokens"),
        "train": trained.args(readonly_dir / "train"),
        "export": export_args(trained, readonly_dir / "hf"),
    }
    for what, args in runs.items():
        proc = cli(args)
        assert_clean_error(proc, str(readonly_dir))
        text = proc.stderr + proc.stdout
        assert "Read-only file system" in text or "Permission denied" in text, f"{what}: {text}"
    assert list(readonly_dir.iterdir()) == []


# ---- one flipped byte, a truncated manifest --------------------------------------------------------------


def test_a_flipped_byte_in_a_record_shard_is_found_by_verify_and_never_tokenized(
    chain: Chain, tmp_path: Path
) -> None:
    run = copy_tree(chain.run, tmp_path / "run")
    shard = sorted((run / "records" / "train").iterdir())[0]
    flip_byte(shard)
    assert_clean_error(cli(["data", "verify", str(run)]), "records/train/", "sha256", codes=(1,))
    out = tmp_path / "tokens"
    assert_clean_error(cli(tokenize_args(chain, out, run)), str(shard), "changed after the run")
    assert not out.exists()


def test_a_truncated_run_manifest_is_a_clear_error_and_a_rerun_restores_it(
    chain: Chain, tmp_path: Path
) -> None:
    run = copy_tree(chain.run, tmp_path / "run")
    truncate(run / "manifest.json")
    for args in (["data", "verify", str(run)], tokenize_args(chain, tmp_path / "tokens", run)):
        assert_clean_error(cli(args), f"{run / 'manifest.json'}: not valid JSON")
    ok(data_run_args(chain.recipe, run))  # the same recipe into the same --out rebuilds what it promised
    assert _records(run) == _records(chain.run)


def test_a_flipped_byte_or_a_truncated_manifest_in_token_shards_stops_training(
    tokens: Tokens, trained: Trained, tmp_path: Path
) -> None:
    for name, damage, says in (
        ("train.bin", flip_byte, "sha256"),
        ("train.idx", flip_byte, "sha256"),
        ("manifest.json", truncate, "not valid JSON"),
    ):
        bad = copy_tree(tokens.path, tmp_path / f"tokens-{name}")
        damage(bad / name)
        out = tmp_path / f"run-{name}"
        proc = cli([*trained.args(out), "--set", f"data.tokens={bad}"])
        assert_clean_error(proc, str(bad / name) if name != "manifest.json" else str(bad), says)
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_a_damaged_checkpoint_is_named_by_train_verify_and_refused_by_resume_and_export(
    trained: Trained, tmp_path: Path
) -> None:
    for name, damage in (
        ("model.safetensors", flip_byte),
        ("optimizer.safetensors", flip_byte),
        ("state.json", truncate),
    ):
        run = copy_tree(trained.run, tmp_path / f"run-{name}")
        last = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
        damage(last / name)
        assert_clean_error(cli(["train", "verify", str(run)]), f"{last / name}", "corrupt", codes=(1,))
        assert_clean_error(cli(["train", "verify", str(last)]), f"{last / name}", codes=(1,))
        assert_clean_error(cli(trained.args(run, "--resume", "--set", "steps=10")), str(last), "corrupt")
        hf = tmp_path / f"hf-{name}"
        assert_clean_error(cli(["export", "hf", str(last), "--out", str(hf)]), str(last), "corrupt")
        assert not hf.exists()


# ---- a second invocation while the first is at work ----------------------------------------------------


def test_a_second_data_run_into_the_same_directory_is_refused_while_the_first_runs(
    chain: Chain, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = data_run_args(chain.recipe, out)
    with stopped_at(args, point=1) as first:
        assert_clean_error(cli(args), str(out), "in use")
    assert first.finished.returncode == 0, first.finished.stderr
    assert _records(out) == _records(chain.run)


def test_a_second_tokenize_into_the_same_output_is_refused_while_the_first_runs(
    chain: Chain, tokens: Tokens, tmp_path: Path
) -> None:
    out = tmp_path / "tokens"
    args = tokenize_args(chain, out)
    with stopped_at(args, point=1) as first:
        assert_clean_error(cli(args), str(out), "in use")
    assert first.finished.returncode == 0, first.finished.stderr
    assert files_of(out) == files_of(tokens.path)


def test_a_second_trainer_on_the_same_directory_is_refused_while_the_first_runs(
    trained: Trained, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with stopped_at(trained.args(out), point=1) as first:
        assert_clean_error(cli(trained.args(out)), str(out), "in use")
        assert_clean_error(cli(trained.args(out, "--resume")), str(out), "in use")
    assert first.finished.returncode == 0, first.finished.stderr
    ref, got = train_outcome(trained.run), train_outcome(out)
    assert got == ref


def test_two_exports_to_the_same_output_leave_one_complete_export(
    trained: Trained, exported: Exported, tmp_path: Path
) -> None:
    """The first export is held mid-way; a second one to the same place finishes. When the first goes on,
    it finds the output it meant to create already there and stops with a clear error — it does not
    replace or mix into the other's files."""
    out = tmp_path / "hf"
    with stopped_at(export_args(trained, out), point=1) as first:
        ok(export_args(trained, out))
    assert_clean_error(first.finished, str(out), "appeared while")
    assert files_of(out) == files_of(exported.path)
