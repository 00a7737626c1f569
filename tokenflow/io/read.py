"""Reading clips from videos or image folders.

Decoding follows the original TokenFlow (torchvision's PyAV reader + ``save_video_frames``):
frames of the first video stream in presentation order, ``frame.to_rgb().to_ndarray()``
(rgb24), a PIL Lanczos resize to (W, H), then ``ToTensor`` (uint8 / 255).

Tensors are float32 [N, 3, H, W] in [0, 1] unless stated otherwise. Sizes are (W, H).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from tokenflow.config import DEFAULT_FRAMES, default_size
from tokenflow.errors import ConfigError, InputError
from tokenflow.io.hashing import hash_file, hash_folder, list_images

FOLDER_FPS = 10.0  # image folders carry no frame rate

AV_INSTALL = "pip install 'av>=12'"

Size = Tuple[int, int]


def require_av(what: str = "reading and writing video files"):
    """PyAV, imported only where a video is read or written: ``tokenflow doctor``, ``tokenflow
    bench`` on synthetic clips, image folders and the kernels work without it. Missing: one
    ConfigError line naming the install command."""
    try:
        import av  # noqa: PLC0415  (see above)
        import av.error  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(f"{what} needs PyAV, which cannot be imported here ({exc}): {AV_INSTALL}") from None
    return av


def _decode_errors(av) -> tuple:
    return (av.error.FFmpegError, OSError, EOFError, ValueError)


FrameCheck = Callable[[int], None]   # called with n before the n-th selected frame takes memory; raises to stop


@dataclass(frozen=True)
class Colour:
    """A video's colour description as FFmpeg numbers it (AVColorPrimaries, AVColorTransferCharacteristic,
    AVColorSpace, AVColorRange): e.g. bt709 = 1, 1, 1; unspecified = 2, 2, 2; range 1 = limited (tv),
    2 = full (pc), 0 = unspecified. ``io.write.write_video`` tags its output with it."""

    primaries: int = 2
    transfer: int = 2
    matrix: int = 2
    range: int = 0

    @classmethod
    def of(cls, frame) -> "Colour":
        """The tags of a decoded av.VideoFrame."""
        return cls(int(frame.color_primaries), int(frame.color_trc), int(frame.colorspace), int(frame.color_range))

    @property
    def specified(self) -> bool:
        return (self.primaries, self.transfer, self.matrix, self.range) != (2, 2, 2, 0)


@dataclass
class Clip:
    """A selection of frames from one source, ready for the model.

    ``frames``: float32 [N, 3, H, W] in [0, 1]. ``source_size``: (W, H) of the source frames as
    displayed. ``indices``: source frame numbers kept. ``start_time`` / ``end_time``: seconds on
    the source's timeline covered by the selection (end = last kept frame + one frame period).
    ``colour``: the source's colour tags (unspecified for image folders).
    """

    frames: torch.Tensor
    fps: float
    source: str
    source_size: tuple[int, int]
    indices: list[int]
    content_hash: str
    audio: bool
    start_time: float
    end_time: float
    colour: Colour = field(default_factory=Colour)

    @property
    def size(self) -> Size:
        """(W, H) of ``frames``."""
        return int(self.frames.shape[-1]), int(self.frames.shape[-2])


# ----------------------------------------------------------------------------- reading


def read_video(path, *, frames: Optional[int] = None, start: int = 0, stride: int = 1,
               size: Optional[Size] = None, crop: bool = False, on_frame: Optional[FrameCheck] = None,
               warn_short: bool = True, family: str = "sd") -> Clip:
    """Decode source frames ``start, start + stride, ...`` (at most ``frames`` of them) into a Clip.

    ``path`` is a video file FFmpeg can decode or a folder of numbered images. ``frames=None``
    keeps every selected frame; if fewer exist than asked, the ones that exist are kept.
    ``size`` (W, H) must be multiples of 8 and at least 64; None picks ``default_size`` for the
    model ``family`` ("sd" or "sdxl").
    ``crop=True`` centre-crops each frame to the aspect ratio of ``size`` before resizing, so
    nothing is stretched; otherwise the whole frame is resized (possibly changing its aspect).
    Videos whose container asks for a display rotation (phone footage) are rotated upright.
    Decoding stops at the last selected frame. Frames are resized one by one as they are decoded
    or read, so only the selected frames at the target size are held (plus one source frame).
    ``on_frame(n)`` is called before the n-th selected frame is resized; an exception it raises
    (a host-memory check: ``engine.planner.HostPlan.check_frames``) ends the read.
    ``warn_short``: one warning when ``frames`` (other than the default 40) asks for more frames than
    exist (an edit's read); readers that check the count themselves (``tokenflow metrics``) turn it off.
    Returns frames float32 [N, 3, H, W] in [0, 1].
    """
    path = os.fspath(path)
    _check_selection(frames, start, stride)
    if size is not None:
        size = _checked_size(size)
    if not os.path.exists(path):
        raise InputError(f"input video '{path}' does not exist. Check the path.")
    selection = _Selection(start, stride, frames, warn_short)
    if os.path.isdir(path):
        return _read_image_folder(path, selection, size, crop, on_frame, family)
    return _read_video_file(path, selection, size, crop, on_frame, family)


def probe(path) -> dict:
    """Cheap facts about a source, read from headers only: ``frames`` (None if the container
    does not say), ``fps``, ``width``, ``height`` (as stored, before any display rotation),
    ``audio`` and ``duration`` in seconds (or None)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"input video '{path}' does not exist. Check the path.")
    if os.path.isdir(path):
        images = list_images(path)
        width, height = _image_size(images[0])
        return {"frames": len(images), "fps": FOLDER_FPS, "width": width, "height": height,
                "audio": False, "duration": len(images) / FOLDER_FPS}
    av = require_av(f"reading the video '{path}'")
    try:
        with av.open(path) as container:
            stream = _first_video_stream(container, path)
            if stream.codec_context is None:   # no decoder for its codec: what decoding would say
                raise _decode_error(path, ValueError("Decoder not found"))
            width, height = stream.codec_context.width, stream.codec_context.height
            duration = float(container.duration / av.time_base) if container.duration else None
            return {"frames": stream.frames or None, "fps": _stream_fps(stream), "width": width,
                    "height": height, "audio": bool(container.streams.audio), "duration": duration}
    except _decode_errors(av) as error:
        raise _decode_error(path, error) from error


