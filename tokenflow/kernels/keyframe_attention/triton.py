"""Fused extended keyframe attention in Triton (all branches and heads in one launch).

Flash-attention style forward: each program owns BLOCK_M queries of one (branch, keyframe, head)
and streams keys/values block by block with an online softmax (exp2, fp32 accumulators), so no
score matrix and no repeated K/V exist in memory. The source branch streams its own frame's S
keys; the other branches (uncond/cond per prompt) stream all K*S keys of their branch, frame by frame (the inner function).
With ``inject_qk`` the uncond/cond programs read q and k from the source branch's memory.

Head dims that are not a power of two (40, 80, 160 in SD 1.5) are padded to BLOCK_D with masks;
SD 2.x's and SDXL's 64 (every attention layer) fill BLOCK_D = 64 exactly.
Offsets of branch/frame/head bases are int64 so long videos cannot overflow 32-bit indexing.
Registered as the custom op ``tokenflow::keyframe_attention`` so torch.compile traces through it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from tokenflow.kernels import support

LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _stream_frame(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, seq, qk_scale,
                  offs_n, offs_d, d_mask,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of (acc [BM, BD], l_i [BM], m_i [BM]) with one frame's ``seq`` keys."""
    for start in range(0, seq, BLOCK_N):
        cols = start + offs_n
        col_mask = cols < seq
        kt = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None],
                     mask=d_mask[:, None] & col_mask[None, :], other=0.0)        # [BD, BN]
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale                   # [BM, BN], log2 units
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                     mask=col_mask[:, None] & d_mask[None, :], other=0.0)         # [BN, BD]
        if UPCAST:
            vb = vb.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _keyframe_attention_kernel(
        Q, K, V, Out,
        sqb, sqf, sqs, skb, skf, sks, svb, svf, svs, sob, sof, sos,
        n_kf, seq, heads, qk_scale,
        HEAD_DIM: tl.constexpr, INJECT_QK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Grid: (cdiv(S, BLOCK_M), heads * K, B branches). Program -> (query block, head, keyframe, branch)."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1) // n_kf        # head-major: neighbouring programs share a head's K/V
    frame = tl.program_id(1) % n_kf
    branch = tl.program_id(2)
    if INJECT_QK:
        qk_branch = branch * 0
    else:
        qk_branch = branch
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < seq
    head_off = head.to(tl.int64) * HEAD_DIM

    q_base = Q + qk_branch.to(tl.int64) * sqb + frame.to(tl.int64) * sqf + head_off
    q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # source: its own frame only; uncond/cond: every keyframe of the branch
    f_lo = tl.where(branch == 0, frame, 0)
    f_hi = tl.where(branch == 0, frame + 1, n_kf)
    k_base = K + qk_branch.to(tl.int64) * skb + f_lo.to(tl.int64) * skf + head_off
    v_base = V + branch.to(tl.int64) * svb + f_lo.to(tl.int64) * svf + head_off
    for _ in range(f_lo, f_hi):  # pointers advance frame by frame (64-bit pointer arithmetic)
        acc, l_i, m_i = _stream_frame(acc, l_i, m_i, q, k_base, v_base, sks, svs, seq, qk_scale,
                                      offs_n, offs_d, d_mask, BLOCK_N, UPCAST, PRECISION)
        k_base += skf
        v_base += svf

    out = acc / l_i[:, None]
    o_base = Out + branch.to(tl.int64) * sob + frame.to(tl.int64) * sof + head_off
    tl.store(o_base + offs_m[:, None] * sos + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


def _tuning_configs():
    configs = []
    for block_m, block_n, warps, stages in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                                            (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4),
                                            (64, 32, 4, 2), (128, 128, 8, 2)]:
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages))
    return configs


# Shared memory a config may use: H100/H200 allow 227 KiB per block; configs within a few KiB of
# that fail to launch on some drivers, so leave headroom.
SMEM_BUDGET = 200 * 1024


