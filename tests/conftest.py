"""Shared fixtures of the core tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Seed torch before each test, so adapter initialisations are reproducible."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test of tiny models on one thread: on a busy machine torch's thread pool costs far
    more than it saves on 32-wide matrices (a 10 ms forward can take 0.5 s). The core test
    modules use it through ``pytestmark``; the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
