"""Memory plans of long SD 2.1-base edits at 512x512 in float16, without a GPU or weights.

Builds the real SD 2.1-base UNet and the SD VAE on the ``meta`` device (shapes only), then asks
the planner for the plan of each case under a budget. What it shows is the *analytic* prediction
(calibration factor 1: on a GPU, ``tokenflow edit --plan`` uses the probe measured there).

    .venv/bin/python bench/plan_long_videos.py [--out bench/results/plans_sd21_512_fp16.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout without installing
RESULTS = ROOT / "bench" / "results"

from tokenflow.benchmark.architectures import SD21_UNET, SD_VAE, build_text_encoder  # noqa: E402
from tokenflow.benchmark.measure import write_results  # noqa: E402
from tokenflow.engine.memory import Calibration, gib  # noqa: E402
from tokenflow.engine.planner import make_plan  # noqa: E402
from tokenflow.errors import ResourceError  # noqa: E402
from tokenflow.models.hf import quiet_hf_libraries  # noqa: E402
from tokenflow.models.load import SDModel  # noqa: E402
from tokenflow.models.random_weights import load_tokenizer, scheduler_config  # noqa: E402

CASES = [  # (frames, keyframe window, budget bytes)
    (200, None, 16 * 10**9),
    (1000, None, 24 * 10**9),
    (1000, 32, 24 * 10**9),
    (1000, 16, 24 * 10**9),
    (1000, 8, 24 * 10**9),
]


def meta_model(dtype: torch.dtype) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"), quiet_hf_libraries():
        unet = UNet2DConditionModel(**SD21_UNET).to(dtype)
        vae = AutoencoderKL(**SD_VAE).to(dtype)
    return SDModel(unet=unet, vae=vae, text_encoder=build_text_encoder("sd21").to(dtype),
                   tokenizer=load_tokenizer(), scheduler_config=scheduler_config(), name="sd21 (meta)",
                   identity="meta:sd21", is_tiny=False, device=torch.device("meta"), dtype=dtype)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "plans_sd21_512_fp16.json"))
    p.add_argument("--steps", type=int, default=51, help="inverted latents kept (50 edit steps + the noisiest)")
    args = p.parse_args()
    model = meta_model(torch.float16)
    rows = []
    for frames, window, budget in CASES:
        keyframes = -(-frames // 8)
        case = {"frames": frames, "keyframe_window": window, "budget_bytes": budget, "keyframes": keyframes}
        try:
            plan = make_plan(model, frames=frames, latent_size=(64, 64), branches=3, keyframes=keyframes,
                             window=window or 0, steps=args.steps, budget=budget, budget_source="given",
                             calibration=Calibration(source="analytic, uncalibrated"))
            case.update(fits=True, plan=plan.as_dict())
            print(f"{frames} frames, window {window or 'all'}: fits {gib(budget)}, predicted peak {gib(plan.peak)}; "
                  f"chunk {plan.chunk_frames}, keyframe call {plan.keyframe_call}, store {gib(plan.store_bytes)} "
                  f"on {plan.store_on}, latents on {plan.latents_on}")
        except ResourceError as exc:
            case.update(fits=False, error=str(exc))
            print(f"{frames} frames, window {window or 'all'}: does not fit {gib(budget)}: {exc}")
        rows.append(case)
    extra = {"what": "memory plans (analytic prediction, no GPU) of SD 2.1-base edits at 512x512 float16, "
                     "keyframe spacing 8, 3 branches, 50 edit steps"}
    write_results("plans_sd21_512_fp16", torch.device("meta"), rows, args.out, extra, RESULTS)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
