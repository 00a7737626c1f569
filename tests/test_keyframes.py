"""Keyframe sampling, groups and blend weights against independent small computations."""
import math

import pytest
import torch

from tokenflow.method.keyframes import KeyframeSampler, groups, original_plan, paper_plan

# recorded from the original implementation (seed 1, 16 frames, batch_size 8, 10 steps)
ORIGINAL_SEED1_16 = [[5, 11], [4, 8], [7, 9], [3, 13], [7, 8], [0, 9], [4, 15], [5, 12], [6, 9], [2, 12]]


def test_sampler_matches_the_originals_global_rng_sequence():
    sampler = KeyframeSampler(16, 8, seed=1)
    assert [sampler.next().tolist() for _ in range(10)] == ORIGINAL_SEED1_16


def test_sampler_equals_manual_seed_then_randint_per_step():
    n, bs, seed = 40, 8, 123
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    expected = [(torch.randint(bs, (n // bs,)) + torch.arange(0, n, bs)).tolist() for _ in range(5)]
    torch.random.set_rng_state(state)
    sampler = KeyframeSampler(n, bs, seed)
    assert [sampler.next().tolist() for _ in range(5)] == expected


def test_sampler_does_not_touch_global_rng():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    KeyframeSampler(16, 8, 1).next()
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("n,bs", [(13, 4), (7, 8), (9, 3), (1, 1)])
def test_short_last_group_gets_a_keyframe_inside_it(n, bs):
    sampler = KeyframeSampler(n, bs, 5)
    for _ in range(20):
        kf = sampler.next().tolist()
        assert len(kf) == len(groups(n, bs))
        for k, (a, b) in zip(kf, groups(n, bs)):
            assert a <= k < b


def test_groups_cover_every_frame_once():
    assert groups(13, 4) == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert groups(8, 8) == [(0, 8)]


def test_original_weights_are_the_documented_sigmoids():
    expected = [0.6225, 0.6514, 0.6792, 0.7058, 0.7311, 0.7109, 0.6971, 0.6869]
    for g in (1, 2, 4):
        plan = original_plan(g, 40, 8)
        assert plan.pairs.tolist() == [[g, g - 1]] * 8
        assert plan.weights[:, 0].tolist() == pytest.approx(expected, abs=1e-4)
        assert torch.allclose(plan.weights.sum(1), torch.ones(8))


def test_original_weights_by_hand():
    # frame f of group i: d1 = |f - (i*bs + bs//2)|, d2 = |f - ((i-1)*bs + bs//2)|, w = sigmoid(d2/(d1+d2))
    bs, g = 6, 3
    plan = original_plan(g, 30, bs)
    for row, f in enumerate(range(g * bs, (g + 1) * bs)):
        d1, d2 = abs(f - (g * bs + bs // 2)), abs(f - ((g - 1) * bs + bs // 2))
        assert plan.weights[row, 0].item() == pytest.approx(1 / (1 + math.exp(-d2 / (d1 + d2))), abs=1e-6)


def test_group_zero_uses_only_its_own_keyframe():
    plan = original_plan(0, 40, 8)
    assert plan.pairs.tolist() == [[0]] * 8 and plan.weights.tolist() == [[1.0]] * 8


def test_paper_plan_nearest_before_and_after_with_linear_weights():
    keyframes = torch.tensor([2, 9, 13])  # groups of 5 frames: [0,5) [5,10) [10,15)
    rows = {f: None for f in range(15)}
    for g in range(3):
        plan = paper_plan(g, 15, 5, keyframes)
        for r, f in enumerate(range(plan.start, plan.stop)):
            rows[f] = (plan.pairs[r].tolist(), plan.weights[r].tolist())
    assert rows[0] == ([0, -1], [1.0, 0.0])          # before the first keyframe
    assert rows[2] == ([0, -1], [1.0, 0.0])          # a keyframe itself
    assert rows[5][0] == [0, 1] and rows[5][1] == pytest.approx([4 / 7, 3 / 7])
    assert rows[12][0] == [1, 2] and rows[12][1] == pytest.approx([1 / 4, 3 / 4])
    assert rows[14] == ([2, -1], [1.0, 0.0])         # after the last keyframe


def test_plan_rows_cut_across_groups_and_pad_the_first_group():
    from tokenflow.method.keyframes import original_plan, plan_rows

    plans = [original_plan(g, 10, 4) for g in range(3)]   # groups 0-3, 4-7, 8-9
    pairs, weights = plan_rows(plans, 2, 9)
    assert pairs.shape == (7, 2) and weights.shape == (7, 2)
    assert pairs[:2].tolist() == [[0, -1], [0, -1]] and weights[:2].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert torch.equal(pairs[2:6], plans[1].pairs) and torch.equal(weights[2:6], plans[1].weights)
    assert torch.equal(pairs[6:], plans[2].pairs[:1]) and torch.equal(weights[6:], plans[2].weights[:1])
    one_group = plan_rows(plans, 4, 8)
    assert torch.equal(one_group[0], plans[1].pairs) and torch.equal(one_group[1], plans[1].weights)


def test_keyframe_windows_cover_every_slot_once_and_shift_on_odd_steps():
    from tokenflow.method.keyframes import keyframe_windows

    assert keyframe_windows(5, None, 0) == [(0, 5)] == keyframe_windows(5, 5, 1) == keyframe_windows(5, 9, 0)
    assert keyframe_windows(10, 4, 0) == [(0, 4), (4, 8), (8, 10)]
    assert keyframe_windows(10, 4, 1) == [(0, 2), (2, 6), (6, 10)]
    for k in (1, 7, 25, 125):
        for w in (1, 2, 3, 8):
            for step in (0, 1, 2):
                windows = keyframe_windows(k, w, step)
                slots = [s for a, b in windows for s in range(a, b)]
                assert slots == list(range(k)) and all(0 < b - a <= w for a, b in windows)
    even, odd = keyframe_windows(40, 8, 0), keyframe_windows(40, 8, 1)
    assert not {b for _, b in even[:-1]} & {b for _, b in odd[:-1]}  # no boundary is shared by both
