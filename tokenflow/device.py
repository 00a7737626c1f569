"""Pick the torch device and dtype from user input, with clear errors for unusable choices.

``None`` means "best available": CUDA, else Apple MPS, else CPU; float16 on GPUs, float32 on CPU.
This is the only place that decides a default device.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from typing import Callable, Dict, Optional, Union

import torch

from tokenflow.errors import ConfigError

DEVICE_CHOICES = "cpu, cuda, cuda:N (N = GPU index) or mps"

DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

_DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def default_device() -> torch.device:
    """cuda if a CUDA GPU is visible, else mps if available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: Union[str, torch.device, None]) -> torch.device:
    """The torch device for ``--device NAME`` (None: the best available one).

    Raises ConfigError for unknown names and for devices this machine / torch build lacks.
    """
    if name is None:
        return default_device()
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    match = _DEVICE_PATTERN.match(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ConfigError(f"unknown device '{name}': use {DEVICE_CHOICES}")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        _check_cuda(text, None if index is None else int(index))
    elif kind == "mps" and not mps_available():
        raise ConfigError(f"device '{text}' is not available (torch {torch.__version__} sees no "
                          "Apple MPS device); use --device cpu")
    return torch.device(text)


def _check_cuda(text: str, index: Optional[int]) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(f"device '{text}' is not available (torch {torch.__version__} sees no "
                          "CUDA GPU); use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ConfigError(f"device '{text}' is not available: torch sees {count} CUDA GPU(s) "
                          f"(cuda:0..cuda:{count - 1})")


def resolve_dtype(name: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """The weight / compute dtype for ``--dtype NAME`` on ``device``.

    None: float16 on cuda / mps, float32 on cpu. Accepts float32/fp32, float16/fp16/half and
    bfloat16/bf16; raises ConfigError for anything else or bfloat16 on a GPU without it.
    """
    device = torch.device(device)
    if name is None:
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    dtype = name if isinstance(name, torch.dtype) else DTYPE_ALIASES.get(str(name).strip().lower())
    if dtype not in DTYPE_ALIASES.values():
        raise ConfigError(f"unknown dtype '{name}': use float32 (fp32), float16 (fp16, half) "
                          "or bfloat16 (bf16)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype 'bfloat16' is not supported by this GPU ({device}); "
                          "use --dtype float16")
    return dtype


def synchronizer(device: torch.device) -> Optional[Callable[[], None]]:
    """A function that waits for the device's queued work (None where work is synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return None


def sync(device: torch.device) -> None:
    fn = synchronizer(device)
    if fn is not None:
        fn()


def versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "diffusers", "transformers", "triton", "faiss-cpu", "faiss-gpu-cu12", "xformers",
                 "numpy", "tokenflow"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["cuda"] = torch.version.cuda or "none"
    return out


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"
