"""``--backend tensorrt``: TensorRT engines built from the ONNX graphs of the three TokenFlow passes.

THIS BACKEND HAS NEVER BEEN RUN. There was no TensorRT and no GPU where it was written; it is
written against the TensorRT 10 Python API documentation. Do not assume it works: the pure
functions (profiles, engine keys, call sizes) are tested, nothing that touches TensorRT is.

Pipeline, per pass graph (plain / keyframes / propagate, per branch count and latent size):

    ``onnx.export_pass`` (reused when its manifest matches)
    -> ``Engine.build``: OnnxParser.parse_from_file (external weights next to the graph), a
       strongly typed network (precision is the graph's: fp16/bf16 UNet -> fp16/bf16 kernels), one
       optimization profile (``profile_shapes``: min/opt/max of every dynamic axis), a timing cache
       kept under the cache folder, build_serialized_network, written atomically
    -> ``Engine.load`` (deserialize) -> ``Engine.activate`` (execution context)
    -> ``Engine.infer``: torch tensors bound by address, execute_async_v3 on torch's current stream,
       optionally replayed as one CUDA graph per input shape.

Engines live in ``<cache_root>/tensorrt/<pass>-<key>.engine``; the key (``engine_key``) covers the
graph spec, the TensorRT version, the GPU and its compute capability, the profile and the build
options. Profiles span 1..planned frames per call (``CallSizes``: from the memory plan via
``use_plan``, else from the first call of each pass); calls outside them are refused with a message
naming ``--chunk-frames``, so the runner never pads (``pads_calls`` stays False).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tokenflow.engine.backends.base import UNetBackend, switch
from tokenflow.engine.backends.compiled import exported_kernels
from tokenflow.engine.backends.onnx import MAX_ROWS, export_pass, graph_spec, spec_key
from tokenflow.engine.passes import GRAPH_PAIRS, input_names, output_names
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.engine.state import timestep_tensor
from tokenflow.errors import ConfigError, ModelError
from tokenflow.io.outputs import atomic_file
from tokenflow.kernels import KernelChoice

INSTALL = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"
UNVERIFIED = ("NEVER RUN: written against the TensorRT 10 Python API documentation without TensorRT or a GPU; "
              "do not assume it works")
TEXT_TOKENS = 77
Range = Tuple[int, int, int]                 # (min, opt, max) calls' frames or keyframes
Shape = Tuple[int, ...]
Profile = Dict[str, Tuple[Shape, Shape, Shape]]


def _tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise ConfigError(f"--backend tensorrt needs TensorRT ({INSTALL}): {exc}") from None
    return tensorrt


# --------------------------------------------------------------------------- pure functions

def profile_shapes(kind: str, n_branches: int, layers: Sequence[Sequence], *, latent_size: Tuple[int, int],
                   text_dim: int, frames: Range, keyframes: Range, in_channels: int = 4) -> Profile:
    """{input: (min, opt, max) shape} for every input of the ``kind`` graph with a dynamic axis.

    layers: [(name, S_l, C_l)] as in ``graph_spec``; frames: frames per call of the plain and
    propagation passes; keyframes: keyframes per keyframe-pass call and keyframes K' in the store a
    propagation call reads. Rows = n_branches * frames (plain graphs: n_branches = 1):
        plain      sample [R,4,h,w], text [R,77,D]                        R = frames
        keyframes  sample, text                                           R = B * keyframes
        propagate  sample, text (R = B * frames), pairs/weights [frames, P],
                   features_i [K', S_l, C_l], outputs_i [B*K', S_l, C_l]
    The scalar inputs (timestep, injection switches) are static and not listed."""
    for label, r in (("frames", frames), ("keyframes", keyframes)):
        if len(r) != 3 or not 1 <= r[0] <= r[1] <= r[2]:
            raise ValueError(f"{label} range must be 1 <= min <= opt <= max, got {r}")
    if n_branches < 1:
        raise ValueError(f"n_branches must be >= 1, got {n_branches}")
    h, w = latent_size
    per_call = keyframes if kind == "keyframes" else frames
    if n_branches * per_call[2] > MAX_ROWS:
        raise ConfigError(f"{n_branches} branches x {per_call[2]} frames per call exceed the {MAX_ROWS} rows the "
                          f"exported graphs allow; use a smaller --chunk-frames")

    def each(fn) -> Tuple[Shape, Shape, Shape]:
        return tuple(fn(n) for n in per_call)

    profile = {"sample": each(lambda n: (n_branches * n, in_channels, h, w)),
               "text": each(lambda n: (n_branches * n, TEXT_TOKENS, text_dim))}
    if kind in ("plain", "keyframes"):
        return profile
    if kind != "propagate":
        raise ValueError(f"unknown pass {kind!r}")
    profile["pairs"] = profile["weights"] = each(lambda n: (n, GRAPH_PAIRS))
    for i, (_, s, c) in enumerate(layers):
        profile[f"features_{i}"] = tuple((k, s, c) for k in keyframes)
        profile[f"outputs_{i}"] = tuple((n_branches * k, s, c) for k in keyframes)
    return profile


def profile_for_spec(spec: dict, frames: Range, keyframes: Range, in_channels: int = 4) -> Profile:
    return profile_shapes(spec["pass"], spec["n_branches"] or 1, spec["layers"], latent_size=tuple(spec["latent_size"]),
                          text_dim=spec["text_dim"], frames=frames, keyframes=keyframes, in_channels=in_channels)


def profile_violation(profile: Profile, shapes: Dict[str, Shape]) -> Optional[str]:
    """None when every shape lies within the profile, else which input does not."""
    for name, (low, _, high) in profile.items():
        shape = shapes.get(name)
        if shape is None:
            continue
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            return f"input {name!r} has shape {tuple(shape)}, outside the engine's profile {low} .. {high}"
    return None


def engine_identity(graph_key: str, trt_version: str, gpu_name: str, capability: Tuple[int, int],
                    profile: Profile, options: Optional[dict] = None) -> dict:
    """Everything a serialized engine depends on (an engine runs only where it was built)."""
    return {"graph": graph_key, "tensorrt": trt_version, "gpu": gpu_name, "capability": list(capability),
            "profile": {name: [list(s) for s in shapes] for name, shapes in sorted(profile.items())},
            "options": dict(options or {})}


def engine_key(graph_key: str, trt_version: str, gpu_name: str, capability: Tuple[int, int], profile: Profile,
               options: Optional[dict] = None) -> str:
    doc = engine_identity(graph_key, trt_version, gpu_name, capability, profile, options)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def call_limits(kind: str, frames: Range, keyframes: Range) -> str:
    """What an engine's profile allows, in the words of the flags that set it."""
    if kind == "plain":
        return f"{frames[0]}..{frames[2]} frames per inversion call"
    if kind == "keyframes":
        return f"{keyframes[0]}..{keyframes[2]} keyframes per keyframe-pass call"
    return (f"{frames[0]}..{frames[2]} frames per propagation call (--chunk-frames) reading "
            f"{keyframes[0]}..{keyframes[2]} stored keyframes")


