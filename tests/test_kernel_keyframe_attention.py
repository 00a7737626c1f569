"""keyframe_attention, every backend: the API, the torch reference, triton, xformers, and triton's
sm_90 build.

Inputs are fresh random tensors (seeded per case, ``kernel_helpers.generator``) of irregular
shapes: S not a multiple of any tile, K = 1, head dims that are not powers of two, 1 to 3 heads.

Tolerances:
- torch reference, float32: against explicit loops in float64 with a materialised softmax. Its
  SDPA runs in float32 (relative rounding ~6e-8 per operation over <= 100-term sums of O(1)
  values), so 1e-5 absolute is two orders of magnitude above its rounding and far below any
  indexing mistake (errors of O(0.1)).
- low precision, flash-attention's rule (``tokenflow.kernels.verify``): a backend's max error
  against float64 on the same rounded inputs must be at most 2x the error of plain PyTorch in that
  dtype. For the torch backend, "plain PyTorch" is the materialised softmax computed in the dtype;
  every other backend is held to 2x the torch backend's error (plus 1e-5 in float32, where both
  errors are rounding noise).
Triton runs through ``triton_device`` (conftest): the real kernels on CUDA, the interpreter on CPU,
where kernels are called with explicit tiles (autotuning does not run under the interpreter).
"""
import pytest
import torch

from tokenflow.kernels import verify
from tokenflow.kernels.keyframe_attention import keyframe_attention

from .kernel_helpers import DTYPES, LAYOUTS, LOW_PRECISION, channels_strided, generator, rand

SHAPES = [(1, 7, 1, 8), (3, 21, 2, 40), (2, 33, 1, 80), (4, 17, 3, 20)]   # n_kf, seq, heads, head dim


def _qkv(g, n_kf, seq, heads, dim, dtype=torch.float32, device="cpu", branches=3):
    # q scaled so the softmax is peaked, not uniform: errors in the max/rescaling would show
    shape = (branches, n_kf, seq, heads * dim)
    return (rand(g, *shape, dtype=dtype, scale=2.0, device=device), rand(g, *shape, dtype=dtype, device=device),
            rand(g, *shape, dtype=dtype, device=device))


def _attention_loops(q, k, v, heads, inject, dtype=torch.float64):
    """Explicit loops over branches, keyframes and heads with a materialised softmax, computed in
    ``dtype`` (float64: the exact value; the inputs' dtype: plain PyTorch in low precision)."""
    n_branches, n_kf, seq, channels = q.shape
    d = channels // heads
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = torch.zeros_like(q)
    for b in range(n_branches):
        qb = q[0] if (inject and b > 0) else q[b]
        kb = k[0] if (inject and b > 0) else k[b]
        for f in range(n_kf):
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                if b == 0:
                    keys, vals = kb[f, :, sl], v[b, f, :, sl]
                else:  # all keyframes of the branch, concatenated in keyframe order
                    keys, vals = kb[:, :, sl].reshape(-1, d), v[b, :, :, sl].reshape(-1, d)
                p = torch.softmax(qb[f, :, sl] @ keys.T * d ** -0.5, dim=-1)
                out[b, f, :, sl] = p @ vals
    return out


# ----------------------------------------------------------------------------- API


def test_api_rejects_shapes_it_cannot_attend():
    q = torch.zeros(3, 2, 5, 8)
    with pytest.raises(ValueError, match="equal shape"):
        keyframe_attention(q, q, torch.zeros(3, 2, 6, 8), 2)
    with pytest.raises(ValueError, match="B>=2"):
        keyframe_attention(q[:1], q[:1], q[:1], 2)
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        keyframe_attention(q, q, q, 3)


# ----------------------------------------------------------------------------- torch (the reference)


@pytest.mark.parametrize("n_kf,seq,heads,d", [(1, 7, 1, 8), (3, 13, 2, 5), (2, 33, 3, 16)])
@pytest.mark.parametrize("inject", [False, True])
def test_torch_matches_loops_in_float64(n_kf, seq, heads, d, inject):
    q, k, v = _qkv(generator("torch", n_kf, seq, heads, d, inject), n_kf, seq, heads, d)
    ours = keyframe_attention(q, k, v, heads, inject_qk=inject, backend="torch")
    assert torch.allclose(ours.double(), _attention_loops(q, k, v, heads, inject), atol=1e-5)


