"""Reading clips from videos or image folders, and writing results as MP4 or numbered PNGs.

Decoding follows the original TokenFlow (torchvision's PyAV reader + ``save_video_frames``):
frames of the first video stream in presentation order, ``frame.to_rgb().to_ndarray()``
(rgb24), a PIL Lanczos resize to (W, H), then ``ToTensor`` (uint8 / 255). Writing follows its
``save_video``: ``(x * 255).to(torch.uint8)`` and libx264 at CRF 18, preset "slow".

Tensors are float32 [N, 3, H, W] in [0, 1] unless stated otherwise. Sizes are (W, H).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Optional, Sequence, Tuple

import av
import av.error
import numpy as np
import torch
from PIL import Image

from tokenflow.config import default_size
from tokenflow.errors import ConfigError, InputError, OutputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FOLDER_FPS = 10.0  # image folders carry no frame rate
H264_ENCODERS = ("libx264", "libopenh264", "h264_videotoolbox", "h264_nvenc", "h264_qsv",
                 "h264_amf", "h264_mf", "h264_vaapi", "h264_v4l2m2m")
FALLBACK_ENCODER = "mpeg4"
AAC_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)

_DECODE_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError)
_WRITE_ERRORS = (av.error.FFmpegError, OSError)

Size = Tuple[int, int]


@dataclass
class Clip:
    """A selection of frames from one source, ready for the model.

    ``frames``: float32 [N, 3, H, W] in [0, 1]. ``source_size``: (W, H) of the source frames as
    displayed. ``indices``: source frame numbers kept. ``start_time`` / ``end_time``: seconds on
    the source's timeline covered by the selection (end = last kept frame + one frame period).
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

    @property
    def size(self) -> Size:
        """(W, H) of ``frames``."""
        return int(self.frames.shape[-1]), int(self.frames.shape[-2])


# ----------------------------------------------------------------------------- reading


def read_video(path, *, frames: Optional[int] = None, start: int = 0, stride: int = 1,
               size: Optional[Size] = None, crop: bool = False) -> Clip:
    """Decode source frames ``start, start + stride, ...`` (at most ``frames`` of them) into a Clip.

    ``path`` is a video file FFmpeg can decode or a folder of numbered images. ``frames=None``
    keeps every selected frame; if fewer exist than asked, the ones that exist are kept.
    ``size`` (W, H) must be multiples of 8 and at least 64; None picks ``default_size``.
    ``crop=True`` centre-crops each frame to the aspect ratio of ``size`` before resizing, so
    nothing is stretched; otherwise the whole frame is resized (possibly changing its aspect).
    Videos whose container asks for a display rotation (phone footage) are rotated upright.
    Decoding stops at the last selected frame. Returns frames float32 [N, 3, H, W] in [0, 1].
    """
    path = os.fspath(path)
    _check_selection(frames, start, stride)
    if size is not None:
        size = _checked_size(size)
    if not os.path.exists(path):
        raise InputError(f"input video '{path}' does not exist. Check the path.")
    selection = _Selection(start, stride, frames)
    if os.path.isdir(path):
        return _read_image_folder(path, selection, size, crop)
    return _read_video_file(path, selection, size, crop)


