"""Golden test of the SD 2 depth variant: a seeded tiny-depth CPU float32 edit with given raw depth
maps must reproduce the ORIGINAL implementation in ``sd_version: depth`` mode.

Same clip, settings and comparison as ``test_golden_original.py`` (8 frames 96x64, batch 4: the
original floors the frame count to a multiple of its batch size, 8 is one), on the tiny DEPTH model
(``build_tiny_model(DIR, seed=0, depth=True)``, i.e. ``--model tiny-depth``: 5-channel UNet) with the
raw maps of ``make_raw_depth`` given as ``--depth-maps raw.npy`` (what the original's MiDaS call
returns, at frame resolution; the harness serves them to the original's own ``prepare_depth_maps``,
which resizes and normalises them itself). Pinned: the maps entering the UNet (bitwise), the
keyframe draws (exactly), the final latents (relative L2 <= 1e-4 on 256 recorded positions).

Recorded with ``scripts/record_golden.py`` (its docstring has the commands; provenance in the JSON):
the original (omerbt/TokenFlow, via shared/reference/run_reference.py --sd_version depth --raw_depth,
CPU, float32, one thread, diffusers 0.42.1 / transformers 5). Measured: maps bitwise equal, final
latents 8.1e-6 relative L2 (max abs 5.8e-5, values up to 5.5), keyframes equal.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_golden_original import (
    check_against_golden,
    make_golden_frames,
    tiny_weights_sha256,
    write_golden_frames,
)

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_original_depth.json"


def make_raw_depth(frames: np.ndarray) -> np.ndarray:
    """float32 ``[N, H, W]`` raw "inverse depth" (larger = nearer) of uint8 frames ``[N, H, W, 3]``:
    ``10 + 20 v + 5 u + 15 luma`` (v, u: pixel-centre row / column fractions, luma in [0, 1]); only
    exact integer sums and correctly rounded float64 operations, so the same bytes everywhere."""
    f = np.asarray(frames).astype(np.int64)
    _, height, width, _ = f.shape
    luma = (299 * f[..., 0] + 587 * f[..., 1] + 114 * f[..., 2]).astype(np.float64)
    v = (np.arange(height)[:, None] + 0.5) / height
    u = (np.arange(width)[None, :] + 0.5) / width
    return (10 + 20 * v + 5 * u + 15 * luma / 255000.0).astype(np.float32)


def array_sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    digest = hashlib.sha256(f"{a.dtype.str}|{list(a.shape)}|".encode())
    digest.update(a.tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def depth_model_dir(tmp_path_factory):
    from tokenflow.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd-depth", seed=0, depth=True)


@pytest.fixture(scope="module")
def golden_inputs(golden, tmp_path_factory):
    s = golden["settings"]
    frames = make_golden_frames(s["n_frames"], s["W"], s["H"], golden["input"]["generator_seed"])
    raw = make_raw_depth(frames)
    assert array_sha256(raw) == golden["depth"]["raw"]["sha256"], "make_raw_depth changed (re-record)"
    folder = tmp_path_factory.mktemp("golden-depth")
    np.save(folder / "raw.npy", raw)
    return write_golden_frames(folder / golden["input"]["folder_name"], frames), folder / "raw.npy", raw


def test_tiny_depth_model_is_the_recorded_one(golden, depth_model_dir):
    assert tiny_weights_sha256(depth_model_dir) == golden["model"]["weights_sha256"], \
        "the tiny depth model recipe changed: the golden data no longer applies (re-record, see record_golden.py)"


def test_maps_entering_the_unet_are_the_originals(golden, golden_inputs):
    """Our resize + normalisation of the raw maps gives the original's maps bit for bit."""
    import torch

    from tokenflow.method.depth import normalise_depth

    _, _, raw = golden_inputs
    shape = golden["depth"]["maps"]["shape"]
    maps = normalise_depth(torch.from_numpy(raw), tuple(shape[2:]), "frame").numpy()
    assert list(maps.shape) == shape
    assert array_sha256(maps) == golden["depth"]["maps"]["sha256"]
    np.testing.assert_array_equal(maps.reshape(-1), np.asarray(golden["depth"]["maps"]["values"], dtype=np.float32))


def test_depth_edit_matches_the_original(golden, depth_model_dir, golden_inputs):
    import torch

    from tokenflow import EditConfig, Editor

    clip, raw_path, _ = golden_inputs
    s = golden["settings"]
    config = EditConfig(video=str(clip), frames=s["n_frames"], size=(s["W"], s["H"]), model=str(depth_model_dir),
                        device="cpu", dtype="float32", inversion_prompt=s["inversion_prompt"],
                        inversion_steps=s["inversion_steps"], inversion_batch_size=s["inv_batch_size"],
                        prompt=s["prompt"], negative_prompt=s["negative_prompt"], steps=s["edit_steps"],
                        keyframe_spacing=s["batch_size"], chunk_frames=s["batch_size"], pnp_attn_t=s["pnp_attn_t"],
                        pnp_f_t=s["pnp_f_t"], guidance_scale=s["guidance_scale"], seed=s["seed"],
                        depth_maps=str(raw_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # recorded with one thread (float summation order)
    try:
        editor = Editor.from_pretrained(str(depth_model_dir), device="cpu", dtype="float32", use_cache=False)
        result = editor.edit(str(clip), config=config)
    finally:
        torch.set_num_threads(threads)
    check_against_golden(result, golden)
