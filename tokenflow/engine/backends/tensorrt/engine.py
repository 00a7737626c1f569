"""``--backend tensorrt``: one serialized TensorRT engine (``Engine``: build -> load -> activate -> infer).

THIS BACKEND HAS NEVER BEEN RUN. There was no TensorRT and no GPU where it was written; it is
written against the TensorRT 10 Python API documentation, using only what TensorRT 11 (PyPI's current
major) keeps: strongly typed networks, no builder precision flags. Do not assume it works: the pure
functions (profiles, engine keys, call sizes, network flags) are tested, nothing that touches TensorRT is.
Here that means: ``Engine`` is checked only against a stand-in ``tensorrt`` module that follows
the documented API (tests/test_backend_tensorrt.py), never against TensorRT itself.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from tokenflow.engine.backends.tensorrt.profiles import Profile, profile_violation
from tokenflow.errors import ConfigError, ModelError
from tokenflow.io.outputs import atomic_file

INSTALL = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"
UNVERIFIED = ("NEVER RUN: written against the TensorRT 10 Python API documentation without TensorRT or a GPU; "
              "do not assume it works")


def _tensorrt():
    try:
        import tensorrt  # noqa: PLC0415  optional package, only on CUDA machines
    except ImportError as exc:
        raise ConfigError(f"--backend tensorrt needs TensorRT ({INSTALL}): {exc}") from None
    return tensorrt


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


def network_flags(trt) -> int:
    """``create_network``'s flags: strongly typed only. Every tensor keeps the type the ONNX graph
    gives it (an fp16/bf16 UNet exports fp16/bf16 layers, with the float32 islands torch's export
    keeps), so no builder precision flag is set. TensorRT 11 (PyPI's current major) removed weak
    typing (``BuilderFlag.FP16``/``BF16``); TensorRT 10 has both."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8,
             trt.DataType.UINT8: torch.uint8, trt.DataType.BF16: torch.bfloat16}
    if dtype not in table:
        raise ModelError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


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
              workspace_bytes: Optional[int] = None) -> None:
        """Parse ``onnx_path``, build a strongly typed network for ``profile``, write the plan to ``engine_path``."""
        trt, logger = _tensorrt(), _logger()
        logger.errors = []
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT {trt.__version__} cannot parse the {self.name} graph {onnx_path}: "
                             f"{errors or 'no error reported'}. Use --backend onnx for this model")
        config = builder.create_builder_config()
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
        for path, data in ((timing_cache, config.get_timing_cache().serialize()), (engine_path, plan)):
            with atomic_file(path, "wb", make_parents=True) as f:
                f.write(data)
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
