"""Cosine nearest-neighbour correspondences between frames and keyframes (the propagation pass).

API, plain-PyTorch references and dispatch. Backends: ``triton`` (fused normalise + matmul +
running argmax; ``triton.py``), ``faiss`` (flat inner-product index on normalised keys;
``faiss.py``), ``torch`` (the reference) and ``static``
(the same math without data-dependent control flow, for traced graphs: torch.compile, ONNX).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from tokenflow.kernels import support
from tokenflow.kernels.dispatch import Backend, register, resolve

# elements of the similarity matrix the reference computes at once (bounds its memory)
_SIM_ELEMENTS = 1 << 24


def cosine_nearest(x: torch.Tensor, keys: torch.Tensor, pairs: torch.Tensor, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """For every token of every frame, its most cosine-similar token in each paired keyframe.

    Args:
        x: [F, N, C] frame features (the source branch's).
        keys: [K, M, C] keyframe features.
        pairs: int64 [F, P], which keyframes frame f is matched against; -1 = none.
        backend: None/"auto", "triton", "faiss" or "torch".
    Returns:
        int64 [F, P, N]: argmax over the M tokens of keyframe ``pairs[f, p]`` (first maximum on
        ties, as torch.argmax); 0 where the pair is -1.
    """
    if x.dim() != 3 or keys.dim() != 3 or x.shape[-1] != keys.shape[-1]:
        raise ValueError(f"cosine_nearest expects x [F,N,C] and keys [K,M,C]; got {tuple(x.shape)}, {tuple(keys.shape)}")
    if pairs.dim() != 2 or pairs.shape[0] != x.shape[0]:
        raise ValueError(f"pairs must be [F, P] with F={x.shape[0]}; got {tuple(pairs.shape)}")
    return resolve("cosine_nearest", backend, x, keys, pairs)(x, keys, pairs)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def slot_groups(pairs: torch.Tensor):
    """Yield (slot, frames [R], pair positions [R]) for each keyframe slot >= 0 used in ``pairs``."""
    pairs_cpu = pairs.cpu()
    for slot in pairs_cpu.unique().tolist():
        if slot >= 0:
            rows = (pairs_cpu == slot).nonzero()
            yield slot, rows[:, 0], rows[:, 1]


def cosine_nearest_torch(x, keys, pairs) -> torch.Tensor:
    """Reference: normalise in float32, matmul, argmax; frames reading one keyframe share a matmul."""
    n_frames, n_tokens, channels = x.shape
    idx = torch.zeros(n_frames, pairs.shape[1], n_tokens, dtype=torch.long, device=x.device)
    xn, kn = _normalize(x.float()), _normalize(keys.float())  # half precision ties too easily near cos = 1
    step = max(1, _SIM_ELEMENTS // max(1, keys.shape[1]))
    for slot, frames, positions in slot_groups(pairs):
        queries = xn[frames.to(x.device)].reshape(-1, channels)
        best = torch.cat([(queries[i:i + step] @ kn[slot].T).argmax(dim=-1)
                          for i in range(0, queries.shape[0], step)])
        idx[frames.to(x.device), positions.to(x.device)] = best.view(len(frames), n_tokens)
    return idx


# query tokens per block of the static search: P * block * M similarities per frame stay <= 2**22
_STATIC_SIM_PER_FRAME = 1 << 22


def cosine_nearest_static(x, keys, pairs) -> torch.Tensor:
    """Static-shape reference: every frame's paired keys gathered, batched matmul, argmax.

    No host syncs and no shape that depends on values, so torch.compile and torch.export trace
    it into one graph. Query tokens go in blocks (a static loop over the layer's N) so a frame's
    similarities stay below 2**22 elements; memory still grows with the frame count F.
    """
    n_frames, n_tokens, channels = x.shape
    n_pairs, n_keys = pairs.shape[1], keys.shape[1]
    xn, kn = _normalize(x.float()), _normalize(keys.float())
    paired_t = kn[pairs.clamp(min=0)].transpose(-1, -2)                  # [F, P, C, M]
    block = max(1, min(n_tokens, _STATIC_SIM_PER_FRAME // max(1, n_pairs * n_keys)))
    best = [torch.matmul(xn[:, None, i:i + block], paired_t).argmax(dim=-1)   # [F, P, block]
            for i in range(0, n_tokens, block)]
    idx = best[0] if len(best) == 1 else torch.cat(best, dim=-1)
    return torch.where(pairs[..., None] >= 0, idx, torch.zeros_like(idx))


def unsupported(x, keys, pairs) -> List[str]:
    reasons = support.same_device((x, keys, pairs)) + support.float_dtype(x)
    if pairs.dtype not in (torch.int64, torch.int32):
        reasons.append(f"pairs must be an integer tensor, got {pairs.dtype}")
    return reasons


def _unsupported_nearest_triton(x, keys, pairs) -> List[str]:
    reasons = unsupported(x, keys, pairs) + support.triton_device((x,))
    if x.dtype != keys.dtype:
        reasons.append("x and keys have different dtypes")
    return reasons


# FAISS streams queries through its own blocked GEMM + top-1, keeping memory O(block). Measured on
# 2 CPU cores, float32, groups of 8 frames x 2 keyframes (bench/results/nearest_cpu_*.json):
# 912 vs 2084 ms for the torch reference at S = 4096 (2.7e8 similarities), 104 vs 133 ms at
# S = 1024 (1.7e7), 14.7 vs 17.0 ms at S = 256 (1.0e6; within run-to-run noise). It is picked
# automatically on CPU only for searches of at least this many similarities (F*P*N*M); smaller
# ones keep the reference, whose tie-breaking is the original's.
AUTO_MIN_ENTRIES = 1 << 24


def _faiss_not_auto(x: torch.Tensor, keys: torch.Tensor, pairs: torch.Tensor) -> Optional[str]:
    if x.device.type != "cpu":
        return "GPU indexes are unverified; on CUDA the Triton kernel is used"
    entries = x.shape[0] * pairs.shape[1] * x.shape[1] * keys.shape[1]
    if entries < AUTO_MIN_ENTRIES:
        return f"picked automatically only for searches of at least {AUTO_MIN_ENTRIES:,} similarities ({entries:,} here)"
    return None


register(Backend("cosine_nearest", "triton", 30, "tokenflow.kernels.nearest.triton:cosine_nearest_triton",
                 requires=support.triton_missing, unsupported=_unsupported_nearest_triton,
                 not_auto=lambda x, *a, **kw: support.triton_not_auto((x,)), verified=support.TRITON_VERIFIED))
register(Backend("cosine_nearest", "faiss", 20, "tokenflow.kernels.nearest.faiss:cosine_nearest_faiss",
                 requires=support.faiss_missing, unsupported=unsupported,
                 not_auto=_faiss_not_auto, verified="faiss-cpu on CPU; faiss-gpu indexes unverified"))
register(Backend("cosine_nearest", "torch", 10, "tokenflow.kernels.nearest:cosine_nearest_torch",
                 unsupported=unsupported, verified="reference; CPU float32 parity with the original"))
register(Backend("cosine_nearest", "static", 5, "tokenflow.kernels.nearest:cosine_nearest_static",
                 unsupported=unsupported, not_auto=lambda *a: support.STATIC_NOT_AUTO,
                 verified="CPU float32/fp16/bf16 against the torch reference (tests)"))
