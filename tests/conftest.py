"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread, then restore the count.

    Small models are fastest on one thread, and two OpenMP threads on a shared 2-core machine are
    many times slower (float64 depthwise convs of a detection backbone: ~0.05 s against ~20 s).
    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
