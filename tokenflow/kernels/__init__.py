"""The two hot spots of TokenFlow as replaceable functions.

- ``keyframe_attention``: extended self-attention of the keyframe pass (all branches, all heads).
- ``cosine_nearest`` + ``propagate``: nearest-neighbour correspondences and the weighted gather
  of the propagation pass.

Each op has a plain-PyTorch reference backend (``"torch"``) that runs on any device and is the
specification the others are tested against, plus faster backends: ``triton`` (CUDA, or CPU
under ``TRITON_INTERPRET=1``), ``faiss`` (nearest neighbours) and ``xformers`` (attention,
unverified). ``backend=None`` picks the best one that runs the arguments; ``explain`` says why
each backend was or was not picked (``tokenflow doctor`` prints it).
"""
from .attention import keyframe_attention
from .dispatch import AUTO, BackendUnavailable, KernelChoice, backend_names, backends, explain, implementation, ops
from .nearest import cosine_nearest, propagate
from .probe import check_backends
from . import original_pattern  # noqa: F401,E402  registers the "original" backends (by name only)

__all__ = ["keyframe_attention", "cosine_nearest", "propagate", "explain", "backends", "backend_names", "ops",
           "check_backends", "implementation", "KernelChoice", "BackendUnavailable", "AUTO"]
