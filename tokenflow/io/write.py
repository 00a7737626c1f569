"""Writing results: a video (H.264 MP4 by default, with the source audio copied) or numbered frames.

Follows the original's ``save_video``: ``(x * 255).to(torch.uint8)`` and libx264 at CRF 18, preset "slow".
Tensors are float32 [N, 3, H, W] in [0, 1]. Other codecs (``CODECS``): HEVC, ProRes (10-bit, .mov) and
FFV1 (lossless RGB, .mkv); frames as 8- or 16-bit PNG or OpenEXR (half or float). docs/outputs.md.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from tokenflow.errors import ConfigError, OutputError
from tokenflow.io.outputs import atomic_path, check_frames_target, check_writable
from tokenflow.io.read import Clip, Colour, require_av

H264_ENCODERS = ("libx264", "libopenh264", "h264_videotoolbox", "h264_nvenc", "h264_qsv",
                 "h264_amf", "h264_mf", "h264_vaapi", "h264_v4l2m2m")


FALLBACK_ENCODER = "mpeg4"


AAC_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)




def _av():
    """PyAV, imported where a video (or a 16-bit PNG / EXR frame) is written (``read.require_av``)."""
    return require_av("writing video files (and png16/exr frames)")


def _write_errors() -> tuple:
    """What writing may raise that means "could not write" (PyAV's errors only where it imports)."""
    try:
        return (_av().error.FFmpegError, OSError)
    except ConfigError:
        return (OSError,)


@dataclass(frozen=True)
class VideoCodec:
    """One ``--codec``: its encoders (first that opens here wins), FFmpeg muxer, default pixel format
    and CRF (None: the codec has none), and the pixel formats named in messages."""

    encoders: Tuple[str, ...]
    muxer: str
    pix_fmt: str
    crf: Optional[int]
    common: Tuple[str, ...]


CODECS = {
    "h264": VideoCodec(H264_ENCODERS, "mp4", "yuv420p", 18,
                       ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv444p10le")),
    "hevc": VideoCodec(("libx265", "hevc_videotoolbox", "hevc_nvenc", "hevc_qsv", "hevc_amf", "hevc_mf",
                        "hevc_vaapi"), "mp4", "yuv420p", 22,
                       ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le")),
    "prores": VideoCodec(("prores_ks", "prores_aw"), "mov", "yuv422p10le", None, ("yuv422p10le", "yuv444p10le")),
    "ffv1": VideoCodec(("ffv1",), "matroska", "bgr0", None, ("bgr0", "yuv444p", "yuv420p", "yuv444p16le")),
}
CRF_ENCODERS = ("libx264", "libx265")
PRORES_PROFILES = {"yuv422p10le": "3", "yuv444p10le": "4"}   # prores_ks: HQ for 4:2:2, 4444 for 4:4:4


@dataclass(frozen=True)
class VideoSettings:
    """What ``write_video`` writes, resolved for this machine (``video_settings``)."""

    codec: str = "h264"
    encoder: str = "libx264"
    pix_fmt: str = "yuv420p"
    crf: Optional[int] = 18      # None: the encoder has no CRF (a bit rate or a fixed profile instead)

    def as_dict(self) -> dict:
        return {"codec": self.codec, "encoder": self.encoder, "pix_fmt": self.pix_fmt, "crf": self.crf}

    def describe(self) -> str:
        return f"{self.codec} ({self.encoder}, {self.pix_fmt}" + (f", crf {self.crf})" if self.crf is not None else ")")


def video_settings(codec: str = "h264", pix_fmt: Optional[str] = None, crf: Optional[int] = None) -> VideoSettings:
    """Resolve ``--codec/--pix-fmt/--crf`` against the encoders this PyAV build has.

    ConfigError (one line) for an unknown codec, a codec without a usable encoder here (naming the
    codecs that have one), a pixel format the encoder cannot write, or a CRF for a codec without one.
    A CRF given for an encoder without one (a hardware H.264/HEVC encoder) is ignored with a warning.
    """
    if codec not in CODECS:
        raise ConfigError.of_field("codec", f"must be one of: {', '.join(CODECS)}, got {codec!r}")
    spec = CODECS[codec]
    if crf is not None and spec.crf is None:
        raise ConfigError.of_field("crf", f"applies to h264 and hevc, not codec {codec}: drop --crf or pick --codec h264")
    encoder = video_encoder() if codec == "h264" else codec_encoder(codec)
    if encoder is None:
        others = [name for name in CODECS if name != codec and (name == "h264" or codec_encoder(name))]
        raise ConfigError.of_field("codec", (
            f"no {codec} encoder in this PyAV build (tried {', '.join(spec.encoders)}): pick --codec "
            f"{' or '.join(others)}, or install a PyAV/FFmpeg with one (`tokenflow doctor` lists them)"))
    pix_fmt = pix_fmt or (spec.pix_fmt if encoder != FALLBACK_ENCODER else "yuv420p")
    supported = _pixel_formats(encoder)
    if supported and pix_fmt not in supported:
        common = [name for name in spec.common if name in supported] or list(supported)[:6]
        raise ConfigError.of_field("pix_fmt", (
            f"{pix_fmt!r} is not a pixel format {encoder} ({codec}) writes: use one of {', '.join(common)}"))
    if encoder not in CRF_ENCODERS:
        if crf is not None:
            warnings.warn(f"--crf {crf} is ignored: {encoder} has no CRF (it writes at a fixed bit rate).")
        return VideoSettings(codec, encoder, pix_fmt, None)
    return VideoSettings(codec, encoder, pix_fmt, spec.crf if crf is None else crf)


def write_video(frames, path, fps, *, audio_from: Optional[Clip] = None, crf: Optional[int] = None,
                metadata: Optional[dict] = None, codec: str = "h264", pix_fmt: Optional[str] = None,
                colour: Optional[Colour] = None) -> str:
    """Write frames (float [N, 3, H, W] in [0, 1], or uint8 [N, 3, H, W]) as a video.

    The container follows ``codec`` (``CODECS``: MP4 for h264/hevc, QuickTime for prores, Matroska for
    ffv1), whatever the extension. ``crf`` and ``pix_fmt`` default per codec (``video_settings``);
    pixel formats above 8 bits are fed 16-bit RGB, so float frames keep their precision. ``colour``
    (the source's, ``Clip.colour``) tags the stream and picks the RGB->YUV matrix and range; None or
    unspecified writes untagged BT.601 limited range as before. ``fps`` may be fractional. Audio of
    ``audio_from`` is re-encoded to AAC, trimmed to the clip's time span, when it lines up with
    the frames (see ``_audio_span``). ``metadata`` goes into the container tags. The file appears
    atomically: it is written next to ``path`` and renamed into place; nothing is left on failure.
    Returns ``path``.
    """
    path = os.fspath(path)
    settings = video_settings(codec, pix_fmt, crf)
    deep = _bits(settings.pix_fmt) > 8
    images = to_uint16_images(frames) if deep else to_uint8_images(frames)
    layout, (height, width) = _av().VideoFormat(settings.pix_fmt), images.shape[1:3]
    if (width % 2 and layout.chroma_width(width) != width) or (height % 2 and layout.chroma_height(height) != height):
        raise ValueError(f"frames of {width}x{height} cannot be written as {settings.codec} "
                         f"({settings.pix_fmt}): width and height must be even.")
    rate = _fps_fraction(fps)
    check_writable(path)
    audio_span = _audio_span(audio_from, rate, len(images))
    try:
        with atomic_path(path, suffix=os.path.splitext(path)[1] or ".mp4") as temp_path:
            _encode_video(str(temp_path), images, rate, settings, colour, audio_span, metadata or {})
    except _write_errors() as error:
        raise OutputError(f"could not write video '{path}': {error}. "
                          "Check free disk space and permissions.") from error
    return path


def write_frames(frames, folder, format: str = "png") -> str:
    """Write frames (float [N, 3, H, W] in [0, 1], or uint8) as ``00000.png``, ``00001.png``, ...

    ``format``: png (8-bit, truncated as the video is), png16 (16-bit, rounded), exr (OpenEXR half
    float, ZIP), exr32 (OpenEXR float). EXR holds the frames' values as they are (display-referred,
    sRGB-encoded, not linearised). The files go into a hidden folder next to ``folder`` that is then
    renamed into place. An existing ``folder`` holding only such numbered frames is replaced;
    anything else there is an OutputError (we never delete files we did not write). Returns ``folder``.
    """
    folder = os.fspath(folder)
    if format not in FRAME_WRITERS:
        raise ConfigError.of_field("frames_format", f"must be one of: {', '.join(FRAME_WRITERS)}, got {format!r}")
    suffix, convert, write = FRAME_WRITERS[format]
    images = convert(frames)
    check_frames_target(folder)
    try:
        with atomic_path(folder) as temp_folder:
            os.mkdir(temp_folder)
            for index, image in enumerate(images):
                write(image, temp_folder / f"{index:05d}{suffix}")
    except _write_errors() as error:
        raise OutputError(f"could not write frames to '{folder}': {error}. "
                          "Check free disk space and permissions.") from error
    return folder


def to_uint8_images(frames) -> np.ndarray:
    """float [N, 3, H, W] in [0, 1] (clamped, then truncated like the original's
    ``(x * 255).to(torch.uint8)``) or uint8 [N, 3, H, W] -> uint8 numpy [N, H, W, 3]."""
    frames = _checked(frames)
    if frames.dtype != torch.uint8:
        frames = (frames.float().clamp(0, 1) * 255).to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous().numpy()


def _fps_fraction(fps) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001 * 1000)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    return rate


def to_uint16_images(frames) -> np.ndarray:
    """float [N, 3, H, W] in [0, 1] (clamped, rounded) or uint8 (x 257) -> uint16 numpy [N, H, W, 3]."""
    frames = _checked(frames)
    if frames.dtype == torch.uint8:
        return frames.permute(0, 2, 3, 1).numpy().astype(np.uint16) * 257
    return (frames.float().clamp(0, 1) * 65535).round().to(torch.int32).permute(0, 2, 3, 1).numpy().astype(np.uint16)


def to_float_images(frames) -> np.ndarray:
    """float [N, 3, H, W] (as they are) or uint8 (/ 255) -> float32 numpy [N, H, W, 3]."""
    frames = _checked(frames)
    frames = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()
    return frames.permute(0, 2, 3, 1).contiguous().numpy()


def _checked(frames) -> torch.Tensor:
    frames = torch.as_tensor(frames).detach().cpu()
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be [N, 3, H, W] with N >= 1, got {list(frames.shape)}.")
    return frames


def _write_png(image: np.ndarray, path) -> None:
    Image.fromarray(image).save(path)


def _write_png16(image: np.ndarray, path) -> None:
    """uint16 [H, W, 3] as a 16-bit RGB PNG (PIL writes no 16-bit colour PNG: FFmpeg's encoder does)."""
    frame = _av().VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb48le").reformat(format="rgb48be")
    _write_image("png", frame, path, {})


def _write_exr(half: bool):
    def write(image: np.ndarray, path) -> None:
        """float32 [H, W, 3] as OpenEXR (FFmpeg's encoder; it truncates to half, so round first)."""
        if half:
            image = image.astype(np.float16).astype(np.float32)
        frame = _av().VideoFrame.from_ndarray(np.ascontiguousarray(image), format="gbrpf32le")
        _write_image("exr", frame, path, {"format": "half" if half else "float", "compression": "zip1"})
    return write


def _write_image(codec: str, frame, path, options: dict) -> None:
    context = _av().CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt = frame.width, frame.height, frame.format.name
    context.time_base, context.options = Fraction(1, 1), options
    data = b"".join(bytes(packet) for packet in [*context.encode(frame), *context.encode(None)])
    with open(path, "wb") as file:
        file.write(data)


FRAME_WRITERS = {   # --frames-format: (suffix, frames -> images, write one image)
    "png": (".png", lambda frames: to_uint8_images(frames), _write_png),
    "png16": (".png", lambda frames: to_uint16_images(frames), _write_png16),
    "exr": (".exr", lambda frames: to_float_images(frames), _write_exr(half=True)),
    "exr32": (".exr", lambda frames: to_float_images(frames), _write_exr(half=False)),
}


def _encode_video(path: str, images: np.ndarray, rate: Fraction, settings: VideoSettings, colour: Optional[Colour],
                  audio_span: Optional[Tuple[str, float, float]], metadata: dict) -> None:
    """Encode uint8 or uint16 [N, H, W, 3] images (and maybe an audio span) into ``path``."""
    muxer = CODECS[settings.codec].muxer
    # use_metadata_tags keeps arbitrary metadata keys; faststart lets players start before the end.
    options = {"movflags": "+faststart+use_metadata_tags"} if muxer in ("mp4", "mov") else {}
    with _av().open(path, mode="w", format=muxer, options=options) as container:
        container.metadata.update({str(key): str(value) for key, value in metadata.items()})
        video = _add_video_stream(container, rate, images.shape[2], images.shape[1], settings)
        tags = _colour_tags(colour, settings)
        if tags:
            for name, value in zip(_COLOUR_FIELDS, tags):
                setattr(video.codec_context, name, value)
        audio_packets = _encode_audio_span(container, *audio_span) if audio_span else []
        _mux_interleaved(container, _encode_frames(video, images, tags), audio_packets)


def _add_video_stream(container, rate: Fraction, width: int, height: int, settings: VideoSettings):
    encoder = settings.encoder
    options = {}
    if settings.crf is not None:
        options = {"crf": str(settings.crf), "preset": "slow"}
        if encoder == "libx265":
            options["x265-params"] = "log-level=error"
    elif encoder.startswith("prores"):
        options = {"profile": PRORES_PROFILES.get(settings.pix_fmt, "3")}
    elif encoder == "ffv1":
        options = {"level": "3", "slicecrc": "1"}   # version 3: per-slice CRCs, the archival choice
    stream = container.add_stream(encoder, rate=rate, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, settings.pix_fmt
    if settings.codec == "hevc" and CODECS["hevc"].muxer == "mp4":
        stream.codec_tag = "hvc1"   # what QuickTime and Apple's editors need to open HEVC in MP4/MOV
    if settings.crf is None and settings.codec in ("h264", "hevc"):
        stream.bit_rate = int(width * height * float(rate) * 0.3)  # ~0.3 bit/pixel: visually clean
    return stream


_COLOUR_FIELDS = ("color_primaries", "color_trc", "colorspace", "color_range")
# AVColorSpace -> the swscale matrix of the RGB->YUV conversion (Colorspace: ITU709 1, FCC 4, ITU601 5,
# SMPTE240M 7, BT2020 9); unspecified and the rest convert as BT.601, what our reader decodes them with.
_SWS_MATRIX = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}
_RGB_MATRIX, _FULL_RANGE, _LIMITED_RANGE = 0, 2, 1


def _colour_tags(colour: Optional[Colour], settings: VideoSettings) -> Optional[Tuple[int, int, int, int]]:
    """(primaries, transfer, matrix, range) to tag the output with, or None to write untagged as before.
    RGB pixel formats (ffv1's bgr0) carry the primaries and transfer; their matrix is RGB, their range
    full. ProRes is limited range by definition: a full-range source is converted to limited."""
    if colour is None or not colour.specified:
        return None
    if _av().VideoFormat(settings.pix_fmt).is_rgb:
        return colour.primaries, colour.transfer, _RGB_MATRIX, _FULL_RANGE
    limited = settings.codec == "prores" and colour.range == _FULL_RANGE
    return colour.primaries, colour.transfer, colour.matrix, _LIMITED_RANGE if limited else colour.range


@functools.lru_cache(maxsize=None)
def video_encoder() -> str:
    """The encoder ``write_video`` uses for H.264: libx264 if present, else the first other H.264 encoder
    that opens on this machine, else mpeg4 (MPEG-4 Part 2, still plays almost everywhere)."""
    for name in H264_ENCODERS:
        if name in _av().codecs_available and _encoder_opens(name, "yuv420p"):
            if name != "libx264":
                warnings.warn(f"libx264 is not available in this PyAV build; writing H.264 with {name}.")
            return name
    warnings.warn("no H.264 encoder is available in this PyAV build; writing MPEG-4 video instead.")
    return FALLBACK_ENCODER


@functools.lru_cache(maxsize=None)
def codec_encoder(codec: str) -> Optional[str]:
    """The first encoder of ``CODECS[codec]`` that opens here (None: none does)."""
    spec = CODECS[codec]
    return next((name for name in spec.encoders
                 if name in _av().codecs_available and _encoder_opens(name, spec.pix_fmt)), None)


@functools.lru_cache(maxsize=None)
def _pixel_formats(encoder: str) -> Tuple[str, ...]:
    """The pixel formats ``encoder`` lists (empty: it does not say, e.g. some hardware encoders)."""
    try:
        return tuple(f.name for f in _av().codec.Codec(encoder, "w").video_formats or ())
    except Exception:  # an encoder PyAV cannot describe: let opening it decide
        return ()


def _bits(pix_fmt: str) -> int:
    return max(component.bits for component in _av().VideoFormat(pix_fmt).components)


def _encoder_opens(name: str, pix_fmt: str) -> bool:
    """Hardware encoders are listed even without their hardware; only opening one tells."""
    try:
        context = _av().CodecContext.create(name, "w")
        context.width, context.height, context.pix_fmt = 64, 64, pix_fmt
        context.time_base = Fraction(1, 25)
        if name == "libx265":
            context.options = {"x265-params": "log-level=none"}   # its banner on stderr, for a probe
        context.open()
        return True
    except Exception:  # any failure means "not usable here"
        return False


def _encode_frames(stream, images: np.ndarray, tags: Optional[Tuple[int, int, int, int]]) -> Iterator:
    """Encode uint8 (rgb24) or uint16 (rgb48le) [N, H, W, 3] images, converted with the matrix and
    range of ``tags`` (None: swscale's defaults, BT.601 limited) and tagged with them."""
    av = _av()
    source = "rgb48le" if images.dtype == np.uint16 else "rgb24"
    convert = {}
    if tags and not av.VideoFormat(stream.pix_fmt).is_rgb:
        convert = {"dst_colorspace": _SWS_MATRIX.get(tags[2], 5),
                   "dst_color_range": _FULL_RANGE if tags[3] == _FULL_RANGE else _LIMITED_RANGE}
    for index, image in enumerate(images):
        # converted to the stream's pixel format here, not inside encode(): that implicit conversion
        # gave different bytes for identical frames on a loaded machine (tests/test_fault_corpus.py)
        frame = av.VideoFrame.from_ndarray(image, format=source).reformat(format=stream.pix_fmt, **convert)
        if tags:   # some encoders (prores_ks) take the tags from each frame, not the stream
            for name, value in zip(_COLOUR_FIELDS, tags):
                setattr(frame, name, value)
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
    with _av().open(source) as reader:
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
    resampler = _av().AudioResampler(format="fltp", layout=layout, rate=sample_rate)
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
    piece = _av().AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
    piece.sample_rate = sample_rate
    piece.pts = position + low - first_sample
    piece.time_base = Fraction(1, sample_rate)
    yield piece
