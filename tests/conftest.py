"""Shared fixtures: a tiny SD-2.1-shaped model built in code, an isolated cache, synthetic clips.

Nothing here downloads: HF_HUB_OFFLINE is set for the whole session and caches live in tmp.
TRITON_INTERPRET=1 is set before anything imports a kernel module, so ``backend="triton"`` runs
the real Triton kernels on CPU tensors (automatic dispatch still picks torch on CPU).
"""
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _offline_and_isolated(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokenflow-cache")
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TOKENFLOW_CACHE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENFLOW_CACHE"] = str(cache)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tokenflow.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sd(tiny_model_dir):
    """The tiny model loaded on CPU in float32 (shared: tests must not keep processors installed)."""
    import torch

    from tokenflow.models.load import load_model

    return load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def sample_clip(tmp_path_factory):
    from tokenflow.io.samples import make_sample_clip

    path = tmp_path_factory.mktemp("clips") / "sample.mp4"
    return make_sample_clip(str(path), n_frames=12, size=(96, 64), fps=12)
