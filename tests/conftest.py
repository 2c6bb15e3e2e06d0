"""Test configuration.

Without a CUDA GPU, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must
be set before any ``@triton.jit`` function is defined, so it is set here, before test
modules import ``fp4comm.kernels``. Child processes spawned by multi-rank tests inherit it.
Tests marked ``gpu`` (or ``multigpu``) are skipped when no (or too few) GPUs are present.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
NUM_GPUS = torch.cuda.device_count() if HAS_CUDA else 0

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs >= 2 CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and NUM_GPUS < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def device():
    """The device a test's kernels run on: the GPU when present, else CPU (interpreter)."""
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")
