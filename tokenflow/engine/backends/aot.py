"""``--backend aot``: the three TokenFlow passes compiled ahead of time with AOTInductor.

``torch.compile`` re-traces the UNet with dynamo in every new process (seconds per pass even with
a warm cache). This backend instead exports each pass once (``torch.export``, static shapes: the
runner pads calls to the planned size), compiles it with AOTInductor into a ``.pt2`` package under
``<cache>/aot/``, and later runs load that package in milliseconds without tracing. It is the
same generated code as ``compile``; what changes is when the cost is paid: once per model,
shape, dtype, machine and code version, not once per process.

Package key: pass, model identity, branch count, propagation mode, kernels, the text rows' layout
(``onnx.text_spec``: SD or SDXL, packed tokens), every input's shape and dtype, device type and
CPU ISA / GPU name, torch version and a fingerprint of the code that defines the graph. Packages
are written to a temp name and renamed (``io.outputs.atomic_path``).

Kernels: the static torch backends (AOTInductor cannot embed the Python-registered Triton
custom ops). CUDA: UNVERIFIED (no GPU was available while this was written).
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from tokenflow import __version__
from tokenflow.engine.backends.base import switch
from tokenflow.engine.backends.compiled import CompiledBackend, exported_kernels
from tokenflow.engine.backends.onnx import graph_code_fingerprint, text_spec
from tokenflow.engine.passes import KeyframePass, PlainPass, PropagatePass
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.engine.state import timestep_tensor
from tokenflow.io.caches import default_cache_root
from tokenflow.io.outputs import atomic_file, atomic_path
from tokenflow.kernels import KernelChoice
from tokenflow.models.text import is_text_time

FORMAT = 1


def machine_tag(device: torch.device) -> str:
    """What generated code depends on besides the graph: the CPU ISA or the GPU model."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda:{props.name}:sm{props.major}{props.minor}"
    return f"{device.type}:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"


class AotBackend(CompiledBackend):
    name = "aot"
    pads_calls = True

    def __init__(self, tokenflow: TokenFlowUNet, kernels: KernelChoice = KernelChoice(), *,
                 model_identity: str = "", cache_root: Optional[str] = None, log=None):
        super().__init__(tokenflow, kernels, compiler="inductor", mode="default", cache_root=cache_root)
        self.kernels = exported_kernels(kernels, "aot", self.dtype)
        self.mode = None   # plain generated code: no CUDA graphs
        self.model_identity = model_identity
        self.folder = Path(cache_root or default_cache_root()) / "aot"
        self.log = log
        self.built = self.reused = 0
        self.seconds = {"build": 0.0, "load": 0.0}
        self._packages: Dict[Tuple, Callable] = {}

    def describe(self) -> str:
        # tests/test_backends_sdxl.py builds SDXL packages only when TOKENFLOW_SDXL_BACKENDS=1 (minutes of CPU)
        xl = ("; SDXL packages checked on CPU by an opt-in test, not in CI" if is_text_time(self.tokenflow.unet.config)
              else "")
        return f"aot (AOTInductor packages in {self.folder}; kernels: attention={self.kernels.attention}, " \
               f"nearest={self.kernels.nearest}{xl})"

    def stats(self) -> dict:
        return {"packages_built": self.built, "packages_reused": self.reused, "folder": str(self.folder),
                **{f"{k}_s": round(v, 3) for k, v in self.seconds.items()}}

    def _spec(self, kind: str, n_branches: int, match_on: str, args) -> dict:
        return {"format": FORMAT, "pass": kind, "model": self.model_identity, "n_branches": n_branches,
                "match_on": match_on, "kernels": [self.kernels.attention, self.kernels.nearest],
                "text": text_spec(self.tokenflow.unet),
                "inputs": [[list(a.shape), str(a.dtype).replace("torch.", "")] for a in args],
                "machine": machine_tag(self.device), "torch": torch.__version__, "tokenflow": __version__,
                "graph_code": graph_code_fingerprint()}

    def _package(self, kind: str, n_branches: int, match_on: str, args) -> Callable:
        spec = self._spec(kind, n_branches, match_on, args)
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        if key in self._packages:
            return self._packages[key]
        path = self.folder / f"{kind}-{key}.pt2"
        if not path.exists():
            self._build(kind, n_branches, match_on, args, path, spec)
        else:
            self.reused += 1
        start = time.perf_counter()
        self._packages[key] = torch._inductor.aoti_load_package(str(path))
        self.seconds["load"] += time.perf_counter() - start
        return self._packages[key]

    def _build(self, kind, n_branches, match_on, args, path: Path, spec: dict) -> None:
        if self.log:
            self.log(f"compiling the {kind} pass ahead of time (once per model, shape and machine): {path}")
        start = time.perf_counter()
        module = self._eager_module(kind, n_branches, match_on).eval()
        with torch.no_grad():
            program = torch.export.export(module, tuple(args), strict=False)
        with atomic_path(path, suffix=".pt2", make_parents=True) as tmp:   # AOTInductor wants the extension
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
            with atomic_file(path.with_suffix(".json")) as f:   # the spec beside it, once the package built
                f.write(json.dumps(spec, indent=1))
        self.built += 1
        self.compilations += 1
        self.seconds["build"] += time.perf_counter() - start

    def _eager_module(self, kind, n_branches, match_on):
        if kind == "plain":
            return PlainPass(self.tokenflow)
        cls = KeyframePass if kind == "keyframes" else PropagatePass
        return cls(self.tokenflow, n_branches, match_on, self.kernels)

    def _run(self, kind, n_branches, match_on, *args):
        out = self._package(kind, n_branches, match_on, args)(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else out

    def plain(self, sample, t, text):
        out = self._run("plain", 0, "input", sample, timestep_tensor(t, self.device), text)
        return out[0] if isinstance(out, tuple) else out

    def keyframes(self, sample, t, text, inject_qk, inject_conv, n_branches, match_on):
        out = self._run("keyframes", n_branches, match_on, sample, timestep_tensor(t, self.device), text,
                        switch(inject_qk, self.device), switch(inject_conv, self.device))
        n = len(self.tokenflow.layers)
        return out[0], list(out[1:1 + n]), list(out[1 + n:])

    def propagate(self, sample, t, text, inject_conv, pairs, weights, store, n_branches, match_on):
        out = self._run("propagate", n_branches, match_on, sample, timestep_tensor(t, self.device), text,
                        switch(inject_conv, self.device), pairs, weights.float(), *store)
        return out[0] if isinstance(out, tuple) else out
