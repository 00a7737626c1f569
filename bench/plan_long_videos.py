"""Memory plans of long SD 2.1-base edits at 512x512 (or SDXL base 1.0 at 1024x1024) in float16,
without a GPU or weights.

Builds the real UNet and VAE on the ``meta`` device (shapes only), then asks the planner for the
plan of each case under a budget. What it shows is the *analytic* prediction (calibration factor 1:
on a GPU, ``tokenflow edit --plan`` uses the probe measured there).

    .venv/bin/python bench/plan_long_videos.py [--out bench/results/plans_sd21_512_fp16.json]
    .venv/bin/python bench/plan_long_videos.py --arch sdxl [--table docs/...]

Both plan for a simulated CUDA device (``models.architectures.meta_model``): the CUDA context,
workspaces, 5 % margin and reserved-memory factor taken off and the GPU call caps applied, as
``--plan`` on a GPU does; host memory not checked. SD 2.1-base: 200 frames in 16 GB, 1000 in 24 GB
with and without keyframe windows; ``--arch sdxl``: SDXL base 1.0 (both text encoders, its float32
VAE) under 24 and 80 GiB budgets. Each prints the markdown table of what the plan chooses (docs/memory.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout without installing
RESULTS = ROOT / "bench" / "results"

from tokenflow.benchmark.measure import write_results  # noqa: E402
from tokenflow.engine.memory import Calibration, gib  # noqa: E402
from tokenflow.engine.planner import make_plan  # noqa: E402
from tokenflow.errors import ResourceError  # noqa: E402
from tokenflow.models.architectures import meta_model  # noqa: E402

SDXL_CASES = [  # (frames, keyframe window, budget bytes): 24 GiB and 80 GiB cards
    (frames, window, gib * 2**30) for frames in (200, 1000) for gib in (24, 80) for window in (None, 8, 4)
]
CASES = [  # (frames, keyframe window, budget bytes)
    (200, None, 16 * 10**9),
    (1000, None, 24 * 10**9),
    (1000, 32, 24 * 10**9),
    (1000, 16, 24 * 10**9),
    (1000, 8, 24 * 10**9),
]


def table(rows: list) -> str:
    """The markdown table of what each plan chooses (frames x budget x keyframe window)."""
    lines = ["| frames | budget | keyframe window | fits | keyframe store | latents | frames per call "
             "(keyframe pass / propagation / inversion / VAE) | predicted peak |",
             "| ---: | ---: | ---: | --- | --- | --- | --- | ---: |"]
    for r in rows:
        head = f"| {r['frames']} | {r['budget_bytes'] / 2**30:.0f} GiB | {r['keyframe_window'] or 'all'} |"
        if not r["fits"]:
            why = (f"needs {r['error'].split('at least ')[-1].split('GiB')[0]} GiB" if "at least " in r["error"]
                   else "a tensor past int32 indexing: needs a window" if "int32" in r["error"] else "see the JSON")
            lines.append(f"{head} no ({why}) | | | | |")
            continue
        p = r["plan"]
        store = f"{gib(p['store_bytes'])} on {p['store_on']}"
        calls = f"{p['keyframe_call']} / {p['chunk_frames']} / {p['inversion_frames']} / {p['vae_frames']}"
        lines.append(f"{head} yes | {store} | {gib(p['latents_bytes'])} on {p['latents_on']} | {calls} | "
                     f"{gib(max(p['peaks'].values()))} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("sd21", "sdxl"), default="sd21")
    p.add_argument("--out", help="the JSON (default bench/results/plans_sd21_512_fp16.json / plans_sdxl_1024_fp16.json)")
    p.add_argument("--steps", type=int, default=51, help="inverted latents kept (50 edit steps + the noisiest)")
    args = p.parse_args()
    xl = args.arch == "sdxl"
    name = "plans_sdxl_1024_fp16" if xl else "plans_sd21_512_fp16"
    out = args.out or str(RESULTS / f"{name}.json")
    # both on a simulated CUDA device (shapes on ``meta``): the GPU planner's call caps, overheads and margins
    model = meta_model("sdxl", "SDXL base 1.0", torch.device("cuda"), torch.float16) if xl else \
        meta_model("sd21", "SD 2.1-base", torch.device("cuda"), torch.float16)
    cases, latent = (SDXL_CASES, (128, 128)) if xl else (CASES, (64, 64))
    host = (2**60, "not checked: a GPU plan")
    rows = []
    for frames, window, budget in cases:
        keyframes = -(-frames // 8)
        case = {"frames": frames, "keyframe_window": window, "budget_bytes": budget, "keyframes": keyframes}
        try:
            plan = make_plan(model, frames=frames, latent_size=latent, branches=3, keyframes=keyframes,
                             window=window or 0, steps=args.steps, budget=budget, budget_source="given",
                             calibration=Calibration(source="analytic, uncalibrated"), host=host,
                             nearest_backend="triton")
            case.update(fits=True, plan=plan.as_dict())
            print(f"{frames} frames, window {window or 'all'}: fits {gib(budget)}, predicted peak {gib(plan.peak)}; "
                  f"chunk {plan.chunk_frames}, keyframe call {plan.keyframe_call}, store {gib(plan.store_bytes)} "
                  f"on {plan.store_on}, latents on {plan.latents_on}")
        except ResourceError as exc:
            case.update(fits=False, error=str(exc))
            print(f"{frames} frames, window {window or 'all'}: does not fit {gib(budget)}: {exc}")
        rows.append(case)
    family = ("SDXL base 1.0 edits at 1024x1024 float16 (VAE float32)" if xl
              else "SD 2.1-base edits at 512x512 float16")
    extra = {"what": f"memory plans (analytic prediction, no GPU: a simulated CUDA device, calibration factor 1) "
                     f"of {family}, keyframe spacing 8, 3 branches, 50 edit steps, eager with the Triton nearest "
                     "search; host memory not checked", "table": table(rows)}
    print(extra["table"])
    write_results(name, torch.device("meta"), rows, out, extra, RESULTS)   # planned here, on no GPU
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