def probe(path) -> dict:
    """Cheap facts about a source, read from headers only: ``frames`` (None if the container
    does not say), ``fps``, ``width``, ``height`` (as stored, before any display rotation),
    ``audio`` and ``duration`` in seconds (or None)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"input video '{path}' does not exist. Check the path.")
    if os.path.isdir(path):
        images = _list_images(path)
        width, height = _image_size(images[0])
        return {"frames": len(images), "fps": FOLDER_FPS, "width": width, "height": height,
                "audio": False, "duration": len(images) / FOLDER_FPS}
    try:
        with av.open(path) as container:
            stream = _first_video_stream(container, path)
            width, height = stream.codec_context.width, stream.codec_context.height
            duration = float(container.duration / av.time_base) if container.duration else None
            return {"frames": stream.frames or None, "fps": _stream_fps(stream), "width": width,
                    "height": height, "audio": bool(container.streams.audio), "duration": duration}
    except _DECODE_ERRORS as error:
        raise _decode_error(path, error) from error


class _Selection:
    """Which source frame numbers to keep: start, start + stride, ... (``count`` of them or all)."""

    def __init__(self, start: int, stride: int, count: Optional[int]):
        self.start, self.stride, self.count = start, stride, count
        self.last = None if count is None else start + stride * (count - 1)

    def keeps(self, index: int) -> bool:
        return index >= self.start and (index - self.start) % self.stride == 0

    def is_done(self, index: int) -> bool:
        """True once ``index`` is past the last frame to keep."""
        return self.last is not None and index > self.last


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


def _read_video_file(path: str, selection: _Selection, size: Optional[Size], crop: bool) -> Clip:
    try:
        with av.open(path) as container:
            stream = _first_video_stream(container, path)
            stream.thread_type = "AUTO"
            fps = _stream_fps(stream)
            has_audio = bool(container.streams.audio)
            listed = int(stream.frames or 0)   # what the header says; 0 when the container does not say
            decoded = _decode_selected(container, stream, selection, size, crop, fps)
    except InputError:
        raise
    except _DECODE_ERRORS as error:
        raise _decode_error(path, error) from error
    images, indices, times, source_size, total, exhausted = decoded
    if total == 0:
        raise InputError(f"no frames could be decoded from '{path}'. Is the video empty or damaged?")
    if not images:
        raise InputError(f"--start {selection.start} is past the end of '{path}' ({total} frames).")
    if exhausted and listed > total and (selection.count is None or len(images) < selection.count):
        warnings.warn(f"'{path}' ended after {total} of the {listed} frames its header lists (truncated or "
                      f"damaged?); editing the {len(images)} selected frames that decoded.")
    return Clip(frames=_to_tensor(images), fps=fps, source=path, source_size=source_size,
                indices=indices, content_hash=_hash_file(path), audio=has_audio,
                start_time=times[0], end_time=times[-1] + 1.0 / fps)


def _first_video_stream(container, path: str):
    if not container.streams.video:
        raise InputError(f"'{path}' has no video stream. Give a video file or a folder of images.")
    return container.streams.video[0]


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else FOLDER_FPS


def _decode_selected(container, stream, selection: _Selection, size: Optional[Size], crop: bool,
                     fps: float):
    """Decode up to the last selected frame; resize selected ones as they come (saves memory).

    Returns (uint8 [H, W, 3] images, kept indices, kept times in s, displayed source (W, H),
    number of frames decoded, whether decoding reached the end of the stream).
    """
    images, indices, times = [], [], []
    source_size = None
    decoded = 0
    exhausted = True
    for frame in container.decode(stream):
        index, decoded = decoded, decoded + 1
        if selection.is_done(index):
            exhausted = False
            break
        if not selection.keeps(index):
            continue
        rgb = _upright(frame.to_rgb().to_ndarray(), frame.rotation)
        source_size = source_size or (rgb.shape[1], rgb.shape[0])
        target = size or default_size(*source_size)
        images.append(_resize(Image.fromarray(rgb), target, crop))
        indices.append(index)
        times.append(float(frame.time) if frame.time is not None else index / fps)
    return images, indices, times, source_size, decoded, exhausted


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


def _to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float32 [N, 3, H, W] in [0, 1], exactly as ToTensor does."""
    stacked = torch.from_numpy(np.stack(images))
    return (stacked.permute(0, 3, 1, 2).float() / 255).contiguous()


def _decode_error(path: str, error: BaseException) -> InputError:
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return InputError(f"could not decode video '{path}': {reason}. "
                      "Is it a video file FFmpeg can read?")


def _hash_file(path: str) -> str:
    digest = hashlib.sha256()
    _hash_into(digest, path)
    return digest.hexdigest()


def _hash_into(digest, path: str) -> None:
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)


# ----------------------------------------------------------------------------- image folders


def _read_image_folder(folder: str, selection: _Selection, size: Optional[Size], crop: bool) -> Clip:
    paths = _list_images(folder)
    chosen = list(range(selection.start, len(paths), selection.stride))[: selection.count]
    if not chosen:
        raise InputError(f"--start {selection.start} is past the end of '{folder}' ({len(paths)} frames).")
    pictures = [_open_rgb(paths[i]) for i in chosen]
    source_size = pictures[0].size
    for index, picture in zip(chosen, pictures):
        if picture.size != source_size:
            raise InputError(
                f"images in '{folder}' differ in size: '{os.path.basename(paths[chosen[0]])}' is "
                f"{source_size[0]}x{source_size[1]} but '{os.path.basename(paths[index])}' is "
                f"{picture.size[0]}x{picture.size[1]}. Resize them to one size first.")
    target = size or default_size(*source_size)
    images = [_resize(picture, target, crop) for picture in pictures]
    return Clip(frames=_to_tensor(images), fps=FOLDER_FPS, source=folder, source_size=source_size,
                indices=chosen, content_hash=_hash_folder(paths), audio=False,
                start_time=chosen[0] / FOLDER_FPS, end_time=(chosen[-1] + 1) / FOLDER_FPS)


