"""Fused cosine nearest neighbour in Triton.

``cosine_nearest``: each program owns BLOCK_N tokens of one (frame, pair) and streams the paired
keyframe's M tokens in BLOCK_M tiles. Per tile it accumulates x·k over channel chunks and, in
the same loop, the keys' squared norms; the tile's scores are x·k / |k| (dividing by |x| does not
change the argmax over keys), reduced to a first-maximum argmax and merged into a running best
with a strict ``>`` so earlier tiles win ties, as torch.argmax does. No similarity matrix is
written; memory is O(F·P·N) for the indices.

A custom op (``tokenflow::cosine_nearest``) with a fake implementation, so torch.compile traces
through it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from tokenflow.kernels import support


@triton.jit
def _cosine_argmax_kernel(
        X, Keys, Pairs, Idx,
        sxf, sxn, skk, skm, spf, spp,
        n_tokens, n_keys, channels, n_pairs,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Grid: (F * P, cdiv(N, BLOCK_N)). Writes Idx[f, p, n] (contiguous int64 [F, P, N])."""
    pid_fp = tl.program_id(0)
    frame = pid_fp // n_pairs
    pair = pid_fp % n_pairs
    slot = tl.load(Pairs + frame.to(tl.int64) * spf + pair * spp)
    m_end = tl.where(slot >= 0, n_keys, 0)   # an unpaired (-1) slot scans nothing and writes 0
    slot = tl.maximum(slot, 0)

    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_tokens
    offs_c = tl.arange(0, BLOCK_C)
    x_base = X + frame.to(tl.int64) * sxf
    k_base = Keys + slot.to(tl.int64) * skk

    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for m0 in range(0, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_keys
        dots = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        key_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + offs_c
            c_mask = c < channels
            xc = tl.load(x_base + offs_n[:, None].to(tl.int64) * sxn + c[None, :],
                         mask=n_mask[:, None] & c_mask[None, :], other=0.0)      # [BN, BC]
            kc = tl.load(k_base + offs_m[:, None].to(tl.int64) * skm + c[None, :],
                         mask=m_mask[:, None] & c_mask[None, :], other=0.0)      # [BM, BC]
            if UPCAST:
                xc = xc.to(tl.float32)
                kc = kc.to(tl.float32)
            dots = tl.dot(xc, tl.trans(kc), dots, input_precision=PRECISION)
            kf = kc.to(tl.float32)
            key_sq += tl.sum(kf * kf, 1)
        scores = dots / tl.sqrt(tl.where(m_mask, key_sq, 1.0))[None, :]
        scores = tl.where(m_mask[None, :], scores, float("-inf"))
        tile_best = tl.max(scores, 1)
        tile_idx = tl.argmax(scores, 1, tie_break_left=True).to(tl.int32) + m0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(Idx + pid_fp.to(tl.int64) * n_tokens + offs_n, best_idx.to(tl.int64), mask=n_mask)


def _nearest_configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=s)
            for bn, bm, bc, w, s in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                                     (128, 128, 32, 8, 4), (64, 64, 64, 4, 4), (128, 256, 32, 8, 3)]]


_cosine_argmax_tuned = triton.autotune(configs=_nearest_configs(), key=["n_tokens", "n_keys", "channels"])(
    _cosine_argmax_kernel)

KERNEL_FOR_MODE_CHECK = _cosine_argmax_kernel  # tells support whether this module was interpreted

# Under the interpreter autotuning does not run: explicit small tiles keep tests fast.
INTERPRETER_NEAREST_BLOCKS = (32, 32, 32)   # BLOCK_N, BLOCK_M, BLOCK_C


def launch_nearest(x: torch.Tensor, keys: torch.Tensor, pairs: torch.Tensor,
                   blocks: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Run the cosine-argmax kernel; ``blocks`` = (BLOCK_N, BLOCK_M, BLOCK_C) skips autotuning.

    Frame/token and pair strides are honoured; x and keys are copied first where their channel
    dim is not at unit stride (the kernel reads channels contiguously)."""
    x, keys = support.unit_channel_stride(x), support.unit_channel_stride(keys)
    n_frames, n_tokens, channels = x.shape
    n_pairs = pairs.shape[1]
    idx = torch.zeros(n_frames, n_pairs, n_tokens, dtype=torch.long, device=x.device)
    if idx.numel() == 0 or keys.shape[1] == 0:
        return idx
    args = (x, keys, pairs, idx, x.stride(0), x.stride(1), keys.stride(0), keys.stride(1),
            pairs.stride(0), pairs.stride(1), n_tokens, keys.shape[1], channels, n_pairs)
    common = dict(UPCAST=support.upcast_bf16(x.dtype), PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    if blocks is None and support.interpreting():
        blocks = INTERPRETER_NEAREST_BLOCKS
    with support.on_device(x):
        if blocks is not None:
            grid = (n_frames * n_pairs, triton.cdiv(n_tokens, blocks[0]))
            _cosine_argmax_kernel[grid](*args, BLOCK_N=blocks[0], BLOCK_M=blocks[1], BLOCK_C=blocks[2], **common)
        else:
            grid = lambda meta: (n_frames * n_pairs, triton.cdiv(n_tokens, meta["BLOCK_N"]))  # noqa: E731
            _cosine_argmax_tuned[grid](*args, **common)
    return idx


@torch.library.custom_op("tokenflow::cosine_nearest", mutates_args=())
def cosine_nearest_op(x: torch.Tensor, keys: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    return launch_nearest(x, keys, pairs)


@cosine_nearest_op.register_fake
def _(x, keys, pairs):
    return x.new_empty((x.shape[0], pairs.shape[1], x.shape[1]), dtype=torch.long)


def cosine_nearest_triton(x, keys, pairs) -> torch.Tensor:
    """Triton backend of ``tokenflow.kernels.nearest.cosine_nearest`` (same arguments and result)."""
    return cosine_nearest_op(x, keys, pairs)
