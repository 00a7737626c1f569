"""Keyframe feature store: what the keyframe pass leaves for the propagation passes.

One preallocated buffer holds, per self-attention layer of S tokens and C channels,

    features[layer]: [K, S, C]     source-branch features that correspondences are computed on
                                   (``norm1(h)`` for the original propagation, the source
                                   self-attention output for the paper's)
    outputs[layer]:  [B, K, S, C]  self-attention outputs (after to_out) of the B branches
                                   [source, uncond_1, cond_1, uncond_2, cond_2, ...]

in the compute dtype, K = keyframe slots of one step. Keyframe-pass calls write their slots
(``write``); a window of keyframes writes at its offset.

Offloaded (the plan puts the store on the host, pinned on CUDA), ``staged(pairs)`` serves each
propagation chunk from a fixed-size device staging buffer of ``staging_slots`` keyframes:

1. wait for the event recorded after the last ``write`` (its device-to-host copies are async);
2. wait for the previous upload's event (the pinned staging buffer is about to be rewritten);
3. gather the chunk's slots, padded to the capacity with copies of its first slot, into one flat
   pinned staging buffer (``torch.index_select(..., out=)`` per layer: no pageable temporaries);
4. one async host-to-device copy of that flat buffer into the device staging buffer, then an event.

The view always has ``staging_slots`` slots and is the same tensor objects every chunk, so a
compiled graph sees one shape and CUDA graphs one address; padding slots are never named by the
renumbered pairs (slot -1 is read as slot 0 and weighted 0 by the kernels, so slot 0 is real).
Without CUDA (CPU, or a device without events) the copies are synchronous and the waits no-ops.
The CUDA ordering is UNVERIFIED on a GPU (no GPU was available while this was written).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tokenflow.device import sync
from tokenflow.engine.memory import attention_layer_shapes


def staging_slots(chunk_frames: int, spacing: int, keyframes: int) -> int:
    """Keyframe slots a propagation call of ``chunk_frames`` consecutive frames can read.

    Its frames span at most ceil((m-1)/spacing)+1 groups; each frame reads keyframes of its own
    group and the ones before and after (original: own and previous; paper: nearest before and
    after), so at most 2 more."""
    return max(1, min(keyframes, math.ceil((max(chunk_frames, 1) - 1) / max(spacing, 1)) + 3))


class StoreView:
    """features / outputs dicts of device tensors, indexed by keyframe slot (see module doc)."""

    def __init__(self, features: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]):
        self.features, self.outputs = features, outputs
        self._graph: Optional[Tuple[Tuple[str, ...], List[torch.Tensor]]] = None

    def graph_tensors(self, layer_names: Sequence[str]) -> List[torch.Tensor]:
        """Graph-pass inputs: features [K,S,C] then outputs folded to [B*K,S,C] (views), built once:
        the same tensor objects, at the same addresses, on every call (static CUDA-graph inputs)."""
        names = tuple(layer_names)
        if self._graph is None or self._graph[0] != names:
            self._graph = (names, [self.features[n] for n in names] + [self.outputs[n].flatten(0, 1) for n in names])
        return self._graph[1]


class KeyframeStore(StoreView):
    """The per-step keyframe features of every layer, in one buffer on the device or pinned host.

    Args:
        shapes: {layer name: (S, C)}, e.g. from ``engine.memory.attention_layer_shapes``.
        keyframes: K slots; branches: B; staging_slots: device slots for an offloaded store
            (``staging_slots()`` of the plan's frames per call; grown if a chunk needs more).
    """

    def __init__(self, shapes: Dict[str, Tuple[int, int]], keyframes: int, branches: int, *,
                 dtype: torch.dtype, device: torch.device, on_host: bool = False, staging_slots: int = 0):
        self.shapes, self.keyframes, self.branches = dict(shapes), keyframes, branches
        self.device, self.on_host = torch.device(device), on_host
        self._events = on_host and self.device.type == "cuda"
        where = torch.device("cpu") if on_host else self.device
        _, features, outputs = _carve(self.shapes, keyframes, branches, dtype, where, self._events)
        super().__init__(features, outputs)
        self.nbytes = sum(t.numel() * t.element_size() for t in [*features.values(), *outputs.values()])
        self.uploads = 0          # host-to-device copies made by ``staged`` (one per chunk)
        self._written = None      # event after the last write's device-to-host copies
        self._uploaded = None     # event after the last upload from the pinned staging buffer
        self._staging: Optional[StoreView] = None
        self.staging_slots = 0
        if on_host:
            self._make_staging(max(1, min(staging_slots or keyframes, keyframes)))

    @classmethod
    def for_unet(cls, unet: torch.nn.Module, latent_size: Tuple[int, int], keyframes: int, branches: int = 3,
                 **kwargs) -> "KeyframeStore":
        """A device store for ``unet`` at latents (h, w), in the UNet's dtype and device."""
        p = next(unet.parameters())
        kwargs.setdefault("dtype", p.dtype)
        kwargs.setdefault("device", p.device)
        return cls(attention_layer_shapes(unet, *latent_size), keyframes, branches, **kwargs)

    def _make_staging(self, slots: int) -> None:
        """The pinned host and device staging buffers (same flat layout), zeroed: finite everywhere."""
        self._wait_uploaded()
        dtype = self.buffer_dtype
        self._host_flat, *host = _carve(self.shapes, slots, self.branches, dtype, torch.device("cpu"), self._events)
        self._device_flat, *dev = _carve(self.shapes, slots, self.branches, dtype, self.device, False)
        self._host_flat.zero_()
        self._device_flat.zero_()
        self._pinned, self._staging, self.staging_slots = StoreView(*host), StoreView(*dev), slots

    @property
    def staging_buffer(self) -> Optional[torch.Tensor]:
        """The flat device staging buffer every ``staged`` view lives in (None for a device store)."""
        return self._device_flat if self.on_host else None

    def write(self, layer: str, start: int, features: torch.Tensor, outputs: torch.Tensor) -> None:
        """Slots start..start+k-1 of ``layer``: features [k, S, C], outputs [B, k, S, C]."""
        k = features.shape[0]
        self.features[layer][start:start + k].copy_(features, non_blocking=True)
        self.outputs[layer][:, start:start + k].copy_(outputs, non_blocking=True)
        if self._events:   # the host must not read these slots before the copies land
            self._written = torch.cuda.Event()
            self._written.record(torch.cuda.current_stream(self.device))
        elif self.on_host and self.device.type != "cpu":
            sync(self.device)   # no events here: wait for the copies now

    def _wait_uploaded(self) -> None:
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def staged(self, pairs: torch.Tensor) -> Tuple[StoreView, torch.Tensor]:
        """(a view holding the slots ``pairs`` [m, P] reads, pairs renumbered into that view).

        On the device the store itself is the view. Offloaded, the slots are uploaded into the
        staging buffer (see the module doc); slot -1, "no pair", stays -1."""
        if not self.on_host:
            return self, pairs
        host_pairs = pairs.cpu()
        slots = torch.unique(host_pairs[host_pairs >= 0])
        n = len(slots)
        if n > self.staging_slots:   # more than the plan's bound: a new shape (one more graph)
            self._make_staging(n)
        if self._written is not None:
            self._written.synchronize()
            self._written = None
        self._wait_uploaded()
        index = torch.zeros(self.staging_slots, dtype=torch.long)
        index[:n] = slots
        if n:
            index[n:] = slots[0]
        for layer in self.shapes:
            torch.index_select(self.features[layer], 0, index, out=self._pinned.features[layer])
            torch.index_select(self.outputs[layer], 1, index, out=self._pinned.outputs[layer])
        self._device_flat.copy_(self._host_flat, non_blocking=True)
        self.uploads += 1
        if self._events:
            self._uploaded = torch.cuda.Event()
            self._uploaded.record(torch.cuda.current_stream(self.device))
        renumber = torch.full((self.keyframes,), -1, dtype=torch.long)
        renumber[slots] = torch.arange(n)
        local = torch.where(host_pairs >= 0, renumber[host_pairs.clamp(min=0)], host_pairs).to(pairs.device)
        return self._staging, local

    @property
    def buffer_dtype(self) -> torch.dtype:
        return next(iter(self.features.values())).dtype


def _carve(shapes: Dict[str, Tuple[int, int]], keyframes: int, branches: int, dtype: torch.dtype,
           device: torch.device, pin: bool):
    """One flat buffer cut into per-layer features [K,S,C] and outputs [B,K,S,C] views:
    (buffer, features, outputs)."""
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
    return buffer, features, outputs
