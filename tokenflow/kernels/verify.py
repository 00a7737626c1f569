"""Check a backend against the torch reference on fresh random inputs (tests and ``doctor --check``).

Rules (after flash-attention's tests):
- float outputs: the backend's max error against the reference computed in float64 must be at
  most ``2x`` the error of the torch backend run in the same dtype, plus a small floor for
  float32 (where both errors are rounding noise);
- nearest indices: equal to the float64 argmax on the same (already rounded) inputs, except where
  the two picks are tied within ``TIE_TOL``. Every backend scores in float32 from those inputs
  (half-precision products are exact in float32), so their scores are off by float32 rounding of
  a C-term dot product: about sqrt(C) * 6e-8 relative, under 3e-6 for C <= 1280.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from tokenflow.kernels.dispatch import resolve
from tokenflow.kernels.gather import gather_blend_torch
from tokenflow.kernels.keyframe_attention import keyframe_attention_torch
from tokenflow.kernels.nearest import cosine_nearest_torch

FLOAT32_FLOOR = 1e-5
TIE_TOL = 1e-5


@dataclass
class CheckResult:
    op: str
    backend: str
    dtype: str
    shape: str
    error: float        # max abs error (attention, gather) or number of non-tie index mismatches
    bound: float        # what the error must not exceed
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def describe(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        return (f"{status} {self.op}[{self.backend}] {self.dtype} {self.shape}: error {self.error:.3g} <= "
                f"{self.bound:.3g}? {self.detail}").rstrip()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _float_bound(torch_error: float, dtype: torch.dtype) -> float:
    return 2.0 * torch_error + (FLOAT32_FLOOR if dtype == torch.float32 else 0.0)


def check_attention(backend: str, q, k, v, heads: int, inject_qk: bool = False, impl=None) -> CheckResult:
    """q, k, v [3, K, S, heads*D] in the dtype under test; ``impl`` overrides the backend's function."""
    fn = impl or resolve("keyframe_attention", backend, q, k, v, heads)
    exact = keyframe_attention_torch(q.double(), k.double(), v.double(), heads, inject_qk)
    same_dtype = keyframe_attention_torch(q, k, v, heads, inject_qk)
    ours = fn(q, k, v, heads, inject_qk)
    err = (ours.double() - exact).abs().max().item()
    ref_err = (same_dtype.double() - exact).abs().max().item()
    return CheckResult("keyframe_attention", backend, _name(q.dtype), str(tuple(q.shape)), err,
                       _float_bound(ref_err, q.dtype), f"(torch {ref_err:.3g}, inject_qk={inject_qk})")


def check_gather(backend: str, kf_out, idx, pairs, weights, impl=None) -> CheckResult:
    fn = impl or resolve("gather", backend, kf_out, idx, pairs, weights)
    exact = gather_blend_torch(kf_out.double(), idx, pairs, weights.double())
    ref_err = (gather_blend_torch(kf_out, idx, pairs, weights).double() - exact).abs().max().item()
    err = (fn(kf_out, idx, pairs, weights).double() - exact).abs().max().item()
    return CheckResult("gather", backend, _name(kf_out.dtype), str(tuple(kf_out.shape)), err,
                       _float_bound(ref_err, kf_out.dtype), f"(torch {ref_err:.3g})")


def cosine_table(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """float64 [F, N, K, M] cosine similarities (brute force, small inputs only)."""
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    kn = torch.nn.functional.normalize(keys.double(), dim=-1)
    return torch.einsum("fnc,kmc->fnkm", xn, kn)


def nearest_mismatches(idx: torch.Tensor, x: torch.Tensor, keys: torch.Tensor, pairs: torch.Tensor,
                       tie_tol: Optional[float] = None) -> int:
    """Positions where ``idx`` is not a float64 argmax, ignoring ties within ``tie_tol``."""
    tie_tol = TIE_TOL if tie_tol is None else tie_tol
    sims = cosine_table(x.cpu(), keys.cpu())             # [F, N, K, M]
    idx, pairs = idx.cpu(), pairs.cpu()
    bad = 0
    for p in range(pairs.shape[1]):
        valid = pairs[:, p] >= 0                         # unpaired slots must hold 0
        bad += int((idx[~valid, p] != 0).sum())
        if valid.any():
            frames = valid.nonzero()[:, 0]
            table = sims[frames, :, pairs[frames, p]]    # [F', N, M]
            best = table.max(dim=-1).values
            picked = table.gather(-1, idx[frames, p].unsqueeze(-1)).squeeze(-1)
            bad += int((best - picked > tie_tol).sum())
    return bad


def check_nearest(backend: str, x, keys, pairs, impl=None) -> CheckResult:
    fn = impl or resolve("cosine_nearest", backend, x, keys, pairs)
    idx = fn(x, keys, pairs)
    bad = nearest_mismatches(idx, x, keys, pairs)
    exact_equal = int((idx.cpu() == cosine_nearest_torch(x.cpu().double(), keys.cpu().double(), pairs.cpu())).sum())
    return CheckResult("cosine_nearest", backend, _name(x.dtype), f"x{tuple(x.shape)} keys{tuple(keys.shape)}",
                       float(bad), 0.0, f"({exact_equal}/{idx.numel()} equal to float64 argmax)")


def check(op: str, backend: str, args: tuple, inject_qk=(False, True)) -> List[CheckResult]:
    """Check ``backend`` of ``op`` on ``args`` (the op's positional arguments); attention once per
    ``inject_qk`` value."""
    if op == "keyframe_attention":
        return [check_attention(backend, *args, inject_qk=i) for i in inject_qk]
    if op == "cosine_nearest":
        return [check_nearest(backend, *args)]
    return [check_gather(backend, *args)]
