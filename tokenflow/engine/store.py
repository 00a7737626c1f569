"""Keyframe feature store: what the keyframe pass leaves for the propagation passes."""
from __future__ import annotations

from typing import Dict

import torch


class KeyframeStore:
    """Per self-attention layer, the keyframe pass's tensors of the current step.

    features[layer]: [K, S, C] source-branch features correspondences are computed on
        (the self-attention input ``norm1(h)`` for the original propagation, the source
        self-attention output for the paper's).
    outputs[layer]:  [3, K, S, C] self-attention outputs of [source, uncond, cond] (after to_out).

    Only the source branch's features are kept: correspondences never use the other two.
    """

    def __init__(self) -> None:
        self.features: Dict[str, torch.Tensor] = {}
        self.outputs: Dict[str, torch.Tensor] = {}

    def put(self, layer: str, features: torch.Tensor, outputs: torch.Tensor) -> None:
        self.features[layer] = features
        self.outputs[layer] = outputs

    def clear(self) -> None:
        self.features.clear()
        self.outputs.clear()