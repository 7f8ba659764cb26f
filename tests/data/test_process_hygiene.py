"""Process hygiene of `moeforge data run`: workers die with a killed parent, a stale worker can never
commit into the run that resumed it, and a resume refuses while an old run's process holds the
directory (issue 14)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moeforge.data.pipeline import PipelineError, run_pipeline
from moeforge.data.plan import plan_tasks
from moeforge.data.recipe import Recipe, recipe_hash
from moeforge.data.stages import run_map_task, task_dir
from moeforge.procs import FenceError, RunFence, die_with_parent, holders_of, spawn_pool

MOEFORGE = [sys.executable, "-m", "moeforge"]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _write_qa(path: Path, start: int, n: int) -> None:
    lines = [
        json.dumps({"question": f"Problem {i}: what is {i} plus {i % 13} apples?", "answer": f"{i + i % 13}"})
        for i in range(start, start + n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _recipe(src: Path) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "sources": [{"path": str(src), "kind": "qa", "family": "fam", "domain": "math"}],
            "langid": {"enabled": False},
            "split": {"min_eval_records": 3},
            "gates": {"train_ratio": [0.8, 0.97], "eval_ratio": [0.01, 0.1]},
        }
    )


def _children(pid: int) -> list[int]:
    kids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.append(int(proc.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _many_sources(tmp_path: Path, n: int = 16) -> Path:
    d = tmp_path / "many"
    d.mkdir()
    for k in range(n):
        _write_qa(d / f"p{k:02d}.jsonl", k * 60, 60)
    sources = "\n".join(
        f"  - {{path: {d / f'p{k:02d}.jsonl'}, kind: qa, family: f, domain: math}}" for k in range(n)
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: kill\nsources:\n{sources}\nlangid: {{enabled: false}}\nsplit: {{min_eval_records: 3}}\n"
        "gates: {train_ratio: [0.8, 0.97], eval_ratio: [0.01, 0.1]}\n",
        encoding="utf-8",
    )
    return recipe


def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    recipe = _many_sources(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen([*MOEFORGE, "data", "run", str(recipe), "--out", str(out), "-w", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        done = list((out / "work" / "map").glob("*/stats.json")) if (out / "work" / "map").exists() else []
        if done or proc.poll() is not None:
            break
        time.sleep(0.01)
    kids = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill; the test proves nothing"
    assert len(kids) >= 2, kids  # two workers (and the resource tracker)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.05)
    assert not [k for k in kids if _alive(k)], "orphaned processes outlived the killed run"
    resumed = subprocess.run([*MOEFORGE, "data", "run", str(recipe), "--out", str(out), "-w", "2"],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr


def test_a_stale_worker_cannot_commit_into_a_resumed_run(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _write_qa(src, 0, 100)
    recipe = _recipe(src)
    out = tmp_path / "run"
    out.mkdir()
    (task,) = plan_tasks(recipe)
    old = RunFence.begin(out)
    stale = (str(out), old.generation, os.getpid())
    old.release()
    new = RunFence.begin(out)  # the resumed invocation
    try:
        with pytest.raises(FenceError, match="newer invocation"):
            run_map_task(task, recipe.resolved(), str(out / "work"), recipe_hash(recipe), stale)
        assert not task_dir(out / "work", task).exists()
        assert not list((out / "work" / "map").glob(".*.tmp")), "the refused task left its temp dir"
        current = (str(out), new.generation, os.getpid())
        run_map_task(task, recipe.resolved(), str(out / "work"), recipe_hash(recipe), current)
        assert (task_dir(out / "work", task) / "stats.json").is_file()
    finally:
        new.release()


def test_a_resume_refuses_while_an_old_runs_process_holds_the_directory(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _write_qa(src, 0, 100)
    out = tmp_path / "run"
    out.mkdir()
    fence = RunFence.begin(out)
    fence.release()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from moeforge.procs import RunFence
            held = RunFence.join({str(out)!r}, {fence.generation!r}, 1)
            print("held", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert holders_of(out / ".holders") == [holder.pid]
        with pytest.raises(PipelineError, match=rf"earlier .*still hold.*pid {holder.pid}"):
            run_pipeline(_recipe(src), out)
    finally:
        holder.kill()
        holder.wait()
    assert run_pipeline(_recipe(src), out).gates_passed


def _pid() -> int:
    return os.getpid()


def test_pool_workers_watch_their_parent(tmp_path: Path) -> None:
    """A pool started by a process that is then killed: its workers exit (PDEATHSIG / parent watch)."""
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent("""
        import os, time
        from moeforge.procs import spawn_pool

        def pid():
            time.sleep(0.2)
            return os.getpid()

        if __name__ == "__main__":
            pool = spawn_pool(2)
            pids = {f.result() for f in [pool.submit(pid) for _ in range(4)]}
            pool.submit(time.sleep, 120)
            print(" ".join(map(str, sorted(pids))), flush=True)
            time.sleep(120)
    """))  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids and all(_alive(p) for p in pids)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]


def test_die_with_parent_and_spawn_pool_run_in_process() -> None:
    die_with_parent(os.getppid())  # a no-op for a process whose parent is alive
    with spawn_pool(1) as pool:
        assert pool.submit(_pid).result() != os.getpid()
