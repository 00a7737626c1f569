"""The two hot spots of TokenFlow as replaceable ops, one folder each (API + PyTorch reference in
``__init__``, other backends beside it):

- ``keyframe_attention/``: extended self-attention of the keyframe pass (all branches, all heads).
- ``nearest/``: cosine nearest-neighbour correspondences between frames and keyframes.
- ``gather/``: the weighted gather of keyframe outputs through those correspondences (the
  propagation pass's output).

Each op has a plain-PyTorch reference backend (``"torch"``) that runs on any device and is the
specification the others are tested against, plus faster backends: ``triton`` (CUDA, or CPU
under ``TRITON_INTERPRET=1``), ``faiss`` (nearest neighbours) and ``xformers`` (attention,
unverified). ``backend=None`` picks the best one that runs the arguments; ``explain`` says why
each backend was or was not picked (``tokenflow doctor`` prints it). ``dispatch`` holds the
registry; importing this package registers the ops' backends.
"""
from tokenflow.kernels import gather, keyframe_attention, nearest  # noqa: F401  registers the ops' backends
from tokenflow.kernels.dispatch import (
                                        AUTO,
                                        BackendUnavailable,
                                        KernelChoice,
                                        backend_names,
                                        backends,
                                        explain,
                                        implementation,
                                        ops,
)
from tokenflow.kernels.probe import check_backends

__all__ = ["explain", "backends", "backend_names", "ops", "check_backends", "implementation", "KernelChoice",
           "BackendUnavailable", "AUTO"]
