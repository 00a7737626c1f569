"""Inputs and the sm_90 compiler shared by the per-op kernel tests (``test_kernel_*.py``).

Random inputs are fresh per test case: each case seeds its own generator from its parameters
(crc32 of their repr, stable across runs and Python hash seeds), so a failure reproduces exactly
and no two cases share data. Tensors are made on the CPU and moved to the device under test.
"""
import zlib

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def generator(*params) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def rand(g, *shape, dtype=torch.float32, scale=1.0, device="cpu"):
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def nearest_inputs(g, n_frames, n_tokens, n_kf, n_keys, channels, n_pairs, dtype=torch.float32, device="cpu"):
    """x [F, N, C], keys [K, M, C], pairs [F, P]; with P = 2 frame 0's second pair is -1 (none)."""
    x = rand(g, n_frames, n_tokens, channels, dtype=dtype, device=device)
    keys = rand(g, n_kf, n_keys, channels, dtype=dtype, device=device)
    pairs = torch.randint(n_kf, (n_frames, n_pairs), generator=g)
    if n_pairs == 2:
        pairs[0, 1] = -1
    return x, keys, pairs.to(device)


def gather_inputs(g, n_branches, n_kf, n_keys, channels, n_frames, n_pairs, n_tokens, dtype=torch.float32,
                  device="cpu"):
    """kf_out [B, K, M, C], idx [F, P, N], pairs [F, P], weights [F, P]; with P = 2 frame 2's
    second pair is -1 with weight 0 (as the runner pads)."""
    kf = rand(g, n_branches, n_kf, n_keys, channels, dtype=dtype, device=device)
    idx = torch.randint(n_keys, (n_frames, n_pairs, n_tokens), generator=g)
    pairs = torch.randint(n_kf, (n_frames, n_pairs), generator=g)
    weights = torch.rand(n_frames, n_pairs, generator=g)
    if n_pairs == 2:
        pairs[2, 1], weights[2, 1] = -1, 0.0
    return kf, idx.to(device), pairs.to(device), weights.to(device)


# ----------------------------------------------------------------------------- sm_90, ahead of time

SM90_SMEM_LIMIT = 232448  # bytes per block (227 KiB opt-in)
ESIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def compile_for_sm90(fn, types, constexprs, warps, stages, aligned):
    """Compile a ``triton.jit`` kernel for an H100/H200 without a GPU (the launcher, which needs
    the CUDA driver, is never built). types: runtime argument -> triton type; aligned: arguments
    marked divisible by 16, as Triton marks contiguous tensors whose channel count is a multiple
    of 16 (SD: 320, 640, 1280). Only for the ``sm90`` fixture's tests (conftest)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in constexprs else types[n] for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


# ----------------------------------------------------------------------------- layouts

LAYOUTS = ["transposed", "reversed", "broadcast"]


def channels_strided(t, layout: str):
    """``t``'s values (``broadcast``: its first channel repeated) in a layout whose channel (last)
    dim is not at unit stride: ``transposed`` (last two dims swapped in memory), ``reversed``
    (every stride reversed, column-major) or ``broadcast`` (an expanded view, stride 0)."""
    if layout == "transposed":
        view = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "reversed":
        dims = list(range(t.dim()))[::-1]
        view = t.permute(*dims).contiguous().permute(*dims)
    elif layout == "broadcast":
        view = t[..., :1].expand(t.shape)
    else:
        raise KeyError(layout)
    assert view.stride(-1) != 1 and (layout == "broadcast" or torch.equal(view, t))
    return view
