"""Backend choice for the kernel ops: which implementations exist and which one runs."""
from __future__ import annotations

from typing import Callable, Dict, Optional

_BACKENDS: Dict[str, Dict[str, Callable]] = {}


def register(op: str, name: str, fn: Callable) -> Callable:
    _BACKENDS.setdefault(op, {})[name] = fn
    return fn


def available_backends(op: str) -> list:
    return sorted(_BACKENDS.get(op, {}))


def resolve(op: str, backend: Optional[str]) -> Callable:
    """The implementation of ``op`` for ``backend`` (None: the default, 'torch')."""
    table = _BACKENDS.get(op, {})
    name = backend or "torch"
    if name not in table:
        raise ValueError(f"{op}: backend {name!r} is not available; available: {', '.join(sorted(table))}")
    return table[name]
