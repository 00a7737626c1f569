"""``tokenflow doctor``: the environment, and for each kernel op which backends run here and why not.

Also what a newcomer needs (``setup``): whether the default model is in the Hugging Face cache
(looked up on disk, never on the network), the tokenflow cache root and the size of each cache
kind (``io.caches``), which optional extras are installed (OpenCV, matplotlib, the H.264 encoder
``io.write`` would use, ONNX Runtime, Ray, FAISS, xFormers, Triton), and the free host and GPU memory.

With ``--check`` every backend that can run is also compared with the torch reference on fresh
random inputs of irregular shapes (see ``tokenflow.kernels.verify``): the way to verify the
Triton, FAISS and xFormers paths on a machine CI has never seen.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import platform
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

from tokenflow import __version__, kernels
from tokenflow.config import DEFAULT_MODEL
from tokenflow.device import mps_available, resolve_device, resolve_dtype
from tokenflow.engine.backends import NAMES, VERIFIED, not_supported_reasons
from tokenflow.engine.memory import host_available, proc_bytes
from tokenflow.errors import ConfigError, one_line
from tokenflow.io import caches
from tokenflow.io.read import AV_INSTALL
from tokenflow.io.write import H264_ENCODERS, video_encoder
from tokenflow.kernels import probe, support, verify
from tokenflow.models.load import HUB_ALLOW_PATTERNS

PACKAGES = ("torch", "diffusers", "transformers", "peft", "triton", "faiss-cpu", "faiss-gpu-cu12", "xformers", "av", "numpy",
            "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def environment() -> Dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"device": f"cuda:{i}", "name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory_gib": round(p.total_memory / 2**30, 1)})
    if mps_available():
        devices.append({"device": "mps"})
    return {"tokenflow": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "torch_cuda": torch.version.cuda, "triton_interpret": support.interpreting(),
            "packages": versions, "devices": devices}


# extra: (module to look for, distributions that provide it, what it gives)
EXTRAS = {"opencv": ("cv2", ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                             "opencv-contrib-python-headless"), "tokenflow metrics, --report (optical flow) and --control canny"),
          "matplotlib": ("matplotlib", ("matplotlib",), "--report and bench plots"),
          "onnxruntime": ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"), "--backend onnx"),
          "ray": ("ray", ("ray",), "tokenflow farm"),
          "faiss": ("faiss", ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12"), "--nearest-backend faiss"),
          "xformers": ("xformers", ("xformers",), "--attention-backend xformers"),
          "triton": ("triton", ("triton",), "the fused GPU kernels and --backend compile on CUDA")}
MODEL_FILES = tuple(p for p in HUB_ALLOW_PATTERNS if "*" not in p)   # model_index.json and every family's weights


def model_files(model_index: Optional[Dict]) -> List[str]:
    """The files of MODEL_FILES a model needs: model_index.json and the weights of the components its
    model_index names (SD: unet, vae, text_encoder; SDXL adds text_encoder_2; SD 2 depth its
    depth_estimator). Without a model_index (not cached yet): model_index.json and SD's three."""
    named = {k for k, v in (model_index or {}).items() if isinstance(v, list) and v and v[0]} if model_index \
        else {"unet", "vae", "text_encoder"}
    return [f for f in MODEL_FILES if "/" not in f or f.split("/", 1)[0] in named]


def model_cache(model: str = DEFAULT_MODEL, hub_cache: Optional[str] = None) -> Dict:
    """Whether ``model``'s files are in the Hugging Face cache (``hub_cache``, default the hub's
    own: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ...), looked up on disk only: no network."""
    from huggingface_hub import constants, try_to_load_from_cache  # noqa: PLC0415 (only here)

    def cached(name: str) -> Optional[str]:
        try:
            path = try_to_load_from_cache(model, name, cache_dir=hub_cache)
        except Exception:   # noqa: BLE001 - an unreadable cache is a miss here, never a crashed doctor
            path = None
        return path if isinstance(path, str) else None

    index_path = cached("model_index.json")
    try:
        index = json.loads(Path(index_path).read_text()) if index_path else None
    except (OSError, ValueError):   # damaged: SD's components are what is looked for
        index = None
    found, missing = {}, []
    for name in model_files(index if isinstance(index, dict) else None):
        path = cached(name)
        if path is not None:
            found[name] = path
        else:
            missing.append(name)
    snapshot = found["model_index.json"].rsplit("/", 1)[0] if "model_index.json" in found else None
    return {"model": model, "cached": not missing, "missing": missing, "snapshot": snapshot,
            "hub_cache": str(hub_cache or constants.HF_HUB_CACHE)}


