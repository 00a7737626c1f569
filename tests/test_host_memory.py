"""Host memory before work (issue 16): the estimate (``engine.planner.HostPlan``), what the host
has (``engine.memory.host_available``), the frame count known before decoding
(``io.read.count_selected``), the per-frame check while decoding, and the CLI refusing what
cannot fit before anything is decoded or loaded (exit 6, the numbers, the flags that fix it).

Every estimate here is given its available memory explicitly (``available=``): the tests do not
depend on the machine's memory, except the CLI cases, whose sizes no machine holds (terabytes).
"""
import dataclasses
import json
import os
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tokenflow.engine import memory
from tokenflow.engine.host_plan import HOST_MARGIN, HostPlan, before_read
from tokenflow.engine.latents import InvertedLatents
from tokenflow.engine.planner import SEARCH_TILE, make_plan
from tokenflow.errors import ResourceError
from tokenflow.io.read import count_selected, read_video
from tokenflow.io.samples import render_frames
from tokenflow.io.write import to_uint8_images

from .inprocess import run_tokenflow

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--device", "cpu", "--keyframe-spacing", "4",
        "--frames", "5"]
BASE = dict(frames=10, frames_source="test", width=512, height=512, source_pixels=1920 * 1080, prompts=1,
            timesteps=51, device_type="cuda", inverted_latents="auto", use_cache=True, available=(64 * GIB, "test"))


