"""Plumbing around the Hugging Face libraries that loading needs in more than one place."""
from __future__ import annotations

import importlib.metadata
import re
import warnings
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quiet_hf_libraries() -> Iterator[None]:
    """Silence diffusers / transformers logging, progress bars and warnings; restore after."""
    # start-up time: importing either library takes seconds; modules that merely may load a model
    # (models.load, models.tiny, quality.clip_metrics) import this one
    import diffusers.utils.logging as diffusers_logging  # noqa: PLC0415  start-up time
    import transformers.utils.logging as transformers_logging  # noqa: PLC0415  start-up time

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for module in ("diffusers", "transformers", "huggingface_hub", "torch"):
                warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
            yield
    finally:
        for lib, verbosity, progress_bar in saved:
            lib.set_verbosity(verbosity)
            if progress_bar:
                lib.enable_progress_bar()


def hub_cli() -> str:
    """The installed huggingface_hub's command: ``hf`` (0.34 and later; 1.0 dropped
    ``huggingface-cli``), else ``huggingface-cli``. Read from its console scripts, else its version."""
    try:
        dist = importlib.metadata.distribution("huggingface_hub")
    except importlib.metadata.PackageNotFoundError:
        return "hf"   # what `pip install huggingface_hub` gives today
    scripts = {entry.name for entry in dist.entry_points if entry.group == "console_scripts"}
    if scripts & {"hf", "huggingface-cli"}:
        return "hf" if "hf" in scripts else "huggingface-cli"
    numbers = [int(part) for part in re.findall(r"\d+", dist.version)[:2]]
    return "hf" if numbers >= [0, 34] else "huggingface-cli"


def download_command(repo_id: str) -> str:
    """The command that downloads ``repo_id`` into DIR with the installed huggingface_hub's CLI."""
    return f"{hub_cli()} download {repo_id} --local-dir DIR"
