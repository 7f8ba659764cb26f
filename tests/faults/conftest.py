"""Fixtures of the fault-injection suite: the session's data run → tokens → train → export chain (each
reference run doubles as the run that counts its fault points) and a read-only directory. The helpers
live in ``faultkit``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    SEQ_LEN,
    TRAIN_CONFIG,
    Chain,
    Exported,
    Tokens,
    Trained,
    build_chain,
    count_points,
    export_args,
    tokenize_args,
    writable,
)


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    pytest.importorskip("tokenizers")
    return build_chain(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="session")
def tokens(chain: Chain) -> Tokens:
    out = chain.base / "tokens-ref"
    return Tokens(out, count_points(tokenize_args(chain, out), chain.base))


@pytest.fixture(scope="session")
def trained(chain: Chain, tokens: Tokens) -> Trained:
    """8 steps of a tiny MoE, a checkpoint every 2 (keep 2), eval at 4 and 8: four checkpoint commits."""
    config = chain.base / "train.yaml"
    config.write_text(TRAIN_CONFIG.format(out=chain.base / "unused", tokens=tokens.path, seq=SEQ_LEN))
    t = Trained(config, chain.base / "train-ref", [])
    t.points = count_points(t.args(t.run), chain.base)
    return t


@pytest.fixture(scope="session")
def exported(chain: Chain, trained: Trained) -> Exported:
    out = chain.base / "export-ref"
    return Exported(out, count_points(export_args(trained, out), chain.base))


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this user cannot write into: mode 0555, or — for root, whom modes do not stop — a
    read-only tmpfs mounted there. Skips when neither works (root without mount rights)."""
    d = tmp_path / "readonly"
    d.mkdir()
    mounted = False
    os.chmod(d, 0o555)
    if writable(d):
        os.chmod(d, 0o755)
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k,mode=0555", "tmpfs", str(d)],
                               capture_output=True, text=True, check=False)  # fmt: skip
        if mount.returncode != 0:
            pytest.skip(
                f"running as uid {os.geteuid()}, whom mode 0555 does not stop, and a read-only tmpfs cannot be "
                f"mounted ({mount.stderr.strip() or mount.returncode}); nothing honest to test"
            )
        mounted = True
        assert not writable(d), "the read-only tmpfs accepted a write"
    try:
        yield d
    finally:
        if mounted:
            subprocess.run(["umount", str(d)], check=False)
        os.chmod(d, 0o755)
