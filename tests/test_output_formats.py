"""Output formats farms and editors expect: --codec h264/hevc/prores/ffv1 with --crf and --pix-fmt,
--frames-format png/png16/exr/exr32, and the source's colour tags carried to the output."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from tokenflow.app import cli
from tokenflow.app.outputs import resolve_output
from tokenflow.config import EditConfig, field_specs
from tokenflow.errors import ConfigError
from tokenflow.io import write
from tokenflow.io.checkpoint import NOT_FINGERPRINTED, fingerprint_fields
from tokenflow.io.read import Colour, read_video
from tokenflow.io.samples import make_sample_clip, render_frames
from tokenflow.io.write import to_uint8_images, video_settings, write_frames, write_video

BT709_TV = Colour(primaries=1, transfer=1, matrix=1, range=1)       # HD video as cameras tag it
BT601_PC = Colour(primaries=6, transfer=6, matrix=6, range=2)       # SD (SMPTE 170M), full range
OUTPUT_FIELDS = ("codec", "crf", "pix_fmt", "frames_format")


def smooth_frames(n: int = 3, size=(96, 64)) -> torch.Tensor:
    """float [N, 3, H, W] in [0, 1]: the sample clip's pictures."""
    return torch.from_numpy(render_frames(n, size)).permute(0, 3, 1, 2).float() / 255


