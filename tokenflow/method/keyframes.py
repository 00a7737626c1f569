"""Keyframe sampling, frame groups and propagation pairs/weights: small pure functions.

Vocabulary: frames are split into consecutive *groups* of ``spacing`` frames (the original's
``batch_size``; the last group may be shorter). Each denoising step draws one *keyframe* per
group. When a group is denoised, every frame's self-attention output is gathered from a few
keyframes (*pairs*, given as keyframe slots = group numbers) and blended with *weights*.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


def groups(n_frames: int, spacing: int) -> List[Tuple[int, int]]:
    """[(start, stop), ...] of consecutive groups of ``spacing`` frames (last one may be short)."""
    return [(s, min(s + spacing, n_frames)) for s in range(0, n_frames, spacing)]


class KeyframeSampler:
    """Draws one uniformly random keyframe per group, every step, like the original.

    The original calls ``torch.randint(bs, (n // bs,)) + torch.arange(0, n, bs)`` on the global
    CPU generator right after ``torch.manual_seed(seed)``; a private CPU generator seeded the same
    way yields the same sequence without touching global RNG state. A short last group (which the
    original cannot have: it floors n to a multiple of bs) gets one extra draw after the others.
    """

    def __init__(self, n_frames: int, spacing: int, seed: int):
        self.n_frames, self.spacing = n_frames, spacing
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def next(self) -> torch.Tensor:
        """Keyframe frame indices of the next step: int64 [n_groups], ascending."""
        n, bs = self.n_frames, self.spacing
        full = n // bs
        picks = torch.randint(bs, (full,), generator=self.generator) + torch.arange(0, full * bs, bs)
        rest = n - full * bs
        if rest:
            picks = torch.cat([picks, full * bs + torch.randint(rest, (1,), generator=self.generator)])
        return picks


@dataclass(frozen=True)
class GroupPlan:
    """How one group's frames are propagated.

    pairs:   int64 [F, P] keyframe slots (group numbers) each frame reads; -1 = none.
    weights: float32 [F, P] blend weights (0 where the pair is -1); rows sum to 1.
    """

    start: int
    stop: int
    pairs: torch.Tensor
    weights: torch.Tensor


def original_plan(group: int, n_frames: int, spacing: int) -> GroupPlan:
    """The original's propagation: group i blends its own keyframe with group i-1's.

    ``w = sigmoid(d2 / (d1 + d2))`` with d1, d2 the distances of each frame to the *centres* of
    groups i and i-1 (not the keyframes); group 0 uses its own keyframe only. For spacing 8 the
    weights are always [0.6225, 0.6514, 0.6792, 0.7058, 0.7311, 0.7109, 0.6971, 0.6869].
    """
    start, stop = group * spacing, min((group + 1) * spacing, n_frames)
    count = stop - start
    if group == 0:
        return GroupPlan(start, stop, torch.zeros(count, 1, dtype=torch.long), torch.ones(count, 1))
    s = torch.arange(start, stop)
    centre_own = start + count // 2
    centre_prev = (group - 1) * spacing + spacing // 2
    d1, d2 = (s - centre_own).abs(), (s - centre_prev).abs()
    w = torch.sigmoid(d2 / (d1 + d2))
    pairs = torch.tensor([group, group - 1]).expand(count, 2).contiguous()
    return GroupPlan(start, stop, pairs, torch.stack([w, 1 - w], dim=1))


def paper_plan(group: int, n_frames: int, spacing: int, keyframes: torch.Tensor) -> GroupPlan:
    """The paper's propagation: each frame blends the nearest keyframes before and after it.

    Linear weights ``(next - f) / (next - prev)`` and ``(f - prev) / (next - prev)``; a keyframe
    itself, or a frame before the first / after the last keyframe, uses one keyframe (weight 1).
    """
    start, stop = group * spacing, min((group + 1) * spacing, n_frames)
    kf = [int(k) for k in keyframes]
    pairs, weights = [], []
    for f in range(start, stop):
        before = [slot for slot, k in enumerate(kf) if k <= f]
        after = [slot for slot, k in enumerate(kf) if k >= f]
        prev_slot = before[-1] if before else None
        next_slot = after[0] if after else None
        if prev_slot is None or next_slot is None or prev_slot == next_slot:
            only = prev_slot if prev_slot is not None else next_slot
            pairs.append([only, -1])
            weights.append([1.0, 0.0])
        else:
            span = kf[next_slot] - kf[prev_slot]
            pairs.append([prev_slot, next_slot])
            weights.append([(kf[next_slot] - f) / span, (f - kf[prev_slot]) / span])
    return GroupPlan(start, stop, torch.tensor(pairs, dtype=torch.long), torch.tensor(weights, dtype=torch.float32))


def plan_rows(plans: List[GroupPlan], start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairs and weights [stop-start, P] of frames start..stop-1, whichever groups they belong to.

    Lets the propagation pass run in chunks that ignore group boundaries (the chunk size is a
    resource decision; groups are the method's). Rows of groups with fewer pairs (the original's
    group 0 has one) are padded with slot -1 and weight 0, which adds exactly nothing.
    """
    rows_p, rows_w = [], []
    for plan in plans:
        a, b = max(start, plan.start), min(stop, plan.stop)
        if a < b:
            rows_p.append(plan.pairs[a - plan.start:b - plan.start])
            rows_w.append(plan.weights[a - plan.start:b - plan.start])
    width = max(p.shape[1] for p in rows_p)
    pairs = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in rows_p])
    weights = torch.cat([torch.nn.functional.pad(w, (0, width - w.shape[1]), value=0.0) for w in rows_w])
    return pairs, weights


def keyframe_windows(n_keyframes: int, window: Optional[int], step: int) -> List[Tuple[int, int]]:
    """Keyframe slots [(start, stop), ...] that attend to each other in the keyframe pass of ``step``.

    ``window`` None (or >= K): one window of all K keyframes, the original's extended attention.
    Otherwise consecutive windows of ``window`` keyframes, shifted by ``window // 2`` on odd steps
    (as Swin's shifted windows) so no boundary between windows stays fixed across steps. Each window
    is one UNet call, so compute and memory grow linearly with the video's length, and the result
    does not depend on how the work is chunked.
    """
    if not window or window >= n_keyframes:
        return [(0, n_keyframes)]
    shift = window // 2 if step % 2 else 0
    starts = ([0] if shift else []) + list(range(shift, n_keyframes, window))
    return [(a, min(b, n_keyframes)) for a, b in zip(starts, starts[1:] + [n_keyframes])]


def window_sizes(n_keyframes: int, window: Optional[int]) -> List[int]:
    """The distinct keyframe-window sizes ``keyframe_windows`` yields over all steps (even and odd),
    ascending: one keyframe-pass shape each (W, the W//2 head of shifted windows, two tails; <= 4)."""
    return sorted({b - a for step in (0, 1) for a, b in keyframe_windows(n_keyframes, window, step)})
