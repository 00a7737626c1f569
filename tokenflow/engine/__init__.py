"""How the UNet runs: the 3-branch batches, the keyframe store (planning, chunking and compiled
backends build on this).

``KeyframeStore`` and ``UNetRunner`` load on first use (PEP 562), so importing a light submodule
(e.g. the ``export`` command's flags while the CLI parses arguments) does not import diffusers.
"""
from __future__ import annotations

import importlib

__all__ = ["KeyframeStore", "UNetRunner"]
_LAZY = {"KeyframeStore": ".store", "UNetRunner": ".runner"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
