"""gather_blend, every backend: the API, the torch reference, static, triton, and triton's sm_90 build.

Inputs are fresh random tensors (seeded per case, ``kernel_helpers.generator``) of irregular
shapes: N and M not multiples of the tiles, C = 72 (two channel tiles of 64, the second partial),
P = 1 and 2 with a -1 pair of weight 0, as the runner pads.

Tolerances:
- torch reference, float32: against explicit loops in float32. The weighted sum has at most P = 2
  terms, so the two differ by a few float32 roundings of O(1) values: 1e-6 absolute.
- low precision, flash-attention's rule (``tokenflow.kernels.verify``): a backend's max error
  against float64 on the same rounded inputs must be at most 2x the error of plain PyTorch in that
  dtype. For the torch backend (which accumulates in float32), "plain PyTorch" is the same weighted
  sum computed in the dtype; every other backend is held to 2x the torch backend's error (plus 1e-5
  in float32, where both errors are rounding noise). Float32 backends must also agree with the
  reference to 1e-6, as above.
Triton runs through ``triton_device`` (conftest): the real kernels on CUDA, the interpreter on CPU.
"""
import pytest
import torch

from tokenflow.kernels import gather, verify
from tokenflow.kernels.gather import gather_blend

from .kernel_helpers import DTYPES, LAYOUTS, LOW_PRECISION, channels_strided, gather_inputs, generator


def _gather_loops(kf, idx, pairs, w, dtype=torch.float32):
    """sum_p w[f,p] * kf[b, pairs[f,p], idx[f,p,n]], one element at a time, accumulated in ``dtype``."""
    n_branches, _, _, channels = kf.shape
    n_frames, n_pairs, n_tokens = idx.shape
    kf, w = kf.to(dtype), w.to(dtype)
    out = torch.zeros(n_branches, n_frames, n_tokens, channels, dtype=dtype)
    for b in range(n_branches):
        for f in range(n_frames):
            for p in range(n_pairs):
                if pairs[f, p] >= 0:
                    for n in range(n_tokens):
                        out[b, f, n] += w[f, p] * kf[b, pairs[f, p], idx[f, p, n]]
    return out


# ----------------------------------------------------------------------------- API


def test_api_rejects_shapes_that_disagree():
    kf, idx, pairs, weights = gather_inputs(generator("api"), 2, 3, 10, 4, 5, 2, 7)
    with pytest.raises(ValueError, match="disagree"):
        gather_blend(kf[0], idx, pairs, weights)
    with pytest.raises(ValueError, match="disagree"):
        gather_blend(kf, idx, pairs, weights[:, :1])
    with pytest.raises(ValueError, match="disagree"):
        gather_blend(kf, idx[:4], pairs, weights)


# ----------------------------------------------------------------------------- torch (the reference)


