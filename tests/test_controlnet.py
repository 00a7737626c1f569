"""ControlNet through `tokenflow edit` (in process): tiny random-weight ControlNets built with
``ControlNetModel.from_unet`` from the tiny model's UNet, saved as diffusers folders and as a single
file in the original (LDM) key layout, loaded through the real paths.

Edits use 4 frames of 64x64, 4 inversion and 2 edit steps on the CPU. ``runs`` keeps the latents of
each distinct command line of this module, so tests that compare against the same edit share it.
"""
import json
import os
import re
import signal
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from tokenflow.app.cli import main

BASE = ["--prompt", "glass", "--inversion-prompt", "shapes", "--inversion-steps", "4", "--steps", "2",
        "--size", "64x64", "--frames", "4", "--keyframe-spacing", "2", "--device", "cpu"]
RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
              "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def ldm_key(key, layers):
    """diffusers ControlNet key -> the original (LDM) layout of ControlNet checkpoints (written by hand
    here, the inverse of what diffusers' single-file conversion reads)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": "input_hint_block.14", "controlnet_mid_block": "middle_block_out.0",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}   # SDXL
    prefix, leaf = key.rsplit(".", 1)
    if prefix in fixed:
        return f"{fixed[prefix]}.{leaf}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", prefix):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{leaf}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", prefix):
        return f"zero_convs.{m[1]}.0.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(\w+)(.*)", key):
        index = 1 + int(m[1]) * (layers + 1) + int(m[3])
        if m[2] == "resnets":
            return f"input_blocks.{index}.0.{RESNET_LDM[m[4]]}{m[5]}"
        return f"input_blocks.{index}.1.{m[4]}{m[5]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{RESNET_LDM[m[2]]}{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    raise AssertionError(f"no LDM name for {key}")


def write_ldm_file(net, path):
    from safetensors.torch import save_file

    layers = net.config.layers_per_block
    save_file({f"control_model.{ldm_key(k, layers)}": v.contiguous() for k, v in net.state_dict().items()}, str(path))


def random_controlnet(unet, seed):
    from diffusers import ControlNetModel

    from tokenflow.models.random_weights import build_random

    return build_random(lambda: ControlNetModel.from_unet(unet, load_weights_from_unet=False), seed, "controlnet")


@pytest.fixture(scope="module")
def nets(tiny_sd, tmp_path_factory):
    """Folders A and B, A as one LDM-layout file, a ControlNet (folder and file) for another base
    model (cross_attention_dim 24), and a folder of 4 control images (80x80: resized to 64x64)."""
    from diffusers import UNet2DConditionModel

    from tokenflow.models import tiny

    root = tmp_path_factory.mktemp("controlnets")
    a, b = random_controlnet(tiny_sd.unet, 1), random_controlnet(tiny_sd.unet, 2)
    a.save_pretrained(root / "A", safe_serialization=True)
    b.save_pretrained(root / "B", safe_serialization=True)
    write_ldm_file(a, root / "A.safetensors")
    other = UNet2DConditionModel(**{**tiny.UNET_CONFIG, "cross_attention_dim": 24})
    wrong = random_controlnet(other, 3)
    wrong.save_pretrained(root / "sd-other", safe_serialization=True)
    write_ldm_file(wrong, root / "sd-other.safetensors")
    tiny_sd.unet.save_pretrained(root / "a-unet", safe_serialization=True)   # not a ControlNet
    (root / "half").mkdir()   # A's config, half of A's weights
    (root / "half" / "config.json").write_bytes((root / "A" / "config.json").read_bytes())
    weights = a.state_dict()
    save_file({k: v.contiguous() for k, v in list(weights.items())[: len(weights) // 2]},
              str(root / "half" / "diffusion_pytorch_model.safetensors"))
    images = root / "poses"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):   # numbered so that a plain sort would put frame10 first
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(images / f"frame{k * 3 + 1}.png")
    return root


@pytest.fixture(scope="module")
def runs():
    return {}


@pytest.fixture
def edit(tiny_model_dir, sample_clip, tmp_path, capsys, runs):
    """edit(*flags) -> (exit code, stderr, latents [N,4,h,w] or None); cached per command line."""

    def run(*flags, cached=True, outputs=None):
        key = tuple(map(str, flags))
        if cached and key in runs:
            return runs[key]
        out = outputs or tmp_path / f"out{len(os.listdir(tmp_path))}"
        out.mkdir(exist_ok=True)
        code = main(["edit", str(sample_clip), "--model", str(tiny_model_dir), *BASE, "-o", str(out / "e.mp4"),
                     "--save-latents", str(out / "l.npy"), *key])
        err = capsys.readouterr().err
        latents = np.load(out / "l.npy") if (out / "l.npy").exists() else None
        if code == 0:
            runs[key] = (code, err, latents)
        return code, err, latents

    return run


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_one_and_two_controlnets_change_the_edit_and_scale_zero_is_none(edit, nets):
    _, _, plain = edit()
    code, err, one = edit("--controlnet", nets / "A", "--control", "canny")
    assert code == 0, err
    assert "ControlNet 1: " in err and "canny edges (100/200)" in err
    assert rel(one, plain) > 1e-3                       # the control changes the output
    code, err, zero = edit("--controlnet", f"{nets / 'A'}:0", "--control", "canny")
    assert code == 0, err
    assert np.allclose(zero, plain, rtol=0, atol=1e-6)  # scale 0 is no ControlNet
    code, err, two = edit("--controlnet", nets / "A", "--control", "canny",
                          "--controlnet", f"{nets / 'B'}:0.5", "--control", nets / "poses")
    assert code == 0, err
    assert "ControlNet 2: " in err and "at scale 0.5" in err
    assert rel(two, one) > 1e-3 and np.isfinite(two).all()


def test_a_single_ldm_file_loads_offline_as_the_same_controlnet(edit, nets):
    _, _, folder = edit("--controlnet", nets / "A", "--control", "canny")
    code, err, single = edit("--controlnet", nets / "A.safetensors", "--control", "canny")
    assert code == 0, err
    assert np.array_equal(single, folder)


def test_a_4_channel_controlnet_file_runs_on_a_depth_model(edit, nets):
    """A depth UNet has 5 input channels; a ControlNet file made for SD 2 (4 channels) reads the latents."""
    code, err, latents = edit("--model", "tiny-depth", "--controlnet", nets / "A.safetensors", "--control", "canny",
                              cached=False)
    assert code == 0, err
    assert "ControlNet 1: " in err and np.isfinite(latents).all()


def test_several_prompts_share_the_controlnets_whatever_the_chunks(edit, nets, tmp_path):
    """Two prompts in one edit in chunks of 3 frames (3 + 1): the first prompt's latents are the one-prompt
    edit's (other chunks, another batch: the same result)."""
    flags = ("--controlnet", nets / "A", "--control", "canny")
    _, _, single = edit(*flags)
    out = tmp_path / "prompts"
    code, err, _ = edit(*flags, "--prompt", "marble", "--chunk-frames", "3", outputs=out)   # a second --prompt
    assert code == 0, err
    first, second = np.load(out / "l-1-glass.npy"), np.load(out / "l-2-marble.npy")
    assert rel(first, single) < 1e-5 and rel(second, first) > 1e-3


