"""Control images of ControlNets (``--control canny|depth|DIR``): uint8 ``[N,3,H,W]`` at the frame
size, one per edited frame.

* canny: OpenCV's ``cv2.Canny`` of each frame (grey, thresholds ``low``/``high``) on 3 channels, as
  diffusers' canny ControlNet examples make them (OpenCV is the optional ``control`` extra);
* depth: raw depth maps (larger = nearer) normalised per frame to 0..255 as the depth-estimation
  annotator does (``(d - min) / (max - min) * 255``, truncated), on 3 channels;
* a folder: the user's own annotator's images, one per edited frame in natural order
  (frame2.png before frame10.png), resized (and centre-cropped with ``crop``) like the frames.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch

from tokenflow.errors import ConfigError, InputError
from tokenflow.io.hashing import image_names
from tokenflow.io.read import _open_rgb, _resize

OPENCV_MISSING = ("--control canny needs OpenCV, which is not installed: pip install opencv-python-headless "
                  "(or pip install 'tokenflow[control]')")


def require_cv2():
    """The ``cv2`` module, or ConfigError with the command that installs it."""
    try:
        import cv2  # noqa: PLC0415  optional dependency (the `control` extra)
    except ImportError:
        raise ConfigError(OPENCV_MISSING) from None
    return cv2


def canny_images(frames: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """frames ``[N,3,H,W]`` float in [0,1] -> edge images ``[N,3,H,W]`` uint8 (0 or 255)."""
    cv2 = require_cv2()
    pixels = (frames.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    edges = [cv2.Canny(np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)), int(low), int(high))
             for rgb in pixels]
    return torch.from_numpy(np.stack(edges))[:, None].expand(-1, 3, -1, -1).contiguous()


def depth_images(raw: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """raw depth ``[N,H',W']`` float (larger = nearer) -> ``[N,3,H,W]`` uint8 at ``size`` (W, H):
    bicubic resize when the maps have another size, then min/max per frame to 0..255 (a flat map gives 0)."""
    d = raw.detach().cpu().double()
    width, height = size
    if tuple(d.shape[-2:]) != (height, width):
        d = torch.nn.functional.interpolate(d[:, None], size=(height, width), mode="bicubic", align_corners=False)[:, 0]
    low = d.amin(dim=(1, 2), keepdim=True)
    span = d.amax(dim=(1, 2), keepdim=True) - low
    scaled = torch.where(span > 0, (d - low) / span.clamp_min(1e-30), torch.zeros_like(d)) * 255
    return scaled.floor().clamp(0, 255).to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()


def folder_images(folder: str, count: int, size: Tuple[int, int], crop: bool = False) -> torch.Tensor:
    """``count`` images from ``folder`` in natural order, resized to ``size`` (W, H) -> ``[N,3,H,W]``
    uint8. InputError when the folder is missing, holds another number of images or one is unreadable."""
    if not os.path.isdir(folder):
        raise InputError(f"--control {folder}: no such folder; give canny, depth or a folder of control images "
                         "(one per edited frame)")
    names = image_names(folder)
    if len(names) != count:
        raise InputError(f"--control {folder} holds {len(names)} images but the edit has {count} frames: give one "
                         "control image per edited frame (after --frames/--start/--stride), numbered in order")
    images = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            picture = _open_rgb(path)
        except InputError:
            raise InputError(f"--control {folder}: could not read image '{name}': replace it with a valid "
                             "image") from None
        images.append(_resize(picture, tuple(size), crop))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