def stream_facts(path) -> dict:
    """Codec, pixel format, container and the colour tags of the first decoded frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frame = next(container.decode(stream))
        return {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                "container": container.format.name, "colour": Colour.of(frame), "frames": stream.frames,
                "tags": {key.lower(): value for key, value in container.metadata.items()}}   # Matroska: upper case


# ----------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("codec, suffix, pix_fmt, decoded_as, container", [
    ("h264", ".mp4", None, "yuv420p", "mp4"),
    ("hevc", ".mp4", None, "yuv420p", "mp4"),
    ("prores", ".mov", None, "yuv422p10le", "mov"),
    ("ffv1", ".mkv", None, "bgr0", "matroska"),
    ("h264", ".mov", "yuv444p", "yuv444p", "mp4"),
    ("hevc", ".m4v", "yuv420p10le", "yuv420p10le", "mp4"),
    ("prores", ".mov", "yuv444p10le", "yuv444p12le", "mov"),   # ProRes 4444 decodes at 12 bits
])
def test_each_codec_writes_a_readable_tagged_file(tmp_path, codec, suffix, pix_fmt, decoded_as, container):
    frames = smooth_frames()
    out = write_video(frames, tmp_path / f"out{suffix}", 12, codec=codec, pix_fmt=pix_fmt, colour=BT709_TV)
    facts = stream_facts(out)
    assert facts["codec"] == codec and facts["pix_fmt"] == decoded_as
    assert container in facts["container"] and facts["frames"] in (0, 3)
    rgb = codec == "ffv1" and pix_fmt is None
    assert facts["colour"] == (Colour(1, 1, 0, 2) if rgb else BT709_TV)   # RGB: matrix rgb, full range
    back = read_video(out, size=(96, 64)).frames
    assert back.shape == frames.shape and (back - frames).abs().mean() < 0.02


def test_ffv1_is_bit_exact(tmp_path):
    images = torch.from_numpy(render_frames(4, (64, 48), seed=3)).permute(0, 3, 1, 2).contiguous()
    images[0, :, :8, :8] = torch.tensor([0, 255, 7], dtype=torch.uint8)[:, None, None]   # extremes survive too
    out = write_video(images, tmp_path / "lossless.mkv", 10, codec="ffv1")
    with av.open(out) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert np.array_equal(decoded, images.permute(0, 2, 3, 1).numpy())
    floats = smooth_frames(2, (64, 48))
    out = write_video(floats, tmp_path / "floats.mkv", 10, codec="ffv1")
    with av.open(out) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert np.array_equal(decoded, to_uint8_images(floats))   # the video's own 8-bit truncation, nothing more


def test_crf_reaches_the_encoder(tmp_path):
    frames = smooth_frames(4, (128, 96))
    sizes = {crf: (tmp_path / f"crf{crf}.mp4") for crf in (10, 40)}
    for crf, path in sizes.items():
        write_video(frames, path, 12, crf=crf)
    assert sizes[10].stat().st_size > 2 * sizes[40].stat().st_size
    assert video_settings("hevc").crf == 22 and video_settings("h264").crf == 18
    assert video_settings("prores").crf is None and video_settings("h264", crf=0).crf == 0


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_refused_combinations_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"pix_fmt: 'yuv420p' is not a pixel format prores_ks \(prores\) writes: "
                                          r"use one of yuv422p10le, yuv444p10le") as error:
        write_video(smooth_frames(1), tmp_path / "x.mov", 12, codec="prores", pix_fmt="yuv420p")
    one_line(error)
    with pytest.raises(ConfigError, match="crf: applies to h264 and hevc, not codec ffv1") as error:
        video_settings("ffv1", crf=10)
    one_line(error)
    with pytest.raises(ConfigError, match="codec: must be one of: h264, hevc, prores, ffv1"):
        video_settings("vp9")
    assert not list(tmp_path.iterdir())   # nothing written


def test_an_unavailable_encoder_names_the_codec_and_the_alternatives(monkeypatch):
    monkeypatch.setitem(write.CODECS, "hevc", write.CODECS["hevc"].__class__(
        ("no_such_hevc",), "mp4", "yuv420p", 22, ("yuv420p",)))
    write.codec_encoder.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"codec: no hevc encoder in this PyAV build \(tried no_such_hevc\): "
                                              r"pick --codec h264 or prores or ffv1") as error:
            video_settings("hevc")
        one_line(error)
    finally:
        monkeypatch.undo()
        write.codec_encoder.cache_clear()


def test_container_follows_the_codec():
    def out(codec, name=None):
        return resolve_output(EditConfig(video="clips/wolf.mp4", codec=codec, output=name))

    assert out("prores").endswith("wolf-pnp.mov") and out("ffv1").endswith("wolf-pnp.mkv")
    assert out("hevc", "a.mov") == "a.mov" and out("ffv1", "a.MKV") == "a.MKV"
    with pytest.raises(ConfigError, match=r"output: 'a.mp4' is a .mp4 file, which cannot hold --codec ffv1: "
                                          r"name a .mkv file, or pick --codec h264 or hevc"):
        out("ffv1", "a.mp4")
    with pytest.raises(ConfigError, match=r"'a.mkv' is a .mkv file, which cannot hold --codec prores: name a .mov"):
        out("prores", "a.mkv")
    with pytest.raises(ConfigError, match=r"name a .mp4 / .m4v / .mov file \(for --codec h264\)"):
        out("h264", "a.avi")


# ----------------------------------------------------------------------------- colour metadata


@pytest.mark.parametrize("colour", [BT709_TV, BT601_PC], ids=["bt709-limited", "bt601-full"])
def test_source_colour_is_read_and_carried(tmp_path, colour):
    source = make_sample_clip(tmp_path / "camera.mp4", n_frames=3, size=(96, 64), colour=colour)
    clip = read_video(source, size=(96, 64))
    assert clip.colour == colour
    reference = read_video(make_sample_clip(tmp_path / "plain.mp4", n_frames=3, size=(96, 64)), size=(96, 64))
    assert reference.colour.primaries == 2   # untagged stays untagged
    # converted with the matrix and range it is tagged with: the pictures read back the same
    assert (clip.frames - reference.frames).abs().mean() < 0.01
    for codec, suffix in (("h264", ".mp4"), ("hevc", ".mp4"), ("prores", ".mov"), ("ffv1", ".mkv")):
        out = write_video(clip.frames, tmp_path / f"edit-{codec}{suffix}", clip.fps, codec=codec, colour=clip.colour)
        tags = stream_facts(out)["colour"]
        assert (tags.primaries, tags.transfer) == (colour.primaries, colour.transfer), codec
        if codec == "ffv1":
            assert (tags.matrix, tags.range) == (0, 2)   # RGB
        else:
            assert tags.matrix == colour.matrix and tags.range == (1 if codec == "prores" else colour.range), codec
        assert (read_video(out, size=(96, 64)).frames - clip.frames).abs().mean() < 0.02, codec


# ----------------------------------------------------------------------------- frames


def read_image(path, fmt: str) -> np.ndarray:
    """[H, W, 3] as stored: uint8, uint16 or float32 (EXR, from its G, B, R planes)."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    if fmt.startswith("png"):
        return frame.to_ndarray(format="rgb48le" if fmt == "png16" else "rgb24")
    dtype = np.float16 if frame.format.name == "gbrpf16le" else np.float32
    assert dtype == (np.float16 if fmt == "exr" else np.float32)
    g, b, r = (np.frombuffer(bytes(p), dtype).reshape(frame.height, -1)[:, :frame.width] for p in frame.planes)
    return np.stack([r, g, b], axis=-1).astype(np.float32)


@pytest.mark.parametrize("fmt, suffix", [("png", ".png"), ("png16", ".png"), ("exr", ".exr"), ("exr32", ".exr")])
def test_frames_keep_their_depth(tmp_path, fmt, suffix):
    frames = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    frames[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 1e-3, 0.5])
    folder = write_frames(frames, tmp_path / "frames", fmt)
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == [f"00000{suffix}", f"00001{suffix}"]
    expected = frames.permute(0, 2, 3, 1).numpy()
    for index, name in enumerate(names):
        stored = read_image(f"{folder}/{name}", fmt)
        if fmt == "png":
            assert stored.dtype == np.uint8 and np.abs(stored / 255 - expected[index]).max() <= 1 / 255
        elif fmt == "png16":
            assert stored.dtype == np.uint16 and np.abs(stored / 65535 - expected[index]).max() <= 0.5 / 65535 + 1e-7
        elif fmt == "exr":
            assert np.all(np.abs(stored - expected[index]) <= 1e-3 * np.abs(expected[index]) + 1e-7)
        else:
            assert np.array_equal(stored, expected[index])
    write_frames(frames[:1], folder, fmt)   # our own numbered frames are replaced
    assert len(list((tmp_path / "frames").iterdir())) == 1


