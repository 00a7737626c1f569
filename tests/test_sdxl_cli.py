"""SDXL on the command line (``tokenflow.app.cli.main``, as a user runs it) with the tiny SDXL
folder: PnP and SDEdit edits end to end, several prompts, keyframe windows, the default size, which
VAE ran in which dtype, the inversion cache, and one-line errors for what cannot work."""
import dataclasses
import json

import av
import numpy as np
import pytest
import torch

from tokenflow.app.cli import main
from tokenflow.app.jobs import vae_facts
from tokenflow.config import SD_VERSIONS, EditConfig, default_size
from tokenflow.io.cache import InversionCache
from tokenflow.io.read import read_video
from tokenflow.method.editor import Editor
from tokenflow.models.load import family_of, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny-model calls: see tests/conftest.py
FAST = ["--frames", "4", "--size", "64x64", "--steps", "2", "--inversion-steps", "2", "--device", "cpu",
        "--keyframe-spacing", "2", "--inversion-prompt", "shapes", "--log-json"]


def edit(capsys, *args):
    code = main(["edit", *map(str, args)])
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return code, events, err


def _size(path):
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        return sum(1 for _ in c.decode(video=0)), (stream.width, stream.height)


def test_pnp_edit_with_two_prompts_and_keyframe_windows(tmp_path, capsys, tiny_xl_dir, sample_clip):
    code, events, err = edit(capsys, sample_clip, "--model", tiny_xl_dir, "--prompt", "glass", "--prompt", "marble",
                             "--keyframe-window", "1", *FAST, "-o", f"{tmp_path / 'out'}/")
    assert code == 0, err
    done = [e for e in events if e["event"] == "done"][0]
    assert len(done["outputs"]) == 2 and done["prompts"] == ["glass", "marble"]
    assert all(_size(out) == (4, (64, 64)) for out in done["outputs"])
    assert done["vae"] == {"name": "the model's own", "dtype": "float32", "upcast": False}


def test_sdedit_with_another_vae_and_the_inversion_cache(tmp_path, capsys, tiny_xl_dir, sample_clip):
    """SDEdit (3 steps: 0.9 of 2 is too few), --vae (here the model's own folder: the summary names
    it); the second run reuses the first's inversion (same model, VAE, size and so time ids)."""
    vae = tiny_xl_dir / "vae"
    args = [sample_clip, "--model", tiny_xl_dir, "--prompt", "glass", "--method", "sdedit", "--vae", vae,
            *FAST[:-1], "--steps", "3", "--inversion-steps", "3"]
    code, _, err = edit(capsys, *args, "-o", tmp_path / "a.mp4")
    assert code == 0, err
    assert _size(tmp_path / "a.mp4") == (4, (64, 64))
    assert f"  vae: {vae}, float32\n" in err
    code, events, err = edit(capsys, *args, "--log-json", "-o", tmp_path / "b.mp4")
    assert code == 0, err
    assert any("reusing cached latents" in e.get("message", "") for e in events)
    done = [e for e in events if e["event"] == "done"][0]
    assert done["vae"] == {"name": str(vae), "dtype": "float32", "upcast": False} and done["method"] == "sdedit"


@pytest.mark.parametrize("vae,why", [("missing-vae-dir/", "is not a diffusers VAE folder"),
                                     ("unet", "VAE"),
                                     ("empty", "is not a diffusers VAE folder")])
def test_bad_vae_is_one_line(tmp_path, capsys, tiny_xl_dir, sample_clip, vae, why):
    path = {"unet": tiny_xl_dir / "unet", "empty": tmp_path / "empty"}.get(vae, tmp_path / vae)
    if vae == "empty":
        path.mkdir()
    code, _, err = edit(capsys, sample_clip, "--model", tiny_xl_dir, "--prompt", "glass", "--vae", path, *FAST,
                        "-o", tmp_path / "v.mp4")
    lines = err.strip().splitlines()
    assert code != 0 and lines[-1].startswith("tokenflow: error:") and why in lines[-1] and str(path) in lines[-1], err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("flag", ["--depth-model", "--depth-maps"])
def test_depth_options_with_sdxl_are_refused_before_loading(tmp_path, capsys, tiny_xl_dir, sample_clip, flag):
    value = "Intel/dpt-hybrid-midas" if flag == "--depth-model" else tmp_path / "maps.npy"
    np.save(tmp_path / "maps.npy", np.ones((4, 64, 64), dtype=np.float32))
    code, _, err = edit(capsys, sample_clip, "--model", tiny_xl_dir, "--prompt", "glass", flag, value,
                        *FAST[:-1], "-o", tmp_path / "d.mp4")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"tokenflow: error: {flag}") and "SDXL" in lines[0], err
    assert not (tmp_path / "d.mp4").exists()