def test_torch_with_several_prompts():
    """Five branches [source, uncond_1, cond_1, uncond_2, cond_2]: each attends within its own branch."""
    q, k, v = _qkv(generator("prompts"), 2, 9, 2, 8, branches=5)
    for inject in (False, True):
        ours = keyframe_attention(q, k, v, 2, inject_qk=inject, backend="torch")
        assert torch.allclose(ours.double(), _attention_loops(q, k, v, 2, inject), atol=1e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("n_kf,seq,heads,d", [(3, 21, 2, 16), (2, 33, 3, 16)])
@pytest.mark.parametrize("inject", [False, True])
def test_torch_low_precision_within_twice_plain_pytorch(dtype, n_kf, seq, heads, d, inject):
    q, k, v = _qkv(generator("low", dtype, n_kf, seq, heads, d, inject), n_kf, seq, heads, d, dtype=dtype)
    exact = _attention_loops(q, k, v, heads, inject)                          # float64 of the rounded inputs
    plain = _attention_loops(q, k, v, heads, inject, dtype=dtype).double()    # plain PyTorch in the dtype
    ours = keyframe_attention(q, k, v, heads, inject_qk=inject, backend="torch").double()
    assert ours.dtype == plain.dtype
    assert (ours - exact).abs().max() <= 2 * (plain - exact).abs().max()


# ----------------------------------------------------------------------------- triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_kf,seq,heads,dim", SHAPES)
@pytest.mark.parametrize("inject", [False, True])
def test_triton_matches_reference(triton_device, dtype, n_kf, seq, heads, dim, inject):
    q, k, v = _qkv(generator("triton", dtype, n_kf, seq, heads, dim, inject), n_kf, seq, heads, dim, dtype=dtype,
                   device=triton_device)
    result = verify.check_attention("triton", q, k, v, heads, inject)
    assert result.ok, result.describe()


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (64, 64)])
def test_triton_tile_sizes(triton_device, blocks):
    from tokenflow.kernels.keyframe_attention.triton import launch

    q, k, v = _qkv(generator("tiles", blocks), 3, 45, 2, 24, device=triton_device)
    result = verify.check_attention("triton", q, k, v, 2, True, impl=lambda *a: launch(*a, blocks=blocks))
    assert result.ok, result.describe()


def test_triton_strided_inputs(triton_device):
    """q, k, v as channel slices of one fused projection (row stride 3C): strides are honoured."""
    qkv = rand(generator("strided"), 3, 2, 19, 3 * 48, device=triton_device)
    q, k, v = qkv[..., :48], qkv[..., 48:96], qkv[..., 96:]
    assert not q.is_contiguous()
    result = verify.check_attention("triton", q, k, v, 2, False)
    assert result.ok, result.describe()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_channels_not_at_unit_stride(triton_device, dtype, layout):
    """Channels at a non-unit stride (transposed, column-major, expanded views): the launcher copies
    them, through the public API (eager dispatch) and through the custom op itself, which traced
    graphs call without dispatch. An expanded v also has stride 0 across branches."""
    from tokenflow.kernels.keyframe_attention.triton import keyframe_attention_triton

    q, k, v = _qkv(generator("layout", dtype, layout), 3, 19, 3, 12, dtype=dtype, device=triton_device)
    q, k = channels_strided(q, layout), channels_strided(k, "reversed")
    v = v[:1].expand(v.shape) if layout == "broadcast" else channels_strided(v, layout)
    for inject in (False, True):
        for impl in (None, keyframe_attention_triton):
            result = verify.check_attention("triton", q, k, v, 3, inject, impl=impl)
            assert result.ok, (inject, impl, result.describe())


def test_triton_with_several_prompts(triton_device):
    """Five branches [source, uncond_1, cond_1, uncond_2, cond_2]: one launch covers them all."""
    q, k, v = _qkv(generator("triton prompts"), 2, 19, 2, 24, branches=5, device=triton_device)
    for inject in (False, True):
        result = verify.check_attention("triton", q, k, v, 2, inject)
        assert result.ok, result.describe()


def test_triton_source_branch_sees_only_its_frame(triton_device):
    """Changing another keyframe's values leaves the source branch alone and moves uncond/cond."""
    q, k, v = _qkv(generator("source"), 2, 11, 1, 16, device=triton_device)
    a = keyframe_attention(q, k, v, 1, backend="triton")
    v2 = v.clone()
    v2[:, 1] += 1.0
    b = keyframe_attention(q, k, v2, 1, backend="triton")
    assert torch.equal(a[0, 0], b[0, 0])
    assert not torch.allclose(a[1, 0], b[1, 0]) and not torch.allclose(a[2, 0], b[2, 0])


def test_the_check_catches_a_wrong_implementation(triton_device):
    """The check itself can fail: a backend that ignores inject_qk is caught."""
    from tokenflow.kernels.keyframe_attention.triton import launch

    q, k, v = _qkv(generator("wrong"), 2, 9, 1, 16, device=triton_device)
    result = verify.check_attention("triton", q, k, v, 1, True, impl=lambda q, k, v, h, inj: launch(q, k, v, h, False))
    assert not result.ok