@dataclass(frozen=True)
class FrameCount:
    """What a read of a source will hold, known before decoding (``count_selected``)."""

    frames: Optional[int]      # selected frames; None when not known before decoding
    how: str                   # where the number comes from, for messages
    source_size: Size          # (W, H) of a source frame as stored


def count_selected(path, *, frames: Optional[int] = None, start: int = 0, stride: int = 1) -> FrameCount:
    """How many frames ``read_video`` with this selection keeps, from headers only (``probe``):
    min(listed frames from ``start`` every ``stride``, ``frames``). A container that does not list
    its frame count is estimated as duration x fps (rounded up); one that says neither counts as
    ``frames`` (an upper bound), else as unknown (None): check the frames as they arrive
    (``read_video(on_frame=...)``), which also catches a header that lists too few."""
    info = probe(path)
    listed, how = info["frames"], "listed by the container"
    if os.path.isdir(os.fspath(path)):
        how = "in the folder"
    elif listed is None and info["duration"] and info["fps"]:
        listed = math.ceil(info["duration"] * info["fps"])
        how = "estimated as duration x fps (the container does not list them)"
    size = (info["width"], info["height"])
    if listed is None:
        if frames is None:
            return FrameCount(None, "the count is not known before decoding: checked as frames arrive", size)
        return FrameCount(frames, f"--frames {frames}; the container lists neither frames nor duration", size)
    selected = max(0, math.ceil((listed - start) / stride))
    source = f"{listed} frames {how}"
    if frames is not None and frames < selected:
        return FrameCount(frames, f"--frames {frames}; {source}", size)
    if (start, stride) != (0, 1):
        source = f"--start {start} --stride {stride} of {source}"
    return FrameCount(selected, source, size)


class _Selection:
    """Which source frame numbers to keep: start, start + stride, ... (``count`` of them or all)."""

    def __init__(self, start: int, stride: int, count: Optional[int], warn_short: bool = True):
        self.start, self.stride, self.count, self.warn_short = start, stride, count, warn_short
        self.last = None if count is None else start + stride * (count - 1)

    def keeps(self, index: int) -> bool:
        return index >= self.start and (index - self.start) % self.stride == 0

    def is_done(self, index: int) -> bool:
        """True once ``index`` is past the last frame to keep."""
        return self.last is not None and index > self.last


