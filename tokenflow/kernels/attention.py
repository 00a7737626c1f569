"""Extended keyframe self-attention (the keyframe pass of TokenFlow).

Branch order is [source, uncond, cond]. The source branch attends within its own frame; the
uncond and cond branches attend, for every keyframe's queries, to the keys/values of *all*
keyframes of their branch (concatenated in keyframe order). Because every query of a branch
sees the same key set, the reference flattens the keyframes into one sequence instead of tiling
K/V per keyframe as the original does: same math, no K-fold copies.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .registry import register, resolve


def keyframe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                       inject_qk: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Extended attention over keyframes.

    Args:
        q, k, v: [3, K, S, heads*D], branches [source, uncond, cond], K keyframes, S tokens.
        heads: number of attention heads; scale is D**-0.5.
        inject_qk: uncond and cond use the source branch's q and k (Plug-and-Play).
    Returns:
        [3, K, S, heads*D], before the output projection.
    """
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4 or q.shape[0] != 3:
        raise ValueError(f"keyframe_attention expects q, k, v of equal shape [3, K, S, C]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] % heads:
        raise ValueError(f"channels {q.shape[-1]} are not divisible by heads={heads}")
    return resolve("keyframe_attention", backend)(q, k, v, heads, inject_qk=inject_qk)


def _keyframe_attention_torch(q, k, v, heads, *, inject_qk=False):
    _, n_kf, seq, channels = q.shape
    dim = channels // heads

    def per_frame(x):  # [K, S, C] -> [K, H, S, D]
        return x.view(n_kf, seq, heads, dim).transpose(1, 2)

    def joint(x):  # [K, S, C] -> [1, H, K*S, D]
        return x.reshape(1, n_kf * seq, heads, dim).transpose(1, 2)

    out = torch.empty_like(q)
    src = F.scaled_dot_product_attention(per_frame(q[0]), per_frame(k[0]), per_frame(v[0]))
    out[0] = src.transpose(1, 2).reshape(n_kf, seq, channels)
    for b in (1, 2):
        qb, kb = (q[0], k[0]) if inject_qk else (q[b], k[b])
        ob = F.scaled_dot_product_attention(joint(qb), joint(kb), joint(v[b]))
        out[b] = ob.transpose(1, 2).reshape(n_kf, seq, channels)
    return out


register("keyframe_attention", "torch", _keyframe_attention_torch)
