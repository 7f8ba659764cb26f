"""Launch ``python -m moeforge.train CONFIG`` under torchrun with 2 CPU processes (gloo), as the
distributed tests do: a free rendezvous port, one thread per process, its own session so a hung
rendezvous is killed with every rank it started. Returns torchrun's stderr; fails the test with its
tail when the job fails."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def torchrun_train(cfg: Path, *args: str, nproc: int = 2, timeout: float = 240) -> str:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [torchrun, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "-m", "moeforge.train", str(cfg), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    return stderr
