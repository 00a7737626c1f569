"""Shared helpers of the kernel benchmarks: timing medians, peak memory, environment, JSON out.

Timing: CUDA events on GPUs, perf_counter on CPU, after warm-up; the median of ``reps`` runs.
Peak memory: on CUDA, ``max_memory_allocated`` above what was allocated before the call; on CPU,
the growth of the peak resident set (Linux VmHWM, reset via /proc/self/clear_refs) during one call
of the variant in a fresh spawned process, after one warm-up call (lazy imports and one-time
buffers are not counted), so memory freed by earlier variants cannot hide it.
(``ru_maxrss`` would not do: Linux carries it over from the parent across fork and exec.)
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The flags every kernel benchmark has; ``resolve_args`` fills the device-dependent defaults."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all that exist here)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per case (default 20 CUDA, 3 CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--out", help=f"JSON path (default bench/results/{name}_<device>_<date>.json)")
    return p


def resolve_args(args: argparse.Namespace, default_variants: Callable[[torch.device], List[str]]):
    """(device, dtype name, reps, variants) with the defaults of the device."""
    device = torch.device(args.device)
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    reps = args.reps or (20 if device.type == "cuda" else 3)
    variants = args.variants.split(",") if args.variants else default_variants(device)
    return device, dtype, reps, variants


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    fn()  # warm-up: autotuning and one-time workspaces are not counted
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _child_peak(queue, build: Callable, name: str, case: dict) -> None:
    try:
        fn = build(name, case)  # inputs are made here, before the baseline
        fn()                    # warm-up: imports, one-time workspaces
        try:  # hand freed heap pages back, so reusing them counts as growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")        # reset VmHWM to the current RSS
        base = _status_kib("VmRSS")
        fn()
        queue.put((_status_kib("VmHWM") - base) * 1024)
    except Exception as exc:  # reported, not raised: one failing variant must not end the run
        queue.put(f"{type(exc).__name__}: {exc}")


def cpu_peak_bytes(build: Callable, name: str, case: dict) -> object:
    """Peak RSS growth of one call of variant ``name`` on ``case`` in a fresh process (bytes, or an error)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak, args=(queue, build, name, case))
    proc.start()
    proc.join(600)
    return queue.get() if not queue.empty() else f"child exited with {proc.exitcode}"


def versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "triton", "diffusers", "faiss-cpu", "faiss-gpu-cu12", "xformers", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["cuda"] = torch.version.cuda or "none"
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def write_results(name: str, device: torch.device, rows: List[dict], out: Optional[str], extra: dict) -> Path:
    """bench/results/<name>_<device>_<date>.json (or ``out``); written atomically."""
    stamp = datetime.date.today().isoformat()
    path = Path(out) if out else RESULTS / f"{name}_{device.type}_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "date": stamp, "device": device_name(device), "versions": versions(),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), **extra, "results": rows}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def fmt_bytes(n: object) -> str:
    return f"{n / 2**20:9.1f} MiB" if isinstance(n, (int, float)) else str(n)[:40]
