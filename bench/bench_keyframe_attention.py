"""Benchmark: extended keyframe attention, every backend on the same math, one run.

Variants (each computes [3, K, S, heads*D] from q, k, v of that shape, branches [source, uncond, cond]):
  triton        tokenflow's fused kernel (CUDA; CPU only with --variants triton and TRITON_INTERPRET=1)
  sdpa-<name>   the torch reference (PyTorch SDPA, layout copies included) pinned to one SDPA backend
  xformers      memory-efficient attention, where xFormers imports
  original      the original implementation's formulation: K/V of all keyframes tiled K times,
                a Python loop over heads, the score matrix materialised

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
from tokenflow.kernels.keyframe_attention import keyframe_attention, keyframe_attention_torch  # noqa: E402

# (tokens S, heads, head dim): SD 2.1 at 512x512 has D = 64 at every resolution; SD 1.5 has 8 heads
SD21 = [(4096, 5, 64), (1024, 10, 64), (256, 20, 64)]
SD15 = [(4096, 8, 40), (1024, 8, 80), (256, 8, 160)]
PRESETS = {
    "full": [(s, h, d, k) for s, h, d in SD21 + SD15 for k in (5, 13, 25)],
    "small": [(256, 5, 64, 5), (256, 5, 64, 13), (256, 8, 40, 13), (1024, 5, 64, 5), (1024, 8, 80, 5)],
}
SDPA = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def original_formulation(q, k, v, heads: int) -> torch.Tensor:
    """Written from the description of the original: tile K/V per keyframe, loop heads, full scores."""
    _, n_kf, seq, channels = q.shape
    dim = channels // heads
    out = torch.empty_like(q)
    for b in range(3):
        if b == 0:
            keys, vals = k[0], v[0]                                             # [K, S, C]
        else:
            keys = k[b].reshape(1, n_kf * seq, channels).repeat(n_kf, 1, 1)     # [K, K*S, C]
            vals = v[b].reshape(1, n_kf * seq, channels).repeat(n_kf, 1, 1)
        for h in range(heads):
            sl = slice(h * dim, (h + 1) * dim)
            scores = torch.bmm(q[b, :, :, sl], keys[:, :, sl].transpose(1, 2)) * dim ** -0.5
            out[b, :, :, sl] = torch.bmm(scores.softmax(dim=-1), vals[:, :, sl])
    return out


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
        return lambda: original_formulation(q, k, v, heads)
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
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            case_rows.append(row)
        sdpa = [r["ms"] for r in case_rows if r["variant"].startswith("sdpa-") and "ms" in r]
        for row in case_rows:
            if "ms" in row and sdpa:
                row["speedup_vs_best_sdpa"] = min(sdpa) / row["ms"]
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