@pytest.mark.parametrize("n_pairs", [1, 2])
def test_torch_matches_loops(n_pairs):
    kf, idx, pairs, weights = gather_inputs(generator("torch", n_pairs), 3, 4, 10, 6, 5, n_pairs, 7)
    out = gather_blend(kf, idx, pairs, weights, backend="torch")
    assert torch.allclose(out, _gather_loops(kf, idx, pairs, weights), atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_torch_low_precision_within_twice_plain_pytorch(dtype):
    kf, idx, pairs, weights = gather_inputs(generator("low", dtype), 3, 4, 10, 6, 5, 2, 7, dtype=dtype)
    exact = gather.gather_blend_torch(kf.double(), idx, pairs, weights.double())
    plain = _gather_loops(kf, idx, pairs, weights, dtype=dtype).double()
    ours = gather_blend(kf, idx, pairs, weights, backend="torch")
    assert ours.dtype == dtype
    assert (ours.double() - exact).abs().max() <= 2 * (plain - exact).abs().max()


def test_the_check_catches_a_wrong_implementation():
    """The check itself can fail: a gather that ignores the weights (equal blend) is caught."""
    kf, idx, pairs, weights = gather_inputs(generator("wrong"), 3, 3, 23, 19, 6, 2, 31)
    unweighted = lambda kf, idx, pairs, w: gather.gather_blend_torch(kf, idx, pairs, (pairs >= 0).float() / 2)  # noqa: E731
    assert not verify.check_gather("static", kf, idx, pairs, weights, impl=unweighted).ok


# ----------------------------------------------------------------------------- static (traced graphs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_pairs", [1, 2])
def test_static_matches_reference(dtype, n_pairs):
    kf, idx, pairs, weights = gather_inputs(generator("static", dtype, n_pairs), 5, 3, 23, 19, 6, n_pairs, 31,
                                            dtype=dtype)
    result = verify.check_gather("static", kf, idx, pairs, weights)
    assert result.ok, result.describe()
    if dtype == torch.float32:
        assert torch.allclose(gather_blend(kf, idx, pairs, weights, backend="static"),
                              gather_blend(kf, idx, pairs, weights, backend="torch"), atol=1e-6)


# ----------------------------------------------------------------------------- triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_pairs", [1, 2])
def test_triton_matches_reference(triton_device, dtype, n_pairs):
    kf, idx, pairs, weights = gather_inputs(generator("triton", dtype, n_pairs), 3, 3, 23, 72, 5, n_pairs, 70,
                                            dtype=dtype, device=triton_device)
    result = verify.check_gather("triton", kf, idx, pairs, weights)
    assert result.ok, result.describe()
    if dtype == torch.float32:
        assert torch.allclose(gather_blend(kf, idx, pairs, weights, backend="triton"),
                              gather_blend(kf, idx, pairs, weights, backend="torch"), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_channels_not_at_unit_stride(triton_device, dtype, layout):
    """kf_out with channels at a non-unit stride, idx with tokens at one, pairs and weights
    transposed: the launcher copies what the kernel reads contiguously, through the public API
    and through the custom op that traced graphs call without dispatch."""
    from tokenflow.kernels.gather.triton import gather_blend_triton

    kf, idx, pairs, weights = gather_inputs(generator("layout", dtype, layout), 3, 3, 23, 40, 5, 2, 19,
                                            dtype=dtype, device=triton_device)
    kf, idx = channels_strided(kf, layout), channels_strided(idx, "transposed")
    pairs, weights = pairs.T.contiguous().T, weights.T.contiguous().T
    for impl in (None, gather_blend_triton):
        result = verify.check_gather("triton", kf, idx, pairs, weights, impl=impl)
        assert result.ok, (impl, result.describe())


def test_triton_custom_op_passes_opcheck(triton_device):
    """Schema and fake (meta) implementation of the registered op, as torch.compile needs."""
    import tokenflow.kernels.gather.triton  # noqa: F401 (registers the op)

    args = gather_inputs(generator("opcheck"), 3, 2, 10, 6, 3, 2, 9, device=triton_device)
    torch.library.opcheck(torch.ops.tokenflow.gather_blend.default, args, test_utils=("test_schema", "test_faketensor"))


def test_triton_traces_through_the_public_api(triton_device):
    """fullgraph=True: the backend choice is a trace-time constant and the op one graph node."""
    args = gather_inputs(generator("compile"), 3, 2, 10, 32, 3, 2, 9, device=triton_device)

    def block(kf, idx, pairs, weights):
        return gather_blend(kf * 2, idx, pairs, weights, backend="triton")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), block(*args))


# ----------------------------------------------------------------------------- triton for sm_90 (no GPU needed)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_sm90_compiles_and_fits(sm90, dtype):
    from tokenflow.kernels.gather import triton as gt

    ints = ["skb", "skk", "skm", "sif", "sip", "spf", "spp", "swf", "swp", "sob", "sof", "son", "n_tokens", "n_keys",
            "channels", "n_pairs"]
    types = {"KF": f"*{dtype}", "Idx": "*i64", "Pairs": "*i64", "W": "*fp32", "Out": f"*{dtype}",
             **{n: "i32" for n in ints}}
    kernel = sm90.compile(gt._gather_blend_kernel, types, dict(BLOCK_N=gt.GATHER_BLOCKS[0], BLOCK_C=gt.GATHER_BLOCKS[1]),
                          4, 3, ["KF", "Idx", "Pairs", "W", "Out"])
    assert kernel.metadata.shared <= sm90.SMEM_LIMIT
