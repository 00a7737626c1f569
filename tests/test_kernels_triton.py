"""Triton kernels against the torch reference, run by Triton's interpreter on CPU.

Inputs are fresh random tensors of irregular shapes (S and M not multiples of the tiles, K = 1,
P = 1 and 2 with -1 entries, head dims and channels that are not powers of two). Low-precision
results pass when their error against float64 is within 2x the torch backend's error in the same
dtype (``tokenflow.kernels.verify``); nearest indices must equal the float64 argmax except at ties.
Kernels are called with explicit tiles: autotuning does not run under the interpreter.
"""
import pytest
import torch

pytest.importorskip("triton")

from tokenflow.kernels import verify  # noqa: E402
from tokenflow.kernels.gather import gather_blend  # noqa: E402
from tokenflow.kernels.keyframe_attention import keyframe_attention  # noqa: E402
from tokenflow.kernels.nearest import cosine_nearest  # noqa: E402
from tokenflow.kernels.support import interpreting  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 before import (conftest sets it)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_kf,seq,heads,dim", [(1, 7, 1, 8), (3, 21, 2, 40), (2, 33, 1, 80), (4, 17, 3, 20)])
@pytest.mark.parametrize("inject", [False, True])
def test_attention_matches_reference(dtype, n_kf, seq, heads, dim, inject):
    g = torch.Generator().manual_seed(hash((n_kf, seq, heads, dim, inject)) % 2**31)
    # scaled q so the softmax is peaked, not uniform: errors in the max/rescaling would show
    q, k, v = _rand(g, 3, n_kf, seq, heads * dim, dtype=dtype, scale=2.0), \
        _rand(g, 3, n_kf, seq, heads * dim, dtype=dtype), _rand(g, 3, n_kf, seq, heads * dim, dtype=dtype)
    result = verify.check_attention("triton", q, k, v, heads, inject)
    assert result.ok, result.describe()


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (64, 64)])
def test_attention_tile_sizes(blocks):
    from tokenflow.kernels.keyframe_attention.triton import launch

    g = torch.Generator().manual_seed(7)
    q, k, v = (_rand(g, 3, 3, 45, 2 * 24) for _ in range(3))
    result = verify.check_attention("triton", q, k, v, 2, True, impl=lambda *a: launch(*a, blocks=blocks))
    assert result.ok, result.describe()


def test_attention_strided_inputs():
    """q, k, v as channel slices of one fused projection (row stride 3C): strides are honoured."""
    g = torch.Generator().manual_seed(8)
    qkv = _rand(g, 3, 2, 19, 3 * 48)
    q, k, v = qkv[..., :48], qkv[..., 48:96], qkv[..., 96:]
    assert not q.is_contiguous()
    result = verify.check_attention("triton", q, k, v, 2, False)
    assert result.ok, result.describe()


