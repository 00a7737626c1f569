"""ControlNets of an edit (``--controlnet MODEL[:SCALE]`` with ``--control canny|depth|DIR``): the
models, loaded once per editor, and their control images per frame.

Which branches get the residuals, and when, is ``engine.conditioning``'s (docs/models.md#controlnet):
uncond and cond always within ``--control-start/--control-end``; the source branch and the inversion
only with ``--control-during-inversion``.
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Optional, Tuple

import torch

from tokenflow.config import EditConfig
from tokenflow.engine.conditioning import ControlUnit
from tokenflow.errors import ConfigError
from tokenflow.io import control_images
from tokenflow.io.read import Clip
from tokenflow.method import depth
from tokenflow.models.controlnet import load_controlnet, parse_spec


def control_units(editor, clip: Clip, config: EditConfig) -> Tuple[Tuple[ControlUnit, ...], str, List[str]]:
    """(ControlUnits in order, key of models + scales + images, summary lines).

    The key is a digest of each ControlNet's identity, scale and control images' bytes: equal
    keys mean the same residuals for the same latents."""
    if not config.controlnets:
        return (), "", []
    specs = [parse_spec(text) for text in config.controlnets]   # every spec checked before any load
    units, parts, lines = [], [], []
    raw_depth: Optional[torch.Tensor] = None
    conditions = []   # every control image set is made (and checked) before any ControlNet loads or downloads
    for control in config.controls:
        if control == "canny":
            images = control_images.canny_images(clip.frames, config.canny_low, config.canny_high)
            what = f"canny edges ({config.canny_low}/{config.canny_high})"
        elif control == "depth":
            if raw_depth is None:
                raw_depth = depth.raw_depth_maps(editor, clip, config)
            images = control_images.depth_images(raw_depth, clip.size)
            what = "depth (normalised per frame)"
        else:
            images = control_images.folder_images(control, clip.frames.shape[0], clip.size, config.crop)
            what = f"images of {control}"
        if tuple(images.shape[-2:]) != tuple(clip.frames.shape[-2:]):
            raise ConfigError(f"--control {control}: control images of {images.shape[-1]}x{images.shape[-2]} for "
                              f"frames of {clip.size[0]}x{clip.size[1]}")
        conditions.append((images, what))
    for index, (spec, (images, what)) in enumerate(zip(specs, conditions), 1):
        net, identity = _load(editor, spec.model, config.allow_pickle)
        sha = _sha256(images)
        key = json.dumps({"model": identity, "scale": spec.scale, "images": sha}, sort_keys=True)
        units.append(ControlUnit(net=net, images=images, scale=spec.scale, name=spec.model, key=key))
        parts.append(key)
        lines.append(f"ControlNet {index}: {spec.model} at scale {spec.scale:g} on {what}")
    start, end = config.control_start, config.control_end
    lines.append(f"ControlNets act from {start:.0%} to {end:.0%} of the edit steps on the uncond and cond branches"
                 + ("; also on the inversion and the source branch (--control-during-inversion)"
                    if config.control_during_inversion else "; the inversion and the source branch run without them"))
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
    return tuple(units), digest, lines


def _load(editor, model: str, allow_pickle: bool):
    """(ControlNet, identity), loaded once per editor for a model, dtype and device."""
    cache: Dict[tuple, tuple] = editor.controlnets
    key = (model, str(editor.model.dtype), str(editor.model.device))
    if key not in cache:
        cache[key] = load_controlnet(model, editor.model.unet, editor.model.device, editor.model.dtype,
                                     allow_pickle=allow_pickle, model_name=editor.model.name)
    return cache[key]


def _sha256(images: torch.Tensor) -> str:
    """sha256 of uint8 images ``[N,3,H,W]`` with their shape."""
    digest = hashlib.sha256(f"{tuple(images.shape)}:".encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()

