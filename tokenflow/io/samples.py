"""A small synthetic clip for demos and tests: coloured shapes gliding over a gradient.

Everything is computed with numpy from ``seed``, so the same arguments give the same pixels.
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Optional, Tuple

import numpy as np
import torch

from tokenflow.io.outputs import check_writable, remove_path, temp_sibling
from tokenflow.io.read import Clip, Colour, require_av
from tokenflow.io.write import write_video

TONE_HZ = 440.0
TONE_SAMPLE_RATE = 44100


def make_sample_clip(path, *, n_frames: int = 24, size: Tuple[int, int] = (256, 256),
                     fps: float = 12, audio: bool = False, seed: int = 0, colour: Optional[Colour] = None) -> str:
    """Write an ``n_frames`` clip of ``size`` (W, H) at ``fps`` to ``path`` (MP4, H.264).

    ``colour`` tags the video (and converts it with that matrix and range), as a camera's would be;
    None leaves it untagged. ``audio=True`` adds an AAC track: a 440 Hz sine whose loudness rises linearly from 0.1 to
    0.5 over the clip, so a trimmed copy reveals which part of the source it came from.
    Returns ``path``.
    """
    path = os.fspath(path)
    frames = torch.from_numpy(render_frames(n_frames, size, seed)).permute(0, 3, 1, 2)
    if not audio:
        return write_video(frames, path, fps, colour=colour)
    check_writable(path)
    duration = n_frames / float(fps)
    tone_path = temp_sibling(path, ".tone.m4a")   # a scratch file beside the output, removed below
    try:
        _write_tone(tone_path, duration)
        # write_video copies audio from a Clip's source; this one describes the tone file.
        tone = Clip(frames=frames, fps=float(fps), source=tone_path, source_size=tuple(size),
                    indices=list(range(n_frames)), content_hash="", audio=True,
                    start_time=0.0, end_time=duration)
        return write_video(frames, path, fps, audio_from=tone, colour=colour)
    finally:
        remove_path(tone_path)


def render_frames(n_frames: int, size: Tuple[int, int], seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3]: a slowly shifting two-colour gradient with three soft-edged shapes
    (two discs and a square) moving on smooth, looping paths."""
    width, height = size
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.15, 0.95, size=(5, 3))
    phases = rng.uniform(0, 2 * np.pi, size=(3, 2))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / max(width - 1, 1), y / max(height - 1, 1)
    frames = []
    for index in range(n_frames):
        t = index / max(n_frames, 1)
        image = _gradient(x, y, colours[0], colours[1], t)
        for shape, phase in enumerate(phases):
            centre = (0.5 + 0.3 * np.sin(2 * np.pi * t + phase[0] + shape),
                      0.5 + 0.3 * np.cos(2 * np.pi * t + phase[1]))
            mask = _shape_mask(x, y, centre, radius=0.12, square=(shape == 2))
            image = image * (1 - mask[..., None]) + colours[2 + shape] * mask[..., None]
        frames.append(np.round(image * 255).astype(np.uint8))
    return np.stack(frames)


def _gradient(x: np.ndarray, y: np.ndarray, first: np.ndarray, second: np.ndarray,
              t: float) -> np.ndarray:
    """[H, W, 3] blend from ``first`` to ``second`` along a direction that turns with ``t``."""
    angle = 2 * np.pi * t * 0.25
    blend = np.clip(0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle), 0, 1)
    return first * (1 - blend[..., None]) + second * blend[..., None]


def _shape_mask(x: np.ndarray, y: np.ndarray, centre, radius: float, square: bool) -> np.ndarray:
    """[H, W] coverage in [0, 1] with a soft edge (a few pixels wide) so the codec stays clean."""
    dx, dy = x - centre[0], y - centre[1]
    distance = np.maximum(np.abs(dx), np.abs(dy)) if square else np.sqrt(dx * dx + dy * dy)
    softness = 0.02
    return np.clip((radius - distance) / softness + 0.5, 0, 1)


def _write_tone(path: str, duration: float) -> None:
    """An AAC file (.m4a) with the rising 440 Hz tone, mono, ``duration`` seconds."""
    sample_count = int(round(duration * TONE_SAMPLE_RATE))
    t = np.arange(sample_count) / TONE_SAMPLE_RATE
    loudness = 0.1 + 0.4 * t / max(duration, 1e-9)
    samples = (loudness * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)[None, :]
    av = require_av("writing the sample clip's audio")
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=TONE_SAMPLE_RATE)
        stream.layout, stream.format = "mono", "fltp"
        chunk = 1024
        for offset in range(0, sample_count, chunk):
            frame = av.AudioFrame.from_ndarray(samples[:, offset:offset + chunk], format="fltp",
                                               layout="mono")
            frame.sample_rate = TONE_SAMPLE_RATE
            frame.pts = offset
            frame.time_base = Fraction(1, TONE_SAMPLE_RATE)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
