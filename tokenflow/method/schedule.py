"""DDIM timestep schedules and the PnP injection schedules: small pure functions.

All timesteps come from diffusers' ``DDIMScheduler`` built from the model's scheduler config,
exactly as the original implementation does (leading spacing, ``steps_offset=1`` for SD):
50 steps -> 981, 961, ..., 1; 10 steps -> 901, 801, ..., 1.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Set

from diffusers import DDIMScheduler

from tokenflow.config import EditConfig
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


def check_steps(scheduler_config: dict, config: EditConfig) -> Set[int]:
    """The inversion timesteps ``config``'s edit needs (``inversion_save_timesteps``), from the step
    counts alone: the CLI calls it before anything is read or loaded. A ConfigError names step
    counts that fit: the nearest ``steps`` this inversion serves, or the ``inversion_steps`` that
    serves these edit steps."""
    timesteps = timesteps_function(scheduler_config)
    if config.inversion == "ddpm":   # inverted on the edit's own timesteps: nothing to fit
        edit = edit_timesteps_with(timesteps, config.steps, config.method, config.sdedit_start)
        if config.skip >= len(edit):
            raise ConfigError.of_field("skip", f"{config.skip} skips all {len(edit)} timesteps the edit denoises at; "
                                               f"use a skip below {len(edit)}")
        return set(edit[config.skip:])
    inversion = timesteps(config.inversion_steps)

    edit_timesteps = edit_timesteps_with(timesteps, config.steps, config.method, config.sdedit_start)
    if set(edit_timesteps) <= set(inversion):
        return inversion_save_timesteps(inversion, edit_timesteps)
    held = set(inversion)
    fits = served_steps(held, timesteps, config.method, config.sdedit_start, config.inversion_steps)
    below = max((n for n in fits if n < config.steps), default=None)
    above = min((n for n in fits if n > config.steps), default=None)
    train = int(scheduler_config.get("num_train_timesteps", 1000))
    wanted = set(edit_timesteps)
    inversion_fit = next((n for n in range(config.inversion_steps + 1, train + 1)
                          if wanted <= set(timesteps(n))), None)
    fixes = []
    if below or above:
        fixes.append("--steps " + " or ".join(str(n) for n in (below, above) if n)
                     + f" (edit timesteps a {config.inversion_steps}-step inversion holds)")
    if inversion_fit:
        fixes.append(f"--inversion-steps {inversion_fit} (an inversion that holds these {config.steps} edit steps)")
    missing = sorted(wanted - held, reverse=True)
    raise ConfigError.of_field(
        "steps", f"{config.steps} edit steps do not fit {config.inversion_steps} inversion steps: edit timesteps "
                 f"{', '.join(map(str, missing[:3]))}{', ...' if len(missing) > 3 else ''} are not inversion timesteps, "
                 f"and every edit timestep must be one; use {' or '.join(fixes) or 'other step counts'}")


def served_steps(held: Set[int], timesteps: Callable[[int], List[int]], method: str, sdedit_start: float,
                 most: int) -> List[int]:
    """The edit step counts from ``most`` down to 1 whose timesteps (``timesteps(n)``; SDEdit: the
    truncated schedule) are all in ``held``, most steps first."""
    found = []
    for steps in range(most, 0, -1):
        try:
            if set(edit_timesteps_with(timesteps, steps, method, sdedit_start)) <= held:
                found.append(steps)
        except ConfigError:   # SDEdit: sdedit_start too small for so few steps
            continue
    return found


def edit_timesteps_with(timesteps: Callable[[int], List[int]], steps: int, method: str,
                        sdedit_start: float) -> List[int]:
    """The timesteps an edit of ``steps`` denoises at (``timesteps(n)``: the DDIM schedule of n steps),
    noisiest first; SDEdit: the truncated schedule."""
    out = timesteps(steps)
    return sdedit_timesteps(out, sdedit_start) if method == "sdedit" else out


def timesteps_function(scheduler_config: dict) -> Callable[[int], List[int]]:
    """n -> ``timesteps_of(scheduler_config, n)``, with one scheduler for every n (cheap to call often)."""
    scheduler: Optional[DDIMScheduler] = None

    def timesteps(n: int) -> List[int]:
        nonlocal scheduler
        scheduler = scheduler or DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(n)
        return [int(t) for t in scheduler.timesteps]
    return timesteps