def smem_bytes(block_m: int, block_n: int, block_d: int, stages: int, element_size: int) -> int:
    """Shared memory of one program: the q tile plus ``stages`` buffers of a K and a V tile.

    Matches the compiler's ``metadata.shared`` for sm_90 (tests/test_kernel_keyframe_attention.py checks it).
    """
    return (block_m * block_d + stages * 2 * block_n * block_d) * element_size


def _prune_configs(configs, named_args, **kwargs):
    """Drop tile configs whose shared memory would not fit (large head dims, float32) or whose
    fp32 accumulator alone would need more than 128 registers per thread (it would spill)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    q = named_args.get("Q")
    esize = q.element_size() if hasattr(q, "element_size") else 2
    kept = [c for c in configs
            if smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, c.num_stages, esize) <= SMEM_BUDGET
            and c.kwargs["BLOCK_M"] * block_d <= 128 * 32 * c.num_warps]
    smallest = min(configs, key=lambda c: smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d,
                                                     c.num_stages, esize))
    return kept or [smallest]


_keyframe_attention_tuned = triton.autotune(
    configs=_tuning_configs(), key=["seq", "n_kf", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune_configs})(_keyframe_attention_kernel)

KERNEL_FOR_MODE_CHECK = _keyframe_attention_kernel  # tells support whether this module was interpreted

# Under the interpreter autotuning does not run: small explicit tiles keep tests fast.
INTERPRETER_BLOCKS = (32, 32)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, inject_qk: bool,
           blocks: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Run the kernel; ``blocks`` = (BLOCK_M, BLOCK_N) skips autotuning (tests, interpreter).

    Any strides of the branch, keyframe and token dims are honoured; the kernel reads a head's
    channels at unit stride, so a tensor whose channel dim is not (a transposed or expanded view)
    is copied first. Eager dispatch and traced graphs (which call the op directly) both land here.
    """
    q, k, v = (support.unit_channel_stride(t) for t in (q, k, v))
    _, n_kf, seq, channels = q.shape
    dim = channels // heads
    if q.numel() == 0:
        return torch.empty_like(q)
    # the interpreter truncates fp32 -> bf16 on store; GPUs round to nearest: store fp32, round in torch
    out = torch.empty(q.shape, dtype=torch.float32 if support.upcast_bf16(q.dtype) else q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(dim))
    qk_scale = dim ** -0.5 * LOG2E
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays exact; half inputs ignore it
    common = dict(HEAD_DIM=dim, INJECT_QK=bool(inject_qk), BLOCK_D=block_d,
                  UPCAST=support.upcast_bf16(q.dtype), PRECISION=precision)
    args = (q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            n_kf, seq, heads, qk_scale)
    if blocks is None and support.interpreting():
        blocks = INTERPRETER_BLOCKS
    with support.on_device(q):
        if blocks is not None:
            grid = (triton.cdiv(seq, blocks[0]), heads * n_kf, q.shape[0])
            _keyframe_attention_kernel[grid](*args, BLOCK_M=blocks[0], BLOCK_N=blocks[1], **common)
        else:
            grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), heads * n_kf, q.shape[0])  # noqa: E731
            _keyframe_attention_tuned[grid](*args, **common)
    return out.to(q.dtype)


@torch.library.custom_op("tokenflow::keyframe_attention", mutates_args=())
def keyframe_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                          inject_qk: bool) -> torch.Tensor:
    return launch(q, k, v, heads, inject_qk)


@keyframe_attention_op.register_fake
def _(q, k, v, heads, inject_qk):
    return torch.empty_like(q)


def keyframe_attention_triton(q, k, v, heads: int, inject_qk: bool = False) -> torch.Tensor:
    """Triton backend of ``tokenflow.kernels.keyframe_attention`` (same arguments and result)."""
    return keyframe_attention_op(q, k, v, heads, inject_qk)
