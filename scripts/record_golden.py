"""Record tests/data/golden_original.json (tests/test_golden_original.py) from a run of the original.

The golden data are the keyframe draws and a small fixed subsample of the final latents of the
ORIGINAL TokenFlow implementation (omerbt/TokenFlow), run by the reference harness
(shared/reference/run_reference.py, see its README.md) on CPU in float32 with one thread, on the
synthetic clip of the test and on the tiny model folder the test's ``tiny_model_dir`` fixture
builds. This script contains none of the harness's code: it writes the input frames and afterwards
only reads the harness's output folder (result.json, final_latents.npy, pivotal_indices.npy,
edit_tensors.pt for the input pixels).

    # 1. the inputs: the clip as PNGs at the target size, and the tiny model folder (seed 0)
    python scripts/record_golden.py frames /tmp/golden/clip/golden_clip
    python -c "from pathlib import Path; from tokenflow.models.tiny import build_tiny_model; \\
               build_tiny_model(Path('/tmp/golden/tiny-sd'), seed=0)"      # (tokenflow.tiny before the move)
    # 2. the original, with the harness (the printed command; RUN_REFERENCE = shared/reference/run_reference.py,
    #    PYTHON = the harness venv's python; the golden was recorded with venv-new: --stack new, see below)
    python scripts/record_golden.py command --frames-dir /tmp/golden/clip/golden_clip \\
        --model /tmp/golden/tiny-sd --out /tmp/golden/ref_new
    # 3. the JSON (optionally with other runs of the same edit as cross-checks: other stack / thread count)
    python scripts/record_golden.py record /tmp/golden/ref_new --model /tmp/golden/tiny-sd \\
        --cross-check "threads 2=/tmp/golden/ref_new_t2" [--upstream-commit SHA] [--json tests/data/golden_original.json]

Depth variant (tests/test_golden_depth.py, tests/data/golden_original_depth.json): the same clip and
settings with the tiny DEPTH model (``build_tiny_model(DIR, seed=0, depth=True)`` = ``--model tiny-depth``)
and injected raw depth maps (``make_raw_depth`` of the test, frame resolution), the original in
``--sd_version depth --raw_depth raw.npy`` mode:

    python scripts/record_golden.py frames /tmp/gd/clip/golden_clip --depth /tmp/gd/raw.npy
    python -c "from pathlib import Path; from tokenflow.models.tiny import build_tiny_model; \\
               build_tiny_model(Path('/tmp/gd/tiny-sd-depth'), seed=0, depth=True)"
    python scripts/record_golden.py command --depth /tmp/gd/raw.npy --frames-dir /tmp/gd/clip/golden_clip \\
        --model /tmp/gd/tiny-sd-depth --out /tmp/gd/ref_new
    python scripts/record_golden.py record /tmp/gd/ref_new --depth --model /tmp/gd/tiny-sd-depth \\
        --cross-check "threads 2=/tmp/gd/ref_new_t2"

Why --stack new (the harness's venv-new: diffusers 0.42 / transformers 5) and not the diffusers 0.19.3
stack: the tiny folder written by tokenflow under transformers 5 stores the CLIP text encoder's
weights without the ``text_model.`` prefix, which transformers 4.31 does not recognise: it warns and
initialises the whole text encoder randomly. The official code runs unchanged on the new stack.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "tests" / "data" / "golden_original.json"
DEPTH_JSON = ROOT / "tests" / "data" / "golden_original_depth.json"

# the edit of the golden test (the harness's argument names)
SETTINGS = dict(n_frames=8, H=64, W=96, inversion_steps=20, save_steps=5, edit_steps=5, batch_size=4,
                pnp_attn_t=0.5, pnp_f_t=0.8, guidance_scale=7.5, seed=1, threads=1,
                inversion_prompt="coloured shapes moving", prompt="a colourful stained glass window",
                negative_prompt="ugly, blurry, low res, unrealistic, unaesthetic")
GENERATOR_SEED = 3
FOLDER_NAME = "golden_clip"
N_SAMPLES = 256
SAMPLE_SEED = 20240601
UPSTREAM_COMMIT = "5dd6a696277e9d18c23adc034dc4c052ccd64cb5"   # what the harness README names


def golden_test_module():
    sys.path.insert(0, str(ROOT))
    from tests import test_golden_original

    return test_golden_original


def golden_depth_module():
    sys.path.insert(0, str(ROOT))
    from tests import test_golden_depth

    return test_golden_depth


def harness_command(frames_dir: str, model: str, out: str, stack: str = "new", raw_depth: str = "") -> str:
    s = SETTINGS
    args = ["$PYTHON", "$RUN_REFERENCE", "--model", model, "--frames_dir", frames_dir, "--out", out]
    if raw_depth:
        args += ["--sd_version", "depth", "--raw_depth", raw_depth]
    for name in ("n_frames", "H", "W", "inversion_steps", "save_steps", "edit_steps", "batch_size", "pnp_attn_t",
                 "pnp_f_t", "seed", "threads", "inversion_prompt", "prompt", "negative_prompt"):
        args += [f"--{name}", str(s[name])]
    args += ["--stack", stack]
    return "TOKENFLOW_REF_DIR=<omerbt/TokenFlow checkout> " + " ".join(
        a if a.startswith("$") else shlex.quote(a) for a in args)


def sample_indices(numel: int) -> list:
    """N_SAMPLES distinct flat positions (sorted), a seeded choice; stored in the JSON, not re-derived."""
    rng = np.random.default_rng(SAMPLE_SEED)
    return sorted(int(i) for i in rng.choice(numel, size=min(N_SAMPLES, numel), replace=False))


def f32(value) -> float:
    """A float32 value as the shortest decimal that reads back to the same float32."""
    return float(f"{float(np.float32(value)):.9g}")


def stats_against(reference: np.ndarray, other: np.ndarray) -> dict:
    diff = other.astype(np.float64) - reference.astype(np.float64)
    return {"rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(reference.astype(np.float64))),
            "max_abs": float(np.abs(diff).max())}


def load_run(folder: Path) -> dict:
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    return {"result": result, "final": np.load(folder / "final_latents.npy"),
            "pivots": np.load(folder / "pivotal_indices.npy").tolist()}


def check_settings(args: dict) -> None:
    wrong = {k: (args.get(k), v) for k, v in SETTINGS.items() if args.get(k) != v}
    if wrong:
        raise SystemExit(f"the harness run used other settings than the golden test (got, expected): {wrong}")
    if args.get("frames_dir") is None or args.get("device") != "cpu" or args.get("dtype") != "float32":
        raise SystemExit("the harness run must use --frames_dir, --device cpu and --dtype float32")


def check_input_pixels(folder: Path, frames: np.ndarray) -> None:
    """The frames the original encoded (edit_tensors.pt input_frames) are exactly our pixels / 255."""
    import torch

    tensors = torch.load(folder / "edit_tensors.pt", map_location="cpu", weights_only=False)
    seen = tensors["input_frames"].float().numpy()
    expected = frames.transpose(0, 3, 1, 2).astype(np.float32) / 255
    if seen.shape != expected.shape or not np.array_equal(seen, expected):
        raise SystemExit("the original read other pixels than make_golden_frames gives (resized or other frames?)")


def record(folder: Path, model: Path, cross_checks: list, upstream_commit: str, depth: bool = False) -> dict:
    tests = golden_test_module()
    run = load_run(folder)
    result, final = run["result"], run["final"]
    args = result["args"]
    check_settings(args)
    if depth != (args.get("sd_version") == "depth"):
        raise SystemExit(f"the harness run used --sd_version {args.get('sd_version')}; record --depth needs depth")
    frames = tests.make_golden_frames(SETTINGS["n_frames"], SETTINGS["W"], SETTINGS["H"], GENERATOR_SEED)
    check_input_pixels(folder, frames)
    if result["edit"]["n_frames_used"] != SETTINGS["n_frames"]:
        raise SystemExit(f"the original used {result['edit']['n_frames_used']} frames")
    if run["pivots"] != result["edit"]["pivotal_indices"]:
        raise SystemExit("pivotal_indices.npy and result.json disagree")

    latents = final.astype(np.float64)
    indices = sample_indices(final.size)
    settings = dict(SETTINGS, inv_batch_size=args.get("inv_batch_size") or args["batch_size"])
    golden = {
        "what": "final latents (before VAE decode) and keyframe draws of the ORIGINAL TokenFlow (omerbt/TokenFlow) "
                "on the golden clip with the tiny model (seed 0), CPU float32, 1 thread; "
                "tests/test_golden_original.py compares tokenflow's edit with them",
        "settings": settings,
        "input": {"generator": "tests/test_golden_original.py:make_golden_frames", "generator_seed": GENERATOR_SEED,
                  "folder_name": FOLDER_NAME, "frames_uint8_sha256": tests.frames_sha256(frames),
                  "shape_NHWC": list(frames.shape)},
        "model": {"builder": "tokenflow tiny model (build_tiny_model, seed 0) = the tiny_model_dir test fixture",
                  "weights_sha256": tests.tiny_weights_sha256(model)},
        "timesteps": [int(t) for t in result["edit"]["timesteps"]],
        "qk_injection_timesteps": result["edit"]["qk_injection_timesteps"],
        "conv_injection_timesteps": result["edit"]["conv_injection_timesteps"],
        "keyframes": run["pivots"],
        "final_latents": {
            "shape": list(final.shape),
            "l2_norm": float(np.linalg.norm(latents)),
            "abs_max": float(np.abs(latents).max()),
            "frame_channel_means": [[float(v) for v in row] for row in latents.mean(axis=(2, 3))],
            "sample_seed": SAMPLE_SEED,
            "sample_rule": f"sorted(numpy.random.default_rng({SAMPLE_SEED}).choice(numel, {N_SAMPLES}, replace=False))",
            "sample_flat_indices": indices,
            "sample_values": [f32(v) for v in final.reshape(-1)[indices]],
        },
        "provenance": {
            "implementation": "omerbt/TokenFlow preprocess.py + run_tokenflow_pnp.py (official code, patched only "
                              "for CPU / float32 / local model by the harness; patches listed in result.json)",
            "upstream_commit": upstream_commit,
            "official_file_sha256": result.get("official_file_sha256"),
            "harness": "shared/reference/run_reference.py (README.md there)",
            "stack": result.get("stack"),
            "versions": result.get("versions"),
            "torch_num_threads": result.get("torch_num_threads"),
            "patches": [f"{p['file']}: {p['why']}" if isinstance(p, dict) else p for p in result.get("patches", [])],
            "command": harness_command(f"<dir>/{args['frames_dir']}", f"<dir>/{args['model']}", "<out>",
                                       result.get("stack", "new"), "<dir>/raw.npy" if depth else ""),
            "recorded_by": "scripts/record_golden.py record <out> " + ("--depth " if depth else "")
                           + "--model <dir>/" + str(args["model"]),
        },
        "cross_checks": {},
    }
    if depth:
        add_depth(golden, folder, result, frames)
    for label, other in cross_checks:
        other_run = load_run(Path(other))
        check_settings(dict(other_run["result"]["args"], threads=SETTINGS["threads"]))
        golden["cross_checks"][label] = dict(
            stats_against(final, other_run["final"]), keyframes_equal=other_run["pivots"] == run["pivots"],
            stack=other_run["result"].get("stack"), diffusers=other_run["result"]["versions"].get("diffusers"),
            transformers=other_run["result"]["versions"].get("transformers"),
            threads=other_run["result"].get("torch_num_threads"))
    return golden


def add_depth(golden: dict, folder: Path, result: dict, frames: np.ndarray) -> None:
    """The depth run's extra fields: the raw maps it was given (they must be the test's), the maps
    that entered its UNet (all of them: [N,1,h,w] is small), the harness's check of the UNet input."""
    depth_tests = golden_depth_module()
    raw = np.load(folder / "depth_raw.npy")
    expected = depth_tests.make_raw_depth(frames)
    if raw.shape != expected.shape or not np.array_equal(raw, expected):
        raise SystemExit("the original got other raw depth maps than make_raw_depth gives (--raw_depth raw.npy?)")
    maps = np.load(folder / "depth_maps.npy")
    info = result["depth"]
    golden["what"] = golden["what"].replace("the tiny model (seed 0)", "the tiny DEPTH model (tiny-depth, seed 0)") \
        .replace("tests/test_golden_original.py", "tests/test_golden_depth.py") + \
        ", with injected raw depth maps (make_raw_depth)"
    golden["model"]["builder"] = "tokenflow tiny depth model (build_tiny_model(DIR, seed=0, depth=True) = --model tiny-depth)"
    golden["depth"] = {
        "raw": {"generator": "tests/test_golden_depth.py:make_raw_depth", "shape": list(raw.shape),
                "sha256": depth_tests.array_sha256(raw), "min": f32(raw.min()), "max": f32(raw.max())},
        "maps": {"shape": list(maps.shape), "sha256": depth_tests.array_sha256(maps),
                 "values": [f32(v) for v in maps.reshape(-1)]},
        "edit_maps_equal_preprocess_maps": info.get("edit_maps_equal_preprocess_maps"),
        "unet_input": info.get("unet_input"),
        "source": info.get("source"), "stage_injected": info.get("stage_injected"),
    }


