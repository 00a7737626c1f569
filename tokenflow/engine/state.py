"""Per-call state of the TokenFlow passes: what kind of UNet call runs and everything the
processors and the PnP hook read during it (``StepState``), held by ``TokenFlowControl`` while
the call runs. The runner builds a ``StepState`` for each call; nothing is set on modules.
Also the UNet's timestep input (``timestep_tensor``), the same for eager calls and every backend.
"""
from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Protocol, Union

import torch

from tokenflow.kernels import KernelChoice


def timestep_tensor(t, device: torch.device) -> torch.Tensor:
    """The UNet's timestep argument: a 0-dim int64 tensor on the UNet's device (``t`` an int), or
    ``t`` itself there when it is a tensor of one timestep per row (the DDPM inversion's calls)."""
    if isinstance(t, torch.Tensor) and t.dim() > 0:
        return t.to(device=device, dtype=torch.long)
    return torch.tensor(int(t), dtype=torch.long, device=device)


class FeatureStore(Protocol):
    """Where a pass finds keyframe features (``features`` / ``outputs`` per layer) and, in a
    keyframe pass, writes them (``write``): ``engine.store.KeyframeStore`` or a ``StoreView`` of it,
    or in graph mode ``engine.passes.FeatureSink``. A protocol, so this module imports neither (the
    store's module depends on the memory model, which depends on this one)."""

    features: Dict[str, torch.Tensor]
    outputs: Dict[str, torch.Tensor]

    def write(self, layer: str, start: int, features: torch.Tensor, outputs: torch.Tensor) -> None: ...


class PassKind(enum.Enum):
    PLAIN = "plain"            # ordinary UNet (inversion, decoding helpers)
    KEYFRAMES = "keyframes"    # extended attention over keyframes; fills the store
    PROPAGATE = "propagate"    # self-attention replaced by gathered keyframe outputs


@dataclass
class StepState:
    """Everything the processors need for one UNet call.

    n_frames: frames per branch in the call (keyframes of a keyframe-pass call, or a chunk's m
        frames); None in graph mode (taken from the batch: rows // n_branches).
    n_branches: B = 1 + 2 * prompts.
    inject_qk / inject_conv: Python bools, or 0-dim bool tensors in graph mode.
    keyframe_offset: store slot of the call's first keyframe (keyframe windows write at an offset).
    pairs / weights: [m, P] keyframe slots and blend weights (propagation passes).
    on_correspondences: optional callback(layer, idx [m, P, S]) for inspection/parity checks.
    """

    kind: PassKind
    timestep: int
    n_frames: Optional[int]
    store: Optional[FeatureStore] = None
    n_branches: int = 3
    keyframe_offset: int = 0
    inject_qk: Union[bool, torch.Tensor] = False
    inject_conv: Union[bool, torch.Tensor] = False
    pairs: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    match_on: str = "input"    # "input": norm1(h) (original); "output": source attn output (paper)
    on_correspondences: Optional[Callable[[str, torch.Tensor], None]] = None
    kernels: KernelChoice = KernelChoice()

    @property
    def graph_mode(self) -> bool:
        """A traced pass (``engine.passes``): kernels by name, no shape checks, no callbacks."""
        return self.n_frames is None


class TokenFlowControl:
    """Holds the StepState of the UNet call in progress (None outside TokenFlow passes)."""

    def __init__(self) -> None:
        self.state: Optional[StepState] = None

    @contextlib.contextmanager
    def active(self, state: StepState) -> Iterator[StepState]:
        previous, self.state = self.state, state
        try:
            yield state
        finally:
            self.state = previous
