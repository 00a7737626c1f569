"""What a kernel backend needs from the environment: packages, devices, dtypes.

Shared by the backends' ``unsupported`` checks so every op words its reasons the same way.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from typing import List, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# where the Triton backends have been checked, and why the static backends are only used by name
TRITON_VERIFIED = "Triton interpreter on CPU (fp32, fp16, bf16); compiles for sm_90; never run on a GPU"
STATIC_NOT_AUTO = "for traced graphs (--backend compile/onnx); in eager the torch reference is as exact and lighter"
# the modules holding Triton kernels (each exposes KERNEL_FOR_MODE_CHECK)
TRITON_MODULES = ("tokenflow.kernels.keyframe_attention.triton", "tokenflow.kernels.nearest.triton",
                  "tokenflow.kernels.gather.triton")


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter.

    Must be set before the first kernel module is imported (``triton.jit`` reads it then).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _missing(module: str, install: str) -> Optional[str]:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed ({install})"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install: say what failed
        return f"{module} fails to import: {type(exc).__name__}: {exc}"
    return None


def triton_missing() -> Optional[str]:
    missing = _missing("triton", "pip install triton; CUDA builds of torch on Linux bring it")
    if missing:
        return missing
    if not hasattr(torch.library, "custom_op"):
        return f"torch {torch.__version__} is too old for the Triton ops (torch >= 2.4 needed)"
    import triton  # noqa: PLC0415  optional package, found above

    if tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit()) < (3, 2):
        return f"triton {triton.__version__} is too old (>= 3.2 needed: pip install -U triton)"
    return None


def _kernels_interpreted() -> Optional[bool]:
    """How already-imported kernel modules were built (None: none imported yet)."""
    module = next((sys.modules[name] for name in TRITON_MODULES if name in sys.modules), None)
    if module is None:
        return None
    return type(module.KERNEL_FOR_MODE_CHECK).__name__ == "InterpretedFunction"


def faiss_missing() -> Optional[str]:
    return _missing("faiss", "pip install faiss-cpu, or faiss-gpu-cu12 for GPU indexes")


def xformers_missing() -> Optional[str]:
    return _missing("xformers", "pip install xformers matching your torch build")


# The checks below take TensorSpecs (tokenflow.kernels.dispatch): metadata, not values.


def same_device(tensors: Sequence) -> List[str]:
    devices = {t.device for t in tensors}
    return [] if len(devices) == 1 else [f"tensors are on different devices: {sorted(map(str, devices))}"]


def triton_device(tensors: Sequence) -> List[str]:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    device = tensors[0].device.type
    if device == "cuda":
        if any(t.dtype == torch.bfloat16 for t in tensors) and torch.cuda.get_device_capability(tensors[0].device) < (8, 0):
            return ["bfloat16 needs a GPU of compute capability 8.0 or newer"]
        if _kernels_interpreted():
            return ["the kernels were imported under TRITON_INTERPRET=1 and cannot run on CUDA in this process"]
        return []
    if device == "cpu" and interpreting():
        if _kernels_interpreted() is False:
            return ["TRITON_INTERPRET=1 was set after the kernels were imported; set it before starting Python"]
        return []
    if device == "cpu":
        return ["CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter, for testing)"]
    return [f"{device} tensors are not supported (CUDA only)"]


def triton_not_auto(tensors: Sequence) -> Optional[str]:
    if tensors[0].device.type == "cpu":
        return "the Triton interpreter is orders of magnitude slower than torch on CPU"
    return None


def float_dtype(t, allowed=FLOAT_DTYPES) -> List[str]:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        return [f"dtype {str(t.dtype).replace('torch.', '')} is not supported ({names})"]
    return []


def on_device(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: make it the tensors' one (cuda:1, ...)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied to a contiguous tensor if its last (channel) dim is not at unit stride: the
    Triton kernels read channels contiguously. Launchers call it, so the eager path and traced
    graphs (which call the custom ops without dispatch) are both safe."""
    return t if t.stride(-1) == 1 else t.contiguous()


def upcast_bf16(dtype: torch.dtype) -> bool:
    """The interpreter computes bfloat16 arithmetic wrong: kernels upcast right after loading."""
    return interpreting() and dtype == torch.bfloat16
