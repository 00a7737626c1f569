"""Depth maps for SD 2 depth models (``--model 2-depth``): estimated with DPT or given by the user
(``--depth-maps``), resized and normalised as the original does. (Skeleton: filled in by the depth work.)"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from tokenflow.config import EditConfig
from tokenflow.errors import ConfigError
from tokenflow.io.read import Clip


def depth_condition(editor, clip: Clip, config: EditConfig) -> Tuple[Optional[torch.Tensor], str, List[str]]:
    """(maps [N,1,h,w] float32 on the model's device or None, key of the maps, summary lines)."""
    if editor.model.unet.config.in_channels != 5:
        if config.depth_maps:
            raise ConfigError(f"--depth-maps {config.depth_maps} given, but model {editor.model.name} is no depth "
                              "model (its UNet has no depth input): use --model 2-depth, or drop --depth-maps")
        return None, "", []
    raise ConfigError("depth models are not supported yet")


def raw_depth_maps(editor, clip: Clip, config: EditConfig) -> torch.Tensor:
    """Raw depth of every frame, ``[N,H,W]`` float32 at frame resolution (what DPT returns, larger =
    nearer): ``--depth-maps`` when given, else estimated with ``--depth-model`` (``--control depth``
    uses it too)."""
    raise ConfigError("depth estimation is not supported yet")