def test_keyframe_windows_with_a_controlnet_do_not_depend_on_the_chunks(edit, nets):
    """--keyframe-window 1 (each keyframe its own window: the residuals follow the keyframes into
    every window call) gives the same edit in chunks of 1 and of 3 propagated frames."""
    flags = ("--controlnet", nets / "A", "--control", "canny", "--keyframe-window", "1")
    _, _, whole = edit("--controlnet", nets / "A", "--control", "canny")
    code, err, one = edit(*flags, "--chunk-frames", "1")
    assert code == 0, err
    code, err, three = edit(*flags, "--chunk-frames", "3")
    assert code == 0, err
    assert rel(three, one) < 1e-5 and np.isfinite(one).all()
    assert rel(one, whole) > 1e-4   # windows change which keyframes attend together (docs/memory.md)


def test_control_window_follows_diffusers_control_guidance():
    from tokenflow.engine.conditioning import ControlUnit, UNetConditions

    steps = list(range(900, -1, -100))   # 10 steps
    unit = ControlUnit(net=torch.nn.Identity(), images=torch.zeros(1, 3, 8, 8, dtype=torch.uint8), scale=1.0, name="n")
    for start, end in [(0.0, 1.0), (0.2, 0.7), (0.5, 0.5), (0.0, 0.35)]:
        c = UNetConditions(controls=[unit], window=(start, end), timesteps=steps)
        n = len(steps)
        expected = [not (i / n < start or (i + 1) / n > end) for i in range(n)]   # diffusers' keep
        assert [c.controls_active(t) for t in steps] == expected
        assert c.controls_active(7)   # an inversion timestep: always
    # rows of a 3-branch pass of 4 frames: the source rows follow --control-during-inversion at every step
    # (the inversion was controlled at every step), the edit rows follow the window
    late = UNetConditions(controls=[unit], window=(0.0, 0.5), timesteps=steps)
    for source, t, expected in [(False, 900, (4, 12)), (False, 0, (0, 0)), (True, 900, (0, 12)), (True, 0, (0, 4))]:
        late.control_source = source
        assert late.controlled_rows(t, 12, 3, plain=False) == expected, (source, t)
    assert late.controlled_rows(0, 5, 1, plain=True) == (0, 0) and late.controlled_rows(7, 5, 1, plain=True) == (0, 5)


