"""DDIM timestep schedules and the PnP injection schedules: small pure functions.

All timesteps come from diffusers' ``DDIMScheduler`` built from the model's scheduler config,
exactly as the original implementation does (leading spacing, ``steps_offset=1`` for SD):
50 steps -> 981, 961, ..., 1; 10 steps -> 901, 801, ..., 1.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Set

from diffusers import DDIMScheduler

from tokenflow.errors import ConfigError


def make_scheduler(scheduler_config: dict, n_steps: int) -> DDIMScheduler:
    """A fresh DDIM scheduler (eta 0) with ``n_steps`` inference timesteps set (on CPU)."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(n_steps)
    return scheduler


def timesteps_of(scheduler_config: dict, n_steps: int) -> List[int]:
    """Descending inference timesteps for ``n_steps`` steps, as Python ints."""
    return [int(t) for t in make_scheduler(scheduler_config, n_steps).timesteps]


def sdedit_timesteps(timesteps: Sequence[int], start: float) -> List[int]:
    """The original SDEdit truncation: ``timesteps[int(1 - start * len(timesteps)):]``.

    (For 50 steps and start 0.9 that keeps the last 44 timesteps, from 861 down.)
    """
    first = int(1 - start * len(timesteps))
    if first >= 0:  # the formula wraps to the full schedule when start * n < 2
        raise ConfigError(f"sdedit_start={start} is too small for {len(timesteps)} steps: the original's "
                          f"truncation needs start >= {2 / len(timesteps):.3g}; raise --sdedit-start or --steps")
    return list(timesteps[first:])


def injection_timesteps(timesteps: Sequence[int], n_steps: int, fraction: float) -> Set[int]:
    """PnP injection schedule: the first ``int(n_steps * fraction)`` timesteps (float product, truncated)."""
    count = int(n_steps * fraction)
    return set(int(t) for t in timesteps[:count]) if count >= 0 else set()


def inversion_save_timesteps(inversion_timesteps: Sequence[int], edit_timesteps: Iterable[int]) -> Set[int]:
    """Timesteps whose inverted latents an edit needs: every edit timestep plus the noisiest one.

    Raises ConfigError if an edit timestep is not reached by the inversion schedule.
    """
    available = set(int(t) for t in inversion_timesteps)
    needed = set(int(t) for t in edit_timesteps)
    missing = sorted(needed - available, reverse=True)
    if missing:
        raise ConfigError(
            f"edit timesteps {missing[:5]}{'...' if len(missing) > 5 else ''} are not inversion timesteps "
            f"of a {len(available)}-step inversion; every edit timestep must be one. Use inversion/edit step "
            "counts where one divides the other the DDIM way, e.g. --inversion-steps 500 --steps 50 or 50 and 10")
    return needed | {max(available)}
