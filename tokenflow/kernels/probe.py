"""Representative arguments of each op on a device/dtype: for early checks and ``tokenflow doctor``.

The backends' checks only look at devices, dtypes, strides and sizes, so small tensors stand
for the real ones (SD 1.5's head dims 40..160 pass the same checks as the 64 of SD 2.x and SDXL).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from tokenflow.errors import one_line
from tokenflow.kernels import verify
from tokenflow.kernels.dispatch import AUTO, BackendUnavailable, KernelChoice, Verdict, choose, explain, unrecorded


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
    if op == "gather":
        idx = torch.randint(seq + 5, (3, 2, seq), generator=g).to(device)
        weights = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]], device=device)
        return (rand(3, n_kf, seq + 5, dim), idx, pairs, weights), {}
    raise KeyError(op)


def verdicts(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> List[Verdict]:
    args, _ = sample_args(op, device, dtype)
    return explain(op, *args, backend=backend)


_SELF_CHECKED: Dict[tuple, KernelChoice] = {}
_PASSED: set = set()   # (device type, dtype, op, backend) whose self-check passed in this process


def self_checked(device: torch.device, dtype: torch.dtype, op: str, name: str) -> bool:
    """Whether ``name`` passed its self-check for ``op`` on this kind of device and dtype (run summaries)."""
    return (torch.device(device).type, dtype, op, name) in _PASSED


def check_backends(device: torch.device, dtype: torch.dtype, attention: str = AUTO,
                   nearest: str = AUTO, self_check: Optional[bool] = None) -> KernelChoice:
    """The backends an edit will use, checked now, before a model loads.

    A backend asked for by name that cannot run raises BackendUnavailable (exit code 2). On GPUs
    the chosen non-reference backends also run once on small random inputs against the torch
    reference (``verify``): a kernel that fails to compile or disagrees raises when it was asked
    for by name, and is replaced by the torch reference, with a warning, when ``auto`` chose it.
    Returns the choice to use (cached per device, dtype and request). ``self_check`` forces the
    self-check on (or off); by default it runs on every device but the CPU.
    """
    request = KernelChoice(attention, nearest)
    self_check = device.type != "cpu" if self_check is None else self_check
    key = (str(device), dtype, request, self_check)
    if key in _SELF_CHECKED:
        return _SELF_CHECKED[key]
    chosen = {}
    for op, name in (("keyframe_attention", request.attention), ("cosine_nearest", request.nearest),
                     ("gather", request.gather)):
        args, _ = sample_args(op, device, dtype)
        chosen[op] = choose(op, name, *args)
    result = request
    if self_check:
        for op, name in chosen.items():
            if name == "torch":
                continue
            problem = _self_check(op, name, device, dtype)
            if problem is None:
                _PASSED.add((torch.device(device).type, dtype, op, name))
                continue
            asked = request.attention if op == "keyframe_attention" else request.nearest
            if asked != AUTO:
                raise BackendUnavailable(f"{op}: backend {name!r} failed its self-check on {device}: {problem} "
                                         "(choose 'torch' and please report this)")
            warnings.warn(f"{op}: backend {name!r} failed its self-check on {device} ({problem}); "
                          "using the torch reference instead")
            result = (dataclasses.replace(result, attention="torch") if op == "keyframe_attention"
                      else dataclasses.replace(result, nearest="torch"))
    _SELF_CHECKED[key] = result
    return result


def _self_check(op: str, name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    args, _ = sample_args(op, device, dtype, heads=2, dim=40, n_kf=2, seq=70)
    try:
        with unrecorded():   # not the run's work: `used()` reports what the edit ran
            (result,) = verify.check(op, name, args, inject_qk=(True,))
    except Exception as exc:  # a compile or launch failure is exactly what this is for
        return one_line(exc)
    return None if result.ok else result.describe()
