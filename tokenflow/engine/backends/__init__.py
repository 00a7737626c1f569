"""UNet backends: eager (diffusers + processors), compile (torch.compile), aot (AOTInductor
packages, compiled once and loaded without tracing), onnx (ONNX Runtime),
tensorrt (TensorRT engines). Each says what it needs (``not_supported_reasons``, after xFormers'
dispatch) and ``make_backend`` builds the one asked for or explains why it cannot run."""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from tokenflow.config import BACKENDS
from tokenflow.engine.backends.base import UNetBackend, optional_import_reason
from tokenflow.errors import ConfigError

NAMES = BACKENDS   # the --backend choices; config declares them (it validates the flag)

VERIFIED = {
    "eager": "reference; CPU float32 parity with the original implementation",
    "compile": "CPU float32 (inductor) against eager in tests; CUDA graphs / fp16 on GPU unverified",
    "aot": "CPU float32 (AOTInductor packages) against eager in tests; CUDA unverified",
    "onnx": "ONNX Runtime CPU float32 against eager in tests; CUDA/TensorRT execution providers unverified",
    "tensorrt": "NOT RUN ANYWHERE: written against the TensorRT Python API, never executed (no TensorRT here)",
}


def not_supported_reasons(name: str, device: torch.device, dtype: torch.dtype) -> List[str]:
    """Why backend ``name`` cannot run on this device/dtype here (empty: it can)."""
    if name not in NAMES:
        return [f"unknown backend {name!r}; choose one of {', '.join(NAMES)}"]
    reasons: List[str] = []
    if name == "compile" and not hasattr(torch, "compile"):
        reasons.append("torch.compile needs torch >= 2.0")
    if name == "aot" and not hasattr(getattr(torch, "_inductor", None), "aoti_load_package"):
        reasons.append("AOTInductor packages need torch >= 2.6")
    if name == "onnx":
        for module, install in (("onnx", "pip install 'tokenflow[onnx]'"), ("onnxscript", "pip install 'tokenflow[onnx]'"),
                                ("onnxruntime", "pip install 'tokenflow[onnx]' (onnxruntime-gpu for CUDA)")):
            reason = optional_import_reason(module, install)
            if reason:
                reasons.append(reason)
    if name == "tensorrt":
        if device.type != "cuda":
            reasons.append(f"TensorRT runs on CUDA devices only (device is {device.type})")
        reason = optional_import_reason("tensorrt", "pip install tensorrt --extra-index-url https://pypi.nvidia.com")
        if reason:
            reasons.append(reason)
        reason = optional_import_reason("onnx", "pip install 'tokenflow[onnx]'")
        if reason:
            reasons.append(reason)
    return reasons


def make_backend(name: str, tokenflow, kernels, *, model_identity: str = "", cache_root: Optional[str] = None,
                 compiler: Optional[str] = None) -> Optional[UNetBackend]:
    """The backend object (None for eager), or ConfigError naming what is missing.

    compiler: torch.compile's backend for ``compile`` (default ``$TOKENFLOW_COMPILER`` or inductor;
    ``aot_eager`` traces and checks the graphs without generating code, for debugging)."""
    compiler = compiler or os.environ.get("TOKENFLOW_COMPILER", "inductor")
    param = next(tokenflow.unet.parameters())
    reasons = not_supported_reasons(name, param.device, param.dtype)
    if reasons:
        raise ConfigError(f"--backend {name} cannot run here: {'; '.join(reasons)}")
    if name == "eager":
        return None
    # start-up time: `tokenflow doctor` reads NAMES / VERIFIED / not_supported_reasons from this
    # package without loading the backends (they import the UNet processors, hence diffusers)
    if name == "compile":
        from tokenflow.engine.backends.compiled import CompiledBackend  # noqa: PLC0415  (see above)

        return CompiledBackend(tokenflow, kernels, compiler=compiler, cache_root=cache_root)
    if name == "aot":
        from tokenflow.engine.backends.aot import AotBackend  # noqa: PLC0415  (see above)

        return AotBackend(tokenflow, kernels, model_identity=model_identity, cache_root=cache_root)
    if name == "onnx":
        from tokenflow.engine.backends.onnx import OnnxBackend  # noqa: PLC0415  (see above)

        return OnnxBackend(tokenflow, kernels, model_identity=model_identity, cache_root=cache_root)
    from tokenflow.engine.backends.tensorrt import TensorRTBackend  # noqa: PLC0415  (see above)

    return TensorRTBackend(tokenflow, kernels, model_identity=model_identity, cache_root=cache_root)
