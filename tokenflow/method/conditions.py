"""The per-frame conditions of an edit: depth maps (SD 2 depth models) and ControlNets.

``build_conditions`` turns an ``EditConfig`` and a clip into the ``engine.conditioning.UNetConditions``
of the inversion and of the edit, and a key of what changes the inversion (part of the inversion
cache key: other depth maps, or controls applied while inverting, are another inversion).
Depth maps come from ``method.depth``, ControlNets and their control images from ``method.control``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import List, Sequence

import torch

from tokenflow.config import EditConfig
from tokenflow.engine.conditioning import UNetConditions
from tokenflow.io.read import Clip
from tokenflow.method import control, depth


@dataclass
class EditConditions:
    """inversion / edit: what the inversion's and the edit's UNet calls get; key: a digest of what
    the inversion depends on ("" when nothing: a plain model); lines: what the summary says."""

    inversion: UNetConditions = field(default_factory=UNetConditions)
    edit: UNetConditions = field(default_factory=UNetConditions)
    key: str = ""
    lines: List[str] = field(default_factory=list)


def build_conditions(editor, clip: Clip, config: EditConfig, timesteps: Sequence[int]) -> EditConditions:
    """The conditions of editing ``clip`` with ``config`` on ``editor``'s model; ``timesteps``: the
    edit's, noisiest first. Depth models get depth maps; ``config.controlnet`` ControlNets. SDXL
    has no depth model: its depth options serve ``--control depth`` only (``depth.refuse_depth_options``,
    the one refusal, called by ``depth_condition`` and before loading by the CLI)."""
    maps, depth_key, depth_lines = depth.depth_condition(editor, clip, config)
    units, control_key, control_lines = control.control_units(editor, clip, config)
    during = bool(units) and config.control_during_inversion
    window = (config.control_start, config.control_end)
    inversion = UNetConditions(depth=maps, controls=units if during else (), control_source=True)
    edit = UNetConditions(depth=maps, controls=units, control_source=during, window=window,
                          timesteps=tuple(int(t) for t in timesteps))
    parts = {k: v for k, v in (("depth", depth_key), ("controls", control_key if during else "")) if v}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32] if parts else ""
    return EditConditions(inversion, edit, key, depth_lines + control_lines)


def tensor_sha256(x: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (CPU, contiguous) with its dtype and shape."""
    x = x.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{x.dtype}:{tuple(x.shape)}:".encode())
    digest.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return digest.hexdigest()
