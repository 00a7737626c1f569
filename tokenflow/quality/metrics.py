"""Temporal-consistency metrics of an edited video against its source (see docs/metrics.md).

All errors are on RGB in [0, 1]. For consecutive frames t, t+1 with flow ``F_t`` (t -> t+1)
and visibility mask ``M_t`` (forward–backward consistent, see ``flow.py``):

* **warp error** (Lai et al., "Learning Blind Video Temporal Consistency", ECCV 2018, eq. 9):
  the flow and mask come from the **source** video; the **edited** frame t+1 is warped to t

      E_t = sum_p M_t(p) |Y_t(p) - Y_{t+1}(p + F_t(p))|²  /  sum_p M_t(p)

  with |.|² the squared L2 norm over the three channels; the video's number is the mean of
  E_t over its N-1 pairs. An edit that follows the source's motion exactly scores the same as
  the source itself; flicker, drift and texture that does not move with the content raise it.
* **flicker**: the same formula on one video with flow and mask estimated on **that video**
  (edited or source): what is left of the temporal change once the video's own motion is
  compensated. For the source, its flicker is also its warp error: the floor an edit is judged
  against (flow errors, lighting changes, motion blur, compression).
* **temporal difference**: mean |Y_{t+1}(p) - Y_t(p)| over pixels and channels, no motion
  compensation (context: how much the video moves at all).

``warp_error_ratio`` = edited warp error / source warp error (1.0: as consistent as the source).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch

from tokenflow.io.write import to_uint8_images
from tokenflow.quality.flow import PairFlow, pair_flows, require_cv2, sample

DEFINITIONS = {
    "warp_error": "mean over consecutive pairs of the squared RGB L2 error (values in [0,1]) between "
                  "edited frame t and edited frame t+1 warped to t with the SOURCE video's optical flow "
                  "(OpenCV DIS), over pixels visible in both (forward-backward consistency); Lai et al. 2018",
    "flicker": "the warp error of a video against its OWN optical flow: temporal change left after "
               "compensating the video's own motion",
    "temporal_difference": "mean absolute difference of consecutive frames (RGB in [0,1]), no motion compensation",
    "warp_error_ratio": "edited warp_error / source warp_error (1.0: as temporally consistent as the source)",
}


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3], converted exactly as the video and
    frame writers convert (so in-memory frames score like their lossless ``--save-frames`` PNGs)."""
    return to_uint8_images(frames)


def to_float(frames: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, H, W, 3] in [0, 1]."""
    return frames.astype(np.float32) / 255.0


def warp_errors(frames: np.ndarray, flows: List[PairFlow]) -> np.ndarray:
    """Per-pair warp error (see module docstring) of float32 [N, H, W, 3] frames: float64 [N-1].

    NaN for a pair where no pixel is visible."""
    if len(flows) != len(frames) - 1:
        raise ValueError(f"{len(frames)} frames need {len(frames) - 1} flows, got {len(flows)}")
    errors = np.empty(len(flows))
    for t, pair in enumerate(flows):
        warped = sample(frames[t + 1], pair.forward)
        squared = ((frames[t] - warped) ** 2).sum(-1)
        visible = pair.visible
        errors[t] = float(squared[visible].mean(dtype=np.float64)) if visible.any() else math.nan
    return errors


def temporal_differences(frames: np.ndarray) -> np.ndarray:
    """Mean |Y_{t+1} - Y_t| of float32 [N, H, W, 3] frames: float64 [N-1]."""
    return np.array([float(np.abs(b - a).mean(dtype=np.float64)) for a, b in zip(frames[:-1], frames[1:])])


def temporal_metrics(source: torch.Tensor, edited: torch.Tensor, *, preset: str = "medium") -> Dict:
    """Warp error, flicker and temporal difference of ``edited`` against ``source``.

    source, edited: float [N, 3, H, W] in [0, 1], same N, H, W (N >= 2). Returns a JSON-ready
    dict: means under ``edited`` / ``source``, per-pair series under ``per_pair``.
    """
    if source.shape != edited.shape:
        raise ValueError(f"source {list(source.shape)} and edited {list(edited.shape)} differ in shape")
    if source.shape[0] < 2:
        raise ValueError("temporal metrics need at least 2 frames")
    cv2 = require_cv2()
    src8, edit8 = to_uint8(source), to_uint8(edited)
    src, edit = to_float(src8), to_float(edit8)
    source_flows = pair_flows(src8, preset)
    edited_flows = pair_flows(edit8, preset)
    series = {
        "warp_error": warp_errors(edit, source_flows),
        "source_warp_error": warp_errors(src, source_flows),
        "flicker": warp_errors(edit, edited_flows),
        "temporal_difference": temporal_differences(edit),
        "source_temporal_difference": temporal_differences(src),
        "visible_fraction": np.array([p.visible_fraction for p in source_flows]),
    }
    means = {k: _mean(v) for k, v in series.items()}
    source_warp = means["source_warp_error"]
    return {
        "frames": int(source.shape[0]),
        "size": [int(source.shape[-1]), int(source.shape[-2])],
        "flow": {"method": "OpenCV DIS", "preset": preset, "opencv": cv2.__version__, "computed_on": "source"},
        "edited": {"warp_error": means["warp_error"], "flicker": means["flicker"],
                   "temporal_difference": means["temporal_difference"]},
        "source": {"warp_error": source_warp, "flicker": source_warp,
                   "temporal_difference": means["source_temporal_difference"]},
        "warp_error_ratio": (means["warp_error"] / source_warp
                             if means["warp_error"] is not None and source_warp else None),
        "visible_fraction": means["visible_fraction"],
        "per_pair": {k: [_finite(x) for x in v] for k, v in series.items()},
        "definitions": DEFINITIONS,
    }


def _mean(values: np.ndarray) -> Optional[float]:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _finite(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None
