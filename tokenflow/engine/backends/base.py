"""What a UNet backend is: the three TokenFlow passes as functions of tensors.

``eager`` runs diffusers' UNet with the TokenFlow processors directly (the keyframe pass writes
into the store in place). Every other backend runs the graph-mode passes of ``engine.passes``:

    plain(sample [R,4,h,w], t, text [R,T,D]) -> eps [R,4,h,w]   (T = 77, SDXL 77 + E: models.text)
    keyframes(sample, t, text, inject_qk, inject_conv, n_branches, match_on)
        -> (eps, features [K,S_l,C_l] per layer, outputs [B*K,S_l,C_l] per layer)
    propagate(sample, t, text, inject_conv, pairs [m,P], weights [m,P], store, n_branches, match_on)
        -> eps        (store: ``passes.store_tensors`` of the keyframe store view)

Inputs are already in the UNet's dtype and device; eps comes back in the UNet's dtype.
``rows_per_call`` lets the runner pad plain and propagation calls to the planned size so a
static-shape backend sees one shape per pass (padding rows repeat the last frame; results for the
real rows are unchanged because frames never interact in those passes).
"""
from __future__ import annotations

import importlib.util
from typing import List, Optional, Sequence, Tuple

import torch


class UNetBackend:
    name = "base"
    pads_calls = False   # True: the runner pads plain/propagation calls to the planned frame count

    def plain(self, sample: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def keyframes(self, sample, t: int, text, inject_qk: bool, inject_conv: bool, n_branches: int,
                  match_on: str) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        raise NotImplementedError

    def propagate(self, sample, t: int, text, inject_conv: bool, pairs, weights, store: Sequence[torch.Tensor],
                  n_branches: int, match_on: str) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def stats(self) -> dict:
        """Backend facts for summaries and benchmarks (compilations, engine builds, cache hits)."""
        return {}


def switch(value: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor(bool(value), device=device)


def optional_import_reason(module: str, install: str) -> Optional[str]:
    """None when ``module`` imports, else the reason with the install command."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed ({install})"
    return None
