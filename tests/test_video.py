"""Tests of tokenflow.io.read and tokenflow.io.write (reading, writing, audio, atomicity, errors) and tokenflow.io.samples."""
from __future__ import annotations

import os
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tokenflow.errors import ConfigError, InputError, OutputError
from tokenflow.io import outputs, write
from tokenflow.io.outputs import check_writable
from tokenflow.io.read import probe, read_video
from tokenflow.io.samples import _write_tone, make_sample_clip, render_frames
from tokenflow.io.write import write_frames, write_video

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# H.264 at CRF 18 on smooth synthetic content leaves a mean error of about 0.005 (1-2 grey
# levels); soft shape edges lose a little more to 4:2:0 chroma subsampling. 0.03 (~8 grey
# levels) is far above that noise and far below what a wrong frame, order or colour gives.
LOSSY_TOLERANCE = 0.03

N_FRAMES, FPS, SIZE = 24, 12, (128, 96)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> str:
    return make_sample_clip(tmp_path_factory.mktemp("sample") / "sample.mp4",
                            n_frames=N_FRAMES, size=SIZE, fps=FPS)


@pytest.fixture(scope="module")
def sample_with_audio(tmp_path_factory) -> str:
    return make_sample_clip(tmp_path_factory.mktemp("audio") / "sample.mp4",
                            n_frames=N_FRAMES, size=SIZE, fps=FPS, audio=True)


def expected_frames(n=N_FRAMES, size=SIZE) -> torch.Tensor:
    """The sample's frames before encoding: float [N, 3, H, W]."""
    return torch.from_numpy(render_frames(n, size)).permute(0, 3, 1, 2).float() / 255


def decode_rgb(path, index) -> np.ndarray:
    """Frame ``index`` of ``path`` as uint8 [H, W, 3], decoded independently of tokenflow."""
    with av.open(str(path)) as container:
        for position, frame in enumerate(container.decode(video=0)):
            if position == index:
                return frame.to_rgb().to_ndarray()
    raise IndexError(index)


def streams_of(path) -> dict:
    """{'video': seconds, 'audio': seconds} of each stream in ``path``."""
    with av.open(str(path)) as container:
        return {s.type: float(s.duration * s.time_base) for s in container.streams}


def leftovers(folder) -> list:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def encode_with(path, codec, container_format, frames_uint8, fps=10):
    """Write uint8 [N, H, W, 3] frames with PyAV directly (for formats write_video never makes)."""
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames_uint8.shape[2], frames_uint8.shape[1]
        stream.pix_fmt = "yuv420p"
        for index, image in enumerate(frames_uint8):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return str(path)


def require_codec(name):
    if name not in av.codecs_available:
        pytest.skip(f"codec {name} is not in this PyAV build")


# ----------------------------------------------------------------------------- round trips


def test_round_trip_keeps_count_size_fps_and_pixels(sample):
    clip = read_video(sample, size=SIZE)
    assert clip.frames.shape == (N_FRAMES, 3, SIZE[1], SIZE[0])
    assert clip.frames.dtype == torch.float32
    assert clip.fps == FPS and clip.source_size == SIZE and clip.size == SIZE
    assert clip.indices == list(range(N_FRAMES))
    assert clip.audio is False
    assert (clip.start_time, clip.end_time) == pytest.approx((0.0, N_FRAMES / FPS))
    error = (clip.frames - expected_frames()).abs()
    assert error.mean() < LOSSY_TOLERANCE
    # order is preserved: each frame is closer to its own original than to the next one
    per_frame = error.mean(dim=(1, 2, 3))
    to_next = (clip.frames[:-1] - expected_frames()[1:]).abs().mean(dim=(1, 2, 3))
    assert bool((per_frame[:-1] < to_next).all())


def test_content_hash_is_sha256_of_the_file(sample):
    import hashlib
    assert read_video(sample, frames=1).content_hash == hashlib.sha256(Path(sample).read_bytes()).hexdigest()


