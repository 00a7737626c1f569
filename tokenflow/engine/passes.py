"""TokenFlow's three UNet passes as plain modules with explicit tensor inputs and outputs.

Compiled and exported backends (``torch.compile``, ONNX, TensorRT) need each pass as a function
of tensors only. These wrappers install a graph-mode ``StepState`` around one UNet call:

    PlainPass     (sample [R,4,h,w], timestep [], text [R,T,D]) -> eps [R,4,h,w]
    KeyframePass  (sample, timestep, text, inject_qk [] bool, inject_conv [] bool)
                  -> (eps, features_0..L-1 [K,S_l,C_l], outputs_0..L-1 [B*K,S_l,C_l])
    PropagatePass (sample, timestep, text, inject_conv, pairs [m,P] int64, weights [m,P] float32,
                   features_0..L-1 [K',S_l,C_l], outputs_0..L-1 [B*K',S_l,C_l]) -> eps

R = B*K (keyframe pass) or B*m (propagation) rows, branches [source, uncond_1, cond_1, ...];
L self-attention layers in module order (``layer_names``: 16 for SD, 70 for SDXL). Text rows are
the packed conditioning of ``models.text``: T = 77 for SD; for SDXL T = 77 + E, the pooled text
embedding and the 6 time ids in the last E tokens, unpacked inside the graph (``unet_keywords``)
into the UNet's ``added_cond_kwargs``, so SDXL's added conditioning is a graph input with the
text and no pass has another signature. The injection switches are inputs, not graph variants,
so one graph serves every step. Keyframe outputs are returned with
branches folded into the batch ([B*K, S, C]) so every tensor has the batch-like axis first.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.engine.state import PassKind, StepState
from tokenflow.engine.store import StoreView
from tokenflow.kernels import KernelChoice
from tokenflow.models.text import unet_keywords

GRAPH_PAIRS = 2   # P: keyframes a frame blends (previous and next, or own and previous group's)


class FeatureSink:
    """Graph-mode stand-in for the keyframe store: keeps what the keyframe pass writes."""

    def __init__(self) -> None:
        self.features: Dict[str, torch.Tensor] = {}
        self.outputs: Dict[str, torch.Tensor] = {}

    def write(self, layer: str, start: int, features: torch.Tensor, outputs: torch.Tensor) -> None:
        self.features[layer], self.outputs[layer] = features, outputs


class _Pass(torch.nn.Module):
    def __init__(self, tokenflow: TokenFlowUNet, n_branches: int, match_on: str, kernels: KernelChoice):
        super().__init__()
        self.unet = tokenflow.unet
        self._control = tokenflow.control   # not a submodule: plain state holder
        self.layer_names: List[str] = [layer.name for layer in tokenflow.layers]
        self.n_branches, self.match_on, self.kernels = n_branches, match_on, kernels

    def _run(self, state: StepState, sample, timestep, text) -> torch.Tensor:
        previous = self._control.state
        self._control.state = state
        try:
            return self.unet(sample, timestep, **unet_keywords(self.unet, text)).sample
        finally:
            self._control.state = previous


class PlainPass(torch.nn.Module):
    """The UNet alone (inversion)."""

    def __init__(self, tokenflow: TokenFlowUNet):
        super().__init__()
        self.unet = tokenflow.unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, **unet_keywords(self.unet, text)).sample


class KeyframePass(_Pass):
    """Extended attention over the call's keyframes; returns every layer's keyframe features."""

    def forward(self, sample, timestep, text, inject_qk, inject_conv) -> Tuple[torch.Tensor, ...]:
        sink = FeatureSink()
        state = StepState(PassKind.KEYFRAMES, 0, None, sink, n_branches=self.n_branches, inject_qk=inject_qk,
                          inject_conv=inject_conv, match_on=self.match_on, kernels=self.kernels)
        eps = self._run(state, sample, timestep, text)
        features = [sink.features[n] for n in self.layer_names]
        outputs = [sink.outputs[n].flatten(0, 1) for n in self.layer_names]
        return (eps, *features, *outputs)


class PropagatePass(_Pass):
    """Self-attention replaced by keyframe outputs gathered through correspondences."""

    def forward(self, sample, timestep, text, inject_conv, pairs, weights, *store: torch.Tensor) -> torch.Tensor:
        n = len(self.layer_names)
        if len(store) != 2 * n:
            raise ValueError(f"PropagatePass expects {2 * n} store tensors (features, outputs), got {len(store)}")
        outputs = {name: o.unflatten(0, (self.n_branches, -1)) for name, o in zip(self.layer_names, store[n:])}
        view = StoreView(dict(zip(self.layer_names, store[:n])), outputs)
        state = StepState(PassKind.PROPAGATE, 0, None, view, n_branches=self.n_branches, inject_conv=inject_conv,
                          pairs=pairs, weights=weights, match_on=self.match_on, kernels=self.kernels)
        return self._run(state, sample, timestep, text)


def store_tensors(view: StoreView, layer_names: Sequence[str]) -> List[torch.Tensor]:
    """A store view as PropagatePass inputs: features [K,S,C] then outputs folded to [B*K,S,C];
    the same tensor objects on every call with the same view (``StoreView.graph_tensors``)."""
    return view.graph_tensors(layer_names)


def input_names(kind: str, layer_names: Sequence[str]) -> List[str]:
    """Input names of a pass graph (ONNX/TensorRT bindings), in forward-argument order."""
    base = ["sample", "timestep", "text"]
    if kind == "plain":
        return base
    if kind == "keyframes":
        return base + ["inject_qk", "inject_conv"]
    if kind == "propagate":
        n = len(layer_names)
        return (base + ["inject_conv", "pairs", "weights"] + [f"features_{i}" for i in range(n)] +
                [f"outputs_{i}" for i in range(n)])
    raise ValueError(f"unknown pass {kind!r}")


def output_names(kind: str, layer_names: Sequence[str]) -> List[str]:
    if kind == "keyframes":
        n = len(layer_names)
        return ["eps"] + [f"features_{i}" for i in range(n)] + [f"outputs_{i}" for i in range(n)]
    return ["eps"]