def _warn_if_short(path: str, total: int, kept: int, selection: _Selection) -> None:
    """One warning when ``frames`` asked for more frames than the source has from ``start`` every
    ``stride``; the default (DEFAULT_FRAMES) is a cap, not a request, and is not warned about."""
    if not selection.warn_short or selection.count is None or kept >= selection.count \
            or selection.count == DEFAULT_FRAMES:
        return
    picked = "" if (selection.start, selection.stride) == (0, 1) else \
        f", {kept} of them from --start {selection.start} --stride {selection.stride}"
    warnings.warn(f"'{path}' has {total} frames{picked}; editing {kept} (--frames {selection.count} asks for more)")


def _check_selection(frames: Optional[int], start: int, stride: int) -> None:
    if frames is not None and frames < 1:
        raise ConfigError(f"--frames {frames} must be at least 1 (or omitted for every frame).")
    if start < 0:
        raise ConfigError(f"--start {start} must be 0 or more.")
    if stride < 1:
        raise ConfigError(f"--stride {stride} must be at least 1.")


def _checked_size(size: Sequence[int]) -> Size:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size {size!r} must be two integers (width, height), e.g. 512x512.") from None
    if width % 8 or height % 8 or width < 64 or height < 64:
        raise InputError(f"size {width}x{height} is not supported: width and height must be "
                         f"multiples of 8 and at least 64 (e.g. {_round8(width)}x{_round8(height)}).")
    return width, height