def test_family_is_known_before_anything_loads(tiny_xl_dir, tiny_model_dir):
    assert family_of(str(tiny_xl_dir)) == family_of("tiny-xl:3") == family_of("xl") == "sdxl"
    assert family_of(SD_VERSIONS["xl"]) == "sdxl"
    assert family_of(str(tiny_model_dir)) == family_of("tiny") == family_of("2.1") == "sd"
    assert family_of("no/such-model") == family_of("/no/such/folder") == "sd"


def test_default_size_is_twice_the_originals_for_sdxl(sample_clip):
    assert default_size(640, 640, "sdxl") == (1024, 1024) and default_size(640, 640) == (512, 512)
    assert default_size(1920, 1080, "sdxl") == (1344, 768) and default_size(1080, 1920, "sdxl") == (768, 1344)
    assert default_size(1920, 1080) == (672, 384)
    clip = read_video(sample_clip, frames=1, family="sdxl")   # a 96x64 source
    assert clip.frames.shape[-2:] == (768, 1344)


def test_sdxl_vae_runs_in_float32_under_bfloat16(tiny_xl_dir):
    model = load_model(str(tiny_xl_dir), torch.device("cpu"), torch.bfloat16)
    assert model.vae_upcast and next(model.vae.parameters()).dtype == torch.float32
    assert next(model.unet.parameters()).dtype == torch.bfloat16
    editor = Editor(model, cache=InversionCache(enabled=False))
    try:
        assert vae_facts(editor) == {"name": "the model's own", "dtype": "float32", "upcast": True}
        frames = torch.rand(2, 3, 64, 64)
        z = editor.encode(frames)
        assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
        assert torch.isfinite(editor.decode(z)).all()
    finally:
        editor.tokenflow.remove()


class _RecordingCache(InversionCache):
    """The cache, recording the keys it is asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys = []

    def load(self, key, *args, **kwargs):
        self.keys.append(key)
        return super().load(key, *args, **kwargs)


def test_inversion_cache_key_changes_with_size_and_model(tmp_path, tiny_xl, tiny_sd, sample_clip):
    """Size (and so the time ids, which are the frame size) and model identity are in the key."""
    keys = []
    for model, size in ((tiny_xl, (64, 64)), (tiny_xl, (64, 128))):
        cache = _RecordingCache(root=tmp_path / "cache")
        editor = Editor(model, cache=cache)
        try:
            config = EditConfig(prompt="glass", inversion_prompt="shapes", frames=2, size=size, inversion_steps=2,
                                steps=2, device="cpu")
            editor.invert(sample_clip, config=config)
        finally:
            editor.tokenflow.remove()
        keys.append(cache.keys[0])
    assert keys[0].size == (64, 64) and keys[1].size == (64, 128) and keys[0].digest() != keys[1].digest()
    assert keys[0].model == tiny_xl.identity != tiny_sd.identity   # another model: another key
    assert dataclasses.replace(keys[0], model=tiny_sd.identity).digest() != keys[0].digest()


def test_a_hub_model_that_turns_out_sdxl_is_read_at_sdxl_size(tmp_path, capsys, monkeypatch, tiny_xl_dir, sample_clip):
    """A Hub fine-tune not downloaded yet is taken for SD before the load (family_of cannot read its
    config), so the frames are first read at SD's default size; once the load shows SDXL, without
    --size they are read again at SDXL's (stood in for here by making family_of guess SD)."""
    from tokenflow.app import jobs
    from tokenflow.io.progress import Reporter

    monkeypatch.setattr(jobs, "family_of", lambda model: "sd")
    sd_size, xl_size = default_size(96, 64), default_size(96, 64, "sdxl")
    assert sd_size != xl_size
    code, events, err = edit(capsys, sample_clip, "--model", tiny_xl_dir, "--plan", "--frames", "2", "--device", "cpu",
                             "--log-json")
    assert code == 0, err
    assert any("is an SDXL model (known once it loaded): reading the frames again" in e.get("message", "") for e in events)
    (plan,) = [e for e in events if e["event"] == "plan"]
    assert plan["latent_size"] == [xl_size[1] // 8, xl_size[0] // 8]
    config = EditConfig(video=str(sample_clip), model=str(tiny_xl_dir), frames=2, device="cpu", prompt="x")
    host = jobs.check_host_memory(config, 1, "cpu")
    clip, editor = jobs.read_and_load(config, Reporter(quiet=True), host, 1, "cpu")
    assert tuple(clip.frames.shape[-1:-3:-1]) == xl_size and editor.model.family == "sdxl"
    sized = config.replace(size=(64, 64))   # a --size is kept
    clip, _ = jobs.read_and_load(sized, Reporter(quiet=True), jobs.check_host_memory(sized, 1, "cpu"), 1, "cpu")
    assert tuple(clip.frames.shape[-2:]) == (64, 64)
