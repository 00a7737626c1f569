"""Writing results: H.264 MP4 (with the source audio copied) or numbered PNGs.

Follows the original's ``save_video``: ``(x * 255).to(torch.uint8)`` and libx264 at CRF 18, preset "slow".
Tensors are float32 [N, 3, H, W] in [0, 1].
"""
from __future__ import annotations

import functools
import os
import warnings
from collections import deque
from fractions import Fraction
from typing import Iterator, Optional, Tuple

import av
import av.error
import numpy as np
import torch
from PIL import Image

from tokenflow.errors import OutputError
from tokenflow.io.outputs import atomic_path, check_frames_target, check_writable
from tokenflow.io.read import Clip

H264_ENCODERS = ("libx264", "libopenh264", "h264_videotoolbox", "h264_nvenc", "h264_qsv",
                 "h264_amf", "h264_mf", "h264_vaapi", "h264_v4l2m2m")


FALLBACK_ENCODER = "mpeg4"


AAC_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


_WRITE_ERRORS = (av.error.FFmpegError, OSError)


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
    try:
        with atomic_path(path, suffix=".mp4") as temp_path:
            _encode_mp4(str(temp_path), images, rate, crf, audio_span, metadata or {})
    except _WRITE_ERRORS as error:
        raise OutputError(f"could not write video '{path}': {error}. "
                          "Check free disk space and permissions.") from error
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
    try:
        with atomic_path(folder) as temp_folder:
            os.mkdir(temp_folder)
            for index, image in enumerate(images):
                Image.fromarray(image).save(temp_folder / f"{index:05d}.png")
    except OSError as error:
        raise OutputError(f"could not write frames to '{folder}': {error}. "
                          "Check free disk space and permissions.") from error
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
