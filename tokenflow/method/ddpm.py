"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov, Michaeli, CVPR 2024) and the
samplers the edit steps with.

Written from the paper. For the edit's timesteps t_1 > ... > t_T (noisiest first; a_t = alpha_bar):
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n_t           n_t ~ N(0, I), independent per t (seeded by seed and t)
    z_t = (x_prev - mu_t(x_t)) / sigma_t             x_prev: x of the next timestep, x0 after the last
where mu_t, sigma_t are the DDIM step with ``eta`` (eta = 1: the DDPM posterior) from the model's
noise prediction eps = eps(x_t, t) under the inversion prompt:
    x0_hat  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mu_t    = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps
a_prev: a of the next timestep, or the scheduler's ``final_alpha_cumprod`` after the last (the
DDIM scheduler's own rule for the last step).

Sampling x_prev = mu_t(x_t) + sigma_t z_t gives back every x_prev, and in the end x0, to float
rounding when eps is the inversion's (same prompt, no guidance). A step with sigma_t = 0 (a
scheduler whose last step lands on a_prev = a_t or 1: ``set_alpha_to_one``, ``linspace`` spacing)
is deterministic, z_t = 0 there: the reconstruction ends at that step's DDIM estimate; an edit samples with the edit's
(guided) eps and the same z_t. Every x_t depends on x0 alone, so the inversion's UNet calls are
independent across timesteps: ``ddpm_invert`` batches (timestep, frame) rows freely.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from tokenflow.engine.latents import InvertedLatents
from tokenflow.errors import ConfigError

INVERSIONS = ("ddim", "ddpm")
SEED_STRIDE = 1_000_003   # a prime above the training timesteps: (seed, t) -> one generator seed


@dataclass(frozen=True)
class DDPMSchedule:
    """The sampler's coefficients. timesteps: the full edit schedule, noisiest first (a ``skip``
    starts later in it); alphas: the scheduler's ``alphas_cumprod`` [1000] float32;
    final_alpha: its ``final_alpha_cumprod``; eta in (0, 1]."""

    timesteps: Tuple[int, ...]
    alphas: torch.Tensor
    final_alpha: float
    eta: float = 1.0

    @classmethod
    def of(cls, scheduler, timesteps: Sequence[int], eta: float) -> "DDPMSchedule":
        return cls(tuple(int(t) for t in timesteps), scheduler.alphas_cumprod.float().cpu(),
                   float(scheduler.final_alpha_cumprod), float(eta))

    @functools.cached_property
    def _index(self) -> dict:
        return {t: i for i, t in enumerate(self.timesteps)}

    def prev(self, t: int) -> Optional[int]:
        """The timestep after t (None after the last: x0 comes next)."""
        i = self._index[int(t)]
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else None

    def alpha(self, t: Optional[int]) -> float:
        return self.final_alpha if t is None else float(self.alphas[int(t)])

    def coefficients(self, ts: Sequence[int], device: torch.device) -> torch.Tensor:
        """[R, 5, 1, 1, 1] float32 per row of timestep ts[r]: sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev),
        sqrt(1 - a_prev - sigma^2), sigma (in float64, then rounded once)."""
        rows = []
        for t in ts:
            a, a_prev = self.alpha(t), self.alpha(self.prev(t))
            sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
            rows.append([a ** 0.5, (1 - a) ** 0.5, a_prev ** 0.5, max(1 - a_prev - sigma ** 2, 0.0) ** 0.5, sigma])
        return torch.tensor(rows, dtype=torch.float64).float().to(device).view(len(rows), 5, 1, 1, 1)

    def mean(self, eps: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """mu_t rows [R,4,h,w] from eps and x_t rows (c: ``coefficients`` of their timesteps)."""
        x0_hat = (x - c[:, 1] * eps) / c[:, 0]
        return c[:, 2] * x0_hat + c[:, 3] * eps


def noise_seed(seed: int, t: int) -> int:
    """The generator seed of timestep t's noise n_t: the same whichever timesteps a run computes."""
    return (int(seed) * SEED_STRIDE + int(t)) % (2 ** 63)


def noisy_latents(z0: torch.Tensor, schedule: DDPMSchedule, timesteps: Sequence[int], seed: int,
                  place: str = "device") -> InvertedLatents:
    """{t: x_t = sqrt(a_t) z0 + sqrt(1 - a_t) n_t} for ``timesteps``, n_t drawn on the CPU in float32
    from ``noise_seed(seed, t)`` (the same on every device)."""
    out = InvertedLatents.empty(sorted(int(t) for t in timesteps), z0.shape, z0.device, place)
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(noise_seed(seed, t)))
        c = schedule.coefficients([t], z0.device)[0]
        out[t].copy_(c[0] * z0 + c[1] * noise.to(z0.device))
    return out


EpsFn = Callable[[torch.Tensor, Union[int, torch.Tensor], torch.Tensor], torch.Tensor]


def row_groups(timesteps: Sequence[int], frames: int, rows_per_call: int,
               across_timesteps: bool = True) -> List[List[Tuple[int, int]]]:
    """The UNet calls of an inversion: lists of (timestep, frame) rows, timestep-major.
    ``across_timesteps``: any rows_per_call consecutive rows share a call (the UNet stays at full
    batch for short clips); else each call holds one timestep's frames (backends whose graphs take
    one timestep per call)."""
    if not across_timesteps:
        return [[(int(t), j) for j in range(i, min(i + rows_per_call, frames))]
                for t in timesteps for i in range(0, frames, rows_per_call)]
    rows = [(int(t), j) for t in timesteps for j in range(frames)]
    return [rows[i:i + rows_per_call] for i in range(0, len(rows), rows_per_call)]


