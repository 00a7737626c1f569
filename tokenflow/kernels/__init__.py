"""The two hot spots of TokenFlow as replaceable functions.

- ``keyframe_attention``: extended self-attention of the keyframe pass (all branches, all heads).
- ``cosine_nearest`` + ``propagate``: nearest-neighbour correspondences and the weighted gather
  of the propagation pass.

Each op has a plain-PyTorch reference backend (``"torch"``) that runs on any device and is the
specification faster backends are tested against. ``backend=None`` picks the best available one;
today that is always ``"torch"`` (Triton / FAISS / xFormers backends come with the kernels work).
"""
from .attention import keyframe_attention
from .nearest import cosine_nearest, propagate
from .registry import available_backends

__all__ = ["keyframe_attention", "cosine_nearest", "propagate", "available_backends"]
