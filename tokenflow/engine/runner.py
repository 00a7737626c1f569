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
        self.samples = 0   # UNet batch rows evaluated (one per frame per branch)

    def eps(self, latents: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
        """Plain UNet noise prediction. latents [B,4,h,w], text [B,77,D] -> [B,4,h,w] float32."""
        self.calls += 1
        self.samples += latents.shape[0]
        out = self.unet(latents.to(self.dtype).contiguous(), _timestep(t, latents.device), encoder_hidden_states=text.to(self.dtype))
        return out.sample.float()

    def branches(self, source: torch.Tensor, xs: torch.Tensor, t: int, texts: torch.Tensor,
                 state: StepState) -> torch.Tensor:
        """One TokenFlow pass over B = 1 + 2P branches.

        Args:
            source: [m,4,h,w] inverted source latents at t; xs: [P,m,4,h,w] edit latents per prompt.
            texts: [B, 77, D] embeddings of [inversion prompt, negative, prompt_1, negative, prompt_2, ...].
            state: what the processors do in this call (``state.n_branches`` = B).
        Returns:
            [B, m, 4, h, w] float32 noise predictions of [source, uncond_1, cond_1, ...].
        """
        m = source.shape[0]
        n_branches = 1 + 2 * xs.shape[0]
        latents = torch.cat([source] + [x for x in xs for _ in range(2)])
        text = texts.repeat_interleave(m, dim=0)
        with self.tokenflow.control.active(state):
            return self.eps(latents, t, text).view(n_branches, m, *source.shape[1:])

    def three_branch(self, source: torch.Tensor, x: torch.Tensor, t: int, texts: torch.Tensor,
                     state: StepState) -> torch.Tensor:
        """[source, uncond, cond] of one prompt: x [m,4,h,w] -> [3, m, 4, h, w]."""
        return self.branches(source, x[None], t, texts, state)


def _timestep(t: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(int(t), dtype=torch.long, device=device)