class RecordingNet(torch.nn.Module):
    """A stand-in ControlNet: residuals of ones, recording the rows, text and images of each call."""

    config = type("Config", (), {"in_channels": 4})()

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, sample, t, encoder_hidden_states, controlnet_cond, conditioning_scale, return_dict):
        self.calls.append((sample.shape[0], encoder_hidden_states[:, 0, 0].tolist(), controlnet_cond[:, 0, 0, 0].tolist()))
        ones = torch.ones(sample.shape[0], 2, 1, 1) * conditioning_scale
        return (ones, ones), ones


def test_residuals_reach_uncond_and_cond_and_the_source_only_when_it_was_inverted_with_them():
    from tokenflow.engine.conditioning import ControlUnit, UNetConditions

    m, branches = 2, 3   # rows [source x 2, uncond x 2, cond x 2] of frames 1 and 3
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 4, 4) * 50
    x, text = torch.zeros(m * branches, 4, 1, 1), torch.arange(m * branches).float().view(-1, 1, 1).expand(-1, 77, 8)
    frames = torch.tensor([1, 3])
    for control_source in (False, True):
        net = RecordingNet()
        c = UNetConditions(controls=[ControlUnit(net, images, 0.5, "n")], control_source=control_source)
        out = c.residuals(x, torch.tensor(10), text, frames, branches, plain=False)
        skip = 0 if control_source else m
        rows, texts, pixels = net.calls[0]
        assert rows == m * branches - skip and texts == list(range(skip, m * branches))
        assert pixels == pytest.approx([v / 255 for v in [50, 150] * (branches - skip // m)])   # each row's own frame
        mid = out["mid_block_additional_residual"][:, 0, 0, 0].tolist()
        assert mid == [0.0] * skip + [0.5] * (m * branches - skip)   # source rows: no residual
    plain = UNetConditions(controls=[ControlUnit(RecordingNet(), images, 1.0, "n")])
    assert plain.residuals(x[:m], torch.tensor(10), text[:m], slice(0, 2), 1, plain=True)[
        "mid_block_additional_residual"].flatten().tolist() == [1.0] * (2 * m)   # the inversion: every row


def test_control_during_inversion_is_another_inversion(edit, nets):
    """With a keyframe window and a control window too (every option in one edit)."""
    flags = ("--controlnet", nets / "A", "--control", "canny")
    edit()   # the plain inversion is in the cache
    _, _, edit_only = edit(*flags)
    code, err, during = edit(*flags, "--control-during-inversion", "--keyframe-window", "1", "--control-start", "0.5",
                             cached=False)
    assert code == 0, err
    assert "reusing cached latents" not in err and "also on the inversion" in err and "from 50% to 100%" in err
    assert np.isfinite(during).all() and rel(during, edit_only) > 1e-4


def test_checkpoint_and_resume_give_the_same_latents(edit, nets, tmp_path, monkeypatch):
    from tokenflow.io import progress

    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        pytest.skip("SIGTERM is ignored in this process")
    flags = ("--controlnet", nets / "A", "--control", "canny", "--controlnet", nets / "B", "--control", nets / "poses")
    _, _, reference = edit(*flags)
    real_event, sent = progress.Reporter.event, []

    def event(self, kind, **fields):   # SIGTERM as the edit begins (it stops after step 1), as a farm would
        real_event(self, kind, **fields)
        if not sent and kind == "progress" and fields.get("stage") == "edit" and fields.get("step") == 0:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(progress.Reporter, "event", event)
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed"
    common = (*flags, "--no-cache", "--checkpoint-dir", ckpt, "--checkpoint-every", "1")
    code, err, latents = edit(*common, cached=False, outputs=out)
    assert code == 75 and latents is None, err
    monkeypatch.setattr(progress.Reporter, "event", real_event)
    code, err, latents = edit(*common, "--resume", cached=False, outputs=out)
    assert code == 0 and "resuming the edit at step 1" in err, err
    assert np.array_equal(latents, reference)


def test_job_files_take_lists(edit, nets, tmp_path, tiny_model_dir, sample_clip, capsys):
    flags = ("--controlnet", nets / "A", "--control", "canny", "--controlnet", f"{nets / 'B'}:0.5",
             "--control", nets / "poses")
    _, _, reference = edit(*flags)
    lists = {"controlnet": [str(nets / "A"), f"{nets / 'B'}:0.5"], "control": ["canny", str(nets / "poses")]}
    job = tmp_path / "job.yaml"
    settings = {"video": str(sample_clip), "output": str(tmp_path / "job.mp4"), "save_latents": str(tmp_path / "j.npy"),
                "model": str(tiny_model_dir), "prompt": "glass", "inversion_prompt": "shapes", "inversion_steps": 4,
                "steps": 2, "size": "64x64", "frames": 4, "keyframe_spacing": 2, "device": "cpu", **lists}
    job.write_text(yaml.safe_dump(settings))   # controlnet: [A, B:0.5] and control: [canny, DIR] as YAML lists
    code = main(["run", str(job)])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "j.npy"), reference)


@pytest.mark.parametrize("flags,status,message", [
    (("--controlnet", "{A}"), 2, "1 controlnet(s) but 0 control(s)"),
    (("--controlnet", "{A}", "--control", "canny", "--control", "canny"), 2, "1 controlnet(s) but 2 control(s)"),
    (("--controlnet", "{nets}/sd-other", "--control", "canny"), 4, "made for another base model"),
    (("--controlnet", "{nets}/sd-other.safetensors", "--control", "canny"), 4, "made for another base model"),
    (("--controlnet", "{A}", "--control", "{nets}/poses", "--frames", "3"), 3, "holds 4 images but the edit has 3"),
    (("--controlnet", "{A}:-1", "--control", "canny"), 2, "scale -1.0 is out of range"),
    (("--controlnet", "{nets}/poses", "--control", "canny"), 4, "has no config.json"),
    (("--controlnet", "{nets}/a-unet", "--control", "canny"), 4, "is not a ControlNet: its config.json is a "
                                                               "UNet2DConditionModel's"),
    (("--controlnet", "{nets}/half", "--control", "canny"), 4, "incomplete"),   # "lacks N of its weights" here
])
def test_bad_controlnets_are_refused_before_any_work(edit, nets, flags, status, message):
    flags = [f.format(A=nets / "A", nets=nets) for f in flags]
    code, err, latents = edit(*flags, cached=False)
    lines = [line for line in err.splitlines() if line.startswith("tokenflow: error:")]
    assert code == status and len(lines) == 1 and message in lines[0], err
    assert latents is None and "invert:" not in err


def test_graph_backends_are_refused_before_anything_is_read_or_loaded(nets, sample_clip, tiny_model_dir, capsys):
    for backend in ("compile", "aot", "onnx", "tensorrt"):
        code = main(["edit", str(sample_clip), "--model", str(tiny_model_dir), *BASE, "--log-json", "--backend", backend,
                     "--controlnet", str(nets / "A"), "--control", "canny"])
        out, err = capsys.readouterr()
        events = [json.loads(line) for line in out.splitlines()]
        assert code == 2 and f"backend: {backend} cannot run ControlNets" in err, err
        assert [e["event"] for e in events] == ["start", "error"]   # nothing read, nothing loaded


def test_without_opencv_canny_names_the_install(edit, nets, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    code, err, _ = edit("--controlnet", nets / "A", "--control", "canny", cached=False)
    assert code == 2 and "pip install opencv-python-headless" in err


def test_control_images_and_scale_parsing():
    from tokenflow.io.control_images import canny_images, depth_images
    from tokenflow.models.controlnet import parse_spec

    assert parse_spec("lllyasviel/sd-controlnet-canny") == parse_spec("lllyasviel/sd-controlnet-canny:1")
    assert parse_spec(r"C:\nets\canny.safetensors:0.5").model == r"C:\nets\canny.safetensors"
    assert parse_spec(r"C:\nets\canny.safetensors").scale == 1.0
    assert parse_spec("./nets/a:b:.25").scale == 0.25 and parse_spec("./nets/a:b:.25").model == "./nets/a:b"
    raw = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]]])
    d = depth_images(raw, (2, 2))
    assert d.shape == (2, 3, 2, 2) and d.dtype == torch.uint8
    assert depth_images(raw, (6, 4)).shape == (2, 3, 4, 6)   # DPT's resolution -> the frame size
    assert d[0, 0].tolist() == [[0, 63], [127, 255]] and d[1].max() == 0   # (d - min) / (max - min) * 255, floored
    frames = torch.zeros(1, 3, 32, 32)
    frames[..., 8:24, 8:24] = 1
    edges = canny_images(frames, 100, 200)
    assert edges.shape == (1, 3, 32, 32) and set(edges.unique().tolist()) == {0, 255}
    assert torch.equal(edges[:, 0], edges[:, 2])


