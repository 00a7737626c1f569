"""The weighted nearest-neighbour gather of the propagation pass: every frame's self-attention
output is a blend of its paired keyframes' outputs, read through ``cosine_nearest``'s indices.

API, plain-PyTorch reference and dispatch. Backends: ``triton`` (fused gather; ``triton.py``),
``torch`` (the reference) and ``static`` (the same math without data-dependent control flow, for
traced graphs: torch.compile, ONNX).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from tokenflow.kernels import support
from tokenflow.kernels.dispatch import Backend, register, resolve

OP = "gather"


def gather_blend(kf_out: torch.Tensor, idx: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor, *,
                 backend: Optional[str] = None) -> torch.Tensor:
    """Blend keyframe outputs gathered through correspondences.

    Args:
        kf_out: [B, K, M, C] stored keyframe self-attention outputs per branch.
        idx: int64 [F, P, N] from ``cosine_nearest``.
        pairs: int64 [F, P]; -1 = none (its weight must be 0).
        weights: float [F, P].
        backend: None/"auto", "triton" or "torch".
    Returns:
        [B, F, N, C] = sum_p weights[f,p] * kf_out[b, pairs[f,p], idx[f,p,n]], in kf_out's dtype
        (accumulated in float32).
    """
    if kf_out.dim() != 4 or idx.dim() != 3 or idx.shape[:2] != pairs.shape or weights.shape != pairs.shape:
        raise ValueError(f"kf_out [B,K,M,C], idx [F,P,N], pairs [F,P], weights [F,P] disagree: "
                         f"{tuple(kf_out.shape)}, {tuple(idx.shape)}, {tuple(pairs.shape)}, {tuple(weights.shape)}")
    return resolve(OP, backend, kf_out, idx, pairs, weights)(kf_out, idx, pairs, weights)


def gather_blend_torch(kf_out, idx, pairs, weights) -> torch.Tensor:
    """Reference: one gather per pair position, float32 weighted sum."""
    n_branches, n_kf, n_tokens_kf, channels = kf_out.shape
    n_frames, n_pairs, n_tokens = idx.shape
    flat = kf_out.reshape(n_branches, n_kf * n_tokens_kf, channels)
    slots = pairs.clamp(min=0).to(idx.device)
    w = weights.to(device=kf_out.device, dtype=torch.float32)
    out = torch.zeros(n_branches, n_frames, n_tokens, channels, device=kf_out.device, dtype=torch.float32)
    for p in range(n_pairs):
        sel = (slots[:, p, None] * n_tokens_kf + idx[:, p]).reshape(-1)
        out += flat[:, sel].view(n_branches, n_frames, n_tokens, channels).float() * w[None, :, p, None, None]
    return out.to(kf_out.dtype)


def gather_blend_static(kf_out, idx, pairs, weights) -> torch.Tensor:
    """Static-shape reference: one gather of all pair positions, float32 weighted sum over P."""
    n_branches, n_kf, n_tokens_kf, channels = kf_out.shape
    n_frames, n_pairs, n_tokens = idx.shape
    flat = kf_out.reshape(n_branches, n_kf * n_tokens_kf, channels)
    sel = (pairs.clamp(min=0)[:, :, None] * n_tokens_kf + idx).reshape(-1)
    gathered = flat.index_select(1, sel).view(n_branches, n_frames, n_pairs, n_tokens, channels).float()
    w = weights.to(device=kf_out.device, dtype=torch.float32)
    return (gathered * w[None, :, :, None, None]).sum(dim=2).to(kf_out.dtype)


def unsupported(kf_out, idx, pairs, weights) -> List[str]:
    reasons = support.same_device((kf_out, idx, pairs, weights)) + support.float_dtype(kf_out)
    if idx.dtype not in (torch.int64, torch.int32):
        reasons.append(f"idx must be an integer tensor, got {idx.dtype}")
    return reasons


def _unsupported_gather_triton(kf_out, idx, pairs, weights) -> List[str]:
    reasons = unsupported(kf_out, idx, pairs, weights) + support.triton_device((kf_out,))
    return reasons


register(Backend(OP, "triton", 30, "tokenflow.kernels.gather.triton:gather_blend_triton",
                 requires=support.triton_missing, unsupported=_unsupported_gather_triton,
                 not_auto=lambda kf_out, *a, **kw: support.triton_not_auto((kf_out,)), verified=support.TRITON_VERIFIED))
register(Backend(OP, "torch", 10, "tokenflow.kernels.gather:gather_blend_torch",
                 unsupported=unsupported, verified="reference; CPU float32 parity with the original"))
register(Backend(OP, "static", 5, "tokenflow.kernels.gather:gather_blend_static",
                 unsupported=unsupported, not_auto=lambda *a: support.STATIC_NOT_AUTO,
                 verified="CPU float32/fp16/bf16 against the torch reference (tests)"))
