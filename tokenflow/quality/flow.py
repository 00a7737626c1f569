"""Optical flow between consecutive frames (OpenCV DIS) and what warp-based metrics need from it.

Conventions: frames are ``uint8 [N, H, W, 3]`` RGB for flow estimation and ``float32 [N, H, W, 3]``
in [0, 1] for errors. A flow ``F`` from frame ``a`` to frame ``b`` is ``float32 [H, W, 2]``
(x, y) with ``a(p) ≈ b(p + F(p))`` — OpenCV's convention for ``calc(a, b)``.

Occlusion (which pixels of ``a`` are still visible in ``b``): the forward–backward consistency
check of Sundaram, Brox and Keutzer (ECCV 2010) with the thresholds Ruder, Dosovitskiy and Brox
use for video style transfer (GCPR 2016), as Lai et al. (ECCV 2018) do for their warp error: a
pixel ``p`` is visible when ``p + F(p)`` lies inside ``b`` and

    |F(p) + B(p + F(p))|² <= 0.01 (|F(p)|² + |B(p + F(p))|²) + 0.5

where ``B`` is the flow from ``b`` back to ``a``, sampled bilinearly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from tokenflow.errors import ConfigError

OPENCV_HINT = "pip install opencv-python-headless (or: pip install 'tokenflow[quality]')"
PRESETS = ("ultrafast", "fast", "medium")


def require_cv2():
    """The cv2 module, or a ConfigError that says what to install."""
    try:
        import cv2  # noqa: PLC0415  optional package (the quality extra)
    except ImportError:
        raise ConfigError(f"temporal metrics need OpenCV's optical flow, which is not installed: {OPENCV_HINT}") from None
    return cv2


@dataclass
class PairFlow:
    """Flow from frame t to t+1 of one video. forward: float32 [H, W, 2]; visible: bool [H, W]."""

    forward: np.ndarray
    visible: np.ndarray

    @property
    def visible_fraction(self) -> float:
        return float(self.visible.mean())


def make_dis(preset: str = "medium"):
    """An OpenCV DIS optical-flow estimator (``ultrafast``, ``fast`` or ``medium``)."""
    cv2 = require_cv2()
    if preset not in PRESETS:
        raise ConfigError(f"flow preset '{preset}' is not one of {', '.join(PRESETS)}")
    code = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
            "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[preset]
    return cv2.DISOpticalFlow_create(code)


def gray(frames: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB -> uint8 [N, H, W] luma."""
    cv2 = require_cv2()
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])


def sample(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image(p + flow(p))`` for every pixel p, bilinear, edges replicated: [H, W, C] or [H, W]."""
    cv2 = require_cv2()
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, xs + flow[..., 0], ys + flow[..., 1], interpolation=cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def inside(flow: np.ndarray) -> np.ndarray:
    """bool [H, W]: where ``p + flow(p)`` lands inside the image (pixel centres, inclusive)."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    tx, ty = xs + flow[..., 0], ys + flow[..., 1]
    return (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)


def consistent(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """bool [H, W]: forward–backward consistency of ``forward`` (a->b) against ``backward`` (b->a)."""
    back = sample(backward, forward)
    mismatch = ((forward + back) ** 2).sum(-1)
    scale = (forward ** 2).sum(-1) + (back ** 2).sum(-1)
    return (mismatch <= 0.01 * scale + 0.5) & inside(forward)


def pair_flows(frames: np.ndarray, preset: str = "medium") -> List[PairFlow]:
    """Flow and visibility from every frame to the next: N-1 PairFlows for uint8 [N, H, W, 3]."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N, H, W, 3] frames, got {frames.dtype} {list(frames.shape)}")
    dis = make_dis(preset)
    luma = gray(frames)
    flows = []
    for a, b in zip(luma[:-1], luma[1:]):
        forward = dis.calc(a, b, None)
        backward = dis.calc(b, a, None)
        flows.append(PairFlow(forward=forward, visible=consistent(forward, backward)))
    return flows
