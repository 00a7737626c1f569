"""DDIM inversion of the source video (the original's ``preprocess.py``), the edit's start point,
and ``Inversion``: an inverted clip that remembers the edit it was made for."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import AbstractSet, Callable, Iterable, List, Mapping, Optional

import torch
from diffusers import DDIMScheduler

from tokenflow.config import TRAIN_STEPS, EditConfig
from tokenflow.engine.latents import InvertedLatents
from tokenflow.errors import ConfigError
from tokenflow.io.read import Clip
from tokenflow.method import schedule

# The EditConfig fields that decide which timesteps an edit needs (``edit_timesteps``).
EDIT_FIELDS = ("steps", "method", "sdedit_start", "skip")
# The EditConfig fields that say how the source was inverted: the edit's source branch uses them.
INVERSION_FIELDS = ("inversion_prompt", "inversion_steps", "inversion", "eta")
# The EditConfig fields that select and size the clip: an Inversion's clip is fixed, so an edit of
# one cannot change them (a keyword naming one is refused rather than silently ignored).
CLIP_FIELDS = ("video", "frames", "start_frame", "stride", "size", "crop")


@dataclass
class Inversion:
    """An inverted clip and the edit it was made for (``Editor.invert``).

    clip: the frames [N,3,H,W]; z0: [N,4,h,w] float32, their VAE latents.
    latents: {t: [N,4,h,w] float32} (``InvertedLatents``, one tensor on the device or in host
        memory): the inverted latents of the timesteps that edit needs, plus the noisiest one.
    inversion_prompt, inversion_steps: how it was inverted (the ``EditConfig`` fields of those names).
    inversion: "ddim" (the original's) or "ddpm" (edit-friendly, ``method.ddpm``): then ``latents``
        are the noisy latents x_t of the edit's timesteps, ``noise`` the noise maps z_t of the
        same timesteps (same container), drawn from ``seed``, for a sampler of ``eta``;
        inversion_steps is unused and only an edit of the same ``steps`` fits its noise maps.
    steps, method, sdedit_start, skip: the edit it was made for (the ``EditConfig`` fields of
        those names). ``Editor.edit(inversion, prompt)`` runs that edit unless the call names other
        values; any edit whose timesteps it holds works (``serves``).
    model: identity of the model that inverted it ("" if unknown); another model's edit is refused.
    conditions: ``method.conditions.EditConditions.key`` of its depth maps / controls; an edit with
        others is refused.
    """

    clip: Clip
    z0: torch.Tensor
    latents: Mapping[int, torch.Tensor]
    inversion_prompt: str
    inversion_steps: int
    steps: int
    method: str = "pnp"
    sdedit_start: float = 0.9
    model: str = ""
    from_cache: bool = False
    conditions: str = ""   # key of the depth maps / controls it was inverted with ("" for none)
    inversion: str = "ddim"
    noise: Optional[Mapping[int, torch.Tensor]] = None   # ddpm: {t: z_t [N,4,h,w]}
    eta: float = 1.0
    seed: int = 1
    skip: int = 0

    def made_for(self) -> str:
        """The edit it was made for, as keywords: "steps=10" (+ method and start for SDEdit)."""
        return _describe(self.steps, self.method, self.sdedit_start, self.skip)

    def serves(self, scheduler_config: dict, method: Optional[str] = None,
               sdedit_start: Optional[float] = None) -> List[int]:
        """The edit step counts whose timesteps it holds, for ``method`` / ``sdedit_start``
        (default: its own), most steps first."""
        method = method or self.method
        start = self.sdedit_start if sdedit_start is None else sdedit_start
        held = set(self.latents)
        if self.inversion == "ddpm":   # noise maps belong to one schedule: only its step count fits
            return [self.steps] if set(edit_timesteps(scheduler_config, self.steps, method, start)[self.skip:]) <= held \
                else []
        # an edit needs about steps (PnP) or start * steps (SDEdit) timesteps: more are never held
        most = len(held) if method != "sdedit" else math.ceil((len(held) + 2) / start)
        return schedule.served_steps(held, schedule.timesteps_function(scheduler_config), method, start,
                                     min(most, TRAIN_STEPS))


def edit_timesteps(scheduler_config: dict, steps: int, method: str, sdedit_start: float, skip: int = 0) -> List[int]:
    """The timesteps an edit denoises at, noisiest first (SDEdit: the truncated schedule; ``skip``:
    the DDPM inversion's later start, dropping that many)."""
    return schedule.edit_timesteps_with(schedule.timesteps_function(scheduler_config), steps, method,
                                        sdedit_start)[skip:]


def refuse_clip_keywords(inversion: Inversion, keywords: AbstractSet[str]) -> None:
    """ConfigError if an edit of ``inversion`` names a field of ``CLIP_FIELDS`` as a keyword: the
    inversion's clip (its frames, at its size) is what gets edited."""
    given = [name for name in CLIP_FIELDS if name in keywords]
    if given:
        n, _, h, w = inversion.clip.frames.shape
        raise ConfigError(f"{', '.join(given)} given with an Inversion, whose clip is fixed ({n} frames at {w}x{h}): "
                          f"leave {' and '.join(given)} out, or invert the video again with them")


def edit_config_for(inversion: Inversion, config: EditConfig, named: AbstractSet[str],
                    scheduler_config: dict, model: str = "") -> EditConfig:
    """The config of an edit of ``inversion``: ``config`` with the inversion's inversion_prompt and
    inversion_steps, and the steps, method and sdedit_start it was made for where ``named`` (the
    fields the caller gave) does not name them.

    Raises ConfigError naming the fix when a named inversion field contradicts the inversion, the
    inversion was made with another ``model`` (an identity; "" skips the check), or the edit needs
    timesteps it does not hold (naming the step counts it serves)."""
    for name in INVERSION_FIELDS:
        if name in named and getattr(config, name) != getattr(inversion, name):
            raise ConfigError(f"{name}={getattr(config, name)!r}, but the given Inversion was made with "
                              f"{name}={getattr(inversion, name)!r}: leave {name} out (the edit uses the "
                              f"inversion's), or invert again with {name}={getattr(config, name)!r}")
    if model and inversion.model and model != inversion.model:
        raise ConfigError(f"the given Inversion was made with model {inversion.model}, not this editor's "
                          f"({model}): invert the video with this editor")
    config = config.replace(**{name: getattr(inversion, name) for name in INVERSION_FIELDS},
                            **{name: getattr(inversion, name) for name in EDIT_FIELDS if name not in named})
    if inversion.inversion == "ddpm" and config.steps != inversion.steps:
        raise ConfigError(f"steps={config.steps}, but the given Inversion is a DDPM one made for steps={inversion.steps}: "
                          f"its noise maps belong to that schedule; leave steps out, or invert again with "
                          f"steps={config.steps}")
    needed = edit_timesteps(scheduler_config, config.steps, config.method, config.sdedit_start, config.skip)
    missing = sorted(set(needed) - set(inversion.latents), reverse=True)
    if missing:
        asked = _describe(config.steps, config.method, config.sdedit_start, config.skip)
        served = inversion.serves(scheduler_config, config.method, config.sdedit_start)
        serves = (f"with {config.method} it serves steps {', '.join(map(str, served[:8]))}"
                  f"{' and fewer' if len(served) > 8 else ''}" if served else f"it serves no {config.method} edit")
        leave = [name for name in EDIT_FIELDS if name in named]
        fixes = ([f"leave {' and '.join(leave)} out (the edit it was made for)"] if leave else []) + \
                (["ask for one of those"] if served else []) + [f"invert again with {asked}"]
        raise ConfigError(f"the given Inversion was made for {inversion.made_for()} and holds no inverted latents "
                          f"of timesteps {missing[:5]}{'...' if len(missing) > 5 else ''}, which {asked} needs "
                          f"({serves}): {', or '.join(fixes)}")
    return config


def _describe(steps: int, method: str, sdedit_start: float, skip: int = 0) -> str:
    return f"steps={steps}" + (f", method='sdedit', sdedit_start={sdedit_start}" if method == "sdedit" else "") \
        + (f", skip={skip}" if skip else "")


def ddim_invert(eps_fn: Callable[[torch.Tensor, int, slice], torch.Tensor], z0: torch.Tensor,
                scheduler: DDIMScheduler, save: Iterable[int], batch_size: int,
                on_step: Optional[Callable[[int], None]] = None, place: str = "device",
                start: Optional[Mapping] = None, checkpoint=None) -> InvertedLatents:
    """Deterministic DDIM inversion, conditioned on one prompt (no guidance).

    Walks the timesteps upwards (1, 21, ..., 981 for 50 steps). At step i the noise is predicted
    on the current (less noisy) latent *with the new timestep t_i*:
        x0 = (x - sqrt(1 - a_prev) * eps) / sqrt(a_prev);  x <- sqrt(a_t) * x0 + sqrt(1 - a_t) * eps
    with a_prev = alpha_bar[t_{i-1}], or ``final_alpha_cumprod`` (alpha_bar[0] for SD) at i = 0.

    Args:
        eps_fn: (latents [b,4,h,w], t, frames) -> noise prediction [b,4,h,w] float32; frames: the
            slice of z0's frames the batch holds (for per-frame conditions: depth, ControlNets).
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
            eps = eps_fn(xb, t, slice(b, b + xb.shape[0]))
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
