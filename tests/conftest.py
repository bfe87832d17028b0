"""Suite-wide settings.

Tests run torch on one intra-op thread: the suite's models are small, CI has 2 cores, and several tests start
agent subprocesses that also run one thread each. With two threads per process the OpenMP workers spin against
each other, and small forward passes ran up to 100x slower on a busy machine. Results that are compared across
processes (launch vs run) are computed with one thread on both sides.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_threads():
    # A run whose config says `threads: N` sets torch's thread count process-wide; later tests get theirs back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
