"""SIGKILL at seeded fault points of `data run`, `data tokenize`, `train` and `export hf`: each killed run
dies at its point (exit -9), and running the command again — `--resume` for train, `--overwrite` for an
output that had already landed — ends with the bytes of a run that was never interrupted. What a crash
leaves behind (``.X.tmp`` files and directories) is never taken for data.

Points: a command is run once with ``MOEFORGE_FAULTS=count:…`` (the session's reference run), then
``KILL_POINTS`` distinct points are drawn with ``random.Random(SEED)`` and the command's last point is
added (after its final commit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faultkit import (
    Chain,
    Exported,
    Tokens,
    Trained,
    cli,
    data_run_args,
    export_args,
    files_of,
    in_parallel,
    ok,
    pick_points,
    temp_leftovers,
    tokenize_args,
    train_outcome,
)

from moeforge.data.gates import run_gates
from moeforge.data.manifest import load_manifest

pytestmark = pytest.mark.faults


def _killed(args: list[str], n: int) -> None:
    proc = cli(args, faults=f"kill@{n}")
    assert proc.returncode == -9, f"kill@{n}: exit {proc.returncode}, not SIGKILL\n{proc.stderr[-2000:]}"


def data_snapshot(run: Path) -> dict[str, bytes]:
    """The dataset a run promises: manifest, record shards, review and quarantine files."""
    files = ["manifest.json", *[p.relative_to(run).as_posix() for p in run.glob("records/*/*")]]
    files += [p.relative_to(run).as_posix() for p in run.glob("review/*")]
    files += ["quarantine/quarantine.jsonl"]
    return {f: (run / f).read_bytes() for f in sorted(files)}


def test_data_run_killed_at_any_point_resumes_to_identical_bytes(chain: Chain, tmp_path: Path) -> None:
    ref = data_snapshot(chain.run)
    points = pick_points(chain.run_points)

    def one(n: int) -> None:
        out = tmp_path / f"k{n:03d}"
        args = data_run_args(chain.recipe, out)
        _killed(args, n)
        resumed = cli(args)
        assert resumed.returncode == 0, f"kill@{n}: resume failed\n{resumed.stdout}\n{resumed.stderr}"
        assert data_snapshot(out) == ref, f"kill@{n}: the resumed dataset differs from the reference"
        # leftovers of the crash stay outside what the dataset lists, and its gates (hash: no unlisted
        # file among the outputs) pass
        manifest = load_manifest(out)
        listed = json.dumps(manifest["outputs"]) + json.dumps(manifest["review"])
        for left in temp_leftovers(out):
            assert Path(left).name not in listed, f"kill@{n}: {left} is listed as data"
            assert not left.startswith(("records/", "review/", "quarantine/")), (
                f"kill@{n}: {left} among outputs"
            )
        failed = [g for g in run_gates(out, manifest) if not g.passed]
        assert not failed, f"kill@{n}: {failed}"

    in_parallel(one, points)


def test_tokenize_killed_at_any_point_reruns_to_identical_shards(
    chain: Chain, tokens: Tokens, tmp_path: Path
) -> None:
    ref = files_of(tokens.path)
    points = pick_points(tokens.points)

    def one(n: int) -> None:
        parent = tmp_path / f"k{n:03d}"
        out = parent / "tokens"
        args = tokenize_args(chain, out)
        _killed(args, n)
        if out.exists():  # killed after the rename: the output is complete as it stands
            assert files_of(out) == ref, f"kill@{n}: a published token directory differs"
            args = [*args, "--overwrite"]
        again = cli(args)  # the stale .tokens.*.tmp beside it must not get in the way
        assert again.returncode == 0, f"kill@{n}: rerun failed\n{again.stdout}\n{again.stderr}"
        assert files_of(out) == ref, f"kill@{n}: the rerun's token directory differs from the reference"
        assert temp_leftovers(out) == [], f"kill@{n}: temporary files inside the output"

    in_parallel(one, points)


def test_train_killed_at_any_point_resumes_bit_exactly(trained: Trained, tmp_path: Path) -> None:
    ref = train_outcome(trained.run)
    points = pick_points(trained.points)

    def one(n: int) -> None:
        out = tmp_path / f"k{n:03d}"
        _killed(trained.args(out), n)
        resumed = cli(trained.args(out, "--resume"))
        assert resumed.returncode == 0, f"kill@{n}: resume failed\n{resumed.stdout}\n{resumed.stderr[-3000:]}"
        got = train_outcome(out)
        for key in ref:
            if key == "checkpoints":  # a kill between the last save's rename and its pruning keeps one more
                assert set(ref[key]) <= set(got[key]), f"kill@{n}: checkpoints {got[key]}"
                continue
            assert got[key] == ref[key], f"kill@{n}: {key} differs after the resume"
        # a save the kill interrupted is removed by the resumed run's next save, never loaded or listed;
        # a file write it interrupted leaves a hidden .NAME.*.tmp beside its target, which nothing reads
        left = temp_leftovers(out)
        assert not [p for p in left if p.startswith("checkpoints/")], f"kill@{n}: left behind {left}"
        for p in left:
            assert (out / p).is_file() and Path(p).name.startswith("."), f"kill@{n}: {p}"
        ok(["train", "verify", str(out)])

    in_parallel(one, points)


def test_export_killed_at_any_point_reruns_to_identical_files(
    trained: Trained, exported: Exported, tmp_path: Path
) -> None:
    ref = files_of(exported.path)
    points = pick_points(exported.points)

    def one(n: int) -> None:
        out = tmp_path / f"k{n:03d}" / "hf"
        args = export_args(trained, out)
        _killed(args, n)
        if out.exists():
            assert files_of(out) == ref, f"kill@{n}: a published export differs"
            args = [*args, "--overwrite"]
        again = cli(args)
        assert again.returncode == 0, f"kill@{n}: rerun failed\n{again.stdout}\n{again.stderr}"
        assert files_of(out) == ref, f"kill@{n}: the rerun's export differs from the reference"

    in_parallel(one, points)
