"""Measured dense matmul rate of the device: the yardstick for "fraction of peak".

One square ``[n, n] @ [n, n]`` product is ``2 n^3`` FLOPs. After ``warmup`` untimed products,
``repeats`` products are timed one by one (``measure.time_runs``: CUDA events on GPUs,
``perf_counter`` on the CPU) and the median is reported as TFLOP/s. Defaults: n = 8192, 3 warm-up,
20 timed on CUDA (float16 and bfloat16, plus the benchmark's dtype); n = 2048 (1024 with fewer
than 4 threads), 1 warm-up, 5 timed on the CPU (float32, plus the benchmark's dtype). A measured peak is what this machine,
this torch and these libraries achieve on the easiest possible workload, so stage rates divided
by it say how far an edit is from the hardware's practical limit, not its datasheet one.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

import torch

from tokenflow.benchmark.measure import time_runs


@dataclass
class MatmulPeak:
    dtype: str
    size: int
    repeats: int
    median_s: float
    tflops: float
    all_s: list

    def as_dict(self) -> dict:
        return asdict(self)


def default_dtypes(device: torch.device, run_dtype: torch.dtype) -> list:
    """float16 + bfloat16 on CUDA, float32 on the CPU; always the benchmark's own dtype too."""
    device = torch.device(device)
    wanted = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        wanted.remove(torch.bfloat16)
    return wanted + ([run_dtype] if run_dtype not in wanted else [])


def default_size(device: torch.device) -> int:
    if torch.device(device).type == "cuda":
        return 8192
    return 2048 if torch.get_num_threads() >= 4 else 1024


def measure(device: torch.device, dtype: torch.dtype, size: Optional[int] = None,
            repeats: Optional[int] = None, warmup: Optional[int] = None) -> MatmulPeak:
    """Median TFLOP/s of ``size``-square matmuls in ``dtype`` on ``device`` (see module doc)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = size or default_size(device)
    repeats = repeats or (20 if cuda else 5)
    warmup = (3 if cuda else 1) if warmup is None else warmup
    times = _time_matmuls(device, dtype, size, repeats, warmup)
    median = statistics.median(times)
    if cuda:   # the operands are gone with _time_matmuls' frame
        torch.cuda.empty_cache()
    return MatmulPeak(dtype=str(dtype).removeprefix("torch."), size=size, repeats=repeats, median_s=median,
                      tflops=2.0 * size ** 3 / median / 1e12, all_s=times)


def _time_matmuls(device: torch.device, dtype: torch.dtype, size: int, repeats: int, warmup: int) -> List[float]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return time_runs(lambda: torch.mm(a, b, out=out), device, repeats, warmup)


def measure_all(device: torch.device, dtypes: Iterable[torch.dtype], size: Optional[int] = None,
                repeats: Optional[int] = None) -> Dict[str, MatmulPeak]:
    """{dtype name: MatmulPeak} for each dtype."""
    return {str(d).removeprefix("torch."): measure(device, d, size, repeats) for d in dtypes}
