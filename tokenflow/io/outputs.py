"""Files that appear whole or not at all: written to a temp name in the target's folder, then renamed."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path, mode: str = "w", *, durable: bool = False, make_parents: bool = False) -> Iterator[IO]:
    """Yield a file object; on a clean exit it replaces ``path`` (permissions as a plain open
    would give, not mkstemp's 0600), on any error the temp file is removed and ``path`` is untouched.
    ``durable``: fsync before the rename (state a crash must not lose)."""
    target = Path(path).expanduser()
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
