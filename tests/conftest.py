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


GPU_BACKEND_FILES = ("test_cuda.py", "test_triton.py")
GPU_BACKEND_NAMES = ("cuda", "triton")


@pytest.hookimpl(tryfirst=True)   # before `-m` deselects by markers
def pytest_collection_modifyitems(config, items):
    # gpu_backends: what the GPU suite runs first (-m gpu_backends): the two backend test files,
    # every test marked cuda, and every parametrization over the triton or cuda backend.
    for item in items:
        callspec = getattr(item, "callspec", None)
        ids = callspec.id.split("-") if callspec is not None else ()
        if (item.path.name in GPU_BACKEND_FILES or item.get_closest_marker("cuda") is not None
                or any(name in ids for name in GPU_BACKEND_NAMES)):
            item.add_marker(pytest.mark.gpu_backends)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker, not `"cuda" in item.keywords`: keywords also hold the names of the folders
        # above the test (a checkout in a folder named cuda skipped every test).
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