@dataclass(frozen=True)
class CallSizes:
    """Frames (or keyframes) per call each engine is built for, as (min, opt, max) ranges."""

    plain: Range          # inversion: frames per plain call
    keyframes: Range      # keyframes per keyframe-pass call
    propagate: Range      # frames per propagation call
    store: Range          # keyframes K' in the store a propagation call reads

    @classmethod
    def from_plan(cls, plan) -> "CallSizes":
        """From a ``MemoryPlan``: min 1, opt = max = the planned size. An offloaded store stages
        about two keyframes per frame (opt) but may stage any of them (max K)."""
        k = plan.keyframes
        store = (1, k, k) if plan.store_on == "device" else (1, min(2 * plan.chunk_frames, k), k)
        return cls((1, plan.inversion_frames, plan.inversion_frames), (1, plan.keyframe_call, plan.keyframe_call),
                   (1, plan.chunk_frames, plan.chunk_frames), store)

    @staticmethod
    def from_call(kind: str, frames: int, keyframes: int) -> Tuple[Range, Range]:
        """(frames, keyframes) ranges from a pass's first call, when no plan was given: that call is
        the largest (full chunks come first), later ones are 1..its size. A staged store may hold
        up to two keyframes per frame."""
        if kind == "propagate":
            return (1, frames, frames), (1, keyframes, max(keyframes, 2 * frames))
        return (1, frames, frames), (1, keyframes, keyframes)

    def ranges(self, kind: str) -> Tuple[Range, Range]:
        if kind == "plain":
            return self.plain, (1, 1, 1)
        if kind == "keyframes":
            return (1, 1, 1), self.keyframes
        return self.propagate, self.store


