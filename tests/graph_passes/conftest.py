"""Shared set-up for the graph_passes tests (helpers live in graph_passes.testing).

Tests are fast unless marked ``slow`` (markers are declared in pyproject.toml).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
