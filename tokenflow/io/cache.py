"""On-disk cache of DDIM inversions, keyed by everything that changes the result.

Layout: ``<root>/inversions/<key>/latents.safetensors`` + ``meta.json`` (the key's fields, the
saved timesteps and the sha256 of the latents file); the root: ``io.caches.default_cache_root``. A
hit sets the entry folder's mtime (its last use, for ``tokenflow cache prune``).

Several processes may use one cache at once (docs/farm.md):
- A writer builds the entry in a hidden temp folder next to it (``.<key>.tmp-*``) and renames it
  into place with ``io.outputs.atomic_path(durable=True)``: both files and the folders are fsynced,
  and over an existing entry the two folders are swapped atomically (``renameat2(RENAME_EXCHANGE)``
  on Linux; where that is unsupported the old entry is first renamed aside). Two writers of one
  key: the last rename wins, and either entry is complete.
- A reader opens the entry folder once and reads both files through that handle, so it gets one
  writer's entry even while another replaces it; it checks the bytes it read against the sha256
  and decodes those same bytes. A corrupt entry is a miss with a warning (the recomputed entry
  replaces it); an entry replaced mid-read is read again.
- Temp folders of killed writers (``.<key>.tmp-<owner>-*``, ``.<key>.old-*`` of older versions) are
  removed by the next load or save of any entry (``io.outputs.sweep_folder_temps``): at once when
  their writer was a process of this machine that is gone (exited, pid reused, or an earlier boot),
  otherwise once nothing in them changed for an hour (docs/checkpoints.md "Leftovers").
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tokenflow.io.caches import default_cache_root
from tokenflow.io.outputs import FOREIGN_TEMP_AGE_S, TEMP_MARK, atomic_path, sweep_folder_temps

FORMAT_VERSION = 1
DATA, META = "latents.safetensors", "meta.json"
TEMP_MAX_AGE_S = FOREIGN_TEMP_AGE_S   # another machine's temp folder untouched this long is a dead writer's


@dataclass(frozen=True)
class InversionKey:
    """What an inversion depends on. Timesteps are not part of the key: an entry holds a set.

    The frames are keyed by their decoded pixels, which covers the file, the frame selection,
    size, crop and the decoder's own behaviour.
    """

    frames_sha256: str
    size: Tuple[int, int]           # (W, H)
    model: str                      # model identity fingerprint
    prompt: str
    steps: int
    dtype: str
    device: str                     # device type: kernels differ numerically across devices
    conditions: str = ""            # depth maps / controls of the inversion (method.conditions); "" for none
    # "" for DDIM; "ddpm:eta=E:seed=S" (steps: the edit's) for the DDPM inversion's latents, + ":noise" for its noise maps
    inversion: str = ""

    def fields(self) -> dict:
        """The key as meta.json records it; blank later fields left out, so that keys without them keep
        the digests (and entries) they had before the fields existed."""
        return {k: v for k, v in asdict(self).items() if v or k not in ("conditions", "inversion")}

    def digest(self) -> str:
        fields = self.fields()
        blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


class _Replaced(Exception):
    """The entry changed under a reader (a writer swapped it): read it again."""


class InversionCache:
    def __init__(self, root: Optional[Path] = None, enabled: bool = True):
        self.root = Path(root) if root is not None else default_cache_root()
        self.enabled = enabled

    def _entry(self, key: InversionKey) -> Path:
        return self.root / "inversions" / key.digest()

    def load(self, key: InversionKey, needed: Iterable[int]) -> Optional[Dict[int, torch.Tensor]]:
        """{t: [N,4,h,w]} if a valid entry holds every needed timestep, else None (never raises)."""
        if not self.enabled:
            return None
        entry = self._entry(key)
        sweep_folder_temps(self.root)       # e.g. the memory calibration's temp file of a killed run
        _sweep_stale_temps(entry.parent)
        needed = {int(t) for t in needed}
        for attempt in range(4):
            try:
                found = _read_entry(entry, key, needed)
                if found is not None:
                    _mark_used(entry)
                return found
            except _Replaced:
                time.sleep(0.005 * (attempt + 1))      # a writer is swapping the entry: read the new one
            except FileNotFoundError:
                if attempt:
                    return None                         # no entry
                time.sleep(0.01)                        # or one being moved aside for a new one: look again
            except Exception as exc:  # noqa: BLE001 - damaged in any way: not used, never fatal
                # not deleted here: the recomputed entry replaces it (a delete could race that writer)
                warnings.warn(f"inversion cache entry {entry} is corrupt ({type(exc).__name__}: {exc}); "
                              "recomputing it")
                return None
        return None

    def save(self, key: InversionKey, latents: Dict[int, torch.Tensor]) -> Optional[Path]:
        """Write (or replace) the entry atomically; returns its folder (None if disabled/unwritable)."""
        if not self.enabled:
            return None
        entry = self._entry(key)
        try:
            data = save_safetensors({f"t_{t}": v.detach().float().cpu().contiguous() for t, v in latents.items()})
            meta = {"format": FORMAT_VERSION, "key": key.fields(), "timesteps": sorted(int(t) for t in latents),
                    "sha256": hashlib.sha256(data).hexdigest()}
            with atomic_path(entry, durable=True, make_parents=True) as tmp:
                os.mkdir(tmp)                           # mode 0777 less the umask: entries are shareable
                (tmp / DATA).write_bytes(data)
                (tmp / META).write_bytes(json.dumps(meta, indent=1).encode())
            _sweep_stale_temps(entry.parent)
            return entry
        except OSError as exc:
            warnings.warn(f"could not write the inversion cache under {self.root} ({exc}); continuing without it")
            return None


def _mark_used(entry: Path) -> None:
    """A hit sets the entry folder's mtime: ``tokenflow cache prune`` removes least recently used
    entries first, and file access times are not updated on every mount (noatime, relatime)."""
    try:
        os.utime(entry)
    except OSError:   # a read-only shared cache: its entries age by their writes
        pass


def _read_entry(entry: Path, key: InversionKey, needed: set) -> Optional[Dict[int, torch.Tensor]]:
    """Both files through one handle on the entry folder: one writer's entry, whatever renames happen."""
    folder = os.open(entry, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))   # FileNotFoundError: no entry
    try:
        meta = json.loads(_read_at(folder, entry, META))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        recorded = {k: v for k, v in (meta.get("key") or {}).items() if v or k not in ("conditions", "inversion")}
        if recorded != json.loads(json.dumps(key.fields())):
            raise ValueError("key fields differ")
        timesteps = [int(t) for t in meta["timesteps"]]
        if not needed <= set(timesteps):
            return None  # valid but incomplete: recomputed and replaced by the caller
        data = _read_at(folder, entry, DATA)
    finally:
        os.close(folder)
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError("checksum mismatch")
    tensors = load_safetensors(data)     # the very bytes that were checked
    if set(tensors) != {f"t_{t}" for t in timesteps}:
        raise ValueError("its tensors are not the timesteps meta.json lists")
    return {int(name[2:]): tensor for name, tensor in tensors.items()}


def _read_at(folder_fd: int, entry: Path, name: str) -> bytes:
    try:
        if os.open in os.supports_dir_fd:
            fd = os.open(name, os.O_RDONLY, dir_fd=folder_fd)
        else:  # pragma: no cover - no openat here: by path (the checksum still catches a mix)
            fd = os.open(entry / name, os.O_RDONLY)
    except FileNotFoundError:
        if not _still_linked(folder_fd, entry):
            raise _Replaced() from None
        raise ValueError(f"{name} is missing") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _still_linked(folder_fd: int, entry: Path) -> bool:
    """Whether the folder we opened is still the entry (not swapped out and being deleted)."""
    try:
        here, now = os.fstat(folder_fd), os.stat(entry)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (now.st_dev, now.st_ino)


def _sweep_stale_temps(folder: Path, max_age_s: float = TEMP_MAX_AGE_S) -> None:
    """Remove temp folders that killed writers left behind (``.<key>.tmp-*``; ``.<key>.old-*`` from
    older versions): the owner rule of ``io.outputs``, ``max_age_s`` for other machines' and
    owner-less ones."""
    sweep_folder_temps(folder, foreign_after=max_age_s, loose=(TEMP_MARK, ".old-"))
