"""DDIM inversion of the source video (the original's ``preprocess.py``), and the edit's start point."""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Mapping, Optional

import torch
from diffusers import DDIMScheduler

from tokenflow.engine.latents import InvertedLatents
from tokenflow.errors import ConfigError


def ddim_invert(eps_fn: Callable[[torch.Tensor, int], torch.Tensor], z0: torch.Tensor,
                scheduler: DDIMScheduler, save: Iterable[int], batch_size: int,
                on_step: Optional[Callable[[int], None]] = None, place: str = "device",
                start: Optional[Mapping] = None, checkpoint=None) -> InvertedLatents:
    """Deterministic DDIM inversion, conditioned on one prompt (no guidance).

    Walks the timesteps upwards (1, 21, ..., 981 for 50 steps). At step i the noise is predicted
    on the current (less noisy) latent *with the new timestep t_i*:
        x0 = (x - sqrt(1 - a_prev) * eps) / sqrt(a_prev);  x <- sqrt(a_t) * x0 + sqrt(1 - a_t) * eps
    with a_prev = alpha_bar[t_{i-1}], or ``final_alpha_cumprod`` (alpha_bar[0] for SD) at i = 0.

    Args:
        eps_fn: (latents [b,4,h,w], t) -> noise prediction [b,4,h,w] float32.
        z0: [N,4,h,w] float32 clean latents.
        save: timesteps whose latents to return; the noisiest one is always returned.
        place: where the saved latents live: "device" (z0's) or "host" (pinned when z0 is on CUDA).
        start: a checkpointed state to continue from ({"step": next step, "x": [N,4,h,w],
            "latents": {t: [N,4,h,w]} saved so far}); the result is bit-identical to not stopping.
        checkpoint: a ``checkpoint.Checkpointer`` told about every step boundary (it saves the
            state every few steps, and saves and raises when a stop was requested).
    Returns:
        {t: [N,4,h,w] float32}, one tensor [T,N,4,h,w] underneath.
    """
    alphas = scheduler.alphas_cumprod
    timesteps = [int(t) for t in reversed(scheduler.timesteps)]
    save = (set(int(t) for t in save) & set(timesteps)) | {timesteps[-1]}
    x = z0.clone(memory_format=torch.contiguous_format)
    saved = InvertedLatents.empty(sorted(save), x.shape, z0.device, place)
    first = 0
    if start is not None:
        first = int(start["step"])
        if tuple(start["x"].shape) != tuple(x.shape) or not set(start["latents"]) <= set(save):
            raise ConfigError("the inversion checkpoint does not fit this run (latents of another shape or "
                              "timesteps); start over without --resume")
        x.copy_(start["x"])
        for t, latent in start["latents"].items():
            saved[t].copy_(latent)

    def state(i: int) -> dict:   # what continuing at step i needs
        return {"x": x, "z0": z0, "latents": {t: saved[t] for t in timesteps[:i] if t in save}}

    for i in range(first, len(timesteps)):
        if checkpoint is not None:
            checkpoint.between_steps("invert", i, len(timesteps), functools.partial(state, i))
        t = timesteps[i]
        alpha_t = alphas[t]
        alpha_prev = alphas[timesteps[i - 1]] if i > 0 else scheduler.final_alpha_cumprod
        mu, mu_prev = alpha_t ** 0.5, alpha_prev ** 0.5
        sigma, sigma_prev = (1 - alpha_t) ** 0.5, (1 - alpha_prev) ** 0.5
        for b in range(0, x.shape[0], batch_size):
            xb = x[b:b + batch_size]
            eps = eps_fn(xb, t)
            pred_x0 = (xb - sigma_prev.to(xb.device) * eps) / mu_prev.to(xb.device)
            x[b:b + batch_size] = mu.to(xb.device) * pred_x0 + sigma.to(xb.device) * eps
        if t in save:
            saved[t].copy_(x)
        if on_step is not None:
            on_step(i)
    return saved


def noise_from_inversion(z0: torch.Tensor, z_noisiest: torch.Tensor, alpha_noisiest: torch.Tensor) -> torch.Tensor:
    """The eps that takes z0 to the noisiest inverted latent: (z_T - sqrt(a_T) z0) / sqrt(1 - a_T)."""
    mu, sigma = alpha_noisiest ** 0.5, (1 - alpha_noisiest) ** 0.5
    return (z_noisiest - mu.to(z0.device) * z0) / sigma.to(z0.device)
