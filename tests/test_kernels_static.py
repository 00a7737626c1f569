"""The static-shape backends (traced graphs: --backend compile/onnx) against the torch reference.

Fresh random inputs of irregular shapes, -1 pairs, float32 and fp16/bf16. Nearest indices must be
a float64 argmax except at ties (``verify``); the gather must be within 2x the torch backend's
error in the same dtype. The token-block loop is exercised by shrinking the block budget.
"""
import pytest
import torch

from tokenflow.kernels import nearest, verify
from tokenflow.kernels.gather import gather_blend
from tokenflow.kernels.nearest import cosine_nearest

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _nearest_inputs(g, n_frames, n_tokens, n_kf, n_keys, channels, n_pairs, dtype):
    x = torch.randn(n_frames, n_tokens, channels, generator=g).to(dtype)
    keys = torch.randn(n_kf, n_keys, channels, generator=g).to(dtype)
    pairs = torch.randint(n_kf, (n_frames, n_pairs), generator=g)
    if n_pairs == 2:
        pairs[0, 1] = -1
    return x, keys, pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 9, 2, 11, 5, 2), (1, 4, 1, 4, 3, 1), (4, 37, 3, 29, 40, 2)])
@pytest.mark.parametrize("block_budget", [1 << 22, 64])
def test_static_nearest_is_a_float64_argmax(dtype, shape, block_budget, monkeypatch):
    monkeypatch.setattr(nearest, "_STATIC_SIM_PER_FRAME", block_budget)  # 64: several token blocks
    g = torch.Generator().manual_seed(sum(shape))
    x, keys, pairs = _nearest_inputs(g, *shape, dtype)
    result = verify.check_nearest("static", x, keys, pairs)
    assert result.ok, result.describe()
    idx = cosine_nearest(x, keys, pairs, backend="static")
    assert idx[pairs < 0].eq(0).all()
    if dtype == torch.float32:
        assert torch.equal(idx, cosine_nearest(x, keys, pairs, backend="torch"))


def test_static_nearest_check_can_fail():
    g = torch.Generator().manual_seed(5)
    x, keys, pairs = _nearest_inputs(g, 2, 9, 2, 10, 6, 1, torch.float32)
    argmin = lambda x, k, p: nearest.cosine_nearest_static(-x, k, p)  # noqa: E731
    assert not verify.check_nearest("static", x, keys, pairs, impl=argmin).ok


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_pairs", [1, 2])
def test_static_gather_matches_reference(dtype, n_pairs):
    g = torch.Generator().manual_seed(20 + n_pairs)
    kf = torch.randn(5, 3, 23, 19, generator=g).to(dtype)
    idx = torch.randint(23, (6, n_pairs, 31), generator=g)
    pairs = torch.randint(3, (6, n_pairs), generator=g)
    weights = torch.rand(6, n_pairs, generator=g)
    if n_pairs == 2:
        pairs[2, 1], weights[2, 1] = -1, 0.0
    result = verify.check_gather("static", kf, idx, pairs, weights)
    assert result.ok, result.describe()
    if dtype == torch.float32:
        assert torch.allclose(gather_blend(kf, idx, pairs, weights, backend="static"),
                              gather_blend(kf, idx, pairs, weights, backend="torch"), atol=1e-6)


def test_static_backends_are_never_picked_automatically():
    x, keys, pairs = _nearest_inputs(torch.Generator().manual_seed(0), 2, 5, 2, 5, 4, 1, torch.float32)
    assert "static" not in {v.name for v in verify_explained(x, keys, pairs) if v.chosen}


def verify_explained(x, keys, pairs):
    from tokenflow.kernels import explain

    return explain("cosine_nearest", x, keys, pairs)
