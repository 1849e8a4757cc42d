"""Test configuration shared by every backend.

Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors: the variable must be
set before triton is first imported, so it is set here, at collection time.
"""
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
# The native backend of this device (the fastsam._C extension) is always tested, so a failed
# build shows up as failing tests with the import error; FASTSAM_SKIP_BUILD=1 (a pure-Python
# install on purpose) leaves it out.
NATIVE = [] if os.environ.get("FASTSAM_SKIP_BUILD") == "1" else [DEVICE.type]
FUSED = (["triton"] if HAS_TRITON else []) + NATIVE
BACKENDS = ["torch"] + FUSED


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend usable here; each test using it runs once per backend."""
    return request.param


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
