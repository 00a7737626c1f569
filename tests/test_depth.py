"""SD 2 depth models on the CLI (``tokenflow edit --model tiny-depth``): depth maps from a .npy, a
folder of 16-bit PNGs or the model's own (tiny, random) DPT; per-frame vs per-clip normalisation;
depth maps in the inversion cache key; one-line errors for bad maps; the layout check; the compile
backend on a depth UNet. Tiny sizes: 4 frames 64x64, 4 inversion + 2 edit steps.

Parity with the original's depth variant: tests/test_golden_depth.py.
"""
import numpy as np
import pytest
import torch

from tokenflow.app.cli import main
from tokenflow.errors import ModelError
from tokenflow.io.samples import make_sample_clip

FRAMES, SIZE = 4, 64


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_sample_clip(str(tmp_path_factory.mktemp("clip") / "clip.mp4"), n_frames=FRAMES, size=(SIZE, SIZE),
                            fps=12)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Raw maps with uint16 values (so the PNGs hold them exactly): a .npy and a PNG folder whose names
    sort differently as text (d10 before d8) than by number."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("depth")
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    maps = np.stack([(1000 + 300 * y + 100 * x + 2000 * f * (x > 32)) for f in range(FRAMES)]).astype(np.uint16)
    np.save(folder / "raw.npy", maps.astype(np.float32))
    pngs = folder / "pngs"
    pngs.mkdir()
    for index, depth_map in enumerate(maps):
        Image.fromarray(depth_map).save(pngs / f"d{index + 8}.png")
    other = maps.astype(np.float32)[:, ::-1].copy()   # upside down: another depth
    np.save(folder / "other.npy", other)
    return {"npy": folder / "raw.npy", "pngs": pngs, "other": folder / "other.npy", "maps": maps, "dir": folder}


def edit(clip, out, *extra, model="tiny-depth"):
    """`tokenflow edit` arguments writing out/edit.mp4 and out/latents.npy."""
    return ["edit", str(clip), "--model", model, "--prompt", "glass", "--inversion-prompt", "shapes",
            "--inversion-steps", "4", "--steps", "2", "--size", f"{SIZE}x{SIZE}", "--frames", str(FRAMES),
            "--keyframe-spacing", "2", "--device", "cpu", "-o", str(out / "edit.mp4"),
            "--save-latents", str(out / "latents.npy"), *map(str, extra)]


