"""Benchmark: extended keyframe attention, every backend on the same math, one run.

Variants (each computes [3, K, S, heads*D] from q, k, v of that shape, branches [source, uncond, cond]):
  triton        tokenflow's fused kernel (CUDA; CPU only with --variants triton and TRITON_INTERPRET=1)
  sdpa-<name>   the torch reference (PyTorch SDPA, layout copies included) pinned to one SDPA backend
  xformers      memory-efficient attention, where xFormers imports
  original      the original implementation's compute pattern (``benchmark.original_kernels``): K/V of
                all keyframes tiled K times, a Python loop over heads, the score matrix materialised
                for all keyframes up to 12 and one query keyframe at a time above, as the original

A variant whose materialised scores cannot fit in the device's free memory (SDPA's math backend:
[H, K*S, K*S] float32 scores and their softmax, ~420 GB at K=25, S=4096, 5 heads; the original
likewise) is not run: its row says so under ``skipped``.

Reports the median time, TFLOP/s (matmul FLOPs: 4*D per query-key pair), GB/s of the q/k/v/out
traffic, peak memory per call, and each variant's speed relative to the best SDPA backend.

  python bench/bench_keyframe_attention.py                      # CPU: small sizes
  python bench/bench_keyframe_attention.py --device cuda --dtype float16 --preset full
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout without installing

from tokenflow.benchmark.measure import (  # noqa: E402
    cpu_peak_bytes,
    cuda_peak_bytes,
    fmt_bytes,
    kernel_parser,
    median_seconds,
    resolve_kernel_args,
    write_results,
)
from tokenflow.benchmark.original_kernels import keyframe_attention_original, query_batch  # noqa: E402
from tokenflow.engine.memory import host_available  # noqa: E402
from tokenflow.errors import one_line  # noqa: E402
from tokenflow.kernels.keyframe_attention import keyframe_attention, keyframe_attention_torch  # noqa: E402

# (tokens S, heads, head dim): SD 2.1 at 512x512 has D = 64 at every resolution; SD 1.5 has 8 heads
SD21 = [(4096, 5, 64), (1024, 10, 64), (256, 20, 64)]
SD15 = [(4096, 8, 40), (1024, 8, 80), (256, 8, 160)]
PRESETS = {
    "full": [(s, h, d, k) for s, h, d in SD21 + SD15 for k in (5, 13, 25)],
    "small": [(256, 5, 64, 5), (256, 5, 64, 13), (256, 8, 40, 13), (1024, 5, 64, 5), (1024, 8, 80, 5)],
    "target": [(4096, 5, 64, 25)],   # issue 18's H200 target: SD 2.1's largest attention level, 25 keyframes
}
SDPA = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def score_bytes(name: str, case: dict) -> int:
    """Bytes of the score matrices a variant materialises at once (0: none): float32 scores and
    their softmax. SDPA's math backend scores the joint K*S sequence of all heads in one call (the
    reference passes [1, H, K*S, D]); the original one head and ``query_batch(K)`` query keyframes."""
    n_kf, seq, heads = case["K"], case["S"], case["heads"]
    if name == "sdpa-math":
        return 2 * 4 * heads * (n_kf * seq) ** 2
    if name == "original":
        return 2 * 4 * query_batch(n_kf) * seq * n_kf * seq
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_bytes(device: torch.device) -> int:
    """What the device can still allocate: CUDA's free memory, else the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available()[0]


def make_inputs(case: dict):
    device, dtype = torch.device(case["device"]), getattr(torch, case["dtype"])
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (3, case["K"], case["S"], case["heads"] * case["D"])
    return [torch.randn(shape, generator=g).to(device, dtype) for _ in range(3)]


def build(name: str, case: dict):
    """A zero-argument callable running variant ``name`` on fresh inputs for ``case``."""
    q, k, v = make_inputs(case)
    heads = case["heads"]
    if name == "triton":
        return lambda: keyframe_attention(q, k, v, heads, backend="triton")
    if name == "xformers":
        return lambda: keyframe_attention(q, k, v, heads, backend="xformers")
    if name == "original":
        return lambda: keyframe_attention_original(q, k, v, heads)
    if name.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA[name[5:]])

        def run():
            with sdpa_kernel([backend]):
                return keyframe_attention_torch(q, k, v, heads)
        return run
    raise KeyError(name)


