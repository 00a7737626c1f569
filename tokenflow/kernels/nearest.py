"""Cosine nearest-neighbour correspondences and the weighted gather (the propagation pass)."""
from __future__ import annotations

from typing import Optional

import torch

from .registry import register, resolve

# rows of the similarity matrix computed at once by the reference (bounds its memory)
_SIM_ELEMENTS = 1 << 24


def cosine_nearest(x: torch.Tensor, keys: torch.Tensor, pairs: torch.Tensor, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """For every token of every frame, its most cosine-similar token in each paired keyframe.

    Args:
        x: [F, N, C] frame features (the source branch's).
        keys: [K, M, C] keyframe features.
        pairs: int64 [F, P], which keyframes frame f is matched against; -1 = none.
    Returns:
        int64 [F, P, N]: argmax over the M tokens of keyframe ``pairs[f, p]`` (first maximum on
        ties, as torch.argmax); 0 where the pair is -1.
    """
    if x.dim() != 3 or keys.dim() != 3 or x.shape[-1] != keys.shape[-1]:
        raise ValueError(f"cosine_nearest expects x [F,N,C] and keys [K,M,C]; got {tuple(x.shape)}, {tuple(keys.shape)}")
    if pairs.shape[0] != x.shape[0] or pairs.dim() != 2:
        raise ValueError(f"pairs must be [F, P] with F={x.shape[0]}; got {tuple(pairs.shape)}")
    return resolve("cosine_nearest", backend)(x, keys, pairs)


def propagate(kf_out: torch.Tensor, idx: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """Blend keyframe outputs gathered through correspondences.

    Args:
        kf_out: [B, K, M, C] stored keyframe self-attention outputs per branch.
        idx: int64 [F, P, N] from ``cosine_nearest``.
        pairs: int64 [F, P]; -1 = none (its weight must be 0).
        weights: float [F, P].
    Returns:
        [B, F, N, C] = sum_p weights[f,p] * kf_out[b, pairs[f,p], idx[f,p,n]], in kf_out's dtype
        (accumulated in float32).
    """
    if idx.shape[:2] != pairs.shape or weights.shape != pairs.shape:
        raise ValueError(f"idx [F,P,N], pairs [F,P], weights [F,P] disagree: {tuple(idx.shape)}, "
                         f"{tuple(pairs.shape)}, {tuple(weights.shape)}")
    return resolve("propagate", backend)(kf_out, idx, pairs, weights)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _cosine_nearest_torch(x, keys, pairs):
    n_frames, n_tokens, _ = x.shape
    idx = torch.zeros(n_frames, pairs.shape[1], n_tokens, dtype=torch.long, device=x.device)
    xn, kn = _normalize(x.float()), _normalize(keys.float())  # half precision ties too easily near cos = 1
    pairs_cpu = pairs.cpu()
    # frames that read the same keyframe share one matmul, as in the original
    for slot in pairs_cpu.unique().tolist():
        if slot < 0:
            continue
        rows = (pairs_cpu == slot).nonzero().tolist()  # [(f, p), ...]
        frames = torch.tensor([f for f, _ in rows], device=x.device)
        queries = xn[frames].reshape(-1, x.shape[-1])
        step = max(1, _SIM_ELEMENTS // max(1, keys.shape[1]))
        best = torch.cat([(queries[i:i + step] @ kn[slot].T).argmax(dim=-1)
                          for i in range(0, queries.shape[0], step)])
        best = best.view(len(rows), n_tokens)
        for j, (f, p) in enumerate(rows):
            idx[f, p] = best[j]
    return idx


def _propagate_torch(kf_out, idx, pairs, weights):
    n_branches, n_kf, n_tokens_kf, channels = kf_out.shape
    n_frames, n_pairs, n_tokens = idx.shape
    flat = kf_out.reshape(n_branches, n_kf * n_tokens_kf, channels)
    slots = pairs.clamp(min=0).to(idx.device)
    w = weights.to(device=kf_out.device, dtype=torch.float32)
    out = None
    for p in range(n_pairs):
        sel = (slots[:, p, None] * n_tokens_kf + idx[:, p]).reshape(-1)
        term = flat[:, sel].view(n_branches, n_frames, n_tokens, channels).float() * w[None, :, p, None, None]
        out = term if out is None else out + term
    return out.to(kf_out.dtype)


register("cosine_nearest", "torch", _cosine_nearest_torch)
register("propagate", "torch", _propagate_torch)
