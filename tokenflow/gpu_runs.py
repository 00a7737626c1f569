"""Which GPU paths a recorded GPU run has verified: the one table behind "unverified on GPU".

The run summary, the ``done`` event, ``tokenflow bench`` and the CLI help (``--backend``,
``--keyframe-store``) all word a GPU path's status from ``RECORDED``, so it changes in one place.
A path counts as verified on a GPU model once a run of ``bench/gpu_check`` on that model passed
that path's checks and its JSON is committed under ``bench/results/``: add the model's name as
``torch.cuda.get_device_name`` gives it (e.g. "NVIDIA H200") to the path's tuple, with the file in
a comment. No GPU run has been recorded yet: every tuple is empty.

Standard library only: the CLI builds its help from this without importing torch.
"""
from __future__ import annotations

from typing import Dict, Tuple

# path -> GPU models a recorded run verified it on. Paths: "backend:NAME" (--backend),
# "keyframe_store:host", "OP:BACKEND" (kernel ops; the torch references need no record).
RECORDED: Dict[str, Tuple[str, ...]] = {
    "backend:compile": (),
    "backend:aot": (),
    "backend:onnx": (),
    "backend:tensorrt": (),
    "keyframe_store:host": (),
    "keyframe_attention:triton": (),
    "keyframe_attention:xformers": (),
    "cosine_nearest:triton": (),
    "cosine_nearest:faiss": (),
    "cosine_nearest:static": (),
    "gather:triton": (),
    "gather:static": (),
}

UNVERIFIED = "unverified on GPU"
NEW_MODEL = "never run on this GPU model before"


def models(path: str) -> Tuple[str, ...]:
    """The GPU models a recorded run verified ``path`` on (empty: none)."""
    return RECORDED.get(path, ())


def gpu_note(path: str) -> str:
    """For help texts: "unverified on GPU" until a recorded run says otherwise, then the models."""
    found = models(path)
    return f"verified on GPU: {', '.join(found)}" if found else UNVERIFIED


def status(path: str, device_type: str, device_model: str = "", *, reference: bool = False,
           self_checked: bool = False, tested: str = "") -> str:
    """How far what ran on this device is verified, in words for the summary.

    reference: the path is the reference itself (eager UNet, torch kernels). ``tested``: where the
    tests check it off the GPU (``Backend.verified``, ``engine.backends.VERIFIED``), said on CPUs.
    On a GPU: verified on this model by a recorded run, or never run on it, with whether a
    self-check at startup compared it with the reference."""
    if reference:
        return "reference"
    if device_type == "cpu":
        return tested or "checked against the reference in tests"
    found = models(path)
    if device_model and device_model in found:
        return f"verified on {device_model} by a recorded GPU run"
    before = f"{NEW_MODEL} (recorded on: {', '.join(found)})" if found else NEW_MODEL
    return f"{before}: {'self-checked at startup' if self_checked else UNVERIFIED}"
