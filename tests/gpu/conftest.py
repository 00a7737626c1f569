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
from tokenflow.io.cache import InversionCache
from tokenflow.method.editor import Editor
from tokenflow.models.load import load_model

TINY = dict(inversion_prompt="shapes", prompt="glass", frames=12, size=(64, 64), inversion_steps=6, steps=3,
            keyframe_spacing=3, use_cache=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance ||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def cuda():
    """The CUDA device the checks run on (skips with the reason where they cannot run)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if interpret_kernels():
        pytest.skip("this process interprets the Triton kernels (TRITON_INTERPRET is set): "
                    "run `pytest -m gpu tests/gpu` in its own process without it")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def tiny_cuda(tiny_model_dir):
    """The tiny model in float16 on the CUDA device, shared by the tests (each Editor's processors are
    removed after its test: ``editor_on``)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return load_model(str(tiny_model_dir), torch.device("cuda"), torch.float16)


@pytest.fixture
def editor_on():
    """``editor_on(model)``: an Editor without the inversion cache; its TokenFlow processors and hook
    are removed from the model's UNet at the test's end, so the next Editor on it starts clean."""
    made = []

    def make(model):
        made.append(Editor(model, cache=InversionCache(enabled=False)))
        return made[-1]

    yield make
    for editor in reversed(made):
        editor.tokenflow.remove()