# --------------------------------------------------------------------------- one engine

_LOGGER = None


def _logger():
    """One logger per process (TensorRT keeps the first one it is given); it keeps the last errors
    so that failures can say why."""
    global _LOGGER
    if _LOGGER is None:
        trt = _tensorrt()

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: List[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors = (self.errors + [str(msg)])[-20:]
                elif severity == trt.ILogger.Severity.WARNING:   # builds warn a lot; not for the console
                    logging.getLogger(__name__).info("TensorRT: %s", msg)

        _LOGGER = Logger()
    return _LOGGER


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8,
             trt.DataType.UINT8: torch.uint8, trt.DataType.BF16: torch.bfloat16}
    if dtype not in table:
        raise ModelError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


def _atomic_write(path: Path, data) -> None:
    with atomic_file(path, "wb", make_parents=True) as f:
        f.write(data)


@dataclass
class _Captured:
    context: object
    graph: "torch.cuda.CUDAGraph"
    inputs: Dict[str, torch.Tensor]     # views of the engine's static input buffers
    outputs: Dict[str, torch.Tensor]


class Engine:
    """One serialized engine: ``build`` -> ``load`` -> ``activate`` -> ``infer`` (demo/Diffusion's lifecycle).

    Every execution context uses one scratch buffer (``device_memory_size_v2`` bytes, a torch
    tensor): calls run one after another on one stream, so they can share it. With CUDA graphs,
    each input shape gets its own context and graph; inputs are copied into static buffers sized
    for the profile's max (shared by all shapes), so a propagation graph holds one extra copy of
    the keyframe store on the device."""

    def __init__(self, name: str, profile: Profile, device: torch.device, *, cuda_graphs: bool = True,
                 max_graphs: int = 8, limits: str = "its optimization profile"):
        self.name, self.profile, self.device, self.limits = name, profile, device, limits
        self.cuda_graphs, self.max_graphs = cuda_graphs, max_graphs
        self.path: Optional[Path] = None
        self.engine = self.context = self.scratch = None
        self.inputs: List[str] = []
        self.outputs: List[str] = []
        self.dtypes: Dict[str, torch.dtype] = {}
        self.dynamic: set = set()
        self.graphs: Dict[tuple, Optional[_Captured]] = {}   # None: that shape could not be captured
        self._static: Dict[str, torch.Tensor] = {}

    def build(self, onnx_path: Path, engine_path: Path, profile: Profile, timing_cache: Path, *,
              strongly_typed: bool = True, dtype: torch.dtype = torch.float16,
              workspace_bytes: Optional[int] = None) -> None:
        """Parse ``onnx_path``, build for ``profile``, write the plan to ``engine_path``."""
        trt, logger = _tensorrt(), _logger()
        logger.errors = []
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT {trt.__version__} cannot parse the {self.name} graph {onnx_path}: "
                             f"{errors or 'no error reported'}. Use --backend onnx for this model")
        config = builder.create_builder_config()
        if not strongly_typed:   # weakly typed: let TensorRT pick reduced precision where it is faster
            config.set_flag(trt.BuilderFlag.BF16 if dtype == torch.bfloat16 else trt.BuilderFlag.FP16)
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        optimization = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = tuple(tensor.shape)
            if -1 not in dims:
                continue
            shapes = profile.get(tensor.name)
            if shapes is None or len(shapes[0]) != len(dims) or any(
                    d != -1 and any(s[j] != d for s in shapes) for j, d in enumerate(dims)):
                raise ModelError(f"the {self.name} graph's input {tensor.name!r} {dims} does not fit the profile "
                                 f"{shapes}: the graph and tokenflow's profile disagree (a tokenflow bug)")
            optimization.set_shape(tensor.name, *shapes)
        config.add_optimization_profile(optimization)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):   # from another GPU/version: start afresh
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelError(f"TensorRT {trt.__version__} could not build the {self.name} engine from {onnx_path}: "
                             f"{'; '.join(logger.errors[-5:]) or 'no error logged'}")
        _atomic_write(timing_cache, config.get_timing_cache().serialize())
        _atomic_write(engine_path, plan)
        self.path = engine_path

    def load(self, engine_path: Optional[Path] = None) -> None:
        trt = _tensorrt()
        self.path = Path(engine_path or self.path)
        engine = trt.Runtime(_logger()).deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ModelError(f"TensorRT could not load the {self.name} engine {self.path} "
                             f"({'; '.join(_logger().errors[-3:])}); delete it to rebuild")
        self.engine = engine
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
            self.dtypes[name] = _torch_dtype(trt, engine.get_tensor_dtype(name))
            if is_input and engine.is_shape_inference_io(name):
                raise ModelError(f"the {self.name} engine reads input {name!r} on the host (a shape tensor); "
                                 f"this backend binds device tensors only")
            if is_input and -1 in tuple(engine.get_tensor_shape(name)):
                self.dynamic.add(name)

    def activate(self) -> None:
        size = getattr(self.engine, "device_memory_size_v2", None)
        size = self.engine.device_memory_size if size is None else size
        self.scratch = torch.empty(max(1, int(size)), dtype=torch.uint8, device=self.device)
        self.context = self._new_context()

    def _new_context(self):
        trt = _tensorrt()
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise ModelError(f"TensorRT could not create an execution context for the {self.name} engine")
        if hasattr(context, "set_device_memory"):      # TensorRT >= 10.1
            context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        else:
            context.device_memory = self.scratch.data_ptr()
        return context

    def _bind(self, context, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Set shapes and addresses of ``inputs``; allocate and bind the outputs."""
        for name in self.inputs:
            tensor = inputs[name]
            if name in self.dynamic and not context.set_input_shape(name, tuple(tensor.shape)):
                raise ModelError(f"TensorRT refused shape {tuple(tensor.shape)} for input {name!r} of the "
                                 f"{self.name} engine")
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(f"output {name!r} of the {self.name} engine has no static shape ({shape})")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def infer(self, feeds: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Run the engine on ``feeds`` (cast to the engine's input types); returns new output tensors."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"the {self.name} engine needs inputs {missing}")
        problem = profile_violation(self.profile, {n: tuple(t.shape) for n, t in feeds.items()})
        if problem:
            raise ConfigError(f"--backend tensorrt: {problem}; the {self.name} engine ({self.path}) was built for "
                              f"{self.limits}. Run with --chunk-frames (propagation) or --inversion-batch-size "
                              f"(inversion) within that range, or pass the new memory plan to the backend "
                              f"(TensorRTBackend.use_plan) so that it builds an engine for it")
        inputs = {n: feeds[n].to(device=self.device, dtype=self.dtypes[n]).contiguous() for n in self.inputs}
        if self.cuda_graphs:
            out = self._replay(inputs)
            if out is not None:
                return out
        outputs = self._bind(self.context, inputs)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise ModelError(f"TensorRT execution of the {self.name} engine failed "
                             f"({'; '.join(_logger().errors[-3:])})")
        return outputs

    def _replay(self, inputs: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        key = tuple(tuple(inputs[n].shape) for n in self.inputs)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return None
            self.graphs[key] = self._capture(inputs)
        captured = self.graphs[key]
        if captured is None:
            return None
        for name, tensor in inputs.items():
            captured.inputs[name].copy_(tensor)
        captured.graph.replay()
        return {name: o.clone() for name, o in captured.outputs.items()}

    def _static_view(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in self._static:
            high = self.profile[name][2] if name in self.profile else tuple(tensor.shape)
            self._static[name] = torch.empty(int(torch.Size(high).numel()), dtype=tensor.dtype, device=self.device)
        return self._static[name][:tensor.numel()].view(tensor.shape)

    def _capture(self, inputs: Dict[str, torch.Tensor]) -> Optional[_Captured]:
        """A context and CUDA graph for these input shapes; None (plain execution) if capture fails."""
        context = self._new_context()
        static = {n: self._static_view(n, t) for n, t in inputs.items()}
        for name, tensor in inputs.items():
            static[name].copy_(tensor)
        outputs = self._bind(context, static)
        current, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):   # one run outside the capture: TensorRT's deferred per-shape setup
            ok = context.execute_async_v3(side.cuda_stream)
        current.wait_stream(side)
        if not ok:
            raise ModelError(f"TensorRT execution of the {self.name} engine failed")
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side):
                ok = context.execute_async_v3(side.cuda_stream)
            if not ok:
                raise RuntimeError("execute_async_v3 returned False during capture")
        except RuntimeError as exc:
            warnings.warn(f"TensorRT {self.name} engine: CUDA graph capture failed for shapes "
                          f"{[tuple(t.shape) for t in inputs.values()]} ({exc}); running without a graph")
            return None
        return _Captured(context, graph, static, outputs)


def _parser_error(error) -> str:
    node = error.node_name() if hasattr(error, "node_name") else error.node()
    op = f" {error.node_operator()}" if hasattr(error, "node_operator") else ""
    return f"{error.code()} at node {node}{op}: {error.desc()}"


# --------------------------------------------------------------------------- the backend

class TensorRTBackend(UNetBackend):
    """The three passes as TensorRT engines (one per pass, branch count, latent size and call sizes)."""

    name = "tensorrt"

    def __init__(self, tokenflow: TokenFlowUNet, kernels: KernelChoice = KernelChoice(), *, model_identity: str = "",
                 cache_root: Optional[str] = None, cuda_graphs: bool = True, strongly_typed: bool = True,
                 workspace_bytes: Optional[int] = None, call_sizes: Optional[CallSizes] = None, log=None):
        param = next(tokenflow.unet.parameters())
        self.tokenflow, self.device, self.dtype = tokenflow, param.device, param.dtype
        if self.device.type != "cuda":
            raise ConfigError(f"--backend tensorrt: TensorRT runs on CUDA devices only (the UNet is on "
                              f"{self.device.type}); on a CUDA machine: {INSTALL}")
        self.trt = _tensorrt()
        self.kernels = exported_kernels(kernels, "tensorrt", self.dtype)
        root = Path(cache_root) if cache_root else Path(tempfile.gettempdir())
        self.onnx_folder = root / "onnx" if cache_root else root / "tokenflow-onnx"
        self.folder = root / "tensorrt" if cache_root else root / "tokenflow-tensorrt"
        self.model_identity, self.log = model_identity, log
        self.cuda_graphs, self.call_sizes = cuda_graphs, call_sizes
        self.options = {"strongly_typed": strongly_typed, "workspace_bytes": workspace_bytes,
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
            engine.build(onnx_path, path, profile, self.timing_cache, strongly_typed=self.options["strongly_typed"],
                         dtype=self.dtype, workspace_bytes=self.options["workspace_bytes"])
            self.seconds["build"] += time.perf_counter() - start
            self.counts["engines_built"] += 1
            _atomic_write(path.with_suffix(".json"), json.dumps(engine_identity(*identity), indent=1).encode())
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