def test_fractional_fps_and_uint8_input(tmp_path):
    frames = torch.from_numpy(render_frames(6, (64, 64))).permute(0, 3, 1, 2)
    out = write_video(frames, tmp_path / "ntsc.mp4", Fraction(30000, 1001))
    clip = read_video(out, size=(64, 64))
    assert clip.fps == pytest.approx(30000 / 1001, rel=1e-6)
    assert (clip.frames - frames.float() / 255).abs().mean() < LOSSY_TOLERANCE


def test_float_frames_are_clamped_then_truncated(tmp_path):
    values = torch.tensor([-0.5, 0.0, 0.999, 1.0, 2.0, 0.5])
    frames = values.view(1, 1, 1, 6).expand(1, 3, 2, 6)
    folder = write_frames(frames, tmp_path / "frames")
    pixels = np.asarray(Image.open(Path(folder) / "00000.png"))[0, :, 0]
    assert pixels.tolist() == [0, 0, 254, 255, 255, 127]


def test_metadata_goes_into_the_container(sample, tmp_path):
    clip = read_video(sample, frames=2, size=(64, 64))
    out = write_video(clip.frames, tmp_path / "tagged.mp4", clip.fps,
                      metadata={"comment": "a wolf", "tokenflow_seed": 1})
    with av.open(out) as container:
        assert container.metadata["comment"] == "a wolf"
        assert container.metadata["tokenflow_seed"] == "1"


# ----------------------------------------------------------------------------- resizing


def test_lanczos_resize_matches_pil(sample):
    clip = read_video(sample, frames=4, size=(80, 64))
    expected = Image.fromarray(decode_rgb(sample, 3)).resize((80, 64), resample=Image.Resampling.LANCZOS)
    expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255
    assert torch.equal(clip.frames[3], expected)


def test_default_size_follows_aspect(tmp_path):
    square = make_sample_clip(tmp_path / "square.mp4", n_frames=1, size=(64, 64))
    wide = make_sample_clip(tmp_path / "wide.mp4", n_frames=1, size=(96, 64))
    assert read_video(square).size == (512, 512)
    assert read_video(wide).size == (672, 384)


