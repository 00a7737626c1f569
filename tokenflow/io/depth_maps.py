"""Reading the user's raw depth maps (``--depth-maps``): a ``.npy`` or a folder of 16-bit PNGs.

Raw maps are what a depth network returns before any resize or normalisation (MiDaS / DPT: relative
inverse depth, larger = nearer), one per edited frame, at the frame resolution:

* ``.npy``: ``[N, H, W]`` (or ``[N, 1, H, W]``) floating point, read as float32;
* a folder: one single-channel PNG per frame (16-bit, 8-bit also read), in the order of the numbers
  in their names (``depth2.png`` before ``depth10.png``), values taken as they are.

Every problem (missing or unreadable input, wrong count, wrong size, NaN / infinity) is one
``InputError`` naming the input and the fix; nothing is resized or guessed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from tokenflow.errors import InputError, one_line
from tokenflow.io.hashing import natural_key

PNG_SUFFIX = ".png"
_FLAG = "--depth-maps"


def read_depth_maps(path: str, frames: int, size: Tuple[int, int]) -> torch.Tensor:
    """The raw maps at ``path`` for ``frames`` frames of ``size`` (W, H): ``[N, H, W]`` float32 (CPU)."""
    source = Path(str(path)).expanduser()
    if not source.exists():
        raise InputError(f"{_FLAG} '{path}' does not exist: give a .npy file [N,H,W] or a folder of 16-bit PNGs, "
                         "one raw depth map per edited frame")
    maps = _read_folder(source, path) if source.is_dir() else _read_npy(source, path)
    _check(maps, path, frames, size)
    return torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))


def _read_npy(source: Path, path: str) -> np.ndarray:
    if source.suffix.lower() != ".npy":
        raise InputError(f"{_FLAG} '{path}' is neither a .npy file nor a folder: save the raw maps with "
                         "numpy.save as [N,H,W] float32, or give a folder of 16-bit PNGs")
    try:
        maps = np.load(source, allow_pickle=False)
    except Exception as error:   # truncated, not a .npy, object array ...
        raise InputError(f"{_FLAG} '{path}' cannot be read ({one_line(error)}): write it with "
                         "numpy.save(path, maps.astype('float32')) as [N,H,W]") from None
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3 or not (np.issubdtype(maps.dtype, np.floating) or np.issubdtype(maps.dtype, np.integer)):
        raise InputError(f"{_FLAG} '{path}' holds a {maps.dtype} array of shape {list(maps.shape)}: it must be "
                         "[N,H,W] float32 (one raw depth map per edited frame, at the frame size)")
    return maps.astype(np.float32)


def _read_folder(folder: Path, path: str) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415  start-up time: only when maps are given as images

    files = png_files(folder)
    if not files:
        raise InputError(f"{_FLAG} folder '{path}' has no .png files: give one 16-bit grayscale PNG per "
                         "edited frame (numbered: 00000.png, 00001.png, ...) or a .npy [N,H,W]")
    maps: List[np.ndarray] = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                mode, array = image.mode, np.asarray(image)
        except Exception as error:
            raise InputError(f"{_FLAG}: depth map '{file}' cannot be read ({one_line(error)}): "
                             "replace it with a 16-bit grayscale PNG") from None
        if array.ndim != 2:
            raise InputError(f"{_FLAG}: depth map '{file}' is a {mode} image with {array.shape[-1]} channels: "
                             "depth maps must be single-channel (16-bit grayscale) PNGs")
        if maps and array.shape != maps[0].shape:
            raise InputError(f"{_FLAG}: depth map '{file}' is {array.shape[1]}x{array.shape[0]}, "
                             f"'{files[0]}' {maps[0].shape[1]}x{maps[0].shape[0]}: all maps need the frame size")
        maps.append(array.astype(np.float32))
    return np.stack(maps)


def png_files(folder: Path) -> List[Path]:
    """The PNGs of ``folder`` in the order of the numbers in their names."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(PNG_SUFFIX) and not n.startswith(".")]
    return [folder / n for n in sorted(names, key=natural_key)]


def _check(maps: np.ndarray, path: str, frames: int, size: Tuple[int, int]) -> None:
    width, height = size
    if len(maps) != frames:
        raise InputError(f"{_FLAG} '{path}' has {len(maps)} depth maps but the edit has {frames} frames: give exactly "
                         "one raw map per edited frame (same --frames / --start / --stride selection)")
    if tuple(maps.shape[1:]) != (height, width):
        raise InputError(f"{_FLAG} '{path}': the maps are {maps.shape[2]}x{maps.shape[1]} (WxH), the frames "
                         f"{width}x{height}: give raw maps at the frame size (--size), not resized to the latents")
    bad = ~np.isfinite(maps)
    if bad.any():
        frame = int(np.argwhere(bad)[0][0])
        raise InputError(f"{_FLAG} '{path}': depth map {frame} has NaN or infinite values: replace them "
                         "(e.g. numpy.nan_to_num) before editing")
