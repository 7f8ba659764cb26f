"""Shared test setup: every test starts from the same torch RNG state, so results never depend on order."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_data():
    """``$MOEFORGE_REAL_DATA`` (the shared public data sets) as a Path; skips the test when it is unset."""
    import os
    from pathlib import Path

    root = os.environ.get("MOEFORGE_REAL_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("MOEFORGE_REAL_DATA is not set to the shared data folder")
    return Path(root)
