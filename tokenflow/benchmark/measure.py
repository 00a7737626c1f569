"""Measuring one operation: timing medians, peak memory per call, the kernel benchmarks' JSON.

The helpers of the kernel benchmarks (``bench/bench_keyframe_attention.py``, ``bench/bench_nearest.py``)
and of anything else that times a callable (``peak.measure``'s matmuls):

Timing (``time_runs``, ``median_seconds``): after ``warmup`` untimed calls, each of ``reps`` calls
is timed on its own: CUDA events on CUDA devices, ``perf_counter`` around the call and a device
sync elsewhere (MPS queues work like CUDA; the CPU runs it synchronously).

Peak memory of one call: on CUDA (``cuda_peak_bytes``), ``max_memory_allocated`` above what was
allocated before the call, after one warm-up call; on the CPU (``cpu_peak_bytes``), the growth of
the peak resident set (Linux VmHWM, reset via /proc/self/clear_refs) during one call of the
variant in a fresh spawned process, after one warm-up call (lazy imports and one-time buffers are
not counted), so memory freed by earlier variants cannot hide it. (``ru_maxrss`` would not do:
Linux carries it over from the parent across fork and exec.)

Results (``write_results``): one JSON document per run, written atomically through
``benchmark.report.write_json`` with the device, versions and command line.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from tokenflow.benchmark.report import write_json
from tokenflow.benchmark.system import reset_peak_rss, status_bytes
from tokenflow.config import Ranged, Rule
from tokenflow.device import device_name, sync, versions
from tokenflow.errors import ConfigError

MAX_REPS = 10_000   # timed runs per case of a kernel benchmark

# ----------------------------------------------------------------------------- timing


def time_runs(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 2) -> List[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones (see module doc)."""
    device = torch.device(device)
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
            sync(device)
            times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 2) -> float:
    return statistics.median(time_runs(fn, device, reps, warmup))


# ----------------------------------------------------------------------------- peak memory


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes ``fn`` allocates at its peak on a CUDA device, above what was allocated before it."""
    fn()  # warm-up: autotuning and one-time workspaces are not counted
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _child_peak(queue, build: Callable, name: str, case: dict) -> None:
    try:
        fn = build(name, case)  # inputs are made here, before the baseline
        fn()                    # warm-up: imports, one-time workspaces
        try:  # hand freed heap pages back, so reusing them counts as growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        if not reset_peak_rss():
            raise OSError("the peak resident set cannot be reset here (Linux /proc/self/clear_refs)")
        base = status_bytes("VmRSS")
        fn()
        queue.put(status_bytes("VmHWM") - base)
    except Exception as exc:  # reported, not raised: one failing variant must not end the run
        queue.put(f"{type(exc).__name__}: {exc}")


def cpu_peak_bytes(build: Callable[[str, dict], Callable[[], object]], name: str, case: dict) -> object:
    """Peak RSS growth of one call of variant ``name`` on ``case`` in a fresh process (bytes, or an
    error message). ``build(name, case)`` makes the callable in the child: it must be importable
    there (a module-level function of the benchmark script)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak, args=(queue, build, name, case))
    proc.start()
    proc.join(600)
    return queue.get() if not queue.empty() else f"child exited with {proc.exitcode}"


def fmt_bytes(n: object) -> str:
    return f"{n / 2**20:9.1f} MiB" if isinstance(n, (int, float)) else str(n)[:40]


# ----------------------------------------------------------------------------- kernel benchmark scripts


class _KernelParser(argparse.ArgumentParser):
    """A flag outside its range (``config.Ranged``: a ConfigError) is one line and exit 2."""

    def parse_known_args(self, args=None, namespace=None):
        try:
            return super().parse_known_args(args, namespace)
        except ConfigError as exc:
            self.exit(2, f"{self.prog}: error: {exc}\n")


def kernel_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The flags every kernel benchmark has; ``resolve_kernel_args`` fills the device-dependent defaults."""
    p = _KernelParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all that exist here)")
    p.add_argument("--reps", type=Ranged("--reps", int, Rule(minimum=1, maximum=MAX_REPS)), default=None,
                   help="timed runs per case (default 20 CUDA, 3 CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--out", help=f"JSON path (default bench/results/{name}_<device>_<date>.json)")
    Ranged.add_to_help(p)
    return p


def resolve_kernel_args(args: argparse.Namespace, default_variants: Callable[[torch.device], List[str]]):
    """(device, dtype name, reps, variants) with the defaults of the device."""
    device = torch.device(args.device)
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    reps = args.reps or (20 if device.type == "cuda" else 3)
    variants = args.variants.split(",") if args.variants else default_variants(device)
    return device, dtype, reps, variants


def write_results(name: str, device: torch.device, rows: List[dict], out: Optional[str], extra: dict,
                  folder: Path) -> Path:
    """``out``, or ``folder/<name>_<device type>_<date>.json``: the rows with the device, versions
    and command line (NaN / infinity become null). Written atomically."""
    stamp = datetime.date.today().isoformat()
    path = Path(out) if out else Path(folder) / f"{name}_{torch.device(device).type}_{stamp}.json"
    doc = {"benchmark": name, "date": stamp, "device": device_name(device), "versions": versions(),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), **extra, "results": rows}
    return write_json(doc, str(path))