def tokenflow(*args):
    """``tokenflow ARGS`` through tokenflow.app.cli.main in this process (tests/inprocess.py)."""
    return run_tokenflow(*args, cwd=ROOT)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _encode(path: Path, n: int, size=(96, 64), container_format=None) -> Path:
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for index, image in enumerate(render_frames(n, size)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _folder(path: Path, n: int, size=(80, 64)) -> Path:
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(render_frames(n, size)):
        Image.fromarray(image).save(path / f"{index}.png")
    return path


# --- what the host has ------------------------------------------------------------------------

def test_host_available_is_memavailable_or_a_tighter_cgroup_limit(tmp_path):
    meminfo = _write(tmp_path / "meminfo", "MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    proc = _write(tmp_path / "self-cgroup", "0::/job\n")
    v2 = tmp_path / "v2"
    found, source = memory.host_available(str(meminfo), str(v2), str(proc))
    assert (found, source) == (8000000 * 1024, "MemAvailable 7.63 GiB")   # no cgroup files: no limit
    # the job's cgroup: 2 GiB limit, 1.5 GiB charged of which 0.25 GiB reclaimable page cache
    _write(v2 / "job" / "memory.max", f"{2 * GIB}\n")
    _write(v2 / "job" / "memory.current", f"{3 * GIB // 2}\n")
    _write(v2 / "job" / "memory.stat", f"anon {GIB}\ninactive_file {GIB // 4}\n")
    found, source = memory.host_available(str(meminfo), str(v2), str(proc))
    assert found == 2 * GIB - 3 * GIB // 2 + GIB // 4 and "limit 2.00 GiB" in source and "job" in source
    # "max" is no limit; a parent cgroup's limit still applies
    (v2 / "job" / "memory.max").write_text("max\n")
    _write(v2 / "memory.max", f"{4 * GIB}\n")
    _write(v2 / "memory.current", f"{GIB}\n")
    assert memory.host_available(str(meminfo), str(v2), str(proc))[0] == 3 * GIB
    # cgroup v1: the memory controller's folder; its "no limit" is a huge number
    v1 = tmp_path / "v1"
    _write(proc, "4:memory:/job\n")
    _write(v1 / "memory" / "job" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(v1 / "memory" / "job" / "memory.usage_in_bytes", f"{GIB}\n")
    assert memory.host_available(str(meminfo), str(v1), str(proc))[0] == 8000000 * 1024
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{3 * GIB}\n")
    _write(v1 / "memory" / "job" / "memory.stat", f"inactive_file 5\ntotal_inactive_file {GIB}\n")
    assert memory.host_available(str(meminfo), str(v1), str(proc))[0] == 3 * GIB
    # no /proc/meminfo (not Linux): the free physical pages
    found, source = memory.host_available(str(tmp_path / "none"), str(tmp_path / "none"), str(tmp_path / "none"))
    assert found > 0 and ("free physical memory" in source or "assumed" in source)


def test_host_available_on_this_machine_is_positive():
    found, source = memory.host_available()
    assert found > 0 and source


# --- the estimate -----------------------------------------------------------------------------

@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("field, values", [
    ("frames", [1, 2, 10, 100, 10_000]), ("width", [64, 128, 512, 4096]), ("height", [64, 72, 1024, 65536]),
    ("prompts", [0, 1, 2, 8]), ("timesteps", [1, 11, 51, 1001]), ("source_pixels", [64 * 64, 1920 * 1080, 8192**2]),
    ("inverted_latents", ["device", "host"]), ("use_cache", [False, True]),
])
def test_the_estimate_never_shrinks_when_anything_grows(device_type, field, values):
    plans = [before_read(**{**BASE, "device_type": device_type, field: value}) for value in values]
    needs = [plan.need for plan in plans]
    assert needs == sorted(needs), needs
    if field in ("frames", "width", "height"):   # every phase grows
        assert needs[0] < needs[-1], needs
    elif field != "inverted_latents" or device_type != "cpu":   # (on CPU the latents are on the host anyway)
        totals = [sum(plan.parts.values()) for plan in plans]   # what it counts grows, the peak phase may not
        assert totals[0] < totals[-1], totals


def test_the_estimate_grows_with_the_model_side_parts():
    plan = before_read(**BASE)
    for part, value in (("store", GIB), ("weights", GIB), ("calls", {"edit": ("propagate", GIB, 1, GIB)})):
        assert HostPlan(**{**plan.__dict__, part: value}).need > plan.need, part


def test_parts_are_the_bytes_of_the_real_arrays(sample_clip):
    """Each counted array, against the array the code makes: the decoded clip, its uint8 pixels,
    the inverted latents and z0 on the host, an output (frames and latents), its uint8 conversion."""
    count = count_selected(sample_clip, frames=5)
    clip = read_video(sample_clip, frames=5, size=(96, 64))
    host = before_read(**{**BASE, "frames": count.frames, "frames_source": count.how, "width": 96, "height": 64,
                          "source_pixels": count.source_size[0] * count.source_size[1], "timesteps": 6,
                          "device_type": "cpu", "prompts": 2})
    parts = host.parts
    assert count.frames == clip.frames.shape[0] == 5 and count.source_size == clip.source_size == (96, 64)
    assert parts["frames"] == clip.frames.nbytes
    assert parts["frames_u8"] == clip.frames.numel() * np.dtype(np.uint8).itemsize
    assert parts["hash"] == 2 * clip.frames.nbytes                     # frames * 255, then its rounding
    latents = InvertedLatents.empty(list(range(6)), (5, 4, 64 // 8, 96 // 8), torch.device("cpu"), "host")
    assert parts["latents"] == latents.data.nbytes and parts["z0"] == latents[0].nbytes
    assert parts["cache"] == 2 * latents.data.nbytes                  # the serialised file and a host copy
    assert parts["outputs"] == 2 * (clip.frames.nbytes + latents[0].nbytes)   # P = 2 edits: frames + latents
    converted = to_uint8_images(clip.frames)
    assert parts["converting"] == 2 * clip.frames.nbytes and parts["converting"] >= converted.nbytes
    assert parts["in_flight"] >= 96 * 64 * 3 * 2   # the decoded RGB frame and its resized copy


def test_a_tiny_edit_holds_what_its_plan_counts(tiny_model_dir, sample_clip):
    """The plan of a real edit (CPU, tiny model): its host parts are the arrays the edit made,
    byte for byte, and the estimated peak bounds them within a factor of 4 (the device plan, on
    CPU the activations, is the rest). A whole-process measurement (live tensor storages, 5 and
    12 frames) came to 0.85-0.98 of the estimate: docs/options.md."""
    from tokenflow.config import EditConfig
    from tokenflow.method.editor import Editor

    editor = Editor.from_pretrained(str(tiny_model_dir), device="cpu", dtype="float32", use_cache=False)
    config = EditConfig(model=str(tiny_model_dir), prompt=("a", "b"), inversion_steps=10, steps=5, size=(64, 64),
                        frames=5, keyframe_spacing=4, device="cpu", use_cache=False)
    clip = read_video(sample_clip, frames=5, size=(64, 64))
    results = editor.edit_many(clip, config=config)
    host = results[0].plan.host
    assert host is not None and host.fits and host.held >= clip.frames.nbytes
    assert host.parts["frames"] == clip.frames.nbytes
    arrays = sum(r.frames.nbytes + r.latents.nbytes for r in results)
    assert host.parts["outputs"] == arrays
    real = clip.frames.nbytes + arrays
    assert real <= host.need <= 4 * (real + results[0].plan.peak)
    assert "host memory: peak" in results[0].plan.describe()


# --- refusing, with the numbers and the fixes -----------------------------------------------

def test_a_refusal_gives_the_numbers_and_flags_that_fit():
    host = before_read(**{**BASE, "frames": 400, "width": 1024, "height": 576, "available": (8 * GIB, "test")})
    assert not host.fits
    with pytest.raises(ResourceError) as caught:
        host.check()
    text = str(caught.value)
    assert "\n" not in text and "400 frames at 1024x576" in text and "GiB" in text and "usable" in text
    assert "--size" in text and "--frames" in text and "(test, less a 512.0 MiB margin)" in text
    most = host.max_frames()
    assert host.with_frames(most).fits and not host.with_frames(most + 1).fits and f"at most {most} fit" in text
    width, height = host.max_size()
    assert width % 8 == height % 8 == 0 and f"{width}x{height}" in text
    assert HostPlan(**{**host.__dict__, "width": width, "height": height}).fits
    huge = before_read(**{**BASE, "width": 65536, "height": 65536, "available": (8 * GIB, "test")})
    assert huge.max_frames() == 0 and "not even one frame fits" in str(huge.refusal())


def test_the_per_frame_check_refuses_the_first_frame_that_does_not_fit(tmp_path):
    """A raw H.264 stream lists neither frames nor duration: the count is checked as frames arrive."""
    raw = _encode(tmp_path / "clip.h264", 12, container_format="h264")
    count = count_selected(raw)
    assert count.frames is None and "checked as frames arrive" in count.how
    settings = {**BASE, "width": 512, "height": 512, "source_pixels": 96 * 64, "frames_source": count.how}
    six = before_read(**{**settings, "frames": 6}).need   # room for 6 frames
    host = before_read(**{**settings, "frames": None, "available": (HOST_MARGIN + six, "test")})
    most = host.max_frames()
    assert host.frames == 1 and most == 6
    seen = []

    def check(n):
        seen.append(n)
        host.check_frames(n)

    with pytest.raises(ResourceError, match=f"{most + 1} frames at 512x512 \\(counted as they were decoded\\)"):
        read_video(raw, size=(512, 512), on_frame=check)
    assert seen == list(range(1, most + 2))


def test_a_folder_is_checked_and_resized_picture_by_picture(tmp_path):
    folder = _folder(tmp_path / "frames", 6)
    (folder / "4.png").write_bytes(b"not a png")   # opened only if the check lets the 5th frame through
    seen = []
    clip = read_video(folder, frames=4, size=(64, 64), on_frame=seen.append)
    assert seen == [1, 2, 3, 4] and tuple(clip.frames.shape) == (4, 3, 64, 64)

    def stop_at_five(n):
        if n == 5:
            raise ResourceError("five frames do not fit")

    with pytest.raises(ResourceError, match="five frames"):   # not the broken picture's InputError
        read_video(folder, size=(64, 64), on_frame=stop_at_five)


def test_frames_are_converted_exactly_as_before(sample_clip):
    """The frame-by-frame float conversion is ToTensor's: uint8 / 255 in float32, bit for bit."""
    clip = read_video(sample_clip, frames=3, size=(96, 64))
    with av.open(str(sample_clip)) as container:
        from PIL import Image

        from tokenflow.io.read import _resize
        images = [_resize(Image.fromarray(f.to_rgb().to_ndarray()), (96, 64), False)
                  for _, f in zip(range(3), container.decode(video=0))]
    reference = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255).contiguous()
    assert torch.equal(clip.frames, reference)


def test_frame_counts_known_before_decoding(tmp_path, sample_clip):
    assert count_selected(sample_clip).frames == 12
    assert count_selected(sample_clip, frames=5).frames == 5
    assert count_selected(sample_clip, frames=50).frames == 12
    assert count_selected(sample_clip, start=3, stride=2).frames == 5        # 3, 5, 7, 9, 11
    assert count_selected(sample_clip, start=20).frames == 0
    mkv = _encode(tmp_path / "clip.mkv", 12)
    count = count_selected(mkv)
    assert count.frames == 12 and "duration x fps" in count.how          # Matroska lists no frame count
    folder = _folder(tmp_path / "frames", 7)
    assert count_selected(folder, stride=3).frames == 3 and count_selected(folder).source_size == (80, 64)


def test_make_plan_checks_the_host_with_the_models_numbers(tiny_sd):
    args = dict(frames=40, latent_size=(16, 16), branches=3, keyframes=5, window=0, steps=11, budget=2**40,
                budget_source="test", calibration=memory.Calibration())
    plan = make_plan(tiny_sd, **args, host=(2**40, "test"))
    assert plan.host.weights == plan.weights_bytes   # CPU: device memory is host memory
    # each phase counts its own stage's call: the peak less the weights and the resident latents and store
    resident = plan.latents_bytes * (plan.latents_on == "device") + plan.store_bytes * (plan.store_on == "device")
    calls = {phase: (stage, nbytes) for phase, (stage, nbytes, _, _) in plan.host.calls.items()}
    latents = plan.latents_bytes * (plan.latents_on == "device")
    own = {"keyframes": plan.peaks["keyframes"] - resident, "propagate": plan.peaks["propagate"] - resident,
           "invert": plan.peaks["invert"] - latents, "vae": plan.peaks["vae"]}
    own = {stage: nbytes - plan.weights_bytes for stage, nbytes in own.items()}
    assert calls["invert"] == max((own["invert"], "invert"), (own["vae"], "vae"))[::-1]   # the VAE encodes there
    assert calls["edit"] == max((own["keyframes"], "keyframes"), (own["propagate"], "propagate"))[::-1]
    assert calls["decode"] == ("vae", own["vae"])
    assert len(set(own.values())) == 4   # (the stages differ: a phase taking another's peak would show)
    assert plan.host.latents_on_host and plan.host.store == plan.store_bytes   # counted once, as host parts
    assert plan.host.held == 4 * 40 * 3 * 128 * 128 + plan.weights_bytes
    assert plan.as_dict()["host"]["need"] == plan.host.need and "host memory" in plan.describe()
    json.dumps(plan.as_dict())
    with pytest.raises(ResourceError, match="not enough host memory for 40 frames at 128x128 \\(the decoded clip\\)"):
        make_plan(tiny_sd, **args, host=(0, "test"))


# --- on CPU, the calls are sized in what the host leaves (real SD 2.1 sizes, nothing allocated) --

SD_FRAMES, SD_SIDE = 200, 512


@pytest.fixture(scope="module")
def sd21_on_cpu():
    """SD 2.1-base's UNet, VAE and text encoder (23 layers, 1024 wide) built on the meta device
    (shapes only), planned as if the CPU were their device."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tokenflow.models.architectures import SD21_UNET, SD_VAE

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"))
    return SimpleNamespace(unet=unet, vae=vae, text_encoder=text, dtype=torch.float32, device=torch.device("cpu"),
                           vae_scale_factor=8)


def _frames_bytes(frames, side):
    return 4 * frames * 3 * side * side




CLIP = _frames_bytes(SD_FRAMES, SD_SIDE)   # the 200 float32 frames at 512x512: 600 MiB


def _cpu_plan(model, free, frames=SD_FRAMES, side=SD_SIDE, **kw):
    """make_plan as ``Editor`` calls it on CPU, once the model is loaded and the clip decoded, on
    a machine that had ``free`` bytes for the frames (MemAvailable is ``free`` less the frames),
    with the CPU's default budget from its RSS (weights, frames, 0.7 GiB of libraries); keyframe
    spacing 8, one prompt, 50 edit steps (51 inverted latents kept)."""
    weights = memory.module_bytes(model.unet, model.vae, model.text_encoder)
    available = free - _frames_bytes(frames, side)
    budget, source = memory.cpu_budget(available, weights + _frames_bytes(frames, side) + 7 * GIB // 10)
    args = dict(frames=frames, latent_size=(side // 8, side // 8), branches=3, keyframes=-(-frames // 8), window=0,
                steps=51, budget=budget, budget_source=source, calibration=memory.Calibration(),
                host=(available, "test"))
    return make_plan(model, **{**args, **kw})


@pytest.mark.parametrize("available", [16 * GIB, 20 * GIB])
def test_on_cpu_the_calls_are_sized_in_what_the_host_leaves(sd21_on_cpu, available):
    plan = _cpu_plan(sd21_on_cpu, available + CLIP)   # MemAvailable 16 (20) GiB with the clip decoded
    host = plan.host
    assert host.fits and host.need <= host.usable and plan.peak <= plan.budget
    # the budget alone (the host's memory, counted as if nothing else held it) sizes bigger calls...
    alone = _cpu_plan(sd21_on_cpu, available + CLIP, host=(2**50, "test"))
    assert plan.inversion_frames < alone.inversion_frames
    # ...which the host cannot hold on top of the frames, latents, cache and store (the review's exit 6)
    assert not dataclasses.replace(host, calls=alone.host.calls).fits
    # each phase counts its own stage's call, not the largest of all
    stage = {phase: call[0] for phase, call in host.calls.items()}
    assert stage == {"invert": "invert", "edit": "keyframes", "decode": "vae"}
    assert host.calls["invert"][2] == plan.inversion_frames and host.calls["decode"][2] == plan.vae_frames
    assert host.phases["decode"]["calls"] == plan.vae_frames * plan.vae_row_bytes < host.phases["invert"]["calls"]
    # and the inversion takes the room its phase leaves (less the search tile every call keeps free)
    invert = sum(host.phases["invert"].values())
    assert invert <= host.usable < invert + plan.unet_row_bytes + SEARCH_TILE * 4


def _suggested(text):
    """The numbers a refusal suggests: frames, (width, height), keyframe window (None: not suggested)."""
    frames = re.search(r"at most (\d+) fit at", text)
    size = re.search(r"--size \(at most about (\d+)x(\d+)", text)
    window = re.search(r"--keyframe-window \(at most about (\d+) keyframes", text)
    return (int(frames[1]) if frames else None, (int(size[1]), int(size[2])) if size else None,
            int(window[1]) if window else None)


def test_a_refusal_on_cpu_names_the_weights_and_the_call_and_its_fixes_fit(sd21_on_cpu):
    """12 GiB: the keyframe pass (25 keyframes x 3 branches in one call, which chunking cannot
    split) does not fit next to the weights, the store and the frames, at any chunk size."""
    available = 12 * GIB + CLIP
    with pytest.raises(ResourceError) as caught:
        _cpu_plan(sd21_on_cpu, available)
    text = str(caught.value)
    assert "not enough host memory for 200 frames at 512x512" in text and "\n" not in text
    assert "the model weights + the keyframe pass's activations at 25 keyframes per call alone take" in text
    assert "--dtype bfloat16" in text and "--device cuda" in text and "not even one 64x64" not in text
    frames, size, window = _suggested(text)
    assert frames and size and window, text
    # every number it suggests fits, and the next one up does not
    assert _cpu_plan(sd21_on_cpu, available, frames=frames).host.fits
    with pytest.raises(ResourceError):
        _cpu_plan(sd21_on_cpu, available, frames=frames + 1)
    assert size[0] == size[1] and _cpu_plan(sd21_on_cpu, available, side=size[0]).host.fits
    with pytest.raises(ResourceError):
        _cpu_plan(sd21_on_cpu, available, side=size[0] + 8)
    windowed = _cpu_plan(sd21_on_cpu, available, window=window)
    assert windowed.host.need <= windowed.host.usable and windowed.keyframe_call == window
    with pytest.raises(ResourceError):
        _cpu_plan(sd21_on_cpu, available, window=window + 1)


def test_when_the_weights_alone_do_not_fit_no_smaller_clip_is_suggested(sd21_on_cpu):
    """Nothing left once the model is loaded (MemAvailable 0, 8 frames): no --size or --frames
    shrinks the weights; the refusal says so and names what does (--dtype, a GPU)."""
    with pytest.raises(ResourceError) as caught:
        _cpu_plan(sd21_on_cpu, _frames_bytes(8, SD_SIDE), frames=8)
    text = str(caught.value)
    assert re.search(r"the model weights \+ .* call's activations at 1 frame per call alone take", text), text
    assert text.endswith("Use --dtype bfloat16 (half the weights and activations); or a GPU (--device cuda: the "
                         "weights and activations then live in its memory)"), text


def test_a_forced_chunk_that_does_not_fit_is_refused_not_shrunk(sd21_on_cpu):
    plan = _cpu_plan(sd21_on_cpu, 16 * GIB + CLIP)
    with pytest.raises(ResourceError) as caught:
        _cpu_plan(sd21_on_cpu, 16 * GIB + CLIP, inversion_frames=200)
    text = str(caught.value)
    assert "an inversion call's activations at 200 frames per call" in text
    most = int(re.search(r"--inversion-batch-size \(at most about (\d+) frames per call fit\)", text)[1])
    assert abs(most - plan.inversion_frames) <= 1, (most, plan.inversion_frames)
    assert _cpu_plan(sd21_on_cpu, 16 * GIB + CLIP, inversion_frames=most).host.fits


# --- the CLI ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["edit", "invert", "plan"])
def test_an_absurd_size_is_refused_before_decoding_or_loading(command, tmp_path, tiny_model_dir, sample_clip):
    out = tmp_path / "o.mp4"
    args = ["edit" if command == "plan" else command, sample_clip, "--model", tiny_model_dir, "--size", "65536x65536",
            "--device", "cpu", "--log-json"] + (["--prompt", "x", "-o", out] if command == "edit" else []) \
        + (["--plan"] if command == "plan" else [])
    run = tokenflow(*args)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 6 and len(lines) == 1, run.stderr
    line = lines[0]
    assert line.startswith("tokenflow: error: not enough host memory for 12 frames at 65536x65536"), line
    assert "GiB" in line and "usable" in line and "--size" in line, line
    events = [json.loads(e) for e in run.stdout.splitlines() if e.startswith("{")]
    stages = {e.get("stage") for e in events if e["event"] == "stage_start"}
    assert not stages & {"read", "load", "plan"}, stages   # nothing decoded, no model loaded
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 6
    assert not out.exists() and not list(tmp_path.iterdir())   # no output, no lock



def test_the_host_check_comes_before_the_clip_model_loads(tmp_path, tiny_model_dir, sample_clip):
    """--clip-model names no model here: loading it would fail (another exit code, another
    message); the host check refuses first, having loaded nothing."""
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "x", "-o", tmp_path / "o.mp4",
                    "--size", "65536x65536", "--device", "cpu", "--report", tmp_path / "report",
                    "--clip-model", tmp_path / "no-such-clip")
    assert run.returncode == 6, run.stderr
    assert "not enough host memory for 12 frames at 65536x65536" in run.stderr and "clip" not in run.stderr.lower()

def test_a_modest_clip_passes_and_its_plan_shows_the_host_part(tmp_path, tiny_model_dir, sample_clip):
    out, latents = tmp_path / "o.mp4", tmp_path / "o.npy"
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "x", *FAST, "-o", out,
                    "--save-latents", latents, "--log-json", "--no-cache")
    assert run.returncode == 0, run.stderr
    plan = next(e for e in map(json.loads, run.stdout.splitlines()) if e["event"] == "plan")
    host = plan["host"]
    assert 0 < host["need"] <= host["usable"] and host["frames"] == 5 and host["peak_phase"] in (
        "hash", "invert", "edit", "decode", "write")
    saved = np.load(latents)
    assert host["parts"]["frames"] == 5 * 3 * 64 * 64 * 4                # the float32 clip
    assert host["parts"]["outputs"] == 5 * 3 * 64 * 64 * 4 + saved.nbytes   # the edited frames and latents
    assert os.path.getsize(out) > 0
