"""Where a job's outputs go: the default file name, one output per prompt, the output's
extension. Path arithmetic (and one ``isdir``), shared by the jobs, job-file validation and the farm.

Default names carry the prompt (``tokenflow-results/wolf-pnp-a-robot-wolf.mp4``), so a second
prompt never lands on the first one's file: ``prompt_slug`` is the prompt's lowercase words, and
when those do not spell the prompt exactly (case, punctuation, other scripts, cut at
``SLUG_WORDS`` characters) a short hash of the prompt follows, after a ``_`` that no plain slug has.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from tokenflow.config import EditConfig
from tokenflow.errors import ConfigError

# What -o may end with, per --codec (the first is the default name's): io.write.write_video writes h264 and
# hevc in an MP4 (ISO base media) container, which .m4v and .mov also name (QuickTime and players open an
# MP4 by those names); prores in a QuickTime .mov; ffv1 in Matroska (.mkv: MP4/QuickTime have no FFV1).
# .webm, .avi, ... would name another container than the one in the file.
CODEC_SUFFIXES = {"h264": (".mp4", ".m4v", ".mov"), "hevc": (".mp4", ".m4v", ".mov"), "prores": (".mov",),
                  "ffv1": (".mkv",)}
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")
_SEPARATORS = tuple(s for s in (os.sep, os.altsep, "/") if s)


SLUG_WORDS = 40   # characters of a prompt's words in a name; with the hash a slug has at most 49


def default_output(config: EditConfig) -> str:
    """``tokenflow-results/<video>-<method>-<prompt slug>.mp4`` for one prompt; with several,
    ``tokenflow-results/<video>-<method>.mp4``, which ``prompt_outputs`` numbers and slugs per prompt."""
    stem = Path(str(config.video).rstrip("/\\")).stem or "video"
    prompts = config.prompts
    slug = f"-{prompt_slug(prompts[0])}" if len(prompts) == 1 else ""
    return str(Path("tokenflow-results") / f"{stem}-{config.method}{slug}{CODEC_SUFFIXES.get(config.codec, VIDEO_SUFFIXES)[0]}")


def is_folder_output(out: str) -> bool:
    """-o names a folder: it ends with a path separator, or it is an existing folder."""
    return out.endswith(_SEPARATORS) or os.path.isdir(out)


def resolve_output(config: EditConfig) -> str:
    """The video path of -o (``config.output``): a folder (ending with '/' or existing) gets the
    default file name inside; a file must end with a suffix of ``CODEC_SUFFIXES[config.codec]``, else
    ConfigError (exit 2: the value is wrong whatever is on disk, as a bad --size is)."""
    out = config.output or default_output(config)
    if is_folder_output(out):
        return str(Path(out) / Path(default_output(config)).name)
    suffix = Path(out).suffix
    allowed = CODEC_SUFFIXES.get(config.codec, VIDEO_SUFFIXES)   # (an unknown codec is validate()'s to refuse)
    if suffix.lower() in VIDEO_SUFFIXES and suffix.lower() not in allowed:
        raise ConfigError.of_field("output", (
            f"'{out}' is a {suffix} file, which cannot hold --codec {config.codec}: name a {' / '.join(allowed)} file, "
            f"or pick --codec {' or '.join(c for c, names in CODEC_SUFFIXES.items() if suffix.lower() in names)}"))
    if suffix.lower() not in VIDEO_SUFFIXES:
        got = f"ends in '{suffix}'" if suffix else "has no file extension"
        raise ConfigError.of_field("output", (
            f"'{out}' {got}, not a video file tokenflow writes: name a {' / '.join(allowed)} file (for --codec "
            f"{config.codec}), or end the path with '/' for a folder that gets the default file name"))
    return str(Path(out))


def prompt_outputs(path: str, prompts) -> list:
    """One output path per prompt: the path itself for one prompt, else ``stem-K-slug.ext``."""
    if len(prompts) == 1:
        return [path]
    p = Path(path)
    return [str(p.with_name(f"{p.stem}-{k}-{prompt_slug(text)}{p.suffix}")) for k, text in enumerate(prompts, 1)]


def per_prompt_folders(folder, prompts) -> list:
    """One folder per prompt: ``folder`` itself for one prompt, else ``folder/K-slug``."""
    if not folder:
        return [None] * len(prompts)
    if len(prompts) == 1:
        return [str(folder)]
    return [str(Path(folder) / f"{k}-{prompt_slug(t)}") for k, t in enumerate(prompts, 1)]


def prompt_slug(text: str) -> str:
    """A file-name-safe (``[a-z0-9_-]``), bounded name for a prompt, distinct for distinct prompts:
    ``"a robot wolf"`` -> ``a-robot-wolf``; ``"A robot wolf!"`` -> ``a-robot-wolf_<8 hex>`` (the
    words alone would not tell it from ``"a robot wolf"``)."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    slug = words[:SLUG_WORDS].rstrip("-") or "prompt"
    if slug.replace("-", " ") == text:   # the words are the prompt: nothing lost
        return slug
    return f"{slug}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"
