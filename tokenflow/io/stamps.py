"""Which job made an output: the job's settings recorded with each output it writes.

A job's *fields* are ``io.checkpoint.fingerprint_fields``-style JSON values (``app.skip.job_fields``):
what the result depends on. Each output records them (docs/farm.md, "The skip rule"):

- a video (MP4 for h264/hevc, QuickTime .mov for prores, Matroska .mkv for ffv1): the container
  tag ``tokenflow_job`` (read without case: Matroska upper-cases tag names);
- a frames or report folder: the file ``tokenflow-job.json`` inside it;
- a .npy of latents (whose header holds nothing else): the sidecar ``<name>.npy.tokenflow-job.json``.

The record is ``{"format": 1, "fingerprint": sha256 of the fields, "fields": {...}}``; ``read_stamp``
gives the fields back, or None for an output that records none (another program's, an older
tokenflow's, damaged). ``differences`` says in words which settings two records disagree on.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional

from tokenflow.errors import InputError
from tokenflow.io.hashing import fingerprint, hash_file, hash_folder, list_images
from tokenflow.io.outputs import FOLDER_STAMP

STAMP_FORMAT = 1
VIDEO_TAG = "tokenflow_job"
SIDECAR_SUFFIX = ".tokenflow-job.json"

_WORDS = {"prompt": "the prompt", "input_sha256": "the input video (its contents)", "model_identity": "the model",
          "dtype": "the dtype", "device_type": "the device type", "tokenflow_version": "the tokenflow version"}
_NO_VALUES = ("input_sha256", "model_identity")   # hashes: the values would say nothing
_SHOWN = 3   # settings named in one message


def record(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """What an output records: the fields and their fingerprint."""
    return {"format": STAMP_FORMAT, "fingerprint": fingerprint(fields), "fields": dict(fields)}


def video_metadata(fields: Mapping[str, Any]) -> Dict[str, str]:
    """The container tags that record ``fields`` (for ``io.write.write_video(metadata=...)``)."""
    return {VIDEO_TAG: json.dumps(record(fields), sort_keys=True, separators=(",", ":"))}


def sidecar_path(latents_path: str) -> str:
    """Where a latents file's record lives: next to it."""
    return os.fspath(latents_path) + SIDECAR_SUFFIX


def write_stamp_file(path: str, fields: Mapping[str, Any]) -> str:
    """Write the record to ``path`` (a file in a staged folder, or a staged sidecar); returns ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record(fields), f, sort_keys=True, indent=1)
    return path


def read_stamp(path: str, kind: str) -> Optional[Dict[str, Any]]:
    """The fields an output records, or None when it records none. ``kind``: "video", "latents",
    "frames" or "report" (``app.skip.job_outputs``)."""
    if kind == "video":
        text = _video_tag(path)
    else:
        stamp = sidecar_path(path) if kind == "latents" else os.path.join(path, FOLDER_STAMP)
        try:
            with open(stamp, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            text = None
    try:
        loaded = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("fields"), dict):
        return None
    if loaded.get("fingerprint") != fingerprint(loaded["fields"]):   # edited or damaged
        return None
    return loaded["fields"]


def _video_tag(path: str) -> Optional[str]:
    import av  # noqa: PLC0415  only when an output exists (start-up time)

    try:
        with av.open(os.fspath(path)) as container:   # Matroska upper-cases tag names: compare without case
            return {str(k).lower(): v for k, v in container.metadata.items()}.get(VIDEO_TAG)
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError):   # not a video: records nothing
        return None


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """``"the prompt: 'a robot wolf' there, 'a cat' now"`` for each setting that differs (the
    first few, then how many more)."""
    keys = [k for k in ("prompt", "input_sha256", "model_identity") if k in recorded or k in now]
    keys += sorted(k for k in set(recorded) | set(now) if k not in keys)
    changed = [k for k in keys if recorded.get(k) != now.get(k)]
    words = []
    for key in changed[:_SHOWN]:
        name = _WORDS.get(key, key)
        if key in _NO_VALUES:
            words.append(f"{name} differs")
        else:
            words.append(f"{name}: {_shown(recorded.get(key))} there, {_shown(now.get(key))} now")
    if len(changed) > _SHOWN:
        words.append(f"and {len(changed) - _SHOWN} more")
    return words


def _shown(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    text = repr(value) if not isinstance(value, list) else "[" + ", ".join(map(repr, value)) + "]"
    return text if len(text) <= 60 else text[:57] + "..."


def input_hash(video: str) -> str:
    """sha256 of the input's bytes (a video file, or each image of a frame folder with its name):
    the ``content_hash`` of the Clip that ``io.read.read_video`` decodes from it, without decoding."""
    path = os.fspath(video)
    try:
        return hash_folder(list_images(path)) if os.path.isdir(path) else hash_file(path)
    except OSError as error:
        raise InputError(f"cannot read input video '{video}': {error.strerror or error}. "
                         "Check the path (the outputs' settings are checked against it)") from None
