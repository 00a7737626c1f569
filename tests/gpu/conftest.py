"""tests/gpu: checks that need a CUDA device and the compiled Triton kernels (marker ``gpu``).

Run them in their own process without TRITON_INTERPRET (``bench/gpu_check.py`` stage 2 does):

    pytest -m gpu tests/gpu

Everywhere else they skip: without a CUDA device, and in a process that builds the Triton kernels
for the interpreter (TRITON_INTERPRET set, or no CUDA device: ``tests/conftest.py``), so the normal
CI command collects them and skips them cleanly. Unverified on a GPU until the first recorded run.
"""
import pytest
import torch

from tests.conftest import interpret_kernels


@pytest.fixture
def cuda():
    """The CUDA device the checks run on (skips with the reason where they cannot run)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if interpret_kernels():
        pytest.skip("this process interprets the Triton kernels (TRITON_INTERPRET is set): "
                    "run `pytest -m gpu tests/gpu` in its own process without it")
    return torch.device("cuda")
