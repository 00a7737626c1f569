"""``tokenflow doctor``: the environment, and for each kernel op which backends run here and why not.

With ``--check`` every backend that can run is also compared with the torch reference on fresh
random inputs of irregular shapes (see ``tokenflow.kernels.verify``): the way to verify the
Triton, FAISS and xFormers paths on a machine CI has never seen.
"""
from __future__ import annotations

import importlib.metadata
import itertools
import json
import platform
import sys
from typing import Dict, List, Optional

import torch

from tokenflow import __version__, kernels
from tokenflow.device import mps_available, resolve_device, resolve_dtype
from tokenflow.engine.backends import NAMES, VERIFIED, not_supported_reasons
from tokenflow.errors import one_line
from tokenflow.kernels import probe, support, verify

PACKAGES = ("torch", "diffusers", "transformers", "triton", "faiss-cpu", "faiss-gpu-cu12", "xformers", "av", "numpy",
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


def report(device: Optional[str] = None, dtype: Optional[str] = None, check: bool = False) -> Dict:
    out = {"environment": environment(), "backends": backend_table(device, dtype),
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


def main(args) -> int:
    rep = report(args.device, args.dtype, args.check)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    failed = [c for c in rep.get("checks", []) if not c["ok"]]
    return 1 if failed else 0
