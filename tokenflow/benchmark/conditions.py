"""The benchmark's per-frame UNet conditions: N random-weight ControlNets and a depth UNet's maps.

A throughput benchmark needs the ControlNets' shapes, not trained weights, nor the annotators that
make real control images: ``build_controlnets`` makes N ``ControlNetModel``s of the shape
``ControlNetModel.from_unet`` gives the bench's UNet (``models.architectures.controlnet_from_unet_config``)
with the one random-weight recipe, on the device (no host copy); ``BenchEditor`` is an ``Editor``
whose ``conditions`` are built here (random uint8 control images, depth maps from the frames'
brightness) instead of loaded, so variants time the ControlNets' and depth channel's cost through
the editor's own paths (memory plan, runner, inversion and edit) independently of the loaders.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from tokenflow.config import EditConfig
from tokenflow.engine.conditioning import ControlUnit, UNetConditions
from tokenflow.io.read import Clip
from tokenflow.method.conditions import EditConditions
from tokenflow.method.editor import Editor
from tokenflow.models.architectures import controlnet_from_unet_config
from tokenflow.models.hf import quiet_hf_libraries
from tokenflow.models.random_weights import build_random

SEED = 0


def build_controlnets(model, n: int, device: torch.device, dtype: torch.dtype, tag: str) -> List[torch.nn.Module]:
    """``n`` random-weight ControlNets for ``model``'s UNet on ``device`` in ``dtype`` (eval, no gradients);
    ``tag`` names the architecture in each one's weight seeds."""
    from diffusers import ControlNetModel  # noqa: PLC0415  start-up time

    config = controlnet_from_unet_config(model.unet)
    nets = []
    with quiet_hf_libraries():
        for i in range(n):
            net = build_random(lambda: ControlNetModel.from_config(config), SEED, f"{tag}/controlnet{i}",
                               device=torch.device(device), dtype=dtype)
            nets.append(net.eval().requires_grad_(False))
    return nets


def control_images(frames: int, height: int, width: int, index: int) -> torch.Tensor:
    """[N,3,H,W] uint8 random control images (CPU), seeded by the ControlNet's ``index``."""
    generator = torch.Generator().manual_seed(1000 + index)
    return torch.randint(0, 256, (frames, 3, height, width), generator=generator, dtype=torch.uint8)


def depth_maps(frames: torch.Tensor, scale: int, device: torch.device) -> torch.Tensor:
    """[N,1,h,w] float32 in [-1, 1] from ``frames`` [N,3,H,W] in [0,1]: each frame's brightness at the
    latent size, min/max-normalised per frame (the depth path's shape and range, not a depth estimate)."""
    h, w = frames.shape[-2] // scale, frames.shape[-1] // scale
    grey = F.interpolate(frames.mean(1, keepdim=True).float(), size=(h, w), mode="bicubic", align_corners=False)
    low = grey.amin(dim=(1, 2, 3), keepdim=True)
    high = grey.amax(dim=(1, 2, 3), keepdim=True)
    return (2 * (grey - low) / (high - low).clamp_min(1e-6) - 1).to(device)


class BenchEditor(Editor):
    """An ``Editor`` whose conditions are the bench's: ``nets`` ControlNets (on the edit's non-source
    rows, every step) with random control images, and depth maps for a 5-channel UNet."""

    def __init__(self, model, *, nets: Sequence[torch.nn.Module] = (), **kwargs):
        super().__init__(model, **kwargs)
        self.nets = tuple(nets)

    def conditions(self, clip: Clip, config: EditConfig) -> EditConditions:
        channels = int(self.model.unet.config.in_channels)
        if not self.nets and channels == int(self.model.vae.config.latent_channels):
            return EditConditions()
        n, _, height, width = clip.frames.shape
        depth = depth_maps(clip.frames, self.model.vae_scale_factor, self.model.device) \
            if channels > int(self.model.vae.config.latent_channels) else None
        units = tuple(ControlUnit(net=net, images=control_images(n, height, width, i), scale=1.0,
                                  name=f"random ControlNet {i + 1}") for i, net in enumerate(self.nets))
        timesteps = tuple(int(t) for t in self._edit_timesteps(config))
        return EditConditions(inversion=UNetConditions(depth=depth), key="bench" if depth is not None else "",
                              edit=UNetConditions(depth=depth, controls=units, timesteps=timesteps),
                              lines=[f"{len(units)} random-weight ControlNet(s)"] if units else [])
