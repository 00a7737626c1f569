"""Fused weighted gather in Triton (the propagation pass's nearest-neighbour gather).

Each program owns BLOCK_N tokens of one (frame, branch) and a channel chunk; it gathers the P
paired keyframe rows through the indices and sums them with fp32 weights. A custom op
(``tokenflow::gather_blend``) with a fake implementation, so torch.compile traces through it.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from tokenflow.kernels import support


@triton.jit
def _gather_blend_kernel(
        KF, Idx, Pairs, W, Out,
        skb, skk, skm, sif, sip, spf, spp, swf, swp, sob, sof, son,
        n_tokens, n_keys, channels, n_pairs,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid: (cdiv(N, BLOCK_N) * cdiv(C, BLOCK_C), F, B). Out[b, f, n, c] = sum_p w * KF[b, slot, idx, c]."""
    n_cblocks = tl.cdiv(channels, BLOCK_C)
    pid_n = tl.program_id(0) // n_cblocks
    pid_c = tl.program_id(0) % n_cblocks
    frame = tl.program_id(1).to(tl.int64)
    branch = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask = offs_n < n_tokens
    mask = n_mask[:, None] & (offs_c < channels)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for p in range(0, n_pairs):
        slot = tl.maximum(tl.load(Pairs + frame * spf + p * spp), 0).to(tl.int64)
        w = tl.load(W + frame * swf + p * swp).to(tl.float32)
        rows = tl.load(Idx + frame * sif + p * sip + offs_n, mask=n_mask, other=0).to(tl.int64)
        rows = tl.minimum(tl.maximum(rows, 0), n_keys - 1)   # never read outside the keyframe
        vals = tl.load(KF + branch * skb + slot * skk + rows[:, None] * skm + offs_c[None, :], mask=mask, other=0.0)
        acc += w * vals.to(tl.float32)
    tl.store(Out + branch * sob + frame * sof + offs_n[:, None].to(tl.int64) * son + offs_c[None, :],
             acc.to(Out.dtype.element_ty), mask=mask)


KERNEL_FOR_MODE_CHECK = _gather_blend_kernel  # tells support whether this module was interpreted

GATHER_BLOCKS = (64, 64)   # BLOCK_N, BLOCK_C (a gather: tile size barely matters)


def launch_gather(kf_out: torch.Tensor, idx: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor,
                     blocks: Tuple[int, int] = GATHER_BLOCKS) -> torch.Tensor:
    """Run the gather kernel. Strides of every dim but the last are honoured; kf_out and idx are
    copied first where their last dim is not at unit stride (the kernel reads them contiguously)."""
    kf_out, idx = support.unit_channel_stride(kf_out), support.unit_channel_stride(idx)
    n_branches, _, _, channels = kf_out.shape
    n_frames, n_pairs, n_tokens = idx.shape
    # the interpreter truncates fp32 -> bf16 on store; GPUs round to nearest: store fp32, round in torch
    store_dtype = torch.float32 if support.upcast_bf16(kf_out.dtype) else kf_out.dtype
    out = torch.zeros(n_branches, n_frames, n_tokens, channels, dtype=store_dtype, device=kf_out.device)
    if out.numel() == 0 or n_pairs == 0:
        return out.to(kf_out.dtype)
    block_n, block_c = blocks
    grid = (triton.cdiv(n_tokens, block_n) * triton.cdiv(channels, block_c), n_frames, n_branches)
    with support.on_device(kf_out):
        _gather_blend_kernel[grid](kf_out, idx, pairs, weights, out,
                                kf_out.stride(0), kf_out.stride(1), kf_out.stride(2), idx.stride(0), idx.stride(1),
                                pairs.stride(0), pairs.stride(1), weights.stride(0), weights.stride(1),
                                out.stride(0), out.stride(1), out.stride(2), n_tokens, kf_out.shape[2], channels,
                                n_pairs, BLOCK_N=block_n, BLOCK_C=block_c)
    return out.to(kf_out.dtype)


@torch.library.custom_op("tokenflow::gather_blend", mutates_args=())
def gather_blend_op(kf_out: torch.Tensor, idx: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return launch_gather(kf_out, idx, pairs, weights)


@gather_blend_op.register_fake
def _(kf_out, idx, pairs, weights):
    return kf_out.new_empty((kf_out.shape[0], idx.shape[0], idx.shape[2], kf_out.shape[3]))


def gather_blend_triton(kf_out, idx, pairs, weights) -> torch.Tensor:
    """Triton backend of ``tokenflow.kernels.gather.gather_blend`` (same arguments and result)."""
    return gather_blend_op(kf_out, idx, pairs, weights)
