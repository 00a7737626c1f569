"""Data safety of a job's paths, checked before any work (docs/jobs.md "Data safety"):

- ``job_inputs`` / ``job_output_paths``: every input and every output of a job as (label, path);
- ``check_no_aliasing``: no output is, contains or lies inside an input (same path, a symbolic
  link, a hard link, a folder around or inside), whatever ``--overwrite`` says;
- ``check_root`` / ``root_problems``: with ``--output-root`` / ``--input-root`` (``tokenflow run``,
  ``tokenflow farm``), every output and every input of a job resolves inside its root.

Plain path and ``stat`` arithmetic (no torch), shared by the jobs, job-file validation and the farm.
A new kind of input (a depth or control map, ...) is one more entry of ``INPUT_FIELDS``.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, List, Optional, Sequence, Tuple

from tokenflow.app.outputs import per_prompt_folders, prompt_outputs, resolve_output
from tokenflow.config import SD_VERSIONS, EditConfig
from tokenflow.errors import ConfigError, OutputError
from tokenflow.io.aliasing import NEVER_OVER_INPUTS, alias_reason, inside
from tokenflow.io.outputs import STATE_FILES
from tokenflow.io.stamps import sidecar_path

Pair = Tuple[str, str]   # (label, path)

# EditConfig fields that name an input the job reads: field -> (label, only when it is a local path)
INPUT_FIELDS = {
    "video": ("input video", False),
    "model": ("model folder", True),
    "clip_model": ("CLIP model folder", True),
    "model_config": ("--model-config folder", True),
    "vae": ("--vae folder", True),
    "depth_maps": ("depth maps", False),
    "depth_model": ("depth model folder", True),
}
# fields a job writes besides its videos (per prompt where the job has several), in the order of the checks
OUTPUT_FIELDS = ("save_latents", "save_frames", "report", "checkpoint_dir")
# folder outputs that only ever write and remove their own files (io/outputs.STATE_FILES)
_OWN_FILES_ONLY = ("checkpoint_dir",)
# outputs replaced as a whole folder (swap_folder_into_place): anything inside them would be lost
WHOLE_FOLDERS = ("save_frames", "report")
_TINY = re.compile(r"^tiny(?:-depth|-xl)?(?::.*)?$")


# ----------------------------------------------------------------------------- what a job reads and writes


def is_local_model(value: Optional[str]) -> bool:
    """Whether ``--model``/``clip_model`` names a local folder, as ``models.load.resolve_source``
    decides it: not ``tiny[:seed]`` nor an SD version, and a path (absolute, ``./``, ``~``, more than
    one ``/``) or something that exists here. A Hub id (``owner/name``) is not."""
    if not isinstance(value, str) or not value.strip():
        return False
    value = value.strip()
    if _TINY.match(value) or value in SD_VERSIONS:
        return False
    return (value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") > 1
            or os.path.lexists(os.path.expanduser(value)))


def _field_inputs(config: EditConfig) -> List[Tuple[str, str, str]]:
    """(field, label, path) of every input named by an EditConfig field (``INPUT_FIELDS``)."""
    found = []
    for name, (label, local_only) in INPUT_FIELDS.items():
        value = getattr(config, name, None)
        if not isinstance(value, str) or not value.strip() or (local_only and not is_local_model(value)):
            continue
        path = os.path.expanduser(value)
        if name == "video" and os.path.isdir(path):
            label = "input frame folder"
        found.append((name, label, path))
    return found


# one-or-many fields whose items may name local files or folders ("PATH[:SCALE]", "PATH[:TOKEN]")
SPEC_INPUTS = {"lora": "LoRA weights", "embedding": "embedding", "controlnet": "ControlNet",
               "control": "control image folder"}


def _spec_inputs(config: EditConfig) -> List[Tuple[str, str, str]]:
    """(field, label, path) of the local files and folders named by the list fields (SPEC_INPUTS)."""
    found = []
    for name, label in SPEC_INPUTS.items():
        for item in _as_items(getattr(config, name, ())):
            for candidate in (item, item.rpartition(":")[0]):
                path = os.path.expanduser(candidate) if candidate else ""
                if path and os.path.lexists(path):
                    found.append((name, label, path))
                    break
    return found


def _as_items(value) -> List[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [v for v in value or () if isinstance(v, str) and v.strip()]


def job_inputs(config: EditConfig, extra: Iterable[Optional[Pair]] = ()) -> List[Pair]:
    """Every input of a job as (label, path): the video (a file or a folder of frames), the model
    and CLIP model when they are local folders, then ``extra`` (``("--config file", path)``,
    ``("job file", path)``; ``None`` entries and empty paths are skipped)."""
    found = [(label, path) for _, label, path in _field_inputs(config) + _spec_inputs(config)]
    return found + [(label, os.fspath(path)) for label, path in (p for p in extra if p) if path]


RECORD_LABEL = "save_latents record"   # the job record beside each --save-latents .npy (io.stamps)


def job_output_paths(config: EditConfig, video_outputs: Optional[Sequence[str]] = None) -> List[Pair]:
    """Every path a job writes as (field, path): each prompt's video (``output``), latents (and the
    job record beside them), frames folder and report folder, and the checkpoint folder. ``video_outputs``: the videos when the
    caller resolved them already (``resolve_output`` raises ConfigError for an unsupported -o)."""
    prompts = config.prompts or ("",)
    videos = list(video_outputs) if video_outputs is not None else prompt_outputs(resolve_output(config), prompts)
    found: List[Pair] = [("output", p) for p in videos]
    if config.save_latents:   # each .npy and the record beside it (io.stamps: the skip rule's)
        found += [(field, path) for p in prompt_outputs(config.save_latents, prompts)
                  for field, path in (("save_latents", p), (RECORD_LABEL, sidecar_path(p)))]
    found += [("save_frames", p) for p in per_prompt_folders(config.save_frames, prompts) if p]
    found += [("report", p) for p in per_prompt_folders(config.report, prompts) if p]
    if config.checkpoint_dir:
        found.append(("checkpoint_dir", config.checkpoint_dir))
    return found


# ----------------------------------------------------------------------------- aliasing


def aliasing_problems(outputs: Iterable[Pair], inputs: Iterable[Pair]) -> List[Pair]:
    """(output label, reason) for every output that is, contains or lies inside an input that
    exists (a missing input is the input check's business), then for every output that collides
    with another output of the job (``overlap_problems``); the reason names both paths."""
    outputs = list(outputs)
    inputs = [(label, path) for label, path in inputs if os.path.lexists(path)]
    problems: List[Pair] = []
    refused = set()
    for out_label, out_path in outputs:
        if out_label == RECORD_LABEL and any(sidecar_path(p) == out_path for p in refused):
            continue   # its .npy is refused already (same folder): one line per output
        for in_label, in_path in inputs:
            reason = alias_reason(out_path, in_label, in_path, may_contain=out_label in _OWN_FILES_ONLY)
            if reason is None and out_label in _OWN_FILES_ONLY:   # its own files must not be an input either
                reason = next((f"would write and then delete '{name}', which is the {in_label} '{in_path}'"
                               for name in STATE_FILES.values()
                               if alias_reason(os.path.join(out_path, name), in_label, in_path) is not None), None)
            if reason is not None:
                problems.append((out_label, f"'{out_path}' {reason}; {NEVER_OVER_INPUTS}"))
                refused.add(out_path)
                break
    return problems + overlap_problems(outputs)



def overlap_problems(outputs: Sequence[Pair]) -> List[Pair]:
    """(label, reason) for each pair of a job's outputs that would destroy each other: the same
    path (``-o x.mp4 --save-latents x.mp4``), or an output inside a frames or report folder,
    which is replaced as a whole after the others are written. The checkpoint folder may hold
    outputs (its own files are all it ever removes), but it may not be one."""
    problems: List[Pair] = []
    real = [(label, path, os.path.realpath(os.path.expanduser(path))) for label, path in outputs]
    for i, (label_a, path_a, real_a) in enumerate(real):
        for label_b, path_b, real_b in real[i + 1:]:
            if real_a == real_b:
                reason = f"'{path_a}' is also the {label_b} output '{path_b}'"
            elif label_a in WHOLE_FOLDERS and inside(real_b, real_a):
                reason = f"'{path_a}' contains the {label_b} output '{path_b}', which replacing the folder would delete"
            elif label_b in WHOLE_FOLDERS and inside(real_a, real_b):
                reason = f"'{path_a}' lies inside the {label_b} folder '{path_b}', which is replaced as a whole"
            else:
                continue
            problems.append((label_a, f"{reason}: give each output of a job its own path"))
    return problems


def check_no_aliasing(outputs: Iterable[Pair], inputs: Iterable[Pair]) -> None:
    """OutputError (exit 5) for the first output that is, contains or lies inside an input."""
    for label, reason in aliasing_problems(outputs, inputs):
        raise OutputError(f"{label} {reason}")


# ----------------------------------------------------------------------------- roots


def check_root(path: Optional[str], flag: str) -> Optional[str]:
    """The real path of ``--output-root``/``--input-root`` (an existing folder), or None when not given;
    ConfigError otherwise."""
    if path is None:
        return None
    if not str(path).strip():
        raise ConfigError(f"{flag} is empty: give the folder every job's paths must stay inside")
    real = os.path.realpath(os.path.expanduser(str(path)))
    if not os.path.isdir(real):
        what = "is not a folder" if os.path.exists(real) else "does not exist"
        raise ConfigError(f"{flag} '{path}' {what}: give an existing folder (create it first)")
    return real


def outside_reason(path: str, root: str, flag: str) -> Optional[str]:
    """Why ``path`` is not inside ``root`` (a real path) after resolving ``..`` and every symbolic
    link of its existing part, or None when it is inside."""
    real = os.path.realpath(os.path.expanduser(path))
    if inside(real, root):
        return None
    shown = f"'{path}'" if real == os.path.expanduser(path) else f"'{path}' (resolves to '{real}')"
    return f"{shown} is outside {flag} '{root}'"


def root_problems(config: EditConfig, *, output_root: Optional[str] = None, input_root: Optional[str] = None,
                  video_outputs: Optional[Sequence[str]] = None, extra_outputs: Sequence[Pair] = ()) -> List[Pair]:
    """(field, reason) for every output (videos, latents, frames, report, checkpoint folder, plus
    ``extra_outputs`` such as a job's ``cache_dir``) outside ``output_root`` and every input (video,
    local model folders) outside ``input_root``; both are real paths from ``check_root``."""
    problems: List[Pair] = []
    if output_root:
        for field, path in [*job_output_paths(config, video_outputs), *extra_outputs]:
            if field == RECORD_LABEL:   # beside its .npy: inside the root exactly when the .npy is
                continue
            reason = outside_reason(path, output_root, "--output-root")
            if reason:
                problems.append((field, reason))
    if input_root:
        for field, _, path in _field_inputs(config) + _spec_inputs(config):
            reason = outside_reason(path, input_root, "--input-root")
            if reason:
                problems.append((field, reason))
    return problems