def extras() -> Dict:
    """{extra: {"present", "version", "for"}}, plus "h264": the encoder ``write_video`` would use."""
    out = {}
    for name, (module, dists, use) in EXTRAS.items():
        present = importlib.util.find_spec(module) is not None
        version = None
        for dist in dists:
            try:
                version = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                pass
        out[name] = {"present": present, "version": version, "for": use}
    with warnings.catch_warnings():   # it warns when it falls back: said here in its own words
        warnings.simplefilter("ignore")
        try:
            encoder = video_encoder()
        except ConfigError:   # no PyAV: "av" shows as missing among the packages
            encoder = None
    out["h264"] = {"present": encoder in H264_ENCODERS, "version": None, "encoder": encoder,
                   "for": "H.264 output videos (else MPEG-4)"}
    return out


def memory() -> Dict:
    """Free host memory (as the memory planner counts it) and each CUDA device's free memory."""
    available, source = host_available()
    out = {"ram_available_bytes": available, "ram_source": source,
           "ram_total_bytes": proc_bytes("/proc/meminfo", "MemTotal"), "vram": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out["vram"].append({"device": f"cuda:{i}", "free_bytes": free, "total_bytes": total})
    return out


def cache_summary(cache_dir: Optional[str] = None) -> Dict:
    root, source = caches.cache_root_and_source(cache_dir)
    reports = caches.scan(root)
    return {"root": str(root), "root_from": source, "total_bytes": sum(r.bytes for r in reports),
            "kinds": [{"kind": r.kind, "path": r.path, "entries": len(r.entries), "bytes": r.bytes} for r in reports]}


def setup(cache_dir: Optional[str] = None) -> Dict:
    return {"model": model_cache(), "caches": cache_summary(cache_dir), "extras": extras(), "memory": memory()}


def _targets(device: Optional[str], dtype: Optional[str]) -> List[tuple]:
    if device:
        devs = [resolve_device(device)]
    else:
        devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [(d, resolve_dtype(dtype, d)) for d in devs]


def backend_table(device: Optional[str] = None, dtype: Optional[str] = None) -> List[Dict]:
    rows = []
    for dev, dt in _targets(device, dtype):
        for op in kernels.ops():
            for b, v in zip(kernels.backends(op), probe.verdicts(op, dev, dt)):
                rows.append({"device": str(dev), "dtype": str(dt).replace("torch.", ""), "op": op,
                             "backend": v.name, "chosen": v.chosen, "runs": v.runs, "reasons": v.reasons,
                             "only_by_name": v.auto_reason, "verified": b.verified})
    return rows


def unet_backend_table(device: Optional[str] = None, dtype: Optional[str] = None) -> List[Dict]:
    """--backend choices per device: whether each can run here, why not, and where it was verified."""
    return [{"device": str(dev), "dtype": str(dt).replace("torch.", ""), "backend": name,
             "reasons": not_supported_reasons(name, dev, dt), "verified": VERIFIED[name]}
            for dev, dt in _targets(device, dtype) for name in NAMES]


# (heads, head dim = channels of the nearest-neighbour inputs, keyframes, tokens): irregular sizes;
# on GPUs several tiles per axis and every padded head-dim class (64, 128, 256) of SD 1.5/2.x
CHECK_SHAPES = {"cpu": [(3, 40, 3, 37)],
                "gpu": [(5, 64, 3, 300), (8, 40, 2, 257), (8, 80, 2, 129), (4, 160, 2, 100), (2, 200, 5, 77)]}


def run_checks(device: Optional[str] = None, dtype: Optional[str] = None) -> List[verify.CheckResult]:
    """Every runnable non-reference backend against the reference, fp32 and the device's dtype."""
    results = []
    for dev, dt in _targets(device, dtype):
        shapes = CHECK_SHAPES["cpu" if dev.type == "cpu" else "gpu"]
        for dtype_, (heads, dim, n_kf, seq) in itertools.product(dict.fromkeys([torch.float32, dt]), shapes):
            g = torch.Generator().manual_seed(1234)
            for op in kernels.ops():
                args, _ = probe.sample_args(op, dev, dtype_, heads=heads, dim=dim, n_kf=n_kf, seq=seq, generator=g)
                for v in probe.verdicts(op, dev, dtype_):
                    if not v.runs or v.name == "torch":
                        continue
                    try:
                        results += verify.check(op, v.name, args)
                    except Exception as exc:  # a backend that crashes is a failed check, not a crashed doctor
                        results.append(verify.CheckResult(op, v.name, str(dtype_), "", float("inf"), 0.0,
                                                          f"raised {one_line(exc)}"))
    return results


def report(device: Optional[str] = None, dtype: Optional[str] = None, check: bool = False,
           cache_dir: Optional[str] = None) -> Dict:
    out = {"environment": environment(), "setup": setup(cache_dir), "backends": backend_table(device, dtype),
           "unet_backends": unet_backend_table(device, dtype)}
    if check:
        out["checks"] = [dict(vars(r), ok=r.ok) for r in run_checks(device, dtype)]
    return out


def format_report(rep: Dict) -> str:
    env = rep["environment"]
    lines = [f"tokenflow {env['tokenflow']}  python {env['python']}  {env['platform']}",
             "packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()),
             f"torch CUDA: {env['torch_cuda'] or 'none (CPU build)'}; TRITON_INTERPRET={'1' if env['triton_interpret'] else '0'}",
             "devices: " + "; ".join(" ".join(f"{v}" for v in d.values()) for d in env["devices"])]
    if "setup" in rep:
        lines += format_setup(rep["setup"])
    current = None
    for row in rep["backends"]:
        key = (row["device"], row["dtype"], row["op"])
        if key != current:
            current = key
            lines.append(f"\n{row['op']} on {row['device']} ({row['dtype']}):")
        if row["chosen"]:
            state = "CHOSEN"
        elif not row["runs"]:
            state = "no: " + "; ".join(row["reasons"])
        elif row["only_by_name"]:
            state = "by name only: " + row["only_by_name"]
        else:
            state = "runs (lower priority)"
        lines.append(f"  {row['backend']:9s} {state}   [verified: {row['verified']}]")
    current = None
    for row in rep.get("unet_backends", []):
        if row["device"] != current:
            current = row["device"]
            lines.append(f"\nUNet backends (--backend) on {row['device']} ({row['dtype']}):")
        state = "runs" if not row["reasons"] else "no: " + "; ".join(row["reasons"])
        lines.append(f"  {row['backend']:9s} {state}   [verified: {row['verified']}]")
    if "checks" in rep:
        lines.append("\nchecks against the torch reference:")
        for c in rep["checks"]:
            r = verify.CheckResult(**{k: v for k, v in c.items() if k != "ok"})
            lines.append("  " + r.describe())
        if not rep["checks"]:
            lines.append("  (no non-reference backend runs here)")
    return "\n".join(lines)


def format_setup(setup_: Dict) -> List[str]:
    gb = caches.human
    model, mem, cache = setup_["model"], setup_["memory"], setup_["caches"]
    if model["cached"]:
        lines = [f"\nmodel: {model['model']} is in the Hugging Face cache ({model['snapshot']})"]
    else:
        lines = [f"\nmodel: {model['model']} is not in the Hugging Face cache ({model['hub_cache']}; missing "
                 f"{', '.join(model['missing'])}): the first edit downloads about 5 GB; or pass --model DIR with a "
                 "downloaded copy (./run.sh demo: TOKENFLOW_MODEL=DIR); --model tiny runs offline, random weights"]
    ram = f"memory: {gb(mem['ram_available_bytes'])} RAM available"
    if mem["ram_total_bytes"]:
        ram += f" of {gb(mem['ram_total_bytes'])}"
    ram += "".join(f"; {v['device']} {gb(v['free_bytes'])} free of {gb(v['total_bytes'])}" for v in mem["vram"])
    lines.append(ram + ("" if mem["vram"] else "; no CUDA device"))
    lines.append("extras: " + ", ".join(
        f"{name} {'yes' if e['present'] else 'no'}" + (f" ({e.get('encoder') or e['version']})"
                                                       if e['present'] and (e.get('encoder') or e['version']) else "")
        for name, e in setup_["extras"].items()))
    if setup_["extras"]["h264"]["encoder"] is None:
        lines.append(f"  PyAV is missing: videos can be neither read nor written ({AV_INSTALL})")
    elif not setup_["extras"]["h264"]["present"]:
        lines.append(f"  no H.264 encoder in this PyAV build: videos are written as {setup_['extras']['h264']['encoder']}")
    lines.append(f"caches: {cache['root']} (from {cache['root_from']}), {gb(cache['total_bytes'])} in all"
                 "; `tokenflow cache ls|prune|clear`")
    lines += [f"  {k['kind']:13s} {k['entries']:5d} entries {gb(k['bytes']):>10s}  {k['path']}"
              for k in cache["kinds"] if k["entries"]]
    return lines


def main(args) -> int:
    rep = report(args.device, args.dtype, args.check, getattr(args, "cache_dir", None))
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    failed = [c for c in rep.get("checks", []) if not c["ok"]]
    return 1 if failed else 0
