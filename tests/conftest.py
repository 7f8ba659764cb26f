"""Shared test setup: every test starts from the same torch RNG state, so results never depend on order."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)