def test_triton_custom_op_passes_opcheck(triton_device):
    """Schema and fake (meta) implementation of the registered op, as torch.compile needs."""
    import tokenflow.kernels.keyframe_attention.triton  # noqa: F401 (registers the op)

    q, k, v = _qkv(generator("opcheck"), 2, 9, 2, 16, device=triton_device)
    torch.library.opcheck(torch.ops.tokenflow.keyframe_attention.default, (q, k, v, 2, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_traces_through_the_public_api(triton_device):
    """fullgraph=True: the backend choice is a trace-time constant and the op one graph node."""
    q, k, v = _qkv(generator("compile"), 2, 12, 2, 16, device=triton_device)

    def block(q, k, v):
        return keyframe_attention(q, k, v, 2, backend="triton") * 2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), block(q, k, v))


# ----------------------------------------------------------------------------- xformers (unverified)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inject", [False, True])
def test_xformers_matches_reference(dtype, inject):
    """Never run where this was written: xFormers needs CUDA and cannot sit next to the CPU torch."""
    pytest.importorskip("xformers")
    if not torch.cuda.is_available():
        pytest.skip("xFormers runs on CUDA only")
    q, k, v = _qkv(generator("xformers", dtype, inject), 3, 21, 2, 40, dtype=dtype, device="cuda")
    result = verify.check_attention("xformers", q, k, v, 2, inject)
    assert result.ok, result.describe()


# ----------------------------------------------------------------------------- triton for sm_90 (no GPU needed)

ATTN_INTS = ["sqb", "sqf", "sqs", "skb", "skf", "sks", "svb", "svf", "svs", "sob", "sof", "sos", "n_kf", "seq", "heads"]


class _Q:  # what the autotuner hands the pruner: the positional args (only Q's element size is read)
    def __init__(self, esize):
        self._esize = esize

    def element_size(self):
        return self._esize


def _configs(sm90, dtype, head_dim):
    import triton

    from tokenflow.kernels.keyframe_attention import triton as at

    block_d = max(16, triton.next_power_of_2(head_dim))
    return block_d, at._prune_configs(at._tuning_configs(), {"Q": _Q(sm90.ESIZE[dtype])}, BLOCK_D=block_d)


def _compile_attention(sm90, dtype, head_dim, config, inject=False):
    import triton

    from tokenflow.kernels.keyframe_attention import triton as at

    types = {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")}
    types.update({n: "i32" for n in ATTN_INTS}, qk_scale="fp32")
    constexprs = dict(config.kwargs, HEAD_DIM=head_dim, INJECT_QK=inject, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                      UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32")
    aligned = ["Q", "K", "V", "Out"] + [n for n in ATTN_INTS if n.startswith("s") and n != "seq"]
    return sm90.compile(at._keyframe_attention_kernel, types, constexprs, config.num_warps, config.num_stages, aligned)


@pytest.mark.parametrize("dtype,head_dim", [("fp16", 64), ("fp16", 80), ("fp16", 160), ("fp32", 64), ("fp32", 160)])
def test_sm90_every_config_the_autotuner_may_try_compiles_and_fits(sm90, dtype, head_dim):
    """Compiled for real: the shared memory the compiler reports, for every config kept by the pruner."""
    _, kept = _configs(sm90, dtype, head_dim)
    assert kept
    for c in kept:
        kernel = _compile_attention(sm90, dtype, head_dim, c)
        assert kernel.metadata.shared <= sm90.SMEM_LIMIT, (c, kernel.metadata.shared)


@pytest.mark.parametrize("dtype,head_dim,inject", [("fp16", 64, False), ("bf16", 80, True), ("fp16", 160, False),
                                                   ("fp32", 40, False)])
def test_sm90_compiles_with_tensor_cores_and_the_predicted_shared_memory(sm90, dtype, head_dim, inject):
    from tokenflow.kernels.keyframe_attention import triton as at

    block_d, kept = _configs(sm90, dtype, head_dim)
    config = kept[0]
    kernel = _compile_attention(sm90, dtype, head_dim, config, inject)
    expected = at.smem_bytes(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], block_d, config.num_stages,
                             sm90.ESIZE[dtype])
    assert abs(kernel.metadata.shared - expected) <= 1024, (kernel.metadata.shared, expected)
    assert kernel.metadata.shared <= sm90.SMEM_LIMIT
    if dtype != "fp32":
        assert "wgmma" in kernel.asm["ptx"]  # Hopper tensor-core MMA, not a scalar fallback
