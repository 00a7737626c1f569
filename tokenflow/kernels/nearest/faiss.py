"""FAISS backend for ``cosine_nearest``: exact inner-product search on L2-normalised vectors.

A flat (exact) index per keyframe slot; frames reading the same keyframe are searched together.
CPU tensors use faiss-cpu. CUDA tensors use a GPU index when faiss-gpu is importable (UNVERIFIED:
no GPU with faiss-gpu was available while this was written), otherwise they are searched on the
host. Ties: FAISS does not promise the first maximum, so on exact ties its index may differ from
torch.argmax (the similarity is the same).
"""
from __future__ import annotations

import numpy as np
import torch

from tokenflow.kernels.nearest import slot_groups


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def _index(faiss, channels: int, device: torch.device):
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = device.index or 0
        return faiss.GpuIndexFlatIP(res, channels, config)
    return faiss.IndexFlatIP(channels)


def cosine_nearest_faiss(x: torch.Tensor, keys: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """FAISS backend of ``tokenflow.kernels.cosine_nearest`` (same arguments and result)."""
    import faiss  # noqa: PLC0415  optional package (the faiss extra)

    n_frames, n_tokens, channels = x.shape
    idx = torch.zeros(n_frames, pairs.shape[1], n_tokens, dtype=torch.long)
    xn = torch.nn.functional.normalize(x.float(), dim=-1, eps=0.0)
    kn = torch.nn.functional.normalize(keys.float(), dim=-1, eps=0.0)
    index = _index(faiss, channels, x.device)
    for slot, frames, positions in slot_groups(pairs):
        index.reset()
        index.add(_as_numpy(kn[slot]))
        _, found = index.search(_as_numpy(xn[frames.to(x.device)].reshape(-1, channels)), 1)
        found = torch.from_numpy(found.reshape(len(frames), n_tokens)).clamp_(min=0)  # -1: no finite score
        idx[frames, positions] = found
    return idx.to(x.device)
