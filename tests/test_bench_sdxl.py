"""SDXL in the benchmark: the FLOP model against FlopCounterMode on SDXL base 1.0's real shapes
(meta device) and on the tiny SDXL, the ``sdxl`` architecture's parts, and bench/gpu_check.py's
opt-in SDXL stage (its CPU dry run and its extrapolation)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tokenflow.benchmark import architectures, flops
from tokenflow.benchmark.config import BenchConfig
from tokenflow.models import architectures as model_architectures
from tokenflow.models.text import layout_of, unet_keywords

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny-model calls: see tests/conftest.py
ROOT = Path(__file__).resolve().parents[1]
REL = 1e-9


def counted(unet, x):
    layout = layout_of(unet.config)
    text = torch.zeros(x.shape[0], layout.rows_tokens, layout.dim, device=x.device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor(1, device=x.device), **unet_keywords(unet, text))
    return counter.get_total_flops()


def test_real_sdxl_unet_and_vae_flops_on_meta():
    """SDXL base 1.0's UNet (70 transformer blocks at 1/2/10 per level, 2048-wide cross attention,
    the added text/time embedding, no attention at level 0) and VAE, on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**model_architectures.SDXL_UNET)
        vae = AutoencoderKL(**model_architectures.SDXL_VAE)
        x, image = torch.randn(1, 4, 48, 40), torch.randn(1, 3, 96, 128)
        assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684   # the released UNet
        cost = flops.unet_cost(unet.config, 48, 40)
        assert len(cost.layers) == 70
        assert counted(unet, x) == pytest.approx(cost.plain(), rel=REL)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.decode(vae.encode(image).latent_dist.mean)
    assert counter.get_total_flops() == pytest.approx(flops.vae_encode(vae.config, 96, 128)
                                                      + flops.vae_decode(vae.config, 12, 16), rel=REL)
    # the added embedding's MLP is in the count: 2816 -> 1280 -> 1280
    plain = dict(model_architectures.SDXL_UNET, addition_embed_type=None)
    assert cost.base - flops.unet_cost(plain, 48, 40).base == 2 * (2816 * 1280 + 1280 * 1280)


@pytest.mark.parametrize("h,w", [(11, 9)])   # odd: ceil at every level
def test_tiny_sdxl_unet_flops_match_flop_counter(tiny_xl, h, w):
    assert counted(tiny_xl.unet, torch.randn(2, 4, h, w)) == pytest.approx(
        2 * flops.unet_cost(tiny_xl.unet.config, h, w).plain(), rel=REL)


def test_the_sdxl_architecture_is_a_bench_choice_with_both_text_encoders():
    assert BenchConfig(arch="sdxl").validate().arch == "sdxl"
    second = architectures.build_text_encoder_2("sdxl")
    assert type(second).__name__ == "CLIPTextModelWithProjection"
    assert (second.config.hidden_size, second.config.projection_dim, second.config.num_hidden_layers) == (1280, 1280, 1)
    assert architectures.build_text_encoder("sdxl").config.hidden_size == 768


def _gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
        import gpu_check_stages
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_check, gpu_check_stages


def test_the_sdxl_stage_is_opt_in_and_extrapolates_per_stage():
    """Frames scale encode, decode, inversion steps and the propagation; the keyframe pass's share
    of an edit step scales by its FLOPs at 25 keyframes over 5 (extended attention: K^2 terms),
    here recomputed from the layer list rather than through ``keyframe_pass``."""
    gc, stages = _gpu_check()
    assert [s.name for s in gc.OPT_IN_STAGES] == ["sdxl", "inversion"] and "sdxl" not in [s.name for s in gc.STAGES]
    out = {"frames": 40, "timings_s": {"encode": 2.0, "invert": 9.0, "edit": 30.0, "decode": 4.0,
                                       "keyframes": 12.0, "propagate": 18.0},
           "inversion_step_s": [3.0, 3.0, 5.0], "edit_step_s": [10.0, 9.0, 11.0], "other_s": 1.5}
    config = model_architectures.ARCHITECTURES["sdxl"][0]
    got = stages.sdxl_extrapolation(out, 200, config, (128, 128), spacing=8)
    cost = flops.unet_cost(config, 128, 128)

    def keyframe_pass(k):   # 3 branches: each keyframe's own attention, then 2 branches over all K frames
        return 3 * k * (cost.base + sum(4 * 2 * lay.tokens * lay.channels ** 2 for lay in cost.layers)) + sum(
            k * 4 * lay.tokens ** 2 * lay.channels + 2 * k * 4 * lay.tokens * (k * lay.tokens) * lay.channels
            for lay in cost.layers)

    ratio = keyframe_pass(25) / keyframe_pass(5)
    assert 5 < ratio < 25 and got["keyframe_pass_scale"] == pytest.approx(ratio, rel=1e-9)
    edit = 50 * 10.0 * (0.4 * ratio + 0.6 * 5)
    assert got["edit"] == pytest.approx(edit) and got["edit"] > 5 * 50 * 10.0   # more than linear in the frames
    assert {k: got[k] for k in ("encode", "invert", "decode", "other")} == {
        "encode": 10.0, "invert": 5 * 50 * 3.0, "decode": 20.0, "other": 1.5}
    assert got["total"] == pytest.approx(10.0 + 750.0 + edit + 20.0 + 1.5)


def test_gpu_check_dry_run_of_the_sdxl_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_CHECK_INJECT_NAN")}
    env.update(HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",  # one_torch_thread
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--stages", "8",
                           "--deadline", "300", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line for line in done.stdout.splitlines() if line.startswith("gpu_check stage")] == [
        line for line in done.stdout.splitlines() if line.startswith("gpu_check stage 8 sdxl") and " PASS " in line]
    summary = json.loads((tmp_path / "out" / "gpu_check_summary.json").read_text())
    stage = summary["stages"]["sdxl"]
    assert stage["measured"]["sdxl_extrapolated_s_200_frames"] > 0
    per_stage = stage["details"]["extrapolated_200_frames_50_50_s"]
    assert set(per_stage) == {"encode", "invert", "edit", "decode", "other", "total", "keyframe_share",
                              "keyframe_pass_scale", "frame_scale"}
    assert 0 < per_stage["keyframe_share"] < 1 and per_stage["keyframe_pass_scale"] > 1   # the run timed both passes
    assert stage["details"]["model"]["arch"] == "tiny-xl" and stage["details"]["run"]["finite"]
    (target,) = summary["targets"][-1:]
    assert target["key"] == "sdxl_extrapolated_s_200_frames" and target["met"] is None
