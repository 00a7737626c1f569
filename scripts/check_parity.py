"""Compare tokenflow with a recorded run of the original implementation.

The recorded run comes from the reference harness (``shared/reference/run_reference.py``), which
runs the authors' code on CPU with a tiny model and writes ``final_latents.npy``,
``inverted_latents.pt``, ``edit_tensors.pt``, ``nn_indices.pt`` and ``result.json``. This script
re-runs the same edit with tokenflow (same model folder, video, settings, seed) and reports:
final-latent relative L2 / max abs difference, inverted-latent differences, keyframe agreement and
the fraction of nearest-neighbour indices that agree. Exit 0 when within the acceptance bounds
(relative L2 <= 1e-4, max abs <= 1e-2, NN agreement >= 99.9 %).

    python scripts/check_parity.py --reference OUT_DIR --model MODEL_DIR --video wolf.mp4 [--json res.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def compare(reference: str, model: str, video: str, threads: int = 1) -> dict:
    from tokenflow import Editor
    from tokenflow.config import EditConfig
    from tokenflow.io.cache import InversionCache

    torch.set_num_threads(threads)
    result_json = json.load(open(f"{reference}/result.json"))
    a = result_json["args"]
    config = EditConfig(video=video, frames=a["n_frames"], size=(a["W"], a["H"]), model=model, device="cpu",
                        dtype="float32", inversion_prompt=a["inversion_prompt"], inversion_steps=a["inversion_steps"],
                        inversion_batch_size=a.get("inv_batch_size") or a["batch_size"], prompt=a["prompt"],
                        negative_prompt=a["negative_prompt"], steps=a["edit_steps"], keyframe_spacing=a["batch_size"],
                        chunk_frames=a["batch_size"],  # correspondences are compared per group; results do not depend on it
                        pnp_attn_t=a["pnp_attn_t"], pnp_f_t=a["pnp_f_t"],
                        guidance_scale=a.get("guidance_scale", 7.5), seed=a["seed"])
    editor = Editor.from_pretrained(model, device="cpu", dtype="float32")
    editor.cache = InversionCache(enabled=False)
    start = time.perf_counter()
    res = editor.edit(video, config=config, record_correspondences=True)
    seconds = time.perf_counter() - start

    ref_final = torch.from_numpy(np.load(f"{reference}/final_latents.npy")).float()
    ours = res.latents.float()
    diff = (ours - ref_final)
    report = {
        "final_rel_l2": float(diff.norm() / ref_final.norm()),
        "final_max_abs": float(diff.abs().max()),
        "final_abs_max_value": float(ref_final.abs().max()),
        "seconds_ours": round(seconds, 3),
    }
    ref_pivots = np.load(f"{reference}/pivotal_indices.npy").tolist()
    report["keyframes_equal"] = ref_pivots == res.keyframes

    ref_inv = torch.load(f"{reference}/inverted_latents.pt", weights_only=False)
    inversion = editor.invert(video, config=config)
    report["inverted_max_abs"] = max(float((inversion.latents[int(t)] - v.float()).abs().max())
                                     for t, v in ref_inv.items() if int(t) in inversion.latents)

    ref_nn = torch.load(f"{reference}/nn_indices.pt", weights_only=False)
    ours_nn = {(s, g, layer.rsplit(".attn1", 1)[0]): idx for s, g, layer, idx in res.correspondences}
    agree = total = 0
    for entry in ref_nn:
        idx = ours_nn[(entry["step"], entry["batch"], entry["block"])]  # [m, P, S]
        ours_flat = idx.permute(1, 0, 2).reshape(idx.shape[1], -1)[: entry["idx"].shape[0]]
        agree += int((ours_flat == entry["idx"].long()).sum())
        total += entry["idx"].numel()
    report["nn_agreement"] = agree / total
    report["nn_tokens"] = total
    report["ok"] = (report["final_rel_l2"] <= 1e-4 and report["final_max_abs"] <= 1e-2
                    and report["nn_agreement"] >= 0.999 and report["keyframes_equal"])
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="output folder of run_reference.py")
    p.add_argument("--model", required=True, help="the model folder the reference used")
    p.add_argument("--video", required=True, help="the video the reference used")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    report = compare(args.reference, args.model, args.video, args.threads)
    print(json.dumps(report, indent=1))
    if args.json:
        json.dump(report, open(args.json, "w"), indent=1)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
