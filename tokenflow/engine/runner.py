"""Runs the UNet for TokenFlow's passes: builds the [source, uncond, cond] batches.

The method (``tokenflow.method.editor``) decides *what* each pass is (a ``StepState``); the runner
decides *how* the UNet runs it: eagerly with the processors writing into the keyframe store
(``backend=None``), or through a graph backend (``engine.backends``: compile, onnx, tensorrt)
whose passes take and return tensors, with the runner moving keyframe features into the store
and padding calls to the planned size for static-shape backends.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

from tokenflow.engine.backends.base import UNetBackend
from tokenflow.engine.conditioning import FrameIndex, UNetConditions
from tokenflow.engine.passes import GRAPH_PAIRS, store_tensors
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.engine.state import PassKind, StepState, timestep_tensor
from tokenflow.errors import ConfigError
from tokenflow.models.text import unet_keywords


class UNetRunner:
    """Evaluates the TokenFlow UNet.

    Text rows are [1, 77, D] each (SDXL: [1, 77 + 1, D], its pooled embedding and time ids packed
    in, ``models.text``); latents are float32 and cast to the UNet dtype on entry; noise
    predictions come back as float32.
    """

    def __init__(self, unet: torch.nn.Module, tokenflow: TokenFlowUNet, backend: Optional[UNetBackend] = None):
        self.unet = unet
        self.tokenflow = tokenflow
        self.backend = backend
        self.dtype = next(unet.parameters()).dtype
        self.calls = 0
        self.samples = 0   # UNet batch rows evaluated (one per frame per branch), padding excluded
        self.conditions: Optional[UNetConditions] = None   # depth / ControlNets of the inversion or edit running

    @contextlib.contextmanager
    def conditioned(self, conditions: Optional[UNetConditions]) -> Iterator[None]:
        """Apply ``conditions`` (depth channel, ControlNet residuals) to the calls inside; every call
        then needs its ``frames``."""
        saved, self.conditions = self.conditions, (None if conditions is None or conditions.empty else conditions)
        try:
            yield
        finally:
            self.conditions = saved

    def _conditioned_input(self, x: torch.Tensor, t: int, text: torch.Tensor, frames: Optional[FrameIndex],
                           n_branches: int, plain: bool):
        """(UNet input with the depth channel, ControlNet residual keywords) of a call."""
        c = self.conditions
        if c is None:
            return x, {}
        if frames is None:
            raise ValueError("a conditioned UNet call (depth / ControlNet) needs the clip frames of its rows")
        x = c.unet_input(x, frames, n_branches)
        if not c.controls:
            return x, {}
        if self.backend is not None:
            raise ConfigError(f"ControlNet runs with --backend eager only (this run uses {self.backend.name}): the "
                              "exported UNet graphs take no ControlNet residuals")
        return x, c.residuals(x, timestep_tensor(t, x.device), text, frames, n_branches, plain)

    @property
    def backend_name(self) -> str:
        return "eager" if self.backend is None else self.backend.name

    def eps(self, latents: torch.Tensor, t: Union[int, torch.Tensor], text: torch.Tensor, pad_to: Optional[int] = None,
            frames: Optional[FrameIndex] = None, *, n_branches: int = 1) -> torch.Tensor:
        """Plain UNet noise prediction. latents [R,4,h,w], text [R,77,D] -> [R,4,h,w] float32; t: a
        timestep, or (eager only) an int64 tensor [R] of one per row.

        pad_to: rows a static-shape backend is padded to (the plan's inversion batch).
        frames: the clip frames of the rows (needed under ``conditioned``); with ``n_branches`` > 1
        the rows are that many branches of those frames (a TokenFlow pass run eagerly)."""
        self.calls += 1
        rows = latents.shape[0]
        self.samples += rows
        x, text = latents.to(self.dtype).contiguous(), text.to(self.dtype)
        x, extra = self._conditioned_input(x, t, text, frames, n_branches, plain=n_branches == 1)
        if self.backend is None:
            return self.unet(x, timestep_tensor(t, latents.device), **unet_keywords(self.unet, text),
                             **extra).sample.float()
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            raise ValueError(f"backend {self.backend.name} takes one timestep per call, not one per row")
        text = text.contiguous()   # static-shape graphs guard on strides (an expanded text has stride 0)
        if self.backend.pads_calls and pad_to and rows < pad_to:
            x, text = _pad_rows(x, pad_to), _pad_rows(text, pad_to)
        return self.backend.plain(x, t, text)[:rows].float()

    def branches(self, source: torch.Tensor, xs: torch.Tensor, t: int, texts: torch.Tensor,
                 state: StepState, pad_to: Optional[int] = None, frames: Optional[FrameIndex] = None) -> torch.Tensor:
        """One TokenFlow pass over B = 1 + 2P branches.

        Args:
            source: [m,4,h,w] inverted source latents at t; xs: [P,m,4,h,w] edit latents per prompt.
            texts: [B, 77, D] embeddings of [inversion prompt, negative, prompt_1, negative, prompt_2, ...].
            state: what the processors do in this call (``state.n_branches`` = B).
            pad_to: frames per branch a static-shape backend pads propagation calls to.
            frames: the clip frames of the m rows (an index tensor or a slice; needed under ``conditioned``).
        Returns:
            [B, m, 4, h, w] float32 noise predictions of [source, uncond_1, cond_1, ...].
        """
        m = source.shape[0]
        n_branches = 1 + 2 * xs.shape[0]
        latents = torch.cat([source] + [x for x in xs for _ in range(2)])
        text = texts.repeat_interleave(m, dim=0)
        if self.backend is None or state.kind is PassKind.PLAIN:
            with self.tokenflow.control.active(state):
                return self.eps(latents, t, text, frames=frames, n_branches=n_branches).view(
                    n_branches, m, *source.shape[1:])
        self.calls += 1
        self.samples += n_branches * m
        x, text = latents.to(self.dtype).contiguous(), text.to(self.dtype)
        x, _ = self._conditioned_input(x, t, text, frames, n_branches, plain=False)
        names = [layer.name for layer in self.tokenflow.layers]
        if state.kind is PassKind.KEYFRAMES:
            eps, features, outputs = self.backend.keyframes(x, t, text, state.inject_qk, state.inject_conv,
                                                            n_branches, state.match_on)
            for name, f, o in zip(names, features, outputs):
                state.store.write(name, state.keyframe_offset, f, o.unflatten(0, (n_branches, -1)))
            return eps.float().view(n_branches, m, *source.shape[1:])
        if state.on_correspondences is not None:
            raise ConfigError(f"recording correspondences needs --backend eager (this run uses {self.backend.name})")
        pairs, weights, frames = state.pairs, state.weights.float(), m
        if pairs.shape[1] < GRAPH_PAIRS:  # one graph for every chunk: pad with "no pair" (slot -1, weight 0)
            pairs = torch.nn.functional.pad(pairs, (0, GRAPH_PAIRS - pairs.shape[1]), value=-1)
            weights = torch.nn.functional.pad(weights, (0, GRAPH_PAIRS - weights.shape[1]), value=0.0)
        if self.backend.pads_calls and pad_to and m < pad_to:
            x, text = _pad_branches(x, n_branches, pad_to), _pad_branches(text, n_branches, pad_to)
            pairs, weights, frames = _pad_rows(pairs, pad_to), _pad_rows(weights, pad_to), pad_to
        eps = self.backend.propagate(x, t, text, state.inject_conv, pairs, weights,
                                     store_tensors(state.store, names), n_branches, state.match_on)
        return eps.float().view(n_branches, frames, *source.shape[1:])[:, :m]

    def three_branch(self, source: torch.Tensor, x: torch.Tensor, t: int, texts: torch.Tensor,
                     state: StepState) -> torch.Tensor:
        """[source, uncond, cond] of one prompt: x [m,4,h,w] -> [3, m, 4, h, w]."""
        return self.branches(source, x[None], t, texts, state)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """[n, ...] -> [rows, ...] repeating the last row."""
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])


def _pad_branches(x: torch.Tensor, n_branches: int, frames: int) -> torch.Tensor:
    """[B*m, ...] -> [B*frames, ...], each branch padded with its last frame."""
    return _pad_rows(x.unflatten(0, (n_branches, -1)).transpose(0, 1), frames).transpose(0, 1).flatten(0, 1)