def default_variants(device: torch.device):
    names = [f"sdpa-{n}" for n in (SDPA if device.type == "cuda" else ("flash", "math"))] + ["original"]
    if device.type == "cuda":
        names.insert(0, "triton")
        try:
            import xformers.ops  # noqa: F401
        except Exception:
            pass
        else:
            names.insert(1, "xformers")
    return names


def main(argv=None) -> int:
    p = kernel_parser(__doc__, "keyframe_attention")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: full on CUDA, small on CPU")
    args = p.parse_args(argv)
    device, dtype, reps, variants = resolve_kernel_args(args, default_variants)
    preset = args.preset or ("full" if device.type == "cuda" else "small")
    esize = torch.finfo(getattr(torch, dtype)).bits // 8
    rows = []
    print(f"{'variant':14s} {'K':>3s} {'S':>5s} {'H':>3s} {'D':>4s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'peak mem':>13s}")
    for seq, heads, dim, n_kf in PRESETS[preset]:
        case = {"device": str(device), "dtype": dtype, "K": n_kf, "S": seq, "heads": heads, "D": dim}
        flops = 4.0 * dim * heads * (n_kf * seq * seq + 2 * n_kf * seq * n_kf * seq)
        traffic = 4 * 3 * n_kf * seq * heads * dim * esize
        case_rows = []
        reference = keyframe_attention_torch(*make_inputs(case), heads).float()
        for name in variants:
            row = dict(case, variant=name)
            needed, free = score_bytes(name, case), free_bytes(device)
            if needed > free:
                row["skipped"] = f"its scores need {_size(needed)} at once; {_size(free)} of {device.type} memory is free"
                print(f"{name:14s} {n_kf:3d} {seq:5d} {heads:3d} {dim:4d} skipped: {row['skipped']}")
                case_rows.append(row)
                continue
            try:
                fn = build(name, case)
                # timed variants must compute the same thing: max abs difference to the reference
                row["max_abs_diff_vs_reference"] = (fn().float() - reference).abs().max().item()
                secs = median_seconds(fn, device, reps=reps, warmup=1 if device.type == "cpu" else 3)
                row.update(ms=secs * 1e3, tflops=flops / secs / 1e12, gbps=traffic / secs / 1e9)
                del fn
                if not args.no_memory:
                    row["peak_bytes"] = cuda_peak_bytes(build(name, case), device) if device.type == "cuda" \
                        else cpu_peak_bytes(build, name, case)
            except Exception as exc:  # an SDPA backend that refuses, an OOM: recorded, run goes on
                row["error"] = one_line(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            case_rows.append(row)
        sdpa = [r["ms"] for r in case_rows if r["variant"].startswith("sdpa-") and "ms" in r]
        for row in case_rows:
            if "ms" in row and sdpa:
                row["speedup_vs_best_sdpa"] = min(sdpa) / row["ms"]
            if "skipped" in row:
                continue
            if "error" in row:
                print(f"{row['variant']:14s} {n_kf:3d} {seq:5d} {heads:3d} {dim:4d} error: {row['error']}")
            else:
                print(f"{row['variant']:14s} {n_kf:3d} {seq:5d} {heads:3d} {dim:4d} {row['ms']:9.2f} "
                      f"{row['tflops']:8.2f} {row['gbps']:7.1f} {fmt_bytes(row.get('peak_bytes', '-')):>13s}"
                      f"  x{row.get('speedup_vs_best_sdpa', float('nan')):.2f} vs best SDPA"
                      f"  diff {row['max_abs_diff_vs_reference']:.1e}")
        rows += case_rows
    path = write_results("keyframe_attention", device, rows, args.out,
                         {"dtype": dtype, "preset": preset, "reps": reps, "threads": torch.get_num_threads()},
                         ROOT / "bench" / "results")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
