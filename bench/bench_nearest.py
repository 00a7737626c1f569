"""Benchmark: cosine nearest neighbours and the weighted gather of the propagation pass, one run.

One case is one group of F frames matched against P keyframes each (TokenFlow: groups of 8
frames, P = 2), N = M = S tokens of C channels (SD at 512x512). Variants of ``cosine_nearest``:
  triton          tokenflow's fused kernel (no similarity matrix)                 (CUDA)
  torch           the reference: float32 normalise + chunked matmul + argmax
  matmul-argmax   normalise + one matmul + argmax in the input dtype, matrix materialised
  original        the original's formulation: (F*N) x (P*M) similarity matrix, argmax per keyframe
  faiss           exact inner-product index on normalised keys (faiss-cpu; GPU index with faiss-gpu)
and of the gather (``kernels.gather.gather_blend``; its variants keep the names propagate-triton and
propagate-torch of earlier results). Reports median time, TFLOP/s (2*F*P*N*M*C), GB/s of the
minimal traffic (search: read x and the paired keyframes once, write int64 indices; gather: read
3*F*P*N*C gathered rows, write 3*F*N*C), peak memory, and each variant's speed relative to
``matmul-argmax``.

  python bench/bench_nearest.py                               # CPU, small sizes
  python bench/bench_nearest.py --device cuda --dtype float16
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
from tokenflow.errors import one_line  # noqa: E402
from tokenflow.kernels.gather import gather_blend  # noqa: E402
from tokenflow.kernels.nearest import cosine_nearest  # noqa: E402

# (tokens S, channels C): SD 2.1 / 1.5 at 512x512, the three resolutions with self-attention
SIZES = [(4096, 320), (1024, 640), (256, 1280)]
N_FRAMES, N_PAIRS, N_KEYFRAMES = 8, 2, 5


def make_inputs(case: dict):
    device, dtype = torch.device(case["device"]), getattr(torch, case["dtype"])
    g = torch.Generator(device="cpu").manual_seed(0)
    f, s, c = case["F"], case["S"], case["C"]
    x = torch.randn(f, s, c, generator=g).to(device, dtype)
    keys = torch.randn(case["K"], s, c, generator=g).to(device, dtype)
    pairs = torch.tensor([[1, 2]] * f, device=device)[:, :case["P"]]   # a group shares its keyframes
    kf_out = torch.randn(3, case["K"], s, c, generator=g).to(device, dtype)
    idx = torch.randint(s, (f, case["P"], s), generator=g).to(device)
    weights = torch.full((f, case["P"]), 1.0 / case["P"], device=device)
    return x, keys, pairs, kf_out, idx, weights


def matmul_argmax(x, keys, pairs):
    xn = x / x.norm(dim=-1, keepdim=True)
    kn = keys / keys.norm(dim=-1, keepdim=True)
    idx = torch.empty(x.shape[0], pairs.shape[1], x.shape[1], dtype=torch.long, device=x.device)
    for p in range(pairs.shape[1]):
        for slot in pairs[:, p].unique().tolist():
            frames = (pairs[:, p] == slot).nonzero()[:, 0]
            sim = xn[frames].reshape(-1, x.shape[-1]) @ kn[slot].T
            idx[frames, p] = sim.argmax(dim=-1).view(len(frames), x.shape[1])
    return idx


def original_formulation(x, keys, pairs):
    """One (F*N) x (P*M) matrix per group (all frames of a group share their keyframes)."""
    f, n, c = x.shape
    xn = x / x.norm(dim=-1, keepdim=True)
    kn = keys[pairs[0]]                                   # [P, M, C]
    kn = kn / kn.norm(dim=-1, keepdim=True)
    sim = xn.reshape(f * n, c) @ kn.reshape(-1, c).T      # [F*N, P*M]
    best = sim.view(f * n, pairs.shape[1], -1).argmax(dim=-1)
    return best.view(f, n, -1).permute(0, 2, 1)


def build(name: str, case: dict):
    x, keys, pairs, kf_out, idx, weights = make_inputs(case)
    if name in ("triton", "torch", "faiss"):
        return lambda: cosine_nearest(x, keys, pairs, backend=name)
    if name == "matmul-argmax":
        return lambda: matmul_argmax(x, keys, pairs)
    if name == "original":
        return lambda: original_formulation(x, keys, pairs)
    if name.startswith("propagate-"):
        backend = name.split("-", 1)[1]
        return lambda: gather_blend(kf_out, idx, pairs, weights, backend=backend)
    raise KeyError(name)


def default_variants(device: torch.device):
    names = ["torch", "matmul-argmax", "original"]
    names += ["triton"] if device.type == "cuda" else []
    try:
        import faiss  # noqa: F401
    except Exception:
        pass
    else:
        names.append("faiss")
    names += ["propagate-torch"] + (["propagate-triton"] if device.type == "cuda" else [])
    return names


def main(argv=None) -> int:
    p = kernel_parser(__doc__, "nearest")
    p.add_argument("--frames", type=int, default=N_FRAMES, help="frames per group (default 8)")
    args = p.parse_args(argv)
    device, dtype, reps, variants = resolve_kernel_args(args, default_variants)
    rows = []
    esize = torch.finfo(getattr(torch, dtype)).bits // 8
    print(f"{'variant':17s} {'F':>2s} {'S':>5s} {'C':>5s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'peak mem':>13s}")
    for seq, channels in SIZES:
        case = {"device": str(device), "dtype": dtype, "F": args.frames, "P": N_PAIRS, "K": N_KEYFRAMES,
                "S": seq, "C": channels}
        flops = 2.0 * args.frames * N_PAIRS * seq * seq * channels
        search_bytes = (args.frames + N_PAIRS) * seq * channels * esize + args.frames * N_PAIRS * seq * 8
        gather_bytes = 3 * args.frames * (N_PAIRS + 1) * seq * channels * esize
        case_rows, reference = [], None
        for name in ["torch"] + [v for v in variants if v != "torch"]:
            row = dict(case, variant=name)
            try:
                fn = build(name, case)
                if reference is None and name == "torch":
                    reference = fn()
                elif reference is not None and not name.startswith("propagate"):
                    # timed variants must compute the same thing (ties aside): share of equal indices
                    row["agree_with_reference"] = (fn() == reference).float().mean().item()
                secs = median_seconds(fn, device, reps=reps, warmup=1 if device.type == "cpu" else 3)
                row.update(ms=secs * 1e3, gbps=(gather_bytes if name.startswith("propagate") else search_bytes)
                           / secs / 1e9)
                if not name.startswith("propagate"):
                    row["tflops"] = flops / secs / 1e12
                del fn
                if not args.no_memory:
                    row["peak_bytes"] = cuda_peak_bytes(build(name, case), device) if device.type == "cuda" \
                        else cpu_peak_bytes(build, name, case)
            except Exception as exc:
                row["error"] = one_line(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            case_rows.append(row)
        base = [r["ms"] for r in case_rows if r["variant"] == "matmul-argmax" and "ms" in r]
        for row in case_rows:
            if "ms" in row and base and not row["variant"].startswith("propagate"):
                row["speedup_vs_matmul_argmax"] = base[0] / row["ms"]
            if "error" in row:
                print(f"{row['variant']:17s} {args.frames:2d} {seq:5d} {channels:5d} error: {row['error']}")
            else:
                speed = row.get("speedup_vs_matmul_argmax")
                print(f"{row['variant']:17s} {args.frames:2d} {seq:5d} {channels:5d} {row['ms']:9.2f} "
                      f"{row.get('tflops', float('nan')):8.3f} {row['gbps']:7.2f} "
                      f"{fmt_bytes(row.get('peak_bytes', '-')):>13s}"
                      + (f"  x{speed:.2f} vs matmul+argmax" if speed else "")
                      + (f"  agree {row['agree_with_reference']:.5f}" if "agree_with_reference" in row else ""))
        rows += case_rows
    path = write_results("nearest", device, rows, args.out, {"dtype": dtype, "reps": reps,
                                                              "threads": torch.get_num_threads()},
                         ROOT / "bench" / "results")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