def ddpm_invert(eps_fn: EpsFn, z0: torch.Tensor, schedule: DDPMSchedule, timesteps: Sequence[int], seed: int,
                rows_per_call: int, *, across_timesteps: bool = True, place: str = "device",
                on_call: Optional[Callable[[int, int], None]] = None, start: Optional[Mapping] = None,
                checkpoint=None) -> Tuple[InvertedLatents, InvertedLatents]:
    """The edit-friendly inversion of z0 [N,4,h,w] float32 at ``timesteps`` (a tail of
    ``schedule.timesteps``).

    eps_fn(x [R,4,h,w], t, frames [R] int64) -> [R,4,h,w] float32: the noise prediction under the
        inversion prompt; t is an int when the rows share a timestep, else an int64 tensor [R].
    rows_per_call: UNet batch rows; ``across_timesteps``: see ``row_groups``.
    start / checkpoint: as ``inversion.ddim_invert`` (a "step" is a call; the noisy latents are
        drawn again from their seeds, the noise maps computed so far come from the checkpoint).
    Returns (latents {t: x_t}, noise maps {t: z_t}), each [T,N,4,h,w] float32 underneath.
    """
    latents = noisy_latents(z0, schedule, timesteps, seed, place)
    noise = InvertedLatents.empty(sorted(int(t) for t in timesteps), z0.shape, z0.device, place)
    groups = row_groups(timesteps, z0.shape[0], rows_per_call, across_timesteps)
    first = 0
    if start is not None:
        first = int(start["step"])
        if int(start["total"]) != len(groups) or not set(start["noise"]) <= set(latents) \
                or any(tuple(z.shape) != tuple(z0.shape) for z in start["noise"].values()):
            raise ConfigError("the inversion checkpoint does not fit this run (other calls, timesteps or latent "
                              "shapes); start over without --resume")
        for t, z in start["noise"].items():
            noise[t].copy_(z)

    def state(i: int) -> dict:   # what continuing at call i needs: the noise maps written so far
        done = {t for group in groups[:i] for t, _ in group}
        return {"z0": z0, "noise": {t: noise[t] for t in sorted(done)}}

    for i in range(first, len(groups)):
        if checkpoint is not None:
            checkpoint.between_steps("invert", i, len(groups), functools.partial(state, i))
        group = groups[i]
        ts = [t for t, _ in group]
        frames = torch.tensor([j for _, j in group], dtype=torch.long)
        x = torch.stack([latents[t][j] for t, j in group])
        prev = torch.stack([z0[j] if schedule.prev(t) is None else latents[schedule.prev(t)][j] for t, j in group])
        x, prev = x.to(z0.device), prev.to(z0.device)
        t_arg = ts[0] if len(set(ts)) == 1 else torch.tensor(ts, dtype=torch.long, device=z0.device)
        eps = eps_fn(x, t_arg, frames)
        c = schedule.coefficients(ts, z0.device)
        sigma = c[:, 4]
        # sigma 0 (a last step onto ā_prev = ā_t or 1: set_alpha_to_one, linspace spacing): a deterministic step
        z = (prev - schedule.mean(eps, x, c)) / torch.where(sigma > 0, sigma, torch.ones_like(sigma)) * (sigma > 0)
        for r, (t, j) in enumerate(group):
            noise[t][j].copy_(z[r])
        if on_call is not None:
            on_call(i, len(groups))
    return latents, noise


def ddpm_sample(eps_fn: EpsFn, x: torch.Tensor, schedule: DDPMSchedule, timesteps: Sequence[int],
                noise: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Plain sampling with stored noise maps from x [N,4,h,w] at timesteps[0] down to x0 (the
    reconstruction check; the edit steps through ``DDPMStepper``)."""
    stepper = DDPMStepper(schedule, noise)
    frames = torch.arange(x.shape[0])
    for t in timesteps:
        x = stepper.step(eps_fn(x, t, frames), t, x, slice(0, x.shape[0]))
    return x


class DDPMStepper:
    """One edit step with the inversion's noise maps: x_prev = mu_t(x_t) + sigma_t z_t[frames],
    the same z_t for every prompt."""

    name = "ddpm"

    def __init__(self, schedule: DDPMSchedule, noise: Mapping[int, torch.Tensor]):
        self.schedule, self.noise = schedule, noise

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor, frames: slice) -> torch.Tensor:
        """eps, x: [P*m,4,h,w] (prompt-major rows of frames ``frames``, m frames) -> x_prev."""
        z = self.noise.rows(t, frames, x.device) if hasattr(self.noise, "rows") else self.noise[t][frames].to(x.device)
        z = z.repeat(x.shape[0] // z.shape[0], 1, 1, 1)
        c = self.schedule.coefficients([t], x.device).expand(x.shape[0], -1, -1, -1, -1)
        return self.schedule.mean(eps, x, c) + c[:, 4] * z


class DDIMStepper:
    """The original's step: diffusers' DDIM (eta 0)."""

    name = "ddim"

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor, frames: slice) -> torch.Tensor:
        return self.scheduler.step(eps, t, x).prev_sample