def _list_images(folder: str) -> list:
    """Image files of ``folder`` in natural order (frame2.png before frame10.png)."""
    names = [name for name in os.listdir(folder)
             if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    if not names:
        raise InputError(f"folder '{folder}' contains no images ({', '.join(IMAGE_EXTENSIONS)}). "
                         "Give a video file or a folder of numbered frames.")
    return [os.path.join(folder, name) for name in sorted(names, key=_natural_key)]


def _natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part]


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


def _hash_folder(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        _hash_into(digest, path)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing


def check_writable(path) -> None:
    """Raise OutputError unless a file can be created at ``path``; creates missing parent folders.
    Meant to run before expensive work."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"output '{path}' is a folder; give a file name such as "
                          f"'{os.path.join(path, 'edited.mp4')}'.")
    _check_folder_writable(os.path.dirname(os.path.abspath(path)), path)


def _check_folder_writable(folder: str, target: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create folder '{folder}' for output '{target}': "
                          f"{error.strerror or error}. Choose another output path.") from error
    try:
        handle, probe_path = tempfile.mkstemp(prefix=".tokenflow-write-test-", dir=folder)
        os.close(handle)
        os.remove(probe_path)
    except OSError as error:
        raise OutputError(f"cannot write output '{target}' into '{folder}': "
                          f"{error.strerror or error}. Check permissions or choose another path.") from error


def write_video(frames, path, fps, *, audio_from: Optional[Clip] = None, crf: int = 18,
                metadata: Optional[dict] = None) -> str:
    """Write frames (float [N, 3, H, W] in [0, 1], or uint8 [N, 3, H, W]) as an H.264 MP4.

    The container is always MP4, whatever the extension. ``fps`` may be fractional. Audio of
    ``audio_from`` is re-encoded to AAC, trimmed to the clip's time span, when it lines up with
    the frames (see ``_audio_span``). ``metadata`` goes into the container tags. The file appears
    atomically: it is written next to ``path`` and renamed into place; nothing is left on failure.
    Returns ``path``.
    """
    path = os.fspath(path)
    images = to_uint8_images(frames)
    if images.shape[1] % 2 or images.shape[2] % 2:
        raise ValueError(f"frames of {images.shape[2]}x{images.shape[1]} cannot be written as "
                         "H.264 (yuv420p): width and height must be even.")
    rate = _fps_fraction(fps)
    check_writable(path)
    audio_span = _audio_span(audio_from, rate, len(images))
    temp_path = temp_sibling(path, ".mp4")
    try:
        _encode_mp4(temp_path, images, rate, crf, audio_span, metadata or {})
        os.replace(temp_path, path)
    except _WRITE_ERRORS as error:
        raise OutputError(f"could not write video '{path}': {error}. "
                          "Check free disk space and permissions.") from error
    finally:
        remove_path(temp_path)
    return path


def write_frames(frames, folder) -> str:
    """Write frames (float [N, 3, H, W] in [0, 1], or uint8) as ``00000.png``, ``00001.png``, ...

    The PNGs go into a hidden folder next to ``folder`` that is then renamed into place. An
    existing ``folder`` holding only such numbered PNGs is replaced; anything else there is an
    OutputError (we never delete files we did not write). Returns ``folder``.
    """
    folder = os.fspath(folder)
    images = to_uint8_images(frames)
    check_frames_target(folder)
    temp_folder = temp_sibling(folder, "")
    try:
        remove_path(temp_folder)  # left by a crashed run with the same pid
        os.mkdir(temp_folder)
        for index, image in enumerate(images):
            Image.fromarray(image).save(os.path.join(temp_folder, f"{index:05d}.png"))
        swap_folder_into_place(temp_folder, folder)
    except OSError as error:
        raise OutputError(f"could not write frames to '{folder}': {error}. "
                          "Check free disk space and permissions.") from error
    finally:
        remove_path(temp_folder)
    return folder


def to_uint8_images(frames) -> np.ndarray:
    """float [N, 3, H, W] in [0, 1] (clamped, then truncated like the original's
    ``(x * 255).to(torch.uint8)``) or uint8 [N, 3, H, W] -> uint8 numpy [N, H, W, 3]."""
    frames = torch.as_tensor(frames).detach().cpu()
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be [N, 3, H, W] with N >= 1, got {list(frames.shape)}.")
    if frames.dtype != torch.uint8:
        frames = (frames.float().clamp(0, 1) * 255).to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous().numpy()


def _fps_fraction(fps) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001 * 1000)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    return rate


def temp_sibling(path: str, suffix: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}{suffix}")


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def check_frames_target(folder: str) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"frames output '{folder}' is a file; give a folder path instead.")
    if os.path.isdir(folder) and not _holds_only_our_frames(folder):
        raise OutputError(f"frames output folder '{folder}' already holds other files; "
                          "choose an empty or new folder.")
    _check_folder_writable(os.path.dirname(os.path.abspath(folder)), folder)


def _holds_only_our_frames(folder: str) -> bool:
    return all(re.fullmatch(r"\d{5,}\.png", name) for name in os.listdir(folder))


def swap_folder_into_place(new_folder: str, folder: str) -> None:
    if not os.path.isdir(folder):
        os.rename(new_folder, folder)
        return
    old_folder = temp_sibling(folder, ".old")
    os.rename(folder, old_folder)
    try:
        os.rename(new_folder, folder)
    except OSError:
        os.rename(old_folder, folder)
        raise
    shutil.rmtree(old_folder, ignore_errors=True)


# ----------------------------------------------------------------------------- encoding


def _encode_mp4(path: str, images: np.ndarray, rate: Fraction, crf: int,
                audio_span: Optional[Tuple[str, float, float]], metadata: dict) -> None:
    """Encode uint8 [N, H, W, 3] images (and maybe an audio span) into an MP4 at ``path``."""
    # use_metadata_tags keeps arbitrary metadata keys; faststart lets players start before the end.
    options = {"movflags": "+faststart+use_metadata_tags"}
    with av.open(path, mode="w", format="mp4", options=options) as container:
        container.metadata.update({str(key): str(value) for key, value in metadata.items()})
        video = _add_video_stream(container, rate, images.shape[2], images.shape[1], crf)
        audio_packets = _encode_audio_span(container, *audio_span) if audio_span else []
        _mux_interleaved(container, _encode_frames(video, images), audio_packets)


def _add_video_stream(container, rate: Fraction, width: int, height: int, crf: int):
    encoder = video_encoder()
    options = {"crf": str(crf), "preset": "slow"} if encoder == "libx264" else {}
    stream = container.add_stream(encoder, rate=rate, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if encoder != "libx264":
        stream.bit_rate = int(width * height * float(rate) * 0.3)  # ~0.3 bit/pixel: visually clean
    return stream


@functools.lru_cache(maxsize=None)
def video_encoder() -> str:
    """The encoder ``write_video`` uses: libx264 if present, else the first other H.264 encoder
    that opens on this machine, else mpeg4 (MPEG-4 Part 2, still plays almost everywhere)."""
    for name in H264_ENCODERS:
        if name in av.codecs_available and _encoder_opens(name):
            if name != "libx264":
                warnings.warn(f"libx264 is not available in this PyAV build; writing H.264 with {name}.")
            return name
    warnings.warn("no H.264 encoder is available in this PyAV build; writing MPEG-4 video instead.")
    return FALLBACK_ENCODER


def _encoder_opens(name: str) -> bool:
    """Hardware encoders are listed even without their hardware; only opening one tells."""
    try:
        context = av.CodecContext.create(name, "w")
        context.width, context.height, context.pix_fmt = 64, 64, "yuv420p"
        context.time_base = Fraction(1, 25)
        context.open()
        return True
    except Exception:  # any failure means "not usable here"
        return False


def _encode_frames(stream, images: np.ndarray) -> Iterator:
    for index, image in enumerate(images):
        # converted to the stream's pixel format here, not inside encode(): that implicit conversion
        # gave different bytes for identical frames on a loaded machine (tests/test_fault_corpus.py)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=stream.pix_fmt)
        frame.pts = index
        yield from stream.encode(frame)
    yield from stream.encode(None)


def _mux_interleaved(container, video_packets: Iterator, audio_packets: list) -> None:
    """Mux video packets as they come, slotting the (pre-encoded) audio packets in by time."""
    pending_audio = deque(audio_packets)
    for packet in video_packets:
        now = _packet_seconds(packet)
        while pending_audio and _packet_seconds(pending_audio[0]) <= now:
            container.mux(pending_audio.popleft())
        container.mux(packet)
    for packet in pending_audio:
        container.mux(packet)


def _packet_seconds(packet) -> float:
    stamp = packet.dts if packet.dts is not None else packet.pts
    return float(stamp * packet.time_base) if stamp is not None else 0.0


# ----------------------------------------------------------------------------- audio


def _audio_span(clip: Optional[Clip], rate: Fraction, frame_count: int):
    """(source path, start s, end s) of the audio to copy, or None.

    Audio is copied only when it stays in sync with the frames: the clip kept consecutive
    frames (stride 1) and the output runs at the clip's frame rate. Otherwise a warning says
    why the output is silent. The span is cut to the length of the written frames.
    """
    if clip is None or not clip.audio:
        return None
    if any(b - a != 1 for a, b in zip(clip.indices, clip.indices[1:])):
        warnings.warn("audio not copied: frames were selected with a stride > 1, so the source "
                      "audio cannot play in sync with them.")
        return None
    if abs(float(rate) - clip.fps) > 1e-3 * clip.fps:
        warnings.warn(f"audio not copied: output fps {float(rate):g} differs from the source's "
                      f"{clip.fps:g}, so the audio would drift.")
        return None
    if not os.path.isfile(clip.source):
        warnings.warn(f"audio not copied: source '{clip.source}' is no longer readable.")
        return None
    end = min(clip.end_time, clip.start_time + frame_count / float(rate))
    return clip.source, clip.start_time, end


def _encode_audio_span(container, source: str, start: float, end: float) -> list:
    """Add an AAC stream to ``container`` and return its packets for [start, end) of the
    source's first audio stream, re-timed so that ``start`` plays at 0 s."""
    with av.open(source) as reader:
        source_stream = reader.streams.audio[0]
        layout = "mono" if source_stream.codec_context.channels == 1 else "stereo"
        sample_rate = _aac_rate(source_stream.codec_context.sample_rate)
        output = container.add_stream("aac", rate=sample_rate)
        output.layout, output.format = layout, "fltp"
        output.bit_rate = 96000 if layout == "mono" else 160000
        packets = []
        for frame in _trimmed_audio(reader, source_stream, start, end, layout, sample_rate):
            packets.extend(output.encode(frame))
        packets.extend(output.encode(None))
        return packets


def _aac_rate(sample_rate: int) -> int:
    return sample_rate if sample_rate in AAC_SAMPLE_RATES else 48000


def _trimmed_audio(reader, stream, start: float, end: float, layout: str,
                   sample_rate: int) -> Iterator:
    """Yield fltp AudioFrames holding the source samples in [start, end), pts in samples from
    ``start``. Sample positions come from the first decoded frame's timestamp plus a count."""
    if start > 0:
        reader.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
    first_sample, end_sample = round(start * sample_rate), round(end * sample_rate)
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
    position = None
    for frame in reader.decode(stream):
        if position is None:
            position = round(float(frame.time or 0.0) * sample_rate)
        for converted in resampler.resample(frame):
            yield from _cut(converted, position, first_sample, end_sample, layout, sample_rate)
            position += converted.samples
        if position >= end_sample:
            return
    if position is None:  # no audio at all
        return
    for converted in resampler.resample(None):  # samples the resampler still holds
        yield from _cut(converted, position, first_sample, end_sample, layout, sample_rate)
        position += converted.samples


def _cut(frame, position: int, first_sample: int, end_sample: int, layout: str,
         sample_rate: int) -> Iterator:
    """The part of ``frame`` (starting at sample ``position``) inside [first_sample, end_sample)."""
    low = max(first_sample - position, 0)
    high = min(end_sample - position, frame.samples)
    if high <= low:
        return
    samples = np.ascontiguousarray(frame.to_ndarray()[:, low:high])  # fltp: [channels, samples]
    piece = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
    piece.sample_rate = sample_rate
    piece.pts = position + low - first_sample
    piece.time_base = Fraction(1, sample_rate)
    yield piece
