"""Per-frame UNet conditions beyond latents and text: the depth channel of SD 2 depth models and
ControlNet residuals.

The method builds one ``UNetConditions`` for the inversion and one for the edit
(``tokenflow.method.conditions``); the runner (``engine.runner.UNetRunner``) applies the one it is
given to every UNet call, knowing which clip frames the call's rows are:

* depth ``[N,1,h,w]``: concatenated as the UNet's fifth input channel, the same map for every
  branch of a frame (the original's ``cat([x, cat([depth[idx]] * 3)], dim=1)``);
* controls: each ControlNet runs on the call's latents, text and its control images of those
  frames; the residuals of all ControlNets are summed and added to the UNet's skip connections.
  The source branch gets residuals only when the inversion was made with them (``control_source``):
  it must stay the function that inverted the source, or its features stop describing the source.

Shapes: a call has B branches of m frames, rows R = B * m ordered branch-major
(``[source x m, uncond x m, cond x m, ...]``); latents ``[R, C, h, w]``; text ``[R, 77, D]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from tokenflow.models.text import unet_keywords

FrameIndex = Union[slice, torch.Tensor]   # the clip frames of a call's m rows per branch


@dataclass
class ControlUnit:
    """One ControlNet and its condition.

    net: a diffusers ``ControlNetModel`` on the UNet's device and dtype (eval, no gradients).
    images: ``[N,3,H,W]`` uint8 control images, one per clip frame, at the frame size (CPU).
    scale: its ``conditioning_scale``.
    name: what the user named (for messages and the run summary).
    key: identity of the model, scale and images (``method.control``; for checkpoint fingerprints).
    """

    net: torch.nn.Module
    images: torch.Tensor
    scale: float
    name: str
    key: str = ""


@dataclass
class UNetConditions:
    """What every UNet call of one inversion or edit gets besides latents and text.

    depth: ``[N,1,h,w]`` float32 normalised depth maps (None: a 4-channel UNet).
    controls: the ControlNets (none: no residuals).
    control_source: the source branch (row block 0 of a TokenFlow pass) gets residuals too;
        plain calls (the inversion) always get them when there are controls.
    window: (start, end) fractions of ``timesteps`` in which the controls act (diffusers'
        ``control_guidance_start/end``); a timestep outside ``timesteps`` always gets them.
    timesteps: the edit's timesteps, noisiest first.
    """

    depth: Optional[torch.Tensor] = None
    controls: Sequence[ControlUnit] = ()
    control_source: bool = False
    window: Tuple[float, float] = (0.0, 1.0)
    timesteps: Sequence[int] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self._step_of = {int(t): i for i, t in enumerate(self.timesteps)}

    @property
    def empty(self) -> bool:
        return self.depth is None and not self.controls

    def controls_active(self, t: int) -> bool:
        """diffusers' rule: step i of n keeps the controls unless i/n < start or (i+1)/n > end."""
        if not self.controls:
            return False
        i = self._step_of.get(int(t))
        if i is None:
            return True
        n = len(self._step_of)
        start, end = self.window
        return not (i / n < start or (i + 1) / n > end)

    def unet_input(self, x: torch.Tensor, frames: FrameIndex, n_branches: int) -> torch.Tensor:
        """``[R,4,h,w]`` -> ``[R,5,h,w]`` with the depth of each row's frame (unchanged without depth)."""
        if self.depth is None:
            return x
        depth = _rows(self.depth, frames).to(x.device, x.dtype)            # [m,1,h,w]
        return torch.cat([x, depth.repeat(n_branches, 1, 1, 1)], dim=1)

    def controlled_rows(self, t: int, rows: int, n_branches: int, plain: bool) -> Tuple[int, int]:
        """The rows ``[lo, hi)`` of a call that get ControlNet residuals (``lo == hi``: none).

        A plain call (the inversion): all rows at an active ``t``. A TokenFlow pass: the source rows
        (the first ``rows // n_branches``) exactly when ``control_source``, at every ``t`` (the
        inversion was controlled at every step, so the source branch must be too, or it stops
        being the function that inverted the source); the edit rows at an active ``t``."""
        active = self.controls_active(int(t))
        if plain or not self.controls:
            return (0, rows) if active else (0, 0)
        m = rows // n_branches
        lo = 0 if self.control_source else m
        hi = rows if active else (m if self.control_source else 0)
        return (lo, hi) if hi > lo else (0, 0)

    def residuals(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, frames: FrameIndex,
                  n_branches: int, plain: bool) -> Dict[str, object]:
        """The UNet's ``down_block_additional_residuals`` / ``mid_block_additional_residual``
        keywords for a call with input ``x`` ``[R,C,h,w]`` (empty: no controls at ``t``): the sum
        over the ControlNets of their residuals on ``controlled_rows``, zeros on the other rows.

        plain: an ordinary call (every row controlled); else a TokenFlow pass whose first m rows
        are the source branch."""
        rows = x.shape[0]
        lo, hi = self.controlled_rows(int(t), rows, n_branches, plain)
        if hi == lo:
            return {}
        m = rows // n_branches
        down, mid = None, None
        for unit in self.controls:
            image = _rows(unit.images, frames).to(x.device, x.dtype) / 255.0     # [m,3,H,W] in [0,1]
            image = image.repeat((hi - lo) // m, 1, 1, 1)
            sample = x[lo:hi, : unit.net.config.in_channels]
            d, md = unit.net(sample, t, **unet_keywords(unit.net, text[lo:hi]), controlnet_cond=image,
                             conditioning_scale=unit.scale, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = md if mid is None else mid + md
        if (lo, hi) != (0, rows):
            down = [_pad(r, lo, rows - hi) for r in down]
            mid = _pad(mid, lo, rows - hi)
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


def _rows(per_frame: torch.Tensor, frames: FrameIndex) -> torch.Tensor:
    """``per_frame[frames]`` with an index tensor on any device."""
    if isinstance(frames, torch.Tensor):
        return per_frame[frames.to(per_frame.device)]
    return per_frame[frames]


def _pad(r: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """[R', ...] -> [before + R' + after, ...] with zero rows (uncontrolled rows) around it."""
    return torch.cat([r.new_zeros(before, *r.shape[1:]), r, r.new_zeros(after, *r.shape[1:])])
