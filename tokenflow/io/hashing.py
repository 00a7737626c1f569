"""Content hashes of inputs and settings, without torch (the CLI imports this while it parses flags).

``fingerprint``: sha256 of JSON fields (checkpoints, output stamps). ``hash_file`` / ``hash_folder``:
the ``content_hash`` a decoded Clip records for a video file or a folder of frames, so an output's
stamp can name its input without decoding it. ``list_images``: a frame folder's pictures in the order
they are read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, List, Mapping, Sequence

from tokenflow.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fingerprint(fields: Mapping[str, Any]) -> str:
    """sha256 of ``fields`` as sorted JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def hash_file(path: str) -> str:
    digest = hashlib.sha256()
    _hash_into(digest, path)
    return digest.hexdigest()


def hash_folder(paths: Sequence[str]) -> str:
    """One hash over the pictures' names and bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        _hash_into(digest, path)
    return digest.hexdigest()


def _hash_into(digest, path: str) -> None:
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)


def image_names(folder: str) -> List[str]:
    """Names of the pictures in ``folder`` (hidden files left out) in natural order: frame2 before frame10."""
    names = [name for name in os.listdir(folder)
             if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return sorted(names, key=natural_key)


def list_images(folder: str) -> List[str]:
    """Paths of ``folder``'s pictures in natural order; InputError when it holds none."""
    names = image_names(folder)
    if not names:
        raise InputError(f"folder '{folder}' contains no images ({', '.join(IMAGE_EXTENSIONS)}). "
                         "Give a video file or a folder of numbered frames.")
    return [os.path.join(folder, name) for name in names]


def natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part]
