"""``--backend tensorrt``: ``TensorRTBackend``, the three passes as TensorRT engines.

THIS BACKEND HAS NEVER BEEN RUN. There was no TensorRT and no GPU where it was written; it is
written against the TensorRT 10 Python API documentation. Do not assume it works: the pure
functions (profiles, engine keys, call sizes) are tested, nothing that touches TensorRT is.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tokenflow.engine.backends.base import UNetBackend, switch
from tokenflow.engine.backends.compiled import exported_kernels
from tokenflow.engine.backends.onnx import export_pass, graph_spec, spec_key
from tokenflow.engine.backends.tensorrt.engine import INSTALL, UNVERIFIED, Engine, _tensorrt
from tokenflow.engine.backends.tensorrt.profiles import (
    CallSizes,
    Range,
    call_limits,
    engine_identity,
    engine_key,
    profile_for_spec,
)
from tokenflow.engine.passes import input_names, output_names
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.engine.state import timestep_tensor
from tokenflow.errors import ConfigError
from tokenflow.io.caches import default_cache_root
from tokenflow.io.outputs import atomic_file
from tokenflow.kernels import KernelChoice


class TensorRTBackend(UNetBackend):
    """The three passes as TensorRT engines (one per pass, branch count, latent size and call sizes)."""

    name = "tensorrt"

    def __init__(self, tokenflow: TokenFlowUNet, kernels: KernelChoice = KernelChoice(), *, model_identity: str = "",
                 cache_root: Optional[str] = None, cuda_graphs: bool = True,
                 workspace_bytes: Optional[int] = None, call_sizes: Optional[CallSizes] = None, log=None):
        param = next(tokenflow.unet.parameters())
        self.tokenflow, self.device, self.dtype = tokenflow, param.device, param.dtype
        if self.device.type != "cuda":
            raise ConfigError(f"--backend tensorrt: TensorRT runs on CUDA devices only (the UNet is on "
                              f"{self.device.type}); on a CUDA machine: {INSTALL}")
        self.trt = _tensorrt()
        self.kernels = exported_kernels(kernels, "tensorrt", self.dtype)
        root = Path(cache_root or default_cache_root())
        self.onnx_folder, self.folder = root / "onnx", root / "tensorrt"
        self.model_identity, self.log = model_identity, log
        self.cuda_graphs, self.call_sizes = cuda_graphs, call_sizes
        self.options = {"network": "strongly typed", "workspace_bytes": workspace_bytes,
                        "dtype": str(self.dtype).replace("torch.", "")}
        self.gpu = (torch.cuda.get_device_name(self.device), tuple(torch.cuda.get_device_capability(self.device)))
        self.timing_cache = self.folder / f"timing-{self.trt.__version__}-sm{self.gpu[1][0]}{self.gpu[1][1]}.cache"
        self._engines: Dict[tuple, Engine] = {}
        self._first: Dict[tuple, Tuple[Range, Range]] = {}
        self.counts = {"graphs_exported": 0, "graphs_reused": 0, "engines_built": 0, "engines_reused": 0}
        self.seconds = {"export": 0.0, "build": 0.0, "load": 0.0}
        self.calls = {"plain": 0, "keyframes": 0, "propagate": 0}

    def use_plan(self, plan) -> None:
        """Build engines for this ``MemoryPlan``'s call sizes (engines for other sizes stay cached)."""
        self.call_sizes = CallSizes.from_plan(plan)

    def describe(self) -> str:
        return (f"tensorrt ({UNVERIFIED}; TensorRT {self.trt.__version__} on {self.gpu[0]}; engines in {self.folder}; "
                f"CUDA graphs {'on' if self.cuda_graphs else 'off'})")

    def stats(self) -> dict:
        return {**self.counts, **{f"{k}_s": round(v, 3) for k, v in self.seconds.items()},
                "infer_calls": dict(self.calls), "folder": str(self.folder), "verified": False,
                "cuda_graphs": sum(c is not None for e in self._engines.values() for c in e.graphs.values()),
                "cuda_graph_failures": sum(c is None for e in self._engines.values() for c in e.graphs.values())}

    def engine(self, kind: str, latent_size: Tuple[int, int], n_branches: int, match_on: str, frames: int,
               keyframes: int) -> Engine:
        """The engine for this pass (built or loaded on first use)."""
        base = (kind, latent_size, n_branches, match_on)
        if self.call_sizes is not None:
            ranges = self.call_sizes.ranges(kind)
        else:
            ranges = self._first.setdefault(base, CallSizes.from_call(kind, frames, keyframes))
        key = base + ranges
        if key in self._engines:
            return self._engines[key]
        spec = graph_spec(self.tokenflow, kind, latent_size=latent_size, n_branches=n_branches, match_on=match_on,
                          model_identity=self.model_identity, kernels=self.kernels)
        start = time.perf_counter()
        onnx_path, reused = export_pass(self.tokenflow, spec, self.kernels, self.onnx_folder, self.log)
        self.seconds["export"] += time.perf_counter() - start
        self.counts["graphs_reused" if reused else "graphs_exported"] += 1
        profile = profile_for_spec(spec, *ranges, in_channels=int(self.tokenflow.unet.config.in_channels))
        identity = (spec_key(spec), self.trt.__version__, *self.gpu, profile, self.options)
        path = self.folder / f"{kind}-{engine_key(*identity)}.engine"
        engine = Engine(f"{kind} pass", profile, self.device, cuda_graphs=self.cuda_graphs,
                        limits=call_limits(kind, *ranges))
        if path.exists():
            self.counts["engines_reused"] += 1
        else:
            if self.log:
                self.log(f"building the TensorRT engine of the {kind} pass (once per model, size, GPU and "
                         f"TensorRT version; minutes for SD): {path}")
            start = time.perf_counter()
            engine.build(onnx_path, path, profile, self.timing_cache, workspace_bytes=self.options["workspace_bytes"])
            self.seconds["build"] += time.perf_counter() - start
            self.counts["engines_built"] += 1
            with atomic_file(path.with_suffix(".json"), make_parents=True) as f:
                f.write(json.dumps(engine_identity(*identity), indent=1))
        start = time.perf_counter()
        engine.load(path)
        engine.activate()
        self.seconds["load"] += time.perf_counter() - start
        self._engines[key] = engine
        return engine

    def _run(self, kind: str, engine: Engine, args: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        self.calls[kind] += 1
        names = input_names(kind, [layer.name for layer in self.tokenflow.layers])
        out = engine.infer(dict(zip(names, args)))
        return [out[n] for n in output_names(kind, [layer.name for layer in self.tokenflow.layers])]

    def plain(self, sample, t, text):
        engine = self.engine("plain", tuple(sample.shape[-2:]), 1, "input", sample.shape[0], 1)
        (eps,) = self._run("plain", engine, (sample, timestep_tensor(t, self.device), text))
        return eps

    def keyframes(self, sample, t, text, inject_qk, inject_conv, n_branches, match_on):
        engine = self.engine("keyframes", tuple(sample.shape[-2:]), n_branches, match_on, 1,
                             sample.shape[0] // n_branches)
        out = self._run("keyframes", engine, (sample, timestep_tensor(t, self.device), text,
                                              switch(inject_qk, self.device), switch(inject_conv, self.device)))
        n = len(self.tokenflow.layers)
        return out[0], out[1:1 + n], out[1 + n:]

    def propagate(self, sample, t, text, inject_conv, pairs, weights, store, n_branches, match_on):
        engine = self.engine("propagate", tuple(sample.shape[-2:]), n_branches, match_on,
                             sample.shape[0] // n_branches, store[0].shape[0])
        (eps,) = self._run("propagate", engine, (sample, timestep_tensor(t, self.device), text,
                                                 switch(inject_conv, self.device), pairs.long(), weights.float(),
                                                 *store))
        return eps
