"""The original TokenFlow implementation's compute pattern, as kernel backends named "original".

Registered for ``keyframe_attention``, ``cosine_nearest`` and ``gather`` but never picked
automatically: they exist so ``tokenflow bench --compare torch,original`` can measure what the
original way of computing the same results costs. Same semantics as the torch references
(``attention.keyframe_attention_torch``, ``nearest.cosine_nearest_torch``,
``gather.gather_blend_torch``); only the work pattern differs:

* attention: for branches 1.. the keys and values of all K keyframes are concatenated and
  *repeated for every query frame* (``[K, K*S, C]`` copies), then each head is computed on its
  own in a Python loop with the score matrix materialised: plain ``softmax(Q K^T * scale) V``.
  Like the original (``single_batch = n_frames <= 12`` in its ``tokenflow_utils.py``), up to
  ``SINGLE_BATCH_MAX`` = 12 keyframes go in one batch (scores ``[K, S, K*S]``); above that the
  query keyframes go one at a time (scores ``[1, S, K*S]`` per head: ~1.7 GB in float32 at K=25,
  S=4096, where the batched form would need ~42 GB). The source branch does the same
  with ``[K, S, S]`` (or ``[1, S, S]``).
* nearest: for the frames sharing a row of ``pairs`` (a group of the original), the
  concatenated paired keyframes' features ``[P*M, C]`` are scored against all frames' tokens
  at once: the full ``[(F*N), (P*M)]`` cosine matrix is materialised, then argmax per keyframe
  (no fused search, no chunking).
* gather: per pair position, the paired keyframe's outputs are first copied out for every
  frame (``[B, F, M, C]``), then gathered along the tokens and blended.

Numerics (so these pass the same checks as every other backend, ``kernels.verify``): attention
scores and cosine scores are kept in float32. On CUDA, half-precision inputs are multiplied by
``bmm``/``mm`` with ``out_dtype=float32`` (the same tensor-core work as the original's
half-precision products, without rounding the scores); cosine scores there divide the raw dot
products by the float32 norms afterwards instead of normalising the inputs first. Elsewhere,
half-precision inputs are upcast. The blend accumulates in float32. The original itself rounds
scores and blends to the model dtype, which can flip near-tied argmaxes.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from tokenflow.kernels import gather, keyframe_attention, nearest
from tokenflow.kernels.dispatch import Backend, register

HALF = (torch.float16, torch.bfloat16)
SINGLE_BATCH_MAX = 12   # the original batches the query frames up to 12 keyframes, else loops over them
NOT_AUTO = "reproduces the original implementation's compute pattern (for benchmarks); only by name"
_OUT_DTYPE_WORKS: Dict[Tuple[str, torch.dtype], bool] = {}


def _float32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D or batched 3-D) as float32; half inputs keep half-precision multiplies on CUDA."""
    if a.dtype not in HALF:
        return a.float() @ b.float()
    key = (a.device.type, a.dtype)
    if a.device.type == "cuda" and _OUT_DTYPE_WORKS.get(key, True):
        op = torch.bmm if a.dim() == 3 else torch.mm
        try:
            result = op(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_WORKS[key] = True
            return result
        except (TypeError, RuntimeError, NotImplementedError):  # torch < 2.8 or no kernel here
            _OUT_DTYPE_WORKS[key] = False
    return a.float() @ b.float()


def query_batch(n_kf: int) -> int:
    """Query keyframes per batched product: all of them up to ``SINGLE_BATCH_MAX``, else one."""
    return n_kf if n_kf <= SINGLE_BATCH_MAX else 1


def keyframe_attention_original(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                                inject_qk: bool = False) -> torch.Tensor:
    """q, k, v [B, K, S, heads*D] -> [B, K, S, heads*D] (see ``kernels.keyframe_attention``)."""
    n_branches, n_kf, seq, channels = q.shape
    dim = channels // heads
    scale = dim ** -0.5
    step = query_batch(n_kf)
    out = torch.empty_like(q)
    for b in range(n_branches):
        if b == 0:  # the source branch: every frame attends to itself
            queries, keys, values = q[0], k[0], v[0]                                # [K, S, C]
        else:
            queries, own_keys = (q[0], k[0]) if inject_qk else (q[b], k[b])
            # all keyframes' keys / values, concatenated and repeated for every query frame
            keys = own_keys.reshape(1, n_kf * seq, channels).repeat(n_kf, 1, 1)     # [K, K*S, C]
            values = v[b].reshape(1, n_kf * seq, channels).repeat(n_kf, 1, 1)
        for first in range(0, n_kf, step):       # the original's frame loop (one pass when batched)
            rows = slice(first, first + step)
            for h in range(heads):
                cols = slice(h * dim, (h + 1) * dim)
                scores = _float32_product(queries[rows, :, cols], keys[rows, :, cols].transpose(1, 2))  # [step, S, S_kv]
                probs = (scores * scale).softmax(dim=-1).to(values.dtype)
                out[b, rows, :, cols] = torch.bmm(probs, values[rows, :, cols])
    return out


def _divide_after(t: torch.Tensor) -> bool:
    """Score half-precision CUDA inputs as raw dot products / norms (see the module docstring)."""
    return t.dtype in HALF and t.device.type == "cuda"


def _cosine_matrix(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[Q, C], [R, C] -> float32 [Q, R] cosine similarities, materialised."""
    if _divide_after(queries):
        raw = _float32_product(queries, keys.T)
        return raw / queries.float().norm(dim=-1)[:, None] / keys.float().norm(dim=-1)[None, :]
    qn = queries.float() / queries.float().norm(dim=-1, keepdim=True)
    kn = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    return qn @ kn.T


def cosine_nearest_original(x: torch.Tensor, keys: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """x [F, N, C], keys [K, M, C], pairs [F, P] -> int64 [F, P, N] (see ``kernels.cosine_nearest``)."""
    n_frames, n_tokens, channels = x.shape
    n_keys = keys.shape[1]
    n_pairs = pairs.shape[1]
    idx = torch.zeros(n_frames, n_pairs, n_tokens, dtype=torch.long, device=x.device)
    rows, inverse = torch.unique(pairs.cpu(), dim=0, return_inverse=True)
    for r, row in enumerate(rows.tolist()):
        frames = (inverse == r).nonzero()[:, 0].to(x.device)              # frames sharing these keyframes
        positions = [p for p, slot in enumerate(row) if slot >= 0]
        if not positions:
            continue
        slots = torch.tensor([row[p] for p in positions], device=x.device)
        queries = x[frames].reshape(-1, channels)                         # [F_g*N, C]
        paired = keys[slots].reshape(-1, channels)                        # [P_g*M, C]
        sim = _cosine_matrix(queries, paired)                             # [F_g*N, P_g*M]
        best = sim.view(len(frames), n_tokens, len(positions), n_keys).argmax(dim=-1)
        idx[frames[:, None], torch.tensor(positions, device=x.device)] = best.permute(0, 2, 1)
    return idx


def gather_blend_original(kf_out: torch.Tensor, idx: torch.Tensor, pairs: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """kf_out [B, K, M, C], idx [F, P, N] -> [B, F, N, C] (see ``kernels.gather.gather_blend``)."""
    n_branches, _, _, channels = kf_out.shape
    n_frames, n_pairs, n_tokens = idx.shape
    slots = pairs.clamp(min=0).to(kf_out.device)
    w = weights.to(device=kf_out.device, dtype=torch.float32)
    out: Optional[torch.Tensor] = None
    for p in range(n_pairs):
        per_frame = kf_out[:, slots[:, p]]                                # [B, F, M, C] copies
        where = idx[:, p].to(kf_out.device)[None, :, :, None].expand(n_branches, n_frames, n_tokens, channels)
        term = per_frame.gather(2, where).float() * w[None, :, p, None, None]
        out = term if out is None else out + term
    if out is None:
        out = torch.zeros(n_branches, n_frames, n_tokens, channels, device=kf_out.device)
    return out.to(kf_out.dtype)


_VERIFIED = "CPU float32/float16/bfloat16 against the torch reference (tests/test_benchmark.py)"
register(Backend("keyframe_attention", "original", 0, "tokenflow.benchmark.original_kernels:keyframe_attention_original",
                 unsupported=keyframe_attention.unsupported, not_auto=lambda *a, **kw: NOT_AUTO, verified=_VERIFIED,
                 benchmark_only=True))
register(Backend("cosine_nearest", "original", 0, "tokenflow.benchmark.original_kernels:cosine_nearest_original",
                 unsupported=nearest.unsupported, not_auto=lambda *a, **kw: NOT_AUTO, verified=_VERIFIED, benchmark_only=True))
register(Backend("gather", "original", 0, "tokenflow.benchmark.original_kernels:gather_blend_original",
                 unsupported=gather.unsupported, not_auto=lambda *a, **kw: NOT_AUTO, verified=_VERIFIED, benchmark_only=True))
