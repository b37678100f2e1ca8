"""Shared pytest setup: `from tiny_models import ...` works, and the `slow` and `gpu` markers exist.

@pytest.mark.gpu
def test_on_cuda(): ...   # skipped with "CUDA not available" on CPU-only machines
"""

import os
import sys

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:  # not added by pytest itself under --import-mode=importlib
    sys.path.insert(0, TESTS_DIR)


def pytest_configure(config):
    # The fixtures are tiny: intra-op threads only add overhead, and oversubscribe a busy machine.
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: takes long; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped when torch.cuda is unavailable")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="CUDA not available")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
