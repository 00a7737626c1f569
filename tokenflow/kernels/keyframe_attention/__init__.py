"""Extended keyframe self-attention (the keyframe pass of TokenFlow): API, reference, dispatch.

Branch order is [source, uncond, cond] (several prompts: [source, uncond_1, cond_1, uncond_2, ...]).
The source branch attends within its own frame; every other branch attends, for every keyframe's
queries, to the keys/values of *all* keyframes of their branch (concatenated in keyframe order).
Every query of a branch sees the same key set, so no backend tiles K/V per keyframe as the original
does: same math, no K-fold copies.

Backends: ``triton`` (fused, one launch for all branches and heads; ``triton.py`` here),
``xformers`` (memory-efficient attention, unverified), ``torch`` (SDPA; the reference).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from tokenflow.kernels import support
from tokenflow.kernels.dispatch import Backend, register, resolve

OP = "keyframe_attention"


def keyframe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                       inject_qk: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Extended attention over keyframes.

    Args:
        q, k, v: [B, K, S, heads*D], branches [source, uncond, cond, ...], K keyframes, S tokens.
        heads: number of attention heads; scale is D**-0.5.
        inject_qk: branches 1.. use the source branch's q and k (Plug-and-Play), without copies.
        backend: None/"auto" (best available), "triton", "xformers" or "torch".
    Returns:
        [B, K, S, heads*D] in q's dtype, before the output projection.
    """
    _check_shapes(q, k, v, heads)
    return resolve(OP, backend, q, k, v, heads)(q, k, v, heads, inject_qk)


def _check_shapes(q, k, v, heads) -> None:
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4 or q.shape[0] < 2:
        raise ValueError(f"keyframe_attention expects q, k, v of equal shape [B>=2, K, S, C]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if heads < 1 or q.shape[-1] % heads:
        raise ValueError(f"channels {q.shape[-1]} are not divisible by heads={heads}")


def keyframe_attention_torch(q, k, v, heads: int, inject_qk: bool = False) -> torch.Tensor:
    """Reference: torch SDPA per frame (source) and on the joint K*S sequence (uncond, cond)."""
    _, n_kf, seq, channels = q.shape
    dim = channels // heads

    def per_frame(x):  # [K, S, C] -> [K, H, S, D]
        return x.view(n_kf, seq, heads, dim).transpose(1, 2)

    def joint(x):  # [K, S, C] -> [1, H, K*S, D]
        return x.reshape(1, n_kf * seq, heads, dim).transpose(1, 2)

    out = torch.empty_like(q)
    src = F.scaled_dot_product_attention(per_frame(q[0]), per_frame(k[0]), per_frame(v[0]))
    out[0] = src.transpose(1, 2).reshape(n_kf, seq, channels)
    for b in range(1, q.shape[0]):
        qb, kb = (q[0], k[0]) if inject_qk else (q[b], k[b])
        ob = F.scaled_dot_product_attention(joint(qb), joint(kb), joint(v[b]))
        out[b] = ob.transpose(1, 2).reshape(n_kf, seq, channels)
    return out


def keyframe_attention_xformers(q, k, v, heads: int, inject_qk: bool = False) -> torch.Tensor:
    """xFormers memory-efficient attention on [B, M, H, D] views (no copies of q, k, v).

    UNVERIFIED: xFormers cannot be installed next to the CPU torch of our CI, and no GPU was
    available while this was written; ``tokenflow doctor --check`` compares it to the reference.
    """
    import xformers.ops as xops  # noqa: PLC0415  optional package

    _, n_kf, seq, channels = q.shape
    dim = channels // heads
    out = torch.empty_like(q)
    out[0] = xops.memory_efficient_attention(*(t[0].view(n_kf, seq, heads, dim) for t in (q, k, v))).view(n_kf, seq, channels)
    for b in range(1, q.shape[0]):
        qb, kb = (q[0], k[0]) if inject_qk else (q[b], k[b])
        joint = [t.reshape(1, n_kf * seq, heads, dim) for t in (qb, kb, v[b])]
        out[b] = xops.memory_efficient_attention(*joint).view(n_kf, seq, channels)
    return out


def unsupported(q, k, v, heads) -> List[str]:
    return support.same_device((q, k, v)) + support.float_dtype(q) + (
        [] if q.dtype == k.dtype == v.dtype else ["q, k, v have different dtypes"])


def _unsupported_triton(q, k, v, heads) -> List[str]:
    reasons = unsupported(q, k, v, heads) + support.triton_device((q,))
    dim = q.shape[-1] // heads
    if dim > 256:
        reasons.append(f"head dim {dim} > 256")
    return reasons


def _unsupported_xformers(q, k, v, heads) -> List[str]:
    reasons = unsupported(q, k, v, heads)
    if q.device.type != "cuda":
        reasons.append(f"{q.device.type} tensors are not supported (CUDA only)")
    return reasons


def _triton_not_auto(q, *rest) -> Optional[str]:
    if q.device.type == "cuda" and q.dtype == torch.float32:
        # exact fp32 dots cannot use tensor cores and spill registers (sm_90 compile reports)
        return "float32 runs without tensor cores in the kernel; torch SDPA is used instead"
    return support.triton_not_auto((q,))


register(Backend(OP, "triton", 30, "tokenflow.kernels.keyframe_attention.triton:keyframe_attention_triton",
                 requires=support.triton_missing, unsupported=_unsupported_triton,
                 not_auto=_triton_not_auto,
                 verified=support.TRITON_VERIFIED))
register(Backend(OP, "xformers", 20, "tokenflow.kernels.keyframe_attention:keyframe_attention_xformers",
                 requires=support.xformers_missing, unsupported=_unsupported_xformers,
                 not_auto=lambda *a, **kw: "unverified (no GPU with xFormers was available to test it)",
                 verified="unverified"))
register(Backend(OP, "torch", 10, "tokenflow.kernels.keyframe_attention:keyframe_attention_torch",
                 unsupported=lambda q, k, v, heads: unsupported(q, k, v, heads),
                 verified="reference; CPU float32 parity with the original implementation"))
