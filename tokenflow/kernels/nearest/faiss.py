"""FAISS backend for ``cosine_nearest``: exact inner-product search on L2-normalised vectors.

A flat (exact) index per keyframe slot; frames reading the same keyframe are searched together.
CPU tensors use faiss-cpu. CUDA tensors use a GPU index when faiss-gpu is importable (UNVERIFIED:
no GPU with faiss-gpu was available while this was written), otherwise they are searched on the
host. A GPU index needs ``StandardGpuResources`` (a cuBLAS handle, streams and a scratch
allocation): built once per device for the process and reused by every call.
Ties: FAISS does not promise the first maximum, so on exact ties its index may differ from
torch.argmax (the similarity is the same).
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from tokenflow.kernels.nearest import slot_groups


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


_GPU_RESOURCES: Dict[int, object] = {}   # device index -> faiss.StandardGpuResources, for the process


def gpu_resources(faiss, device_index: int):
    """The one ``StandardGpuResources`` of a CUDA device (built on first use)."""
    if device_index not in _GPU_RESOURCES:
        _GPU_RESOURCES[device_index] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device_index]


def _index(faiss, channels: int, device: torch.device):
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = torch.cuda.current_device() if device.index is None else device.index
        config = faiss.GpuIndexFlatConfig()
        config.device = index
        return faiss.GpuIndexFlatIP(gpu_resources(faiss, index), channels, config)
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
