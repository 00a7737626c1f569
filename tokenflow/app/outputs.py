"""Where a job's outputs go: the default file name, one output per prompt. Plain path
arithmetic (no I/O), shared by the jobs, job-file validation and the farm."""
from __future__ import annotations

import re
from pathlib import Path

from tokenflow.config import EditConfig


def default_output(config: EditConfig) -> str:
    stem = Path(str(config.video).rstrip("/\\")).stem or "video"
    return str(Path("tokenflow-results") / f"{stem}-{config.method}.mp4")


def resolve_output(config: EditConfig) -> str:
    """-o as given; a folder (existing, or without a video suffix) gets the default file name inside."""
    out = config.output or default_output(config)
    p = Path(out)
    if p.is_dir() or p.suffix.lower() not in (".mp4", ".mov", ".mkv"):
        p = p / Path(default_output(config)).name
    return str(p)


def prompt_outputs(path: str, prompts) -> list:
    """One output path per prompt: the path itself for one prompt, else ``stem-K-slug.ext``."""
    if len(prompts) == 1:
        return [path]
    p = Path(path)
    return [str(p.with_name(f"{p.stem}-{k}-{_slug(text)}{p.suffix}")) for k, text in enumerate(prompts, 1)]


def per_prompt_folders(folder, prompts) -> list:
    """One folder per prompt: ``folder`` itself for one prompt, else ``folder/K-slug``."""
    if not folder:
        return [None] * len(prompts)
    if len(prompts) == 1:
        return [str(folder)]
    return [str(Path(folder) / f"{k}-{_slug(t)}") for k, t in enumerate(prompts, 1)]


def _slug(text: str, limit: int = 40) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "prompt"
