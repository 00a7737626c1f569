"""Runs the UNet for TokenFlow's passes: builds the [source, uncond, cond] batches.

The method (``tokenflow.editor``) decides *what* each pass is (a ``StepState``); the runner
decides *how* the UNet runs it (device, dtype, batching). Later backends (chunked, compiled)
replace this class without the method changing.
"""
from __future__ import annotations

import torch

from ..processors import StepState, TokenFlowUNet


class UNetRunner:
    """Evaluates the TokenFlow UNet.

    Text embeddings are [1, 77, D] each; latents are float32 and cast to the UNet dtype on entry;
    noise predictions come back as float32.
    """

    def __init__(self, unet: torch.nn.Module, tokenflow: TokenFlowUNet):
        self.unet = unet
        self.tokenflow = tokenflow
        self.dtype = next(unet.parameters()).dtype
        self.calls = 0

    def eps(self, latents: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
        """Plain UNet noise prediction. latents [B,4,h,w], text [B,77,D] -> [B,4,h,w] float32."""
        self.calls += 1
        out = self.unet(latents.to(self.dtype).contiguous(), _timestep(t, latents.device), encoder_hidden_states=text.to(self.dtype))
        return out.sample.float()

    def three_branch(self, source: torch.Tensor, x: torch.Tensor, t: int, texts: torch.Tensor,
                     state: StepState) -> torch.Tensor:
        """One TokenFlow pass.

        Args:
            source: [m,4,h,w] inverted source latents at t; x: [m,4,h,w] current edit latents.
            texts: [3, 77, D] embeddings of [inversion prompt, negative prompt, prompt].
            state: what the processors do in this call.
        Returns:
            [3, m, 4, h, w] float32 noise predictions of [source, uncond, cond].
        """
        m = x.shape[0]
        latents = torch.cat([source, x, x])
        text = texts.repeat_interleave(m, dim=0)
        with self.tokenflow.control.active(state):
            return self.eps(latents, t, text).view(3, m, *x.shape[1:])


def _timestep(t: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(int(t), dtype=torch.long, device=device)
