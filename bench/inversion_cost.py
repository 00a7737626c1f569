"""What the edit-friendly DDPM inversion saves, from the FLOP model and the memory plan (no GPU,
no weights): SD 2.1-base at 512x512, 200 frames, float16, the original's defaults (DDIM inversion of
500 steps, 50 edit steps, keyframe spacing 8, original propagation) against ``--inversion ddpm``
at the same 50 edit steps (50 inversion timesteps, each frame once per timestep).

    .venv/bin/python bench/inversion_cost.py [--frames 200] [--out bench/results/...json]

FLOPs: ``benchmark.flops.edit_work`` (checked against torch's FlopCounterMode in the tests). Memory:
the planner (``engine.planner.make_plan``, analytic, calibration factor 1) under a 16 GB budget,
with the inverted latents the run keeps: 50 edit timesteps + the noisiest for DDIM, 50 noisy
latents + 50 noise maps for DDPM. Measured times: ``tokenflow bench --compare inversion=ddim500,ddpm50``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout without installing
RESULTS = ROOT / "bench" / "results"

from bench.plan_long_videos import meta_model  # noqa: E402
from tokenflow.benchmark import flops  # noqa: E402
from tokenflow.benchmark.measure import write_results  # noqa: E402
from tokenflow.engine.memory import Calibration, gib  # noqa: E402
from tokenflow.engine.planner import make_plan  # noqa: E402
from tokenflow.method.keyframes import groups, original_plan  # noqa: E402
from tokenflow.models.architectures import SD21_UNET, SD_VAE  # noqa: E402

STEPS, DDIM_STEPS, SPACING, LATENT = 50, 500, 8, (64, 64)


def variant(name: str, frames: int, inversion_rows: int, latents_kept: int, budget: int) -> dict:
    """FLOPs per stage and the plan of one inversion choice."""
    n_groups = len(groups(frames, SPACING))
    keyframe_calls = [[n_groups]] * STEPS
    pairs = [[int((row >= 0).sum()) for g in range(n_groups) for row in original_plan(g, frames, SPACING).pairs]] * STEPS
    work = flops.edit_work(SD21_UNET, SD_VAE, frames, LATENT, inversion_rows // frames, keyframe_calls, pairs)
    plan = make_plan(meta_model(torch.float16), frames=frames, latent_size=LATENT, branches=3, keyframes=n_groups,
                     window=0, steps=latents_kept, budget=budget, budget_source="given",
                     calibration=Calibration(source="analytic, uncalibrated"))
    calls = -(-inversion_rows // plan.inversion_frames) if name == "ddpm50" else \
        DDIM_STEPS * -(-frames // plan.inversion_frames)
    latent_bytes = frames * 4 * LATENT[0] * LATENT[1] * 4
    return {"variant": name, "inversion_unet_rows": inversion_rows, "inversion_unet_calls": calls,
            "flops": {k: float(v) for k, v in work.flops.items()}, "samples": work.samples,
            "kept_tensors": latents_kept, "kept_bytes": latents_kept * latent_bytes,
            "plan": {k: plan.as_dict()[k] for k in ("latents_on", "latents_bytes", "inversion_frames",
                                                    "chunk_frames", "store_on", "peak")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--budget", type=float, default=16.0, help="GB (10^9 bytes) of device memory for the plan")
    p.add_argument("--out", help="the JSON (default bench/results/inversion_ddpm_vs_ddim_sd21_512_<frames>f.json)")
    args = p.parse_args()
    budget = int(args.budget * 10**9)
    rows = [variant("ddim500", args.frames, DDIM_STEPS * args.frames, STEPS + 1, budget),
            variant("ddpm50", args.frames, STEPS * args.frames, 2 * STEPS, budget)]
    ddim, ddpm = (r["flops"] for r in rows)
    ratios = {stage: ddim[stage] / ddpm[stage] for stage in ("invert", "total")}
    for r in rows:
        f = r["flops"]
        print(f"{r['variant']:8s} inversion {f['invert'] / 1e15:8.1f} PFLOP ({r['inversion_unet_calls']} UNet calls "
              f"of {r['plan']['inversion_frames']} rows), edit {f['edit'] / 1e15:6.1f} PFLOP, total "
              f"{f['total'] / 1e15:8.1f} PFLOP; inversion share {f['invert'] / f['total']:.0%}; kept "
              f"{gib(r['kept_bytes'])} of latents{' and noise maps' if r['variant'] == 'ddpm50' else ''} on "
              f"{r['plan']['latents_on']}, predicted peak {gib(r['plan']['peak'])}")
    print(f"DDIM500 / DDPM50 FLOPs: inversion {ratios['invert']:.1f}x, whole edit {ratios['total']:.2f}x")
    name = f"inversion_ddpm_vs_ddim_sd21_512_{args.frames}f"
    out = args.out or str(RESULTS / f"{name}.json")
    extra = {"what": f"FLOP model and memory plan (analytic, no GPU) of SD 2.1-base edits at 512x512 float16, "
                     f"{args.frames} frames, 50 edit steps, keyframe spacing 8, original propagation, "
                     f"{args.budget:g} GB budget: DDIM inversion of 500 steps (the original's default) vs the "
                     "edit-friendly DDPM inversion at the 50 edit timesteps",
             "flop_ratio_ddim_over_ddpm": ratios}
    write_results(name, torch.device("meta"), rows, out, extra, RESULTS)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
