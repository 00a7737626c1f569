"""How the UNet runs: the 3-branch batches, the keyframe store (planning, chunking and compiled
backends build on this)."""
from .store import KeyframeStore
from .runner import UNetRunner

__all__ = ["KeyframeStore", "UNetRunner"]