def dumps(content: dict) -> str:
    """Indented JSON with every list of plain numbers on one line (keeps the file short and diffable)."""
    text = json.dumps(content, indent=1)
    return re.sub(r"\[\s*(-?[0-9][-+0-9.eE,\s]*?)\s*\]",
                  lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",")) + "]", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_frames = sub.add_parser("frames", help="write the golden clip as numbered PNGs into DIR")
    p_frames.add_argument("dir")
    p_frames.add_argument("--depth", metavar="RAW_NPY", help="also write the golden raw depth maps (depth variant)")
    p_cmd = sub.add_parser("command", help="print the harness command of the golden run")
    p_cmd.add_argument("--frames-dir", required=True)
    p_cmd.add_argument("--model", required=True)
    p_cmd.add_argument("--out", required=True)
    p_cmd.add_argument("--stack", default="new")
    p_cmd.add_argument("--depth", metavar="RAW_NPY", default="", help="the depth variant with these raw maps")
    p_rec = sub.add_parser("record", help="write the golden JSON from a harness output folder")
    p_rec.add_argument("out", help="--out folder of run_reference.py")
    p_rec.add_argument("--model", required=True, help="the tiny model folder the run used")
    p_rec.add_argument("--cross-check", action="append", default=[], metavar="LABEL=DIR",
                       help="another harness run of the same edit, reported against the golden run")
    p_rec.add_argument("--upstream-commit", default=UPSTREAM_COMMIT)
    p_rec.add_argument("--depth", action="store_true", help="a --sd_version depth run (default JSON: "
                       "tests/data/golden_original_depth.json)")
    p_rec.add_argument("--json", default=None)
    args = parser.parse_args()

    if args.cmd == "frames":
        tests = golden_test_module()
        frames = tests.make_golden_frames(SETTINGS["n_frames"], SETTINGS["W"], SETTINGS["H"], GENERATOR_SEED)
        print(tests.write_golden_frames(Path(args.dir), frames))
        if args.depth:
            np.save(args.depth, golden_depth_module().make_raw_depth(frames))
            print(args.depth)
        return 0
    if args.cmd == "command":
        print(harness_command(args.frames_dir, args.model, args.out, args.stack, args.depth))
        return 0
    cross = [tuple(item.split("=", 1)) for item in args.cross_check]
    golden = record(Path(args.out), Path(args.model), cross, args.upstream_commit, args.depth)
    path = Path(args.json or (DEPTH_JSON if args.depth else DEFAULT_JSON))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(golden) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes): keyframes {golden['keyframes']}, "
          f"|final| = {golden['final_latents']['l2_norm']:.6g}, {len(golden['final_latents']['sample_values'])} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
