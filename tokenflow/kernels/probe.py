"""Representative arguments of each op on a device/dtype: for early checks and ``tokenflow doctor``.

The backends' checks only look at devices, dtypes, strides and sizes, so small tensors stand
for the real ones (SD head dims 40..160 all pass the same checks as 64).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .dispatch import AUTO, KernelChoice, Verdict, explain, resolve


def sample_args(op: str, device: torch.device, dtype: torch.dtype, *, heads: int = 2, dim: int = 40,
                n_kf: int = 2, seq: int = 24, generator: Optional[torch.Generator] = None) -> Tuple[tuple, Dict]:
    """(args, kwargs) for ``op`` with random values; shapes are small and deliberately irregular."""
    g = generator or torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if op == "keyframe_attention":
        return (rand(3, n_kf, seq, heads * dim), rand(3, n_kf, seq, heads * dim), rand(3, n_kf, seq, heads * dim),
                heads), {}
    pairs = torch.tensor([[0, -1], [1, 0], [0, 1]], device=device)
    if op == "cosine_nearest":
        return (rand(3, seq, dim), rand(n_kf, seq + 5, dim), pairs), {}
    if op == "propagate":
        idx = torch.randint(seq + 5, (3, 2, seq), generator=g).to(device)
        weights = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]], device=device)
        return (rand(3, n_kf, seq + 5, dim), idx, pairs, weights), {}
    raise KeyError(op)


def verdicts(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> List[Verdict]:
    args, _ = sample_args(op, device, dtype)
    return explain(op, *args, backend=backend)


def check_backends(device: torch.device, dtype: torch.dtype, attention: str = AUTO, nearest: str = AUTO) -> None:
    """Raise BackendUnavailable (exit code 2) now, before a model loads, if a requested backend cannot run."""
    choice = KernelChoice(attention, nearest)
    for op, name in (("keyframe_attention", choice.attention), ("cosine_nearest", choice.nearest),
                     ("propagate", choice.propagate)):
        args, _ = sample_args(op, device, dtype)
        resolve(op, name, *args)