def test_crop_takes_the_centre_before_resizing(tmp_path):
    wide = make_sample_clip(tmp_path / "wide.mp4", n_frames=1, size=(128, 64))
    clip = read_video(wide, size=(64, 64), crop=True)
    centre = Image.fromarray(decode_rgb(wide, 0)).crop((32, 0, 96, 64))
    expected = np.array(centre.resize((64, 64), resample=Image.Resampling.LANCZOS))
    assert torch.equal(clip.frames[0], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


def test_display_rotation_is_applied(tmp_path):
    path = tmp_path / "portrait.mp4"
    image = np.zeros((32, 64, 3), np.uint8)
    image[:8, :8] = 255  # white block top-left of the stored frame
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    clip = read_video(path, size=(64, 128))
    assert clip.source_size == (32, 64)
    # a quarter turn counter-clockwise moves the top-left corner to the bottom-left
    assert clip.frames[0, :, -8:, :8].mean() > 0.8 and clip.frames[0, :, :8, :8].mean() < 0.2


# ----------------------------------------------------------------------------- selection


def test_start_stride_frames_select_the_right_frames(sample):
    everything = read_video(sample, size=(80, 64))
    clip = read_video(sample, start=3, stride=2, frames=5, size=(80, 64))
    assert clip.indices == [3, 5, 7, 9, 11]
    assert torch.equal(clip.frames, everything.frames[3:12:2])
    assert clip.start_time == pytest.approx(3 / FPS)
    assert clip.end_time == pytest.approx(12 / FPS)


def test_fewer_frames_than_asked_keeps_what_exists(sample):
    with pytest.warns(UserWarning, match="asks for more"):   # an edit's read says so, once
        assert len(read_video(sample, frames=100, size=(80, 64)).indices) == N_FRAMES
    with pytest.warns(UserWarning, match="asks for more"):
        assert read_video(sample, start=20, stride=2, frames=10, size=(80, 64)).indices == [20, 22]
    with warnings.catch_warnings():   # a reader that compares the counts itself (tokenflow metrics)
        warnings.simplefilter("error")
        assert len(read_video(sample, frames=100, size=(80, 64), warn_short=False).indices) == N_FRAMES


def test_decoding_stops_after_the_last_selected_frame(sample, monkeypatch):
    decoded = []
    real_open = av.open

    class CountingContainer:
        def __init__(self, container):
            self._container = container

        def __getattr__(self, name):
            return getattr(self._container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._container.close()

        def decode(self, *args, **kwargs):
            for frame in self._container.decode(*args, **kwargs):
                decoded.append(frame)
                yield frame

    monkeypatch.setattr(av, "open", lambda *a, **k: CountingContainer(real_open(*a, **k)))
    assert read_video(sample, start=2, frames=3, size=(80, 64)).indices == [2, 3, 4]
    assert len(decoded) <= 6


def test_bad_selection_values_are_config_errors(sample):
    for kwargs in ({"frames": 0}, {"start": -1}, {"stride": 0}):
        with pytest.raises(ConfigError):
            read_video(sample, **kwargs)


# ----------------------------------------------------------------------------- other inputs


def write_image(path, colour, size=(64, 64)):
    Image.new("RGB", size, colour).save(path)


def test_image_folder_in_natural_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    colours = {"frame_1.png": (255, 0, 0), "frame_2.jpg": (0, 255, 0), "frame_10.png": (0, 0, 255)}
    for name, colour in colours.items():
        write_image(folder / name, colour)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk")
    clip = read_video(folder, size=(64, 64))
    assert clip.fps == 10.0 and clip.audio is False and clip.source_size == (64, 64)
    dominant = clip.frames.mean(dim=(2, 3)).argmax(dim=1).tolist()
    assert dominant == [0, 1, 2]  # red (1), green (2), blue (10)
    assert read_video(folder, start=1, size=(64, 64)).indices == [1, 2]
    assert len(clip.content_hash) == 64


def test_image_folder_of_differing_sizes_is_rejected(tmp_path):
    write_image(tmp_path / "0.png", (0, 0, 0), (64, 64))
    write_image(tmp_path / "1.png", (0, 0, 0), (80, 64))
    with pytest.raises(InputError, match="differ in size") as error:
        read_video(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_gif_input(tmp_path):
    require_codec("gif")
    path = tmp_path / "anim.gif"
    pictures = [Image.new("RGB", (64, 64), (40 * i, 0, 255 - 40 * i)) for i in range(6)]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=100, loop=0)
    clip = read_video(path, size=(64, 64))
    assert clip.frames.shape == (6, 3, 64, 64)
    assert clip.fps == pytest.approx(10.0)
    assert clip.frames[5, 2].mean() < clip.frames[0, 2].mean()


@pytest.mark.parametrize("codec, container_format, suffix", [
    ("libvpx-vp9", "webm", ".webm"),
    ("libvpx", "webm", ".webm"),
    ("libx264", "matroska", ".mkv"),
    ("mpeg4", "avi", ".avi"),
])
def test_other_containers(tmp_path, codec, container_format, suffix):
    require_codec(codec)
    frames = render_frames(5, (64, 64))
    path = encode_with(tmp_path / f"clip{suffix}", codec, container_format, frames)
    clip = read_video(path, size=(64, 64))
    assert clip.frames.shape == (5, 3, 64, 64)
    assert clip.fps == pytest.approx(10.0)
    assert (clip.frames - torch.from_numpy(frames).permute(0, 3, 1, 2) / 255).abs().mean() < 0.06


def test_probe(sample, tmp_path):
    assert probe(sample) == {"frames": N_FRAMES, "fps": FPS, "width": SIZE[0], "height": SIZE[1],
                             "audio": False, "duration": pytest.approx(N_FRAMES / FPS)}
    write_image(tmp_path / "0.png", (0, 0, 0), (80, 64))
    assert probe(tmp_path)["width"] == 80


@pytest.mark.skipif(not (SHARED_DATA / "wolf.mp4").exists(), reason="shared wolf.mp4 not present")
def test_wolf_video():
    clip = read_video(SHARED_DATA / "wolf.mp4", frames=16, size=(128, 128))
    assert clip.frames.shape == (16, 3, 128, 128)
    assert clip.fps == 20
    assert clip.source_size == (512, 512)


# ----------------------------------------------------------------------------- audio


def mean_loudness(path, start_s, length_s) -> float:
    """Mean |sample| of ``path``'s audio in [start_s, start_s + length_s)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(audio=0))
    rate = frames[0].sample_rate
    samples = np.concatenate([frame.to_ndarray() for frame in frames], axis=1)[0]
    begin = int(start_s * rate)
    return float(np.abs(samples[begin:begin + int(length_s * rate)]).mean())


def test_audio_is_copied_and_trimmed(sample_with_audio, tmp_path):
    clip = read_video(sample_with_audio, start=6, frames=12, size=(80, 64))
    assert clip.audio and clip.start_time == pytest.approx(0.5) and clip.end_time == pytest.approx(1.5)
    out = write_video(clip.frames, tmp_path / "with_audio.mp4", clip.fps, audio_from=clip)
    durations = streams_of(out)
    assert durations["video"] == pytest.approx(1.0, abs=0.01)
    assert durations["audio"] == pytest.approx(durations["video"], abs=0.05)
    # the tone gets louder over time, so loudness tells where the copy was cut from
    copied = mean_loudness(out, 0.1, 0.2)
    assert copied == pytest.approx(mean_loudness(sample_with_audio, 0.6, 0.2), rel=0.1)
    assert copied > 1.3 * mean_loudness(sample_with_audio, 0.1, 0.2)


def test_audio_is_skipped_with_a_warning_when_strided(sample_with_audio, tmp_path):
    clip = read_video(sample_with_audio, stride=2, frames=4, size=(80, 64))
    with pytest.warns(UserWarning, match="stride"):
        out = write_video(clip.frames, tmp_path / "strided.mp4", clip.fps, audio_from=clip)
    assert "audio" not in streams_of(out)


def test_no_audio_when_the_source_has_none(sample, tmp_path):
    clip = read_video(sample, frames=3, size=(80, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = write_video(clip.frames, tmp_path / "silent.mp4", clip.fps, audio_from=clip)
    assert set(streams_of(out)) == {"video"}


# ----------------------------------------------------------------------------- atomic writes


def test_invalid_frames_leave_nothing_behind(tmp_path):
    with pytest.raises(ValueError):
        write_video(torch.zeros(2, 4, 64, 64), tmp_path / "bad.mp4", 10)
    with pytest.raises(ValueError):
        write_video(torch.zeros(2, 3, 63, 64), tmp_path / "odd.mp4", 10)
    assert os.listdir(tmp_path) == []


def test_failure_mid_encode_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous result")
    real_encode = write._encode_frames

    def failing_encode(stream, images, *rest):
        for count, packet in enumerate(real_encode(stream, images, *rest)):
            if count == 2:
                raise OSError(28, "No space left on device")
            yield packet

    monkeypatch.setattr(write, "_encode_frames", failing_encode)
    frames = torch.from_numpy(render_frames(12, (64, 64))).permute(0, 3, 1, 2)
    with pytest.raises(OutputError, match="No space left") as error:
        write_video(frames, target, 10)
    assert str(target) in str(error.value)
    assert target.read_bytes() == b"previous result"
    assert leftovers(tmp_path) == []


def test_write_frames_names_and_replaces_its_own_folder(tmp_path):
    frames = torch.from_numpy(render_frames(3, (64, 64))).permute(0, 3, 1, 2)
    folder = tmp_path / "frames"
    write_frames(frames, folder)
    assert sorted(os.listdir(folder)) == ["00000.png", "00001.png", "00002.png"]
    assert np.array_equal(np.asarray(Image.open(folder / "00001.png")), frames[1].permute(1, 2, 0).numpy())
    write_frames(frames[:1], folder)
    assert os.listdir(folder) == ["00000.png"]
    assert leftovers(tmp_path) == []


def test_write_frames_refuses_foreign_folders_and_files(tmp_path):
    frames = torch.zeros(1, 3, 8, 8)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(OutputError, match="other files") as error:
        write_frames(frames, foreign)
    assert str(foreign) in str(error.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        write_frames(frames, tmp_path / "file")
    assert (foreign / "thesis.docx").read_text() == "precious"


def test_write_frames_failure_keeps_the_old_folder(tmp_path, monkeypatch):
    frames = torch.zeros(3, 3, 8, 8)
    folder = write_frames(frames[:1], tmp_path / "frames")
    calls = []

    def failing_fromarray(array):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return Image.fromarray(array)

    monkeypatch.setattr(write.Image, "fromarray", failing_fromarray, raising=True)
    with pytest.raises(OutputError):
        write_frames(frames, folder)
    monkeypatch.undo()
    assert os.listdir(folder) == ["00000.png"]
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- io.outputs helpers


def test_atomic_file_and_atomic_path_replace_the_target_or_leave_it_untouched(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with outputs.atomic_file(target, "wb", durable=True) as f:
            f.write(b"half")
            raise RuntimeError("writer failed")
    with pytest.raises(RuntimeError):
        with outputs.atomic_path(target, suffix=".bin") as tmp:   # a library that writes to a path
            assert tmp.name.endswith(".bin") and tmp.parent == tmp_path and not tmp.exists()
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.bin"]
    with outputs.atomic_path(target, durable=True) as tmp:
        torch.save({"x": 1}, tmp)
    assert torch.load(target) == {"x": 1} and os.listdir(tmp_path) == ["state.bin"]
    with pytest.raises(FileNotFoundError):    # nothing written: an error, not an empty target
        with outputs.atomic_path(tmp_path / "never"):
            pass
    assert os.listdir(tmp_path) == ["state.bin"]


def test_atomic_files_get_the_umask_mode_and_never_touch_the_umask(tmp_path, monkeypatch):
    """A replaced file gets what a plain open would give (0666 less the umask, not mkstemp's 0600),
    and the process umask is never changed (farm and lock threads may be creating files meanwhile)."""
    changed = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: changed.append(mask) or real_umask(mask))
    old = real_umask(0o027)
    try:
        with outputs.atomic_file(tmp_path / "a.json") as f:
            f.write("{}")
        with outputs.atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        (tmp_path / "plain").write_text("x")
    finally:
        real_umask(old)
    assert changed == []
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("a.json", "b.bin", "plain")}
    assert modes == dict.fromkeys(modes, 0o640), modes


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "move-aside"])
def test_atomic_path_swaps_folders_with_and_without_an_atomic_exchange(tmp_path, monkeypatch, exchange):
    if not exchange:   # e.g. NFS or macOS: the old folder is renamed aside first
        monkeypatch.setattr(outputs, "_rename_exchange", lambda a, b: False)
    folder = tmp_path / "model"
    for version in ("one", "two"):
        with outputs.atomic_path(folder, make_parents=True) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
        assert (folder / "weights").read_text() == version
    with pytest.raises(OSError):
        with outputs.atomic_path(folder) as tmp:
            tmp.mkdir()
            raise OSError(28, "No space left on device")
    assert (folder / "weights").read_text() == "two" and os.listdir(tmp_path) == ["model"]


def test_a_failed_folder_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_rename_exchange", lambda a, b: False)
    folder, new = tmp_path / "frames", tmp_path / "new"
    folder.mkdir()
    (folder / "00000.png").write_text("old")
    new.mkdir()
    (new / "00000.png").write_text("new")
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(src) == str(new) and not os.path.exists(dst):
            raise PermissionError(13, "Permission denied")
        return real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", rename)
    with pytest.raises(PermissionError):
        outputs.swap_folder_into_place(new, folder)
    monkeypatch.undo()
    assert (folder / "00000.png").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["frames", "new"]


def test_temp_siblings_are_unique_and_found_again(tmp_path):
    names = {outputs.temp_sibling(tmp_path / "edit.pt") for _ in range(50)}
    assert len(names) == 50 and all(os.path.basename(n).startswith(".edit.pt.tmp-") for n in names)
    for name in list(names)[:3]:
        Path(name).write_bytes(b"")
    (tmp_path / ".other.pt.tmp-1").write_bytes(b"")
    assert len(outputs.temp_siblings(tmp_path / "edit.pt")) == 3


# ----------------------------------------------------------------------------- encoder choice


def test_falls_back_to_mpeg4_without_h264(tmp_path, monkeypatch):
    monkeypatch.setattr(write, "H264_ENCODERS", ())
    write.video_encoder.cache_clear()
    try:
        with pytest.warns(UserWarning, match="MPEG-4"):
            out = write_video(expected_frames(4, (64, 64)), tmp_path / "fallback.mp4", 10)
    finally:
        write.video_encoder.cache_clear()
    with av.open(out) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    assert (read_video(out, size=(64, 64)).frames - expected_frames(4, (64, 64))).abs().mean() < 0.05


# ----------------------------------------------------------------------------- errors


def assert_input_error(path, match, **kwargs):
    with pytest.raises(InputError, match=match) as error:
        read_video(path, **kwargs)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_path(tmp_path):
    assert_input_error(tmp_path / "nope.mp4", "does not exist")


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    assert_input_error(tmp_path, "contains no images")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_input_error(path, "could not decode video .* Is it a video file FFmpeg can read")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert_input_error(empty, "could not decode video")


def test_no_video_stream(tmp_path):
    path = tmp_path / "tone.m4a"
    _write_tone(str(path), 0.5)
    assert_input_error(path, "has no video stream")


def test_zero_frames(tmp_path):
    require_codec("mpeg4")
    path = tmp_path / "empty.avi"
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    assert_input_error(path, "no frames could be decoded")


def test_start_past_the_end(sample, tmp_path):
    with pytest.raises(InputError) as error:
        read_video(sample, start=100)
    assert str(error.value) == f"--start 100 is past the end of '{sample}' ({N_FRAMES} frames)."
    write_image(tmp_path / "0.png", (0, 0, 0))
    assert_input_error(tmp_path, "past the end", start=5)


@pytest.mark.parametrize("size", [(100, 96), (32, 32), (64, 60)])
def test_unsupported_sizes(sample, size):
    with pytest.raises(InputError, match=f"{size[0]}x{size[1]}.*multiples of 8"):
        read_video(sample, size=size)


def test_output_is_a_directory(tmp_path):
    with pytest.raises(OutputError, match="is a folder") as error:
        write_video(torch.zeros(1, 3, 64, 64), tmp_path, 10)
    assert str(tmp_path) in str(error.value)


def test_output_parent_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("x")
    target = tmp_path / "a_file" / "sub" / "out.mp4"
    with pytest.raises(OutputError, match="cannot create folder") as error:
        check_writable(target)
    assert str(target) in str(error.value)


def test_check_writable_creates_parents_and_cleans_up(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.mp4"
    check_writable(target)
    assert target.parent.is_dir() and os.listdir(target.parent) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write read-only folders")
def test_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write output"):
            write_video(torch.zeros(1, 3, 64, 64), locked / "out.mp4", 10)
    finally:
        locked.chmod(0o700)


def test_unwritable_folder_is_reported_even_for_root(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="cannot write output .*Permission denied") as error:
        write_video(torch.zeros(1, 3, 64, 64), tmp_path / "out.mp4", 10)
    assert str(tmp_path / "out.mp4") in str(error.value)
    assert os.listdir(tmp_path) == []
