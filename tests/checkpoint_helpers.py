"""Shared pieces of the checkpoint tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module: on a shared 2-core machine, torch's spinning thread pool is many times
    slower under contention than a single thread, and these networks are too small to gain from two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