def test_attention_source_branch_sees_only_its_frame():
    """Changing another keyframe's values leaves the source branch alone and moves uncond/cond."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (_rand(g, 3, 2, 11, 16) for _ in range(3))
    a = keyframe_attention(q, k, v, 1, backend="triton")
    v2 = v.clone()
    v2[:, 1] += 1.0
    b = keyframe_attention(q, k, v2, 1, backend="triton")
    assert torch.equal(a[0, 0], b[0, 0])
    assert not torch.allclose(a[1, 0], b[1, 0]) and not torch.allclose(a[2, 0], b[2, 0])


def test_attention_rejects_wrong_implementation():
    """The check itself can fail: a backend that ignores inject_qk is caught."""
    from tokenflow.kernels.keyframe_attention.triton import launch

    g = torch.Generator().manual_seed(10)
    q, k, v = (_rand(g, 3, 2, 9, 16) for _ in range(3))
    result = verify.check_attention("triton", q, k, v, 1, True, impl=lambda q, k, v, h, inj: launch(q, k, v, h, False))
    assert not result.ok


def _nearest_inputs(g, n_frames, n_tokens, n_kf, n_keys, channels, n_pairs, dtype):
    x = _rand(g, n_frames, n_tokens, channels, dtype=dtype)
    keys = _rand(g, n_kf, n_keys, channels, dtype=dtype)
    pairs = torch.randint(n_kf, (n_frames, n_pairs), generator=g)
    if n_pairs == 2:
        pairs[0, 1] = -1
    return x, keys, pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 9, 2, 11, 5, 2), (1, 4, 1, 4, 3, 1), (4, 37, 3, 29, 40, 2), (2, 50, 2, 70, 20, 1)])
def test_cosine_nearest_matches_float64_argmax(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, keys, pairs = _nearest_inputs(g, *shape, dtype)
    result = verify.check_nearest("triton", x, keys, pairs)
    assert result.ok, result.describe()
    if dtype == torch.float32:  # random float32 data has no near-ties: identical to the reference
        assert torch.equal(cosine_nearest(x, keys, pairs, backend="triton"), cosine_nearest(x, keys, pairs, backend="torch"))


@pytest.mark.parametrize("blocks", [None, (16, 16, 16)])
def test_cosine_nearest_first_maximum_across_tiles(blocks):
    """Exact ties (scaling by 2 or 0.5 is exact) inside one key tile and across tiles: the first
    index wins, as torch.argmax. Keys 3 and 45 lie in different tiles for tiles of 16 and 32."""
    from tokenflow.kernels.nearest.triton import launch_nearest

    g = torch.Generator().manual_seed(11)
    keys = _rand(g, 1, 80, 6)
    keys[0, 45] = keys[0, 3] * 2.0       # same direction, another tile
    keys[0, 5] = keys[0, 4] * 0.5        # same direction, same tile
    x = torch.stack([keys[0, 45], keys[0, 4], keys[0, 70]]).unsqueeze(0) * 3.0
    idx = launch_nearest(x, keys, torch.zeros(1, 1, dtype=torch.long), blocks=blocks)
    assert idx.flatten().tolist() == [3, 4, 70]
    assert torch.equal(idx, cosine_nearest(x, keys, torch.zeros(1, 1, dtype=torch.long), backend="torch"))


def test_cosine_nearest_unpaired_slots_are_zero():
    g = torch.Generator().manual_seed(12)
    x, keys = _rand(g, 2, 5, 8), _rand(g, 2, 6, 8)
    pairs = torch.tensor([[-1, 1], [-1, -1]])
    idx = cosine_nearest(x, keys, pairs, backend="triton")
    assert idx[:, 0].eq(0).all() and idx[1].eq(0).all()
    assert torch.equal(idx[0, 1], cosine_nearest(x, keys, pairs, backend="torch")[0, 1])


def test_cosine_nearest_check_can_fail():
    g = torch.Generator().manual_seed(13)
    x, keys, pairs = _nearest_inputs(g, 2, 9, 2, 10, 6, 1, torch.float32)
    argmin = lambda x, k, p: cosine_nearest(-x, k, p, backend="torch")  # noqa: E731
    assert not verify.check_nearest("triton", x, keys, pairs, impl=argmin).ok


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_pairs", [1, 2])
def test_gather_matches_reference(dtype, n_pairs):
    g = torch.Generator().manual_seed(14 + n_pairs)
    kf = _rand(g, 3, 3, 23, 72, dtype=dtype)          # C = 72: two channel tiles, the second partial
    idx = torch.randint(23, (5, n_pairs, 70), generator=g)
    pairs = torch.randint(3, (5, n_pairs), generator=g)
    weights = torch.rand(5, n_pairs, generator=g)
    if n_pairs == 2:
        pairs[2, 1], weights[2, 1] = -1, 0.0
    result = verify.check_gather("triton", kf, idx, pairs, weights)
    assert result.ok, result.describe()
    if dtype == torch.float32:
        assert torch.allclose(gather_blend(kf, idx, pairs, weights, backend="triton"),
                              gather_blend(kf, idx, pairs, weights, backend="torch"), atol=1e-6)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and dispatch of the registered ops, as torch.compile needs."""
    import tokenflow.kernels.keyframe_attention.triton  # noqa: F401 (registers the ops)
    import tokenflow.kernels.nearest.triton  # noqa: F401

    g = torch.Generator().manual_seed(15)
    q, k, v = (_rand(g, 3, 2, 9, 32) for _ in range(3))
    x, keys, pairs = _nearest_inputs(g, 3, 9, 2, 10, 6, 2, torch.float32)
    idx = torch.randint(10, (3, 2, 9), generator=g)
    kf = _rand(g, 3, 2, 10, 6)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.tokenflow.keyframe_attention.default, (q, k, v, 2, True), test_utils=tests)
    torch.library.opcheck(torch.ops.tokenflow.cosine_nearest.default, (x, keys, pairs), test_utils=tests)
    torch.library.opcheck(torch.ops.tokenflow.gather_blend.default, (kf, idx, pairs, torch.rand(3, 2, generator=g)),
                          test_utils=tests)


def test_torch_compile_traces_through_the_public_api():
    """fullgraph=True: dispatch is a trace-time constant and each op one graph node, no graph breaks."""

    def block(q, k, v, x, keys, pairs, weights):
        out = keyframe_attention(q, k, v, 2, backend="triton")
        idx = cosine_nearest(x, keys, pairs, backend="triton")
        return out * 2, gather_blend(out[:, :, :10], idx, pairs, weights, backend="triton")

    g = torch.Generator().manual_seed(16)
    q, k, v = (_rand(g, 3, 2, 12, 32) for _ in range(3))
    x, keys = _rand(g, 3, 9, 32), _rand(g, 2, 10, 32)
    pairs, weights = torch.tensor([[0, 1], [1, -1], [0, 0]]), torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    expected = block(q, k, v, x, keys, pairs, weights)
    got = compiled(q, k, v, x, keys, pairs, weights)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
