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

    @property
    def empty(self) -> bool:
        return self.depth is None and not self.controls

    def controls_active(self, t: int) -> bool:
        """diffusers' rule: step i of n keeps the controls unless i/n < start or (i+1)/n > end."""
        if not self.controls:
            return False
        steps = [int(s) for s in self.timesteps]
        if int(t) not in steps:
            return True
        i, n = steps.index(int(t)), len(steps)
        start, end = self.window
        return not (i / n < start or (i + 1) / n > end)

    def unet_input(self, x: torch.Tensor, frames: FrameIndex, n_branches: int) -> torch.Tensor:
        """``[R,4,h,w]`` -> ``[R,5,h,w]`` with the depth of each row's frame (unchanged without depth)."""
        if self.depth is None:
            return x
        depth = _rows(self.depth, frames).to(x.device, x.dtype)            # [m,1,h,w]
        return torch.cat([x, depth.repeat(n_branches, 1, 1, 1)], dim=1)

    def residuals(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, frames: FrameIndex,
                  n_branches: int, plain: bool) -> Dict[str, object]:
        """The UNet's ``down_block_additional_residuals`` / ``mid_block_additional_residual``
        keywords for a call with input ``x`` ``[R,C,h,w]`` (empty: no controls at ``t``).

        plain: an ordinary call (every row controlled); else a TokenFlow pass whose first m rows
        are the source branch, controlled only with ``control_source``."""
        if not self.controls_active(int(t)):
            return {}
        m = x.shape[0] // n_branches
        skip = 0 if plain or self.control_source else m
        down, mid = None, None
        for unit in self.controls:
            image = _rows(unit.images, frames).to(x.device, x.dtype) / 255.0     # [m,3,H,W] in [0,1]
            rows = x.shape[0] - skip
            image = image.repeat(rows // m, 1, 1, 1)
            sample = x[skip:, : unit.net.config.in_channels]
            d, md = unit.net(sample, t, encoder_hidden_states=text[skip:], controlnet_cond=image,
                             conditioning_scale=unit.scale, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = md if mid is None else mid + md
        if skip:
            down = [_pad_front(r, skip) for r in down]
            mid = _pad_front(mid, skip)
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


def _rows(per_frame: torch.Tensor, frames: FrameIndex) -> torch.Tensor:
    """``per_frame[frames]`` with an index tensor on any device."""
    if isinstance(frames, torch.Tensor):
        return per_frame[frames.to(per_frame.device)]
    return per_frame[frames]


def _pad_front(r: torch.Tensor, rows: int) -> torch.Tensor:
    """[R - rows, ...] -> [R, ...] with zero rows first (uncontrolled source rows)."""
    return torch.cat([r.new_zeros(rows, *r.shape[1:]), r])
