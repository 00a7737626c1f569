"""UNet backends: eager (diffusers + processors), compile (torch.compile), aot (AOTInductor
packages, compiled once and loaded without tracing), onnx (ONNX Runtime),
tensorrt (TensorRT engines). Each says what it needs (``not_supported_reasons``, after xFormers'
dispatch) and ``make_backend`` builds the one asked for or explains why it cannot run."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from tokenflow import gpu_runs
from tokenflow.config import BACKENDS
from tokenflow.device import device_name
from tokenflow.engine.backends.base import UNetBackend, optional_import_reason
from tokenflow.errors import ConfigError
from tokenflow.gpu_runs import gpu_note
from tokenflow.kernels import dispatch
from tokenflow.kernels.probe import self_checked

NAMES = BACKENDS   # the --backend choices; config declares them (it validates the flag)

# Where each backend is checked off the GPU (tests); on a GPU the status comes from tokenflow.gpu_runs
VERIFIED = {
    "eager": "reference; CPU float32 parity with the original implementation",
    "compile": f"CPU float32 (inductor) against eager in tests; CUDA graphs / fp16: {gpu_note('backend:compile')}",
    "aot": f"CPU float32 (AOTInductor packages) against eager in tests; CUDA: {gpu_note('backend:aot')}",
    "onnx": "ONNX Runtime CPU float32 against eager in tests; CUDA/TensorRT execution providers: "
            f"{gpu_note('backend:onnx')}",
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


# the kernel ops an edit runs, with the KernelChoice field that names each one's backend
KERNEL_OPS = (("keyframe_attention", "attention"), ("cosine_nearest", "nearest"), ("gather", "gather"))


def what_ran(backend: Optional[UNetBackend], device: torch.device, dtype: torch.dtype,
             used: Dict[str, Dict[str, int]]) -> Dict:
    """What an edit ran and how far each part is verified (run summary, ``done`` event, bench JSON).

    backend: the runner's UNet backend (None: eager). used: ``kernels.dispatch.used()`` over the
    edit, the eager calls per op and backend; a graph backend runs the kernels its graphs were
    traced with (its ``kernels``), so there ``calls`` is None. Returns
    ``{"unet": {"backend", "status"}, "kernels": {op: [{"backend", "calls", "status"}, ...]}}``,
    an op's list empty when it never ran (e.g. an inversion only)."""
    device = torch.device(device)
    model = device_name(device) if device.type != "cpu" else ""
    name = "eager" if backend is None else backend.name
    unet = {"backend": name, "status": gpu_runs.status(f"backend:{name}", device.type, model,
                                                        reference=name == "eager", tested=VERIFIED.get(name, ""))}
    graph = getattr(backend, "kernels", None) if backend is not None else None
    kernels = {}
    for op, field in KERNEL_OPS:
        ran = {getattr(graph, field): None} if graph is not None else used.get(op, {})
        kernels[op] = [{"backend": b, "calls": calls, "status": _kernel_status(op, b, device, dtype, model)}
                       for b, calls in sorted(ran.items(), key=lambda item: -(item[1] or 0))]
    return {"unet": unet, "kernels": kernels}


def _kernel_status(op: str, name: str, device: torch.device, dtype: torch.dtype, model: str) -> str:
    declared = next((b for b in dispatch.backends(op, include_benchmark=True) if b.name == name), None)
    return gpu_runs.status(f"{op}:{name}", device.type, model, reference=name == "torch",
                           self_checked=self_checked(device, dtype, op, name),
                           tested=declared.verified if declared is not None else "")


def describe_ran(ran: Dict) -> List[str]:
    """``what_ran`` in words, one line for the UNet and one per kernel op, e.g.
    ``keyframe_attention: triton (never run on this GPU model before: self-checked at startup)``."""
    lines = [f"UNet: {ran['unet']['backend']} ({ran['unet']['status']})"]
    for op, entries in ran["kernels"].items():
        if not entries:
            lines.append(f"{op}: not run")
            continue
        several = len(entries) > 1
        lines.append(f"{op}: " + "; ".join(
            f"{e['backend']} ({e['status']})" + (f" {e['calls']} calls" if several and e["calls"] else "")
            for e in entries))
    return lines