def test_controlnet_attention_keeps_diffusers_processors(tiny_sd, nets):
    """Our processors go on the UNet only; the ControlNet is a separate module, left alone."""
    from tokenflow.method.control import _load
    from tokenflow.method.editor import Editor

    editor = Editor(tiny_sd)
    try:
        net, identity = _load(editor, str(nets / "A"), False)
        assert _load(editor, str(nets / "A"), False)[0] is net   # loaded once per editor
        kinds = {type(p).__module__.split(".")[0] for p in net.attn_processors.values()}
        assert kinds == {"diffusers"} and not net.training
        assert not any(p.requires_grad for p in net.parameters())
    finally:
        editor.tokenflow.remove()


def test_control_depth_uses_the_raw_depth_maps(edit, nets, tmp_path):
    """--control depth: the depth maps of method.depth.raw_depth_maps (here --depth-maps on a model
    without a depth input), normalised per frame."""
    raw = np.random.default_rng(1).random((4, 64, 64), dtype=np.float32)
    np.save(tmp_path / "raw.npy", raw)
    code, err, latents = edit("--controlnet", nets / "A", "--control", "depth", "--depth-maps", tmp_path / "raw.npy",
                              cached=False)
    assert code == 0, err
    assert "depth (normalised per frame)" in err and np.isfinite(latents).all()


