"""Every on-disk cache tokenflow keeps, under one root: where it is, what it holds, and how to
shrink it (``tokenflow cache ls|clear|prune``, ``tokenflow doctor``). Standard library only (no
torch), so listing caches is quick.

The root (``default_cache_root``, the one place that decides it): ``--cache-dir`` when given, else
``$TOKENFLOW_CACHE``, else ``$XDG_CACHE_HOME/tokenflow`` (an absolute ``XDG_CACHE_HOME`` only, as
the XDG base-directory spec says), else ``~/.cache/tokenflow``.

Kinds (``KINDS``), each a folder below the root whose entries match a name pattern; anything else
there (a user's own files, links, hidden temp names) is never listed as an entry and never removed:

    inversions/<32 hex>/                      DDIM inversions (io.cache)
    onnx/<pass>-<16 hex>/                     ONNX graphs + optimised ORT models (backends/onnx.py)
    tensorrt/<pass>-<16 hex>.engine|.json     TensorRT engines, timing-*.cache (backends/tensorrt)
    aot/<pass>-<20 hex>.pt2|.json             AOTInductor packages (backends/aot.py)
    torch-compile/<child>                     inductor's cache (backends/compiled.py), each top-level child
    memory-calibration.json                   the memory probe's table (engine/memory.py)
    models/tiny-*-seed<n>-r<n>/               the random-weight test models (models/tiny.py)

An entry's size is the apparent size of its regular files (hard links once); its **last use** is
the newest access or modification time of its files and the modification time of its folders
(folder access times are not used: listing a folder sets them). Access times follow the mount's
atime policy (``relatime``: about once a day; ``noatime``: never), so an inversion cache hit also
touches its entry folder.

Safety: links are never followed (a kind folder that is a link is reported and left alone; links
among entries are skipped). An entry is **busy** while a live process writes it or its replacement:
a temp name of a live writer of this machine inside it or next to it (``io.outputs``' owner rule;
temps of other machines younger than ``FOREIGN_TEMP_AGE_S`` count as live), or inductor's
``.<pid>.<tid>.tmp`` / Triton's ``tmp.pid_<pid>_*`` of a running pid. Busy entries are never
removed. A removed folder is first renamed to a hidden temp name of this process (readers that
hold it open see a miss, never a half-deleted entry; a killed clear leaves a temp the next sweep
removes), then deleted.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tokenflow.errors import ConfigError
from tokenflow.io.outputs import TEMP_MARK, leftover_reason, sweep_folder_temps, sweep_temps, temp_sibling
from tokenflow.io.owners import pid_alive

ENV_RULE = "$TOKENFLOW_CACHE, else $XDG_CACHE_HOME/tokenflow, else ~/.cache/tokenflow"
ROOT_RULE = "--cache-dir, else " + ENV_RULE


def default_cache_root(explicit: Optional[str] = None) -> Path:
    """The tokenflow cache root (rule in the module docstring); ``explicit``: a ``--cache-dir``."""
    return cache_root_and_source(explicit)[0]


def cache_root_and_source(explicit: Optional[str] = None) -> Tuple[Path, str]:
    """(root, which rule chose it: "--cache-dir", "$TOKENFLOW_CACHE", "$XDG_CACHE_HOME" or "default")."""
    if explicit:
        return Path(explicit).expanduser(), "--cache-dir"
    if os.environ.get("TOKENFLOW_CACHE"):
        return Path(os.environ["TOKENFLOW_CACHE"]).expanduser(), "$TOKENFLOW_CACHE"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(os.path.expanduser(xdg)):
        return Path(xdg).expanduser() / "tokenflow", "$XDG_CACHE_HOME"
    return Path.home() / ".cache" / "tokenflow", "default"


_PASS = r"(plain|keyframes|propagate)"
CALIBRATION = "memory-calibration.json"   # engine/memory.py's file in the root


@dataclass(frozen=True)
class Kind:
    name: str
    folder: str          # below the root ("": the root itself)
    what: str
    pattern: str         # full match of an entry's name (files: each member's name)
    files: bool = False  # entries are files grouped by stem (an engine and its .json are one entry)


KINDS: Tuple[Kind, ...] = (
    Kind("inversions", "inversions", "DDIM inversions", r"[0-9a-f]{32}"),
    Kind("onnx", "onnx", "ONNX graphs and optimised ORT models", _PASS + r"-[0-9a-f]{16}"),
    Kind("tensorrt", "tensorrt", "TensorRT engines and timing caches",
         _PASS + r"-[0-9a-f]{16}\.(engine|json)|timing-[^/]+\.cache", files=True),
    Kind("aot", "aot", "AOTInductor packages", _PASS + r"-[0-9a-f]{20}\.(pt2|json)", files=True),
    Kind("torch-compile", "torch-compile", "torch.compile (inductor) caches", r"(?!locks$)[^.].*"),
    Kind("calibration", "", "memory calibration table", re.escape(CALIBRATION), files=True),
    Kind("models", "models", "tiny random-weight test models", r"tiny-[a-z0-9]+-seed[0-9]+-r[0-9]+"),
)
KIND_NAMES = tuple(k.name for k in KINDS)
_FOREIGN_TEMPS = re.compile(r"\.(\d+)\.\d+\.tmp|tmp\.pid_(\d+)_.*")   # inductor's write_atomic, Triton's cache


@dataclass
class Entry:
    kind: str
    name: str
    paths: List[str]
    bytes: int
    last_used: float
    busy: Optional[str] = None     # why it is left alone


@dataclass
class KindReport:
    kind: str
    what: str
    path: str
    entries: List[Entry] = field(default_factory=list)
    not_followed: Optional[str] = None   # the kind folder is a link: where it points
    links: int = 0                       # links among the entries: skipped
    others: int = 0                      # names that are not this kind's entries: left alone
    temps: int = 0                       # temp names (writers at work, or leftovers)
    unreadable: Optional[str] = None     # why the kind folder could not be listed

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def to_json(self) -> Dict:
        return {"kind": self.kind, "what": self.what, "path": self.path, "entries": len(self.entries),
                "bytes": self.bytes, "busy": sum(e.busy is not None for e in self.entries),
                "not_followed": self.not_followed, "links_skipped": self.links, "others": self.others,
                "temps": self.temps, "unreadable": self.unreadable, "items": [asdict(e) for e in self.entries]}


def kinds_named(names: Sequence[str]) -> List[Kind]:
    """The kinds for these names (all for none); a wrong name is a ConfigError naming the choices."""
    if not names:
        return list(KINDS)
    unknown = [n for n in names if n not in KIND_NAMES]
    if unknown:
        raise ConfigError(f"unknown cache kind {unknown[0]!r}: choose from {', '.join(KIND_NAMES)}")
    return [k for k in KINDS if k.name in names]


def scan(root: Path, kinds: Sequence[Kind] = KINDS) -> List[KindReport]:
    """What each kind holds under ``root`` (nothing is changed)."""
    return [_scan_kind(Path(root), kind) for kind in kinds]


def _scan_kind(root: Path, kind: Kind) -> KindReport:
    folder = root / kind.folder if kind.folder else root
    report = KindReport(kind.name, kind.what, str(folder if kind.folder else root / CALIBRATION))
    if os.path.islink(folder):
        report.not_followed = os.readlink(folder)
        return report
    try:
        with os.scandir(folder) as items:
            names = sorted(item.name for item in items)
    except (FileNotFoundError, NotADirectoryError):
        return report
    except OSError as exc:   # e.g. no permission: listed as unreadable, nothing in it touched
        report.unreadable = exc.strerror or str(exc)
        return report
    pattern = re.compile(kind.pattern)
    live_targets = set()
    groups: Dict[str, List[str]] = {}
    for name in names:
        path = os.path.join(folder, name)
        if _is_temp(name):
            report.temps += kind.folder != "" or name.startswith("." + CALIBRATION)
            why = _live(path, name)
            if why:
                live_targets.add(_temp_target(name))
            continue
        if not pattern.fullmatch(name):
            report.others += bool(kind.folder)
            continue
        if os.path.islink(path):
            report.links += 1
            continue
        groups.setdefault(name.rsplit(".", 1)[0] if kind.files else name, []).append(path)
    for key, paths in groups.items():
        size, used, busy = _measure(paths)
        if busy is None and any(os.path.basename(p) in live_targets for p in paths):
            busy = "a live process is writing its replacement"
        report.entries.append(Entry(kind.name, key, paths, size, used, busy))
    return report


def _is_temp(name: str) -> bool:
    return (name.startswith(".") and (TEMP_MARK in name or ".old-" in name)) or bool(_FOREIGN_TEMPS.fullmatch(name))


def _temp_target(name: str) -> str:
    """The name a tokenflow temp (``.<target>.tmp-<owner>-<hex>``) will be renamed to."""
    return name[1:name.index(TEMP_MARK)] if name.startswith(".") and TEMP_MARK in name else ""


def _live(path: str, name: str) -> Optional[str]:
    """Why the temp ``path`` belongs to a writer that may still be at work (None: a dead one's)."""
    foreign = _FOREIGN_TEMPS.fullmatch(name)
    if foreign:
        pid = int(foreign.group(1) or foreign.group(2))
        return f"process {pid} is writing it" if pid_alive(pid) else None
    try:
        return None if leftover_reason(path) is not None else f"a live writer's temp {name}"
    except OSError:   # gone meanwhile
        return None


def _measure(paths: List[str]) -> Tuple[int, float, Optional[str]]:
    """(bytes, last use, busy reason) of the files and folders at ``paths``; links not followed."""
    size, used, busy, seen = 0, 0.0, None, set()
    for top in paths:
        try:
            st = os.lstat(top)
        except OSError:
            continue
        if not os.path.isdir(top) or os.path.islink(top):
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
            used = max(used, st.st_atime, st.st_mtime)
            continue
        used = max(used, st.st_mtime)
        for folder, subfolders, files in os.walk(top):   # followlinks=False: links are listed, not entered
            for name in subfolders + files:
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if busy is None and _is_temp(name):
                    busy = _live(path, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    used = max(used, st.st_mtime)
                elif (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_size if not os.path.islink(path) else 0
                    used = max(used, st.st_atime, st.st_mtime)
    return size, used, busy


# ----------------------------------------------------------------------------- removing


def clear(root: Path, kinds: Sequence[Kind] = KINDS, dry_run: bool = False) -> Tuple[List[Entry], List[Entry]]:
    """Remove every entry of ``kinds`` that is not busy, and the temps their dead writers left.
    Returns (removed or, with ``dry_run``, to remove; left because busy)."""
    reports = scan(root, kinds)
    entries = [e for r in reports for e in r.entries]
    if not dry_run:
        for entry in entries:
            if entry.busy is None:
                entry.busy = _remove(Path(root), entry)
        for kind in kinds:
            _sweep_kind(Path(root), kind)
    return [e for e in entries if e.busy is None], [e for e in entries if e.busy is not None]


def prune(root: Path, max_bytes: int, kinds: Sequence[Kind] = KINDS,
          dry_run: bool = False) -> Tuple[List[Entry], List[Entry], int, int]:
    """Remove the least recently used entries of ``kinds`` (oldest last use first) until their
    total is at most ``max_bytes``; busy entries stay and still count.
    Returns (removed or, with ``dry_run``, to remove; left because busy; total before; after)."""
    entries = [e for r in scan(root, kinds) for e in r.entries]
    before = total = sum(e.bytes for e in entries)
    removed, busy = [], []
    for entry in sorted(entries, key=lambda e: (e.last_used, e.kind, e.name)):
        if total <= max_bytes:
            break
        if entry.busy is None and not dry_run:
            entry.busy = _remove(Path(root), entry)
        if entry.busy is None:
            removed.append(entry)
            total -= entry.bytes
        else:
            busy.append(entry)
    return removed, busy, before, total


def _inside(root: Path, path: str) -> bool:
    """Whether ``path`` (not followed itself) lies under the real ``root``."""
    real_root = os.path.realpath(root)
    parent = os.path.realpath(os.path.dirname(path))
    return os.path.commonpath([real_root, parent]) == real_root and not os.path.islink(path)


def _remove(root: Path, entry: Entry) -> Optional[str]:
    """Remove one entry; None when removed, else why it was left (as it is, or partly removed)."""
    if any(not _inside(root, p) for p in entry.paths):   # never reached through the scan: a guard
        return "it is not inside the cache root"
    _, _, busy = _measure(entry.paths)
    if busy is not None:
        return busy
    for path in entry.paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                aside = temp_sibling(path, ".del")
                os.rename(path, aside)                   # readers with it open see a miss, not a half
                shutil.rmtree(aside)
            else:
                os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:   # e.g. a read-only shared cache (a half-deleted folder is a temp: swept later)
            return f"could not remove it ({exc.strerror or exc})"
    return None


def _sweep_kind(root: Path, kind: Kind) -> None:
    """The temps that dead writers left among this kind's entries."""
    if not kind.folder:
        sweep_temps(root / CALIBRATION)
    elif not os.path.islink(root / kind.folder):   # owner-less temps only where tokenflow alone writes
        sweep_folder_temps(root / kind.folder, loose=(TEMP_MARK, ".old-") if kind.name == "inversions" else ())


# ----------------------------------------------------------------------------- words


def human(n: int) -> str:
    """Bytes in decimal units, as ``--max-size`` reads them: 1.23 GB."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def age(seconds_since_epoch: float, now: Optional[float] = None) -> str:
    """How long ago: 3 h, 2 d."""
    s = max(0.0, (time.time() if now is None else now) - seconds_since_epoch)
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= scale:
            return f"{s / scale:.0f} {unit}"
    return f"{s:.0f} s"
