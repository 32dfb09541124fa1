"""Test set-up shared by every test file.

Triton kernels run on CPU tensors under Triton's interpreter when no GPU is present. The
interpreter is chosen by an environment variable that Triton reads at import time, so it is set
here, before any test module imports triton.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run on a lent GPU with `pytest -m gpu`)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_device():
    """Device on which Triton launchers are tested: the GPU if there is one, else the CPU under
    TRITON_INTERPRET=1. Under the interpreter only fp32/fp16 and tiny shapes are practical."""
    return "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fused_masked_ops():
    """Tests of the masked ops test their kernels: pin the fused implementation, so no test depends
    on what a measurement picked (tests/test_dispatch.py tests the dispatch itself)."""
    from sparse_engine.ops import dispatch
    before = dispatch.pinned()
    dispatch.pin("fused")
    yield
    dispatch.pin(before)
