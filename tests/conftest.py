"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: for tiny models on a shared 2-core machine, OpenMP threads that wait for
    each other cost far more CPU time than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