def test_unknown_frames_format():
    with pytest.raises(ConfigError, match="frames_format: must be one of: png, png16, exr, exr32, got 'tiff'"):
        write_frames(smooth_frames(1), "unused", "tiff")


# ----------------------------------------------------------------------------- settings


def test_fields_flags_and_fingerprint():
    specs = field_specs()
    assert specs["codec"].choices == ("h264", "hevc", "prores", "ffv1")
    assert specs["crf"].range_text() == "0..51" and specs["frames_format"].choices == ("png", "png16", "exr", "exr32")
    assert EditConfig(crf=52).errors()[0].field == "crf"
    assert "not codec prores" in str(EditConfig(prompt="x", codec="prores", crf=20).errors()[0])
    # they change how the output files are encoded, not the latents: a checkpoint resumes across them
    assert set(OUTPUT_FIELDS) <= NOT_FINGERPRINTED
    fields = fingerprint_fields(EditConfig(prompt="x", codec="prores", pix_fmt="yuv444p10le", frames_format="exr"),
                                model_identity="m", dtype="float32", device_type="cpu", frames_sha256="abc")
    assert not set(OUTPUT_FIELDS) & set(fields)
    from tokenflow.app.jobfile.schema import job_schema

    schema = json.dumps(job_schema())
    assert '"prores"' in schema and '"exr32"' in schema


def run_cli(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit:   # argparse's own refusals
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra, message", [
    (["--codec", "ffv1", "-o", "{tmp}/edit.mp4"], "output: '{tmp}/edit.mp4' is a .mp4 file, which cannot hold --codec ffv1"),
    (["--codec", "prores", "--pix-fmt", "yuv420p"], "pix_fmt: 'yuv420p' is not a pixel format prores_ks (prores) writes"),
    (["--codec", "ffv1", "--crf", "10"], "crf: applies to h264 and hevc, not codec ffv1"),
    (["--crf", "52"], "crf: must be an integer in [0, 51] (or null), got 52"),
    (["--frames-format", "tiff"], "invalid choice: 'tiff'"),
])
def test_cli_refuses_before_any_work(tmp_path, capsys, sample_clip, extra, message):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    if "-o" not in extra:
        extra += ["-o", f"{tmp_path}/outs/"]   # a folder: the default name has the codec's extension
    code, _, err = run_cli(capsys, "edit", sample_clip, "--prompt", "x", "--model", "tiny", *extra)
    assert code == 2, err
    assert message.replace("{tmp}", str(tmp_path)) in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # nothing written, no folder made


def test_cli_lossless_edit_with_16bit_frames_and_source_colour(tmp_path, capsys, tiny_model_dir):
    source = make_sample_clip(tmp_path / "camera.mp4", n_frames=4, size=(64, 64), colour=BT709_TV)
    out, frames = tmp_path / "edit.mkv", tmp_path / "frames"
    code, stdout, err = run_cli(capsys, "edit", source, "--prompt", "glass", "--model", tiny_model_dir,
                                "--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--device", "cpu",
                                "--keyframe-spacing", "4", "--codec", "ffv1", "-o", out, "--save-frames", frames,
                                "--frames-format", "png16", "--log-json")
    assert code == 0, err
    done = [e for e in map(json.loads, stdout.splitlines()) if e.get("event") == "done"][0]
    assert done["video"] == {"codec": "ffv1", "encoder": "ffv1", "pix_fmt": "bgr0", "crf": None}
    facts = stream_facts(out)
    assert facts["codec"] == "ffv1" and "matroska" in facts["container"]
    assert facts["tags"]["encoded_with"] == "ffv1 (ffv1, bgr0)" and "[made with --model tiny" in facts["tags"]["comment"]
    assert (facts["colour"].primaries, facts["colour"].transfer) == (1, 1)
    pngs = sorted(frames.glob("*.png"))   # beside them: the job record (tokenflow-job.json)
    assert len(pngs) == 4 and read_image(pngs[0], "png16").dtype == np.uint16
    with av.open(str(out)) as container:   # the video is the 16-bit frames truncated to 8 bits, losslessly
        video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    sixteen = np.stack([read_image(p, "png16") for p in pngs]).astype(np.float64) / 65535
    assert np.abs(video / 255 - sixteen).max() <= 1 / 255 + 1e-6