def run_ok(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    return np.load(args[args.index("--save-latents") + 1]), err


def run_fails(args, capsys, code, *words):
    """A one-line `tokenflow: error:` naming ``words``, exit ``code``, no output written."""
    assert main(args) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tokenflow: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    out = args[args.index("-o") + 1]
    assert not __import__("os").path.exists(out)
    return lines[0]


@pytest.fixture(scope="module")
def npy_edit(clip, raw, tmp_path_factory):
    """The edit with the .npy maps (run once; compared with by several tests)."""
    out = tmp_path_factory.mktemp("npy")
    assert main(edit(clip, out, "--depth-maps", raw["npy"])) == 0
    return np.load(out / "latents.npy")


def test_png_folder_gives_the_npy_edit_and_the_maps_are_used(clip, raw, npy_edit, tmp_path, capsys):
    latents, err = run_ok(edit(clip, tmp_path / "png", "--depth-maps", raw["pngs"]), capsys)
    np.testing.assert_array_equal(latents, npy_edit)      # same values, PNGs read in numeric order
    assert "depth: --depth-maps" in err and "normalised per frame" in err
    other, _ = run_ok(edit(clip, tmp_path / "other", "--depth-maps", raw["other"]), capsys)
    assert np.abs(other - npy_edit).max() > 1e-3           # the depth channel changes the edit


def test_another_map_is_another_inversion(clip, raw, npy_edit, tmp_path, capsys):
    """The npy edit cached its inversion: the same maps reuse it, other maps (or the clip
    normalisation) invert again and give another edit."""
    same, err = run_ok(edit(clip, tmp_path / "same", "--depth-maps", raw["npy"]), capsys)
    assert "reusing cached latents" in err
    np.testing.assert_array_equal(same, npy_edit)
    shifted = tmp_path / "shifted.npy"
    np.save(shifted, np.roll(raw["maps"].astype(np.float32), 7, axis=2))
    _, err = run_ok(edit(clip, tmp_path / "shifted", "--depth-maps", shifted), capsys)
    assert "reusing cached latents" not in err
    whole, err = run_ok(edit(clip, tmp_path / "clip", "--depth-maps", raw["npy"], "--depth-normalize", "clip"), capsys)
    assert "reusing cached latents" not in err and "normalised per clip" in err
    assert np.abs(whole - npy_edit).max() > 1e-3


def test_builtin_dpt_estimates_the_depth(clip, tmp_path, capsys):
    latents, err = run_ok(edit(clip, tmp_path), capsys)
    assert "depth: estimated with DPT (the model's depth_estimator/)" in err
    assert latents.shape == (FRAMES, 4, SIZE // 8, SIZE // 8) and np.isfinite(latents).all()


def test_dpt_depth_is_resized_once_to_the_latent_size(clip):
    """As the original: the network's prediction goes straight to the latent size (one bicubic
    resize), not through the frame size first."""
    from tokenflow.config import EditConfig
    from tokenflow.io.read import read_video
    from tokenflow.method.depth import depth_condition, depth_estimator, normalise_depth
    from tokenflow.method.editor import Editor
    from tokenflow.models.depth_estimator import estimate_depth

    editor = Editor.from_pretrained("tiny-depth", device="cpu", use_cache=False)
    frames = read_video(str(clip), frames=FRAMES, size=(96, 64))
    maps, _, _ = depth_condition(editor, frames, EditConfig())
    raw = estimate_depth(depth_estimator(editor, EditConfig()), frames.frames)
    assert raw.shape[0] == FRAMES and tuple(raw.shape[1:]) != (64, 96)   # the network's own resolution
    assert torch.equal(maps.cpu(), normalise_depth(raw, (8, 12)))
    editor.tokenflow.remove()


def test_normalisation_is_the_originals():
    """Bicubic (no antialias) to the latent size, then min/max after the resize: per frame each map
    spans exactly [-1, 1]; per clip only the clip does."""
    from tokenflow.method.depth import normalise_depth

    g = torch.Generator().manual_seed(0)
    raw = torch.rand(3, 40, 24, generator=g) * torch.tensor([1.0, 3.0, 10.0]).view(3, 1, 1)
    maps = normalise_depth(raw, (5, 3), "frame")
    d = torch.nn.functional.interpolate(raw[:, None], size=(5, 3), mode="bicubic", align_corners=False)
    for i in range(3):
        lo, hi = d[i].min(), d[i].max()
        assert torch.equal(maps[i], 2.0 * (d[i] - lo) / (hi - lo) - 1.0)
    assert maps.shape == (3, 1, 5, 3) and maps.dtype == torch.float32
    whole = normalise_depth(raw, (5, 3), "clip")
    assert whole.min() == -1 and whole.max() == 1 and whole[0].max() < 0.5 < whole[2].max()


@pytest.mark.parametrize("problem, words", [
    ("count", ["has 3 depth maps", "the edit has 4 frames"]),
    ("shape", ["32x32", "frame size"]),
    ("nan", ["NaN", "map 2"]),
    ("garbage", ["cannot be read"]),
    ("missing", ["does not exist"]),
    ("colour", ["single-channel"]),
    ("constant", ["constant"]),
])
def test_bad_depth_maps_are_one_line_errors(clip, raw, tmp_path, capsys, problem, words):
    from PIL import Image

    maps = raw["maps"].astype(np.float32)
    path = tmp_path / "maps.npy"
    if problem == "count":
        np.save(path, maps[:3])
    elif problem == "shape":
        np.save(path, maps[:, :32, :32])
    elif problem == "nan":
        maps[2, 5, 5] = np.nan
        np.save(path, maps)
    elif problem == "garbage":
        path.write_bytes(b"not a numpy file")
    elif problem == "missing":
        path = tmp_path / "nowhere.npy"
    elif problem == "colour":
        path = tmp_path / "pngs"
        path.mkdir()
        for i in range(FRAMES):
            Image.new("RGB", (SIZE, SIZE)).save(path / f"{i}.png")
    else:
        np.save(path, np.ones_like(maps))
    line = run_fails(edit(clip, tmp_path / "out", "--depth-maps", path), capsys, 3, "--depth-maps", *words)
    assert str(path) in line or problem == "colour"


def test_depth_maps_need_a_depth_model_and_a_missing_dpt_says_how_to_get_it(clip, raw, tmp_path, capsys):
    run_fails(edit(clip, tmp_path / "a", "--depth-maps", raw["npy"], model="tiny"), capsys, 2,
              "no depth model", "--model 2-depth")
    run_fails(edit(clip, tmp_path / "b", "--depth-model", "Intel/dpt-hybrid-midas"), capsys, 4,
              "Intel/dpt-hybrid-midas", "download Intel/dpt-hybrid-midas", "--depth-maps")
    run_fails(edit(clip, tmp_path / "c", "--depth-model", tmp_path / "no-dpt"), capsys, 4,
              "--depth-model", "does not exist")


def test_layout_check_takes_depth_unets_and_names_other_channel_counts(tmp_path):
    from diffusers import UNet2DConditionModel

    from tokenflow.models import tiny
    from tokenflow.models.load import HUB_ALLOW_PATTERNS, model_kind
    from tokenflow.models.unet_layout import check_unet_layout

    check_unet_layout(UNet2DConditionModel(**tiny.DEPTH_UNET_CONFIG), "depth")
    with pytest.raises(ModelError, match="9 input channels instead of 4 .or 5 for a depth model.*inpainting"):
        check_unet_layout(UNet2DConditionModel(**dict(tiny.UNET_CONFIG, in_channels=9)), "inpaint")
    with pytest.raises(ModelError, match="8 output channels instead of 4"):
        check_unet_layout(UNet2DConditionModel(**dict(tiny.DEPTH_UNET_CONFIG, out_channels=8)), "wide")
    assert "depth_estimator/model.safetensors" in HUB_ALLOW_PATTERNS
    assert "feature_extractor/*.json" in HUB_ALLOW_PATTERNS
    assert model_kind("tiny-depth:3") == ("tiny", "3")
    assert tiny.tiny_identity(0, depth=True) != tiny.tiny_identity(0)


def test_compile_backend_gives_the_eager_depth_edit(clip, raw, npy_edit, tmp_path, capsys, monkeypatch):
    """torch.compile's graphs take the 5-channel input (dynamo captures the graphs and runs them
    eagerly: no code generation; tests/test_compile_graphs.py covers the compilers themselves)."""
    monkeypatch.setenv("TOKENFLOW_COMPILER", "eager")
    latents, err = run_ok(edit(clip, tmp_path, "--depth-maps", raw["npy"], "--backend", "compile", "--no-cache"),
                          capsys)
    assert "UNet: compile" in err
    np.testing.assert_allclose(latents, npy_edit, rtol=0, atol=1e-4 * np.abs(npy_edit).max())


def test_outputs_never_overwrite_the_depth_maps(clip, raw, tmp_path, capsys):
    import shutil

    maps = tmp_path / "maps.npy"
    shutil.copy(raw["npy"], maps)
    before = maps.read_bytes()
    args = edit(clip, tmp_path, "--depth-maps", maps, "--overwrite")
    args[args.index("--save-latents") + 1] = str(maps)
    assert main(args) == 5
    err = capsys.readouterr().err
    assert "depth maps" in err and maps.read_bytes() == before


def test_job_file_depth_keys(tmp_path):
    from tokenflow.app.jobfile.load import load_job

    job = tmp_path / "jobs" / "depth.yaml"
    job.parent.mkdir()
    job.write_text("video: clip.mp4\noutput: out.mp4\nprompt: glass\nmodel: tiny-depth\n"
                   "depth-maps: maps/raw.npy\ndepth_model: Intel/dpt-hybrid-midas\ndepth_normalize: clip\n")
    config = load_job(str(job)).config
    assert config.depth_maps == str(job.parent / "maps" / "raw.npy")   # relative to the job file
    assert config.depth_model == "Intel/dpt-hybrid-midas"                # a Hub id stays one
    assert config.depth_normalize == "clip" and config.model == "tiny-depth"


def test_a_2_depth_single_file_edits_like_its_folder(tmp_path, clip, raw, capsys):
    """The tiny depth model as one LDM-layout file (5-channel UNet input), with --model-config
    pointing at its folder's configs and tokenizer: the CLI edit equals the folder's, bit for bit."""
    from tests.ldm_layout import write_ldm_checkpoint
    from tokenflow.models.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny-depth", seed=0, depth=True)
    single = write_ldm_checkpoint(folder, tmp_path / "tiny-depth.safetensors")
    outs = {name: tmp_path / name for name in ("folder", "file")}
    for out in outs.values():
        out.mkdir()
    from_folder, _ = run_ok(edit(clip, outs["folder"], "--depth-maps", raw["npy"], model=str(folder)), capsys)
    from_file, _ = run_ok(edit(clip, outs["file"], "--depth-maps", raw["npy"], "--model-config", folder, model=str(single)),
                          capsys)
    assert np.array_equal(from_file, from_folder), float(np.abs(from_file - from_folder).max())
