"""Inverted latents of every timestep in one tensor, on the device or in (pinned) host memory.

``InvertedLatents`` is a read-only mapping {timestep: [N, 4, h, w] float32} over one tensor
[T, N, 4, h, w]; ``rows(t, index)`` hands the frames a UNet call needs to the compute device.
``DiskLatents`` reloads a timestep from disk on every access: the original implementation's
pattern, kept only so ``tokenflow bench --compare ...,original`` can measure what it costs.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Mapping, Union

import torch

Index = Union[slice, torch.Tensor]


class InvertedLatents(Mapping):
    """{t: data[i]} over data [T, N, 4, h, w] (float32)."""

    def __init__(self, data: torch.Tensor, timesteps: List[int]):
        if data.shape[0] != len(timesteps):
            raise ValueError(f"{len(timesteps)} timesteps for latents of shape {tuple(data.shape)}")
        self.data = data
        self.position = {int(t): i for i, t in enumerate(timesteps)}

    @classmethod
    def empty(cls, timesteps: List[int], shape, device: torch.device, place: str = "device") -> "InvertedLatents":
        """Uninitialised [T, *shape] float32 on ``device`` ("device") or host memory ("host", pinned
        when the device is CUDA)."""
        device = torch.device(device)
        where = device if place == "device" else torch.device("cpu")
        pin = place == "host" and device.type == "cuda"
        data = torch.empty((len(timesteps), *shape), dtype=torch.float32, device=where, pin_memory=pin)
        return cls(data, timesteps)

    @classmethod
    def stack(cls, latents: Mapping, device: torch.device, place: str = "device") -> "InvertedLatents":
        """One tensor from {t: [N,4,h,w]} (see ``empty`` for ``place``)."""
        timesteps = sorted(int(t) for t in latents)
        out = cls.empty(timesteps, latents[timesteps[0]].shape, device, place)
        for t in timesteps:
            out[t].copy_(latents[t])
        return out

    def __getitem__(self, t: int) -> torch.Tensor:
        return self.data[self.position[int(t)]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.position)

    def __len__(self) -> int:
        return len(self.position)

    def rows(self, t: int, index: Index, device: torch.device) -> torch.Tensor:
        """Frames ``index`` (a slice or an index tensor) of timestep t, on ``device``."""
        if isinstance(index, torch.Tensor):
            index = index.to(self.data.device)
        return self[t][index].to(device, non_blocking=True)


class DiskLatents(Mapping):
    """{t: [N,4,h,w]} saved as one file per timestep and read back at every access (slow on purpose)."""

    def __init__(self, latents: Mapping):
        self.folder = Path(tempfile.mkdtemp(prefix="tokenflow-latents-"))
        self.timesteps = sorted(int(t) for t in latents)
        for t in self.timesteps:
            torch.save(latents[t].cpu(), self.folder / f"noisy_latents_{t}.pt")

    def __getitem__(self, t: int) -> torch.Tensor:
        return torch.load(self.folder / f"noisy_latents_{int(t)}.pt")

    def __iter__(self) -> Iterator[int]:
        return iter(self.timesteps)

    def __len__(self) -> int:
        return len(self.timesteps)

    def rows(self, t: int, index: Index, device: torch.device) -> torch.Tensor:
        return self[t][index].to(device)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self):  # best effort; close() is the real cleanup
        try:
            self.close()
        except Exception:
            pass
