"""Keyframe feature store: what the keyframe pass leaves for the propagation passes.

One preallocated buffer holds, per self-attention layer of S tokens and C channels,

    features[layer]: [K, S, C]     source-branch features that correspondences are computed on
                                   (``norm1(h)`` for the original propagation, the source
                                   self-attention output for the paper's)
    outputs[layer]:  [B, K, S, C]  self-attention outputs (after to_out) of the B branches
                                   [source, uncond_1, cond_1, uncond_2, cond_2, ...]

in the compute dtype, K = keyframe slots of one step. Keyframe-pass calls write their slots
(``write``); a window of keyframes writes at its offset. When the plan puts the store on the host
(pinned memory on CUDA), ``staged(slots)`` copies the slots a propagation chunk reads into a
preallocated device buffer and returns a view of them with pairs renumbered.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from tokenflow.engine.memory import attention_layer_shapes


class StoreView:
    """features / outputs dicts of device tensors, indexed by keyframe slot (see module doc)."""

    def __init__(self, features: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]):
        self.features, self.outputs = features, outputs


class KeyframeStore(StoreView):
    """The per-step keyframe features of every layer, in one buffer on the device or pinned host.

    Args:
        shapes: {layer name: (S, C)}, e.g. from ``engine.memory.attention_layer_shapes``.
        keyframes: K slots; branches: B; staging_slots: device slots for an offloaded store.
    """

    def __init__(self, shapes: Dict[str, Tuple[int, int]], keyframes: int, branches: int, *,
                 dtype: torch.dtype, device: torch.device, on_host: bool = False, staging_slots: int = 0):
        self.shapes, self.keyframes, self.branches = dict(shapes), keyframes, branches
        self.device, self.on_host = torch.device(device), on_host
        where = torch.device("cpu") if on_host else self.device
        pin = on_host and self.device.type == "cuda"
        features, outputs = _carve(self.shapes, keyframes, branches, dtype, where, pin)
        super().__init__(features, outputs)
        self.nbytes = sum(t.numel() * t.element_size() for t in [*features.values(), *outputs.values()])
        self._staging: Optional[StoreView] = None
        if on_host and staging_slots:
            self._staging = StoreView(*_carve(self.shapes, min(staging_slots, keyframes), branches, dtype,
                                              self.device, False))

    @classmethod
    def for_unet(cls, unet: torch.nn.Module, latent_size: Tuple[int, int], keyframes: int, branches: int = 3,
                 **kwargs) -> "KeyframeStore":
        """A device store for ``unet`` at latents (h, w), in the UNet's dtype and device."""
        p = next(unet.parameters())
        kwargs.setdefault("dtype", p.dtype)
        kwargs.setdefault("device", p.device)
        return cls(attention_layer_shapes(unet, *latent_size), keyframes, branches, **kwargs)

    def write(self, layer: str, start: int, features: torch.Tensor, outputs: torch.Tensor) -> None:
        """Slots start..start+k-1 of ``layer``: features [k, S, C], outputs [B, k, S, C]."""
        k = features.shape[0]
        self.features[layer][start:start + k].copy_(features, non_blocking=True)
        self.outputs[layer][:, start:start + k].copy_(outputs, non_blocking=True)

    def staged(self, pairs: torch.Tensor) -> Tuple[StoreView, torch.Tensor]:
        """(a view holding the slots ``pairs`` [m, P] reads, pairs renumbered into that view).

        On the device the store itself is the view. Offloaded, the slots are copied to the staging
        buffer (slot -1, "no pair", stays -1).
        """
        if not self.on_host:
            return self, pairs
        slots = torch.unique(pairs[pairs >= 0].cpu())
        if self._staging is None or len(slots) > self._staging.features[next(iter(self.shapes))].shape[0]:
            self._staging = StoreView(*_carve(self.shapes, max(len(slots), 1), self.branches,
                                              self.buffer_dtype, self.device, False))
        n = len(slots)
        for layer in self.shapes:
            self._staging.features[layer][:n].copy_(self.features[layer][slots], non_blocking=True)
            self._staging.outputs[layer][:, :n].copy_(self.outputs[layer][:, slots], non_blocking=True)
        renumber = torch.full((self.keyframes,), -1, dtype=torch.long)
        renumber[slots] = torch.arange(n)
        local = torch.where(pairs >= 0, renumber[pairs.clamp(min=0).cpu()].to(pairs.device), pairs)
        view = StoreView({k: v[:n] for k, v in self._staging.features.items()},
                         {k: v[:, :n] for k, v in self._staging.outputs.items()})
        return view, local

    @property
    def buffer_dtype(self) -> torch.dtype:
        return next(iter(self.features.values())).dtype


def _carve(shapes: Dict[str, Tuple[int, int]], keyframes: int, branches: int, dtype: torch.dtype,
           device: torch.device, pin: bool):
    """One flat buffer cut into per-layer features [K,S,C] and outputs [B,K,S,C] views."""
    sizes = {name: keyframes * s * c for name, (s, c) in shapes.items()}
    total = sum((1 + branches) * n for n in sizes.values())
    buffer = torch.empty(total, dtype=dtype, device=device, pin_memory=pin)
    features, outputs, offset = {}, {}, 0
    for name, (s, c) in shapes.items():
        n = sizes[name]
        features[name] = buffer[offset:offset + n].view(keyframes, s, c)
        offset += n
        outputs[name] = buffer[offset:offset + branches * n].view(branches, keyframes, s, c)
        offset += branches * n
    return features, outputs
