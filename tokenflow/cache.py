"""On-disk cache of DDIM inversions, keyed by everything that changes the result.

Layout: ``<root>/inversions/<key>/latents.safetensors`` + ``meta.json`` (the key's fields, the
saved timesteps and the sha256 of the latents file). Entries are written into a temp folder and
renamed into place; on read the checksum is verified, and a corrupt or incomplete entry is
reported and recomputed, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def default_cache_root() -> Path:
    """``$TOKENFLOW_CACHE`` if set, else ``~/.cache/tokenflow`` (inversions and built models live below)."""
    cache = os.environ.get("TOKENFLOW_CACHE")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "tokenflow"


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

    def digest(self) -> str:
        blob = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


class InversionCache:
    def __init__(self, root: Optional[Path] = None, enabled: bool = True):
        self.root = Path(root) if root is not None else default_cache_root()
        self.enabled = enabled

    def _entry(self, key: InversionKey) -> Path:
        return self.root / "inversions" / key.digest()

    def load(self, key: InversionKey, needed: Iterable[int]) -> Optional[Dict[int, torch.Tensor]]:
        """{t: [N,4,h,w]} if a valid entry holds every needed timestep, else None."""
        if not self.enabled:
            return None
        entry = self._entry(key)
        meta_path, data_path = entry / "meta.json", entry / "latents.safetensors"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != json.loads(json.dumps(asdict(key))):
                raise ValueError("key fields differ")
            if not set(int(t) for t in needed) <= set(meta.get("timesteps", [])):
                return None  # valid but incomplete: recomputed and replaced by the caller
            if _sha256(data_path) != meta["sha256"]:
                raise ValueError("checksum mismatch")
            tensors = load_file(str(data_path))
        except (ValueError, KeyError, TypeError, OSError) as exc:  # damaged (or being replaced): not used
            # not deleted here: a writer may be swapping the entry in; the recomputed one replaces it
            warnings.warn(f"inversion cache entry {entry} is corrupt ({exc}); recomputing it")
            return None
        return {int(name[2:]): tensor for name, tensor in tensors.items()}

    def save(self, key: InversionKey, latents: Dict[int, torch.Tensor]) -> Optional[Path]:
        """Write (or replace) the entry atomically; returns its folder (None if disabled/unwritable)."""
        if not self.enabled:
            return None
        entry = self._entry(key)
        tmp = None
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
            data_path = tmp / "latents.safetensors"
            save_file({f"t_{t}": v.detach().float().cpu().contiguous() for t, v in latents.items()}, str(data_path))
            meta = {"format": FORMAT_VERSION, "key": asdict(key), "timesteps": sorted(latents),
                    "sha256": _sha256(data_path)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
            _sweep_stale_temps(entry.parent)
            return entry
        except OSError as exc:
            warnings.warn(f"could not write the inversion cache under {self.root} ({exc}); continuing without it")
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            return None


def _sweep_stale_temps(folder: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove temp folders that crashed writers left behind (older than a day)."""
    now = time.time()
    for tmp in folder.glob(".*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
