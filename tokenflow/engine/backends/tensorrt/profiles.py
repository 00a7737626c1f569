"""``--backend tensorrt``, the pure part: optimization profiles of the pass graphs, engine cache
keys and the call sizes engines are built for. Tested; nothing here touches TensorRT.

The backend as a whole (``engine``, ``backend``) has NEVER BEEN RUN: see the package docstring.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from tokenflow.engine.backends.onnx import MAX_ROWS, text_shape
from tokenflow.engine.passes import GRAPH_PAIRS
from tokenflow.errors import ConfigError

Range = Tuple[int, int, int]                 # (min, opt, max) calls' frames or keyframes
Shape = Tuple[int, ...]
Profile = Dict[str, Tuple[Shape, Shape, Shape]]


def profile_shapes(kind: str, n_branches: int, layers: Sequence[Sequence], *, latent_size: Tuple[int, int],
                   text: Tuple[int, int], frames: Range, keyframes: Range, in_channels: int = 4) -> Profile:
    """{input: (min, opt, max) shape} for every input of the ``kind`` graph with a dynamic axis.

    layers: [(name, S_l, C_l)] as in ``graph_spec``; frames: frames per call of the plain and
    propagation passes; keyframes: keyframes per keyframe-pass call and keyframes K' in the store a
    propagation call reads. text: (T, D) of the text rows, ``onnx.text_shape`` of the graph spec:
    SD (77, D); SDXL (77 + E, D), its pooled embedding and time ids packed in the last E tokens
    (``models.text``). Rows = n_branches * frames (plain graphs: n_branches = 1):
        plain      sample [R,4,h,w], text [R,T,D]                         R = frames
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
               "text": each(lambda n: (n_branches * n, *text))}
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
                          text=text_shape(spec), frames=frames, keyframes=keyframes, in_channels=in_channels)


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
