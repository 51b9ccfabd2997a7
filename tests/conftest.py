"""Test configuration shared by every test module.

Without a GPU, Triton kernels run under its CPU interpreter: TRITON_INTERPRET must be set before
triton is first imported, which is why it is set here and not in the tests.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker, not `"cuda" in item.keywords`: keywords also hold the names of the folders
        # above the test (a checkout in a folder named cuda skipped every test).
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
