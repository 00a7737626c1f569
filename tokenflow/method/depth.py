"""Depth maps for SD 2 depth models (``--model 2-depth``): estimated with DPT or given by the user
(``--depth-maps``), resized and normalised as the original does.

The original (omerbt/TokenFlow ``prepare_depth_maps``, ``preprocess.py`` L76-111 =
``run_tokenflow_pnp.py`` L70-105), per frame, from the raw network output ``prediction``:

    d = interpolate(prediction[:, None], size=(H // 8, W // 8), mode="bicubic", align_corners=False)
    d = 2.0 * (d - d.amin()) / (d.amax() - d.amin()) - 1.0       # min / max after the resize

i.e. a PyTorch bicubic resize (no antialias) to the latent size, then min/max normalisation of each
frame to exactly [-1, 1] (``--depth-normalize frame``, the default). ``--depth-normalize clip`` uses
one min/max over the whole clip, so the depth scale does not flicker between frames. The maps are
the UNet's fifth input channel in the inversion and in every editing call, the same map for all
branches of a frame (``engine.conditioning``).
"""
from __future__ import annotations

import hashlib
import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from tokenflow.config import EditConfig
from tokenflow.errors import ConfigError, InputError
from tokenflow.io.depth_maps import read_depth_maps
from tokenflow.io.read import Clip
from tokenflow.models.depth_estimator import DepthEstimator, estimate_depth, load_depth_estimator

DEPTH_CHANNELS = 5        # 4 latent channels + 1 depth channel
ESTIMATOR_BATCH = 8       # frames per DPT call
# loaded DPTs per editor (an editor loads each --depth-model once; gone with the editor)
_ESTIMATORS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def depth_condition(editor, clip: Clip, config: EditConfig) -> Tuple[Optional[torch.Tensor], str, List[str]]:
    """(maps ``[N,1,h,w]`` float32 on the model's device or None, key of the maps, summary lines).

    None, "" and no lines for a model without a depth input; ``--depth-maps`` with such a model is
    a ConfigError unless a ``--control depth`` reads them."""
    model = editor.model
    if model.unet.config.in_channels != DEPTH_CHANNELS:
        refuse_depth_options(config, model.family, model.name)
        if config.depth_maps and "depth" not in config.controls:
            raise ConfigError(f"--depth-maps {config.depth_maps} given, but model {model.name} is no depth "
                              "model (its UNet has no depth input) and no --control depth reads them: use --model 2-depth, "
                              "add --controlnet MODEL --control depth, or drop --depth-maps")
        return None, "", []
    raw = raw_depth_maps(editor, clip, config)
    width, height = clip.size
    latent = (height // model.vae_scale_factor, width // model.vae_scale_factor)
    maps = normalise_depth(raw, latent, config.depth_normalize, _source(editor, config))
    key = hashlib.sha256(f"{config.depth_normalize}:".encode() + maps_sha256(maps).encode()).hexdigest()
    lines = [f"depth: {_source(editor, config)}, {len(raw)} maps {width}x{height} -> {latent[1]}x{latent[0]}, "
             f"normalised per {config.depth_normalize} to [-1, 1]"]
    return maps.to(model.device), key, lines


def refuse_depth_options(config: EditConfig, family: str, name: str) -> None:
    """ConfigError for SD 2 depth's options (--depth-maps, --depth-model) with an SDXL model when no
    ``--control depth`` reads them: SDXL has no depth UNet. Cheap: the CLI calls it before loading
    (``family`` from ``models.load.family_of``)."""
    if family != "sdxl" or "depth" in config.controls:
        return
    for flag, value in (("--depth-model", config.depth_model), ("--depth-maps", config.depth_maps)):
        if value:
            raise ConfigError(f"{flag} {value} given, but model {name} is SDXL: depth maps feed SD 2's depth model "
                              f"(--model 2-depth) and SDXL has none; drop {flag}, or add --controlnet MODEL --control depth")


def raw_depth_maps(editor, clip: Clip, config: EditConfig) -> torch.Tensor:
    """Raw depth of every frame, ``[N,H',W']`` float32 (larger = nearer): ``--depth-maps`` when
    given (at frame resolution), else estimated with ``--depth-model`` (at the network's output
    resolution, as the original resizes it once, to the latent size). ``--control depth`` uses it too."""
    if config.depth_maps:
        return read_depth_maps(config.depth_maps, clip.frames.shape[0], clip.size)
    return estimate_depth(depth_estimator(editor, config), clip.frames, ESTIMATOR_BATCH)


def depth_estimator(editor, config: EditConfig) -> DepthEstimator:
    """The DPT of ``config.depth_model`` on ``editor``'s device, loaded once per editor."""
    cache = _ESTIMATORS.setdefault(editor, {})
    spec = config.depth_model
    if spec not in cache:
        model = editor.model
        cache[spec] = load_depth_estimator(spec, model.path, model.device, model.dtype,
                                           allow_pickle=config.allow_pickle)
    return cache[spec]


def normalise_depth(raw: torch.Tensor, latent_size: Tuple[int, int], mode: str = "frame",
                    source: str = "the depth maps") -> torch.Tensor:
    """Raw maps ``[N,H,W]`` -> ``[N,1,h,w]`` float32 in [-1, 1]: bicubic resize to ``latent_size``
    (h, w) (align_corners False, no antialias), then min/max of each frame (``mode`` "frame", the
    original) or of the whole clip ("clip"), both taken after the resize. InputError for a map
    without depth variation (the original would divide by zero)."""
    d = F.interpolate(raw.float().unsqueeze(1), size=tuple(latent_size), mode="bicubic", align_corners=False)
    if mode == "clip":
        low, high = d.amin(), d.amax()
    else:
        low, high = d.amin(dim=[1, 2, 3], keepdim=True), d.amax(dim=[1, 2, 3], keepdim=True)
    flat = (high - low).reshape(-1) <= 0
    if bool(flat.any()):
        frame = int(flat.nonzero()[0][0]) if mode != "clip" else 0
        what = f"map {frame}" if mode != "clip" else "every map"
        raise InputError(f"{source}: {what} is constant after the resize to the latent size, so it has no depth "
                         "to normalise: give maps with depth variation (or another --depth-model)")
    return 2.0 * (d - low) / (high - low) - 1.0


def maps_sha256(maps: torch.Tensor) -> str:
    """sha256 of a float32 tensor's shape and bytes."""
    x = maps.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(x.shape)}:".encode())
    digest.update(x.numpy().tobytes())
    return digest.hexdigest()


def _source(editor, config: EditConfig) -> str:
    if config.depth_maps:
        return f"--depth-maps {config.depth_maps}"
    cached = _ESTIMATORS.get(editor, {}).get(config.depth_model)
    return f"estimated with DPT ({cached.name if cached else config.depth_model or 'the default'})"