def test_the_skip_rule_compares_condition_inputs_by_content(nets, sample_clip, tmp_path):
    """Depth maps, control image folders and ControlNet weights regenerated at the same path make
    another job; copies elsewhere (another node) are the same; Hub ids and built-ins stay as named."""
    import shutil

    from tokenflow.app.skip import job_fields
    from tokenflow.config import EditConfig

    maps = tmp_path / "raw.npy"
    np.save(maps, np.ones((4, 8, 8), np.float32))
    poses = tmp_path / "poses"
    shutil.copytree(nets / "poses", poses)
    config = EditConfig(video=sample_clip, prompt="x", depth_maps=str(maps),
                        controlnet=(f"{nets / 'A.safetensors'}:0.5", "owner/net"), control=(str(poses), "canny"))
    before = job_fields(config)["condition_inputs"]
    assert before["controlnet"][1] == "owner/net" and before["control"][1] == "canny"
    copy = tmp_path / "copy"
    shutil.copytree(poses, copy)
    assert job_fields(config.replace(control=(str(copy), "canny")))["condition_inputs"] == before
    np.save(maps, np.zeros((4, 8, 8), np.float32))
    assert job_fields(config)["condition_inputs"]["depth_maps"] != before["depth_maps"]
    (poses / "frame1.png").write_bytes((poses / "frame4.png").read_bytes())
    assert job_fields(config)["condition_inputs"]["control"] != before["control"]
    assert "condition_inputs" not in job_fields(EditConfig(video=sample_clip, prompt="x"))


def test_a_hub_controlnet_for_another_base_model_is_refused_before_its_weights_download(nets, tiny_sd, monkeypatch):
    """A Hub id: its config.json is fetched alone and checked against the base model first; only a
    fitting ControlNet's weights are then downloaded (the Hub stood in for by the local folders)."""
    import huggingface_hub

    from tokenflow.errors import ModelError
    from tokenflow.models.controlnet import load_controlnet

    asked = []

    def snapshot(repo_id, allow_patterns=None, **kw):
        asked.append((repo_id, tuple(allow_patterns or ())))
        return str(nets / ("sd-other" if repo_id == "someone/other-base" else "A"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    with pytest.raises(ModelError, match="made for another base model"):
        load_controlnet("someone/other-base", tiny_sd.unet, "cpu", torch.float32)
    assert asked == [("someone/other-base", ("config.json",))]   # no weights fetched
    asked.clear()
    net, _ = load_controlnet("someone/fits", tiny_sd.unet, "cpu", torch.float32)
    assert [patterns for _, patterns in asked] == [("config.json",), ("config.json", "diffusion_pytorch_model.safetensors")]
    assert sum(p.numel() for p in net.parameters()) > 0
