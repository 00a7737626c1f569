"""``--backend tensorrt``: TensorRT engines built from the ONNX graphs of the three TokenFlow passes.

THIS BACKEND HAS NEVER BEEN RUN. There was no TensorRT and no GPU where it was written; it is
written against the TensorRT 10 Python API documentation. Do not assume it works: the pure
functions (profiles, engine keys, call sizes) are tested, nothing that touches TensorRT is.

Pipeline, per pass graph (plain / keyframes / propagate, per branch count and latent size):

    ``onnx.export_pass`` (reused when its manifest matches)
    -> ``Engine.build``: OnnxParser.parse_from_file (external weights next to the graph), a
       strongly typed network (precision is the graph's: fp16/bf16 UNet -> fp16/bf16 kernels; no weak
       typing, which TensorRT 11 removed), one
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

Modules: ``profiles`` (the pure functions: optimization profiles, engine keys, call sizes; tested),
``engine`` (one serialized engine's lifecycle; tested against a stand-in ``tensorrt`` module only),
``backend`` (``TensorRTBackend``, the ``UNetBackend``; never run).
"""
from tokenflow.engine.backends.tensorrt.backend import TensorRTBackend
from tokenflow.engine.backends.tensorrt.engine import INSTALL, UNVERIFIED, Engine
from tokenflow.engine.backends.tensorrt.profiles import (
    CallSizes,
    Profile,
    Range,
    call_limits,
    engine_identity,
    engine_key,
    profile_for_spec,
    profile_shapes,
    profile_violation,
)

__all__ = ["INSTALL", "UNVERIFIED", "CallSizes", "Engine", "Profile", "Range", "TensorRTBackend", "call_limits",
           "engine_identity", "engine_key", "profile_for_spec", "profile_shapes", "profile_violation"]
