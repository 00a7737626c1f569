"""ControlNets of an edit (``--controlnet MODEL[:SCALE]`` with ``--control canny|depth|DIR``): the
models, loaded once per editor, and their control images per frame. (Skeleton: filled in by the
ControlNet work.)"""
from __future__ import annotations

from typing import List, Tuple

from tokenflow.config import EditConfig
from tokenflow.engine.conditioning import ControlUnit
from tokenflow.errors import ConfigError
from tokenflow.io.read import Clip


def control_units(editor, clip: Clip, config: EditConfig) -> Tuple[Tuple[ControlUnit, ...], str, List[str]]:
    """(ControlUnits in order, key of models + scales + images, summary lines)."""
    if not config.controlnets:
        return (), "", []
    raise ConfigError("ControlNet is not supported yet")