def _round8(value: int) -> int:
    return max(64, (value + 4) // 8 * 8)


def _read_video_file(path: str, selection: _Selection, size: Optional[Size], crop: bool,
                     on_frame: Optional[FrameCheck] = None, family: str = "sd") -> Clip:
    av = require_av(f"reading the video '{path}'")
    try:
        with av.open(path) as container:
            stream = _first_video_stream(container, path)
            stream.thread_type = "AUTO"
            fps = _stream_fps(stream)
            has_audio = bool(container.streams.audio)
            listed = int(stream.frames or 0)   # what the header says; 0 when the container does not say
            decoded = _decode_selected(container, stream, selection, size, crop, fps, on_frame, family)
    except InputError:
        raise
    except _decode_errors(av) as error:
        raise _decode_error(path, error) from error
    images, indices, times, source_size, total, exhausted, colour = decoded
    if total == 0:
        raise InputError(f"no frames could be decoded from '{path}'. Is the video empty or damaged?")
    if not images:
        raise InputError(f"--start {selection.start} is past the end of '{path}' ({total} frames).")
    if exhausted and listed > total and (selection.count is None or len(images) < selection.count):
        warnings.warn(f"'{path}' ended after {total} of the {listed} frames its header lists (truncated or "
                      f"damaged?); editing the {len(images)} selected frames that decoded.")
    elif exhausted:
        _warn_if_short(path, total, len(images), selection)
    return Clip(frames=_to_tensor(images), fps=fps, source=path, source_size=source_size,
                indices=indices, content_hash=hash_file(path), audio=has_audio,
                start_time=times[0], end_time=times[-1] + 1.0 / fps, colour=colour)


def _first_video_stream(container, path: str):
    if not container.streams.video:
        raise InputError(f"'{path}' has no video stream. Give a video file or a folder of images.")
    return container.streams.video[0]


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else FOLDER_FPS


def _decode_selected(container, stream, selection: _Selection, size: Optional[Size], crop: bool,
                     fps: float, on_frame: Optional[FrameCheck] = None, family: str = "sd"):
    """Decode up to the last selected frame; resize selected ones as they come (saves memory).

    Returns (uint8 [H, W, 3] images, kept indices, kept times in s, displayed source (W, H),
    number of frames decoded, whether decoding reached the end of the stream, the first kept frame's Colour).
    """
    images, indices, times = [], [], []
    source_size = colour = None
    decoded = 0
    exhausted = True
    for frame in container.decode(stream):
        index, decoded = decoded, decoded + 1
        if selection.is_done(index):
            exhausted = False
            break
        if not selection.keeps(index):
            continue
        if on_frame is not None:
            on_frame(len(images) + 1)
        rgb = _upright(frame.to_rgb().to_ndarray(), frame.rotation)
        source_size = source_size or (rgb.shape[1], rgb.shape[0])
        colour = colour or Colour.of(frame)
        target = size or default_size(*source_size, family)
        images.append(_resize(Image.fromarray(rgb), target, crop))
        indices.append(index)
        times.append(float(frame.time) if frame.time is not None else index / fps)
    return images, indices, times, source_size, decoded, exhausted, colour


def _upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Apply the container's display rotation (degrees counter-clockwise) to [H, W, 3]."""
    quarter_turns = round(rotation / 90) % 4 if rotation else 0
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def _resize(image: Image.Image, size: Size, crop: bool) -> np.ndarray:
    """PIL Lanczos resize to (W, H), optionally after a centre crop to that aspect ratio.
    Returns uint8 [H, W, 3]."""
    if crop:
        image = image.crop(_centre_crop_box(image.size, size))
    return np.asarray(image.resize(size, resample=Image.Resampling.LANCZOS))


def _centre_crop_box(source: Size, target: Size) -> Tuple[int, int, int, int]:
    """The largest centred (left, top, right, bottom) box of ``source`` with ``target``'s aspect."""
    src_w, src_h = source
    dst_w, dst_h = target
    if src_w * dst_h > src_h * dst_w:  # source is wider: trim the sides
        width = max(1, round(src_h * dst_w / dst_h))
        left = (src_w - width) // 2
        return left, 0, left + width, src_h
    height = max(1, round(src_w * dst_h / dst_w))
    top = (src_h - height) // 2
    return 0, top, src_w, top + height


def _to_tensor(images: list) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float32 [N, 3, H, W] in [0, 1], exactly as ToTensor does.

    Filled frame by frame, each image dropped from ``images`` once converted: at most the uint8
    images and the float32 result are held (no stacked copy, no whole-clip temporaries)."""
    height, width = images[0].shape[:2]
    out = torch.empty((len(images), 3, height, width), dtype=torch.float32)
    for index, image in enumerate(images):
        # numpy: the images are read-only views of PIL data; the same float32 division as torch's
        np.divide(image.transpose(2, 0, 1), np.float32(255), out=out[index].numpy(), dtype=np.float32)
        images[index] = None
    return out


def _decode_error(path: str, error: BaseException) -> InputError:
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return InputError(f"could not decode video '{path}': {reason}. "
                      "Is it a video file FFmpeg can read?")






# ----------------------------------------------------------------------------- image folders


def _read_image_folder(folder: str, selection: _Selection, size: Optional[Size], crop: bool,
                       on_frame: Optional[FrameCheck] = None, family: str = "sd") -> Clip:
    """Each picture is read, checked and resized before the next is opened (one source picture held)."""
    paths = list_images(folder)
    chosen = list(range(selection.start, len(paths), selection.stride))[: selection.count]
    if not chosen:
        raise InputError(f"--start {selection.start} is past the end of '{folder}' ({len(paths)} frames).")
    source_size = _image_size(paths[chosen[0]])
    images = []
    for index in chosen:
        if on_frame is not None:
            on_frame(len(images) + 1)
        picture = _open_rgb(paths[index])
        if picture.size != source_size:
            raise InputError(
                f"images in '{folder}' differ in size: '{os.path.basename(paths[chosen[0]])}' is "
                f"{source_size[0]}x{source_size[1]} but '{os.path.basename(paths[index])}' is "
                f"{picture.size[0]}x{picture.size[1]}. Resize them to one size first.")
        images.append(_resize(picture, size or default_size(*source_size, family), crop))
        del picture
    _warn_if_short(folder, len(paths), len(chosen), selection)
    return Clip(frames=_to_tensor(images), fps=FOLDER_FPS, source=folder, source_size=source_size,
                indices=chosen, content_hash=hash_folder(paths), audio=False,
                start_time=chosen[0] / FOLDER_FPS, end_time=(chosen[-1] + 1) / FOLDER_FPS)






def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except (OSError, ValueError) as error:
        raise InputError(f"could not read image '{path}': {error}. Is it a valid image file?") from error


def _image_size(path: str) -> Size:
    try:
        with Image.open(path) as picture:
            return picture.size
    except (OSError, ValueError) as error:
        raise InputError(f"could not read image '{path}': {error}. Is it a valid image file?") from error

