"""cosine_nearest, every backend: the API, the torch reference, static, faiss, triton, and
triton's sm_90 build.

Inputs are fresh random tensors (seeded per case, ``kernel_helpers.generator``) of irregular
shapes: N and M not multiples of any tile, K = 1, P = 1 and 2 with -1 (unpaired) entries, channel
counts that are not powers of two; float32, float16 and bfloat16.

Correctness of an index is exact, not a tolerance: every backend's index must be an argmax of the
cosine similarities computed in float64 from the same (already rounded) inputs, except where the
picked and the best similarity are tied within ``verify.TIE_TOL`` = 1e-5. Backends score in float32
(half-precision products are exact in float32), so their scores differ from float64 by float32
rounding of a C-term dot product, about sqrt(C) * 6e-8 relative: under 3e-6 for C <= 1280, below
the tie tolerance; a real mistake picks a token whose similarity is off by O(0.1). On float32 data
of this size there are no near-ties, so there the backends must equal the torch reference exactly.
Triton runs through ``triton_device`` (conftest): the real kernels on CUDA, the interpreter on CPU.
"""
import pytest
import torch

from tokenflow.kernels import nearest, verify
from tokenflow.kernels.nearest import cosine_nearest

from .kernel_helpers import DTYPES, LOW_PRECISION, channels_strided, generator, nearest_inputs

# F frames, N tokens, K keyframes, M keys, C channels, P pairs
SHAPES = [(3, 9, 2, 11, 5, 2), (1, 4, 1, 4, 3, 1), (4, 37, 3, 29, 40, 2)]


def _nearest_loops(x, keys, pairs):
    """Cosine similarity per (frame, pair, token, key) in float64, first maximum on ties."""
    n_frames, n_tokens, _ = x.shape
    idx = torch.zeros(n_frames, pairs.shape[1], n_tokens, dtype=torch.long)
    for f in range(n_frames):
        for p in range(pairs.shape[1]):
            j = int(pairs[f, p])
            if j < 0:
                continue
            for n in range(n_tokens):
                sims = [float(torch.nn.functional.cosine_similarity(x[f, n].double(), keys[j, m].double(), dim=0))
                        for m in range(keys.shape[1])]
                idx[f, p, n] = max(range(len(sims)), key=lambda m: (sims[m], -m))
    return idx


# ----------------------------------------------------------------------------- API


def test_api_rejects_shapes_it_cannot_match():
    x, keys, pairs = torch.zeros(2, 5, 4), torch.zeros(1, 6, 4), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="x \\[F,N,C\\] and keys \\[K,M,C\\]"):
        cosine_nearest(x, torch.zeros(1, 6, 3), pairs)
    with pytest.raises(ValueError, match="pairs must be \\[F, P\\] with F=2"):
        cosine_nearest(x, keys, torch.zeros(3, 1, dtype=torch.long))


# ----------------------------------------------------------------------------- torch (the reference)


@pytest.mark.parametrize("shape", [(3, 9, 2, 11, 5, 2), (1, 4, 1, 4, 3, 1), (4, 6, 3, 7, 8, 2)], ids=str)
def test_torch_matches_loops_in_float64(shape):
    x, keys, pairs = nearest_inputs(generator("torch", shape), *shape)
    assert torch.equal(cosine_nearest(x, keys, pairs, backend="torch"), _nearest_loops(x, keys, pairs))


def test_torch_first_maximum_on_ties():
    keys = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])  # tokens 0 and 1 have the same direction
    x = torch.tensor([[[3.0, 0.0]]])
    assert cosine_nearest(x, keys, torch.zeros(1, 1, dtype=torch.long), backend="torch").item() == 0


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES[::2], ids=str)
def test_torch_low_precision_is_a_float64_argmax(dtype, shape):
    x, keys, pairs = nearest_inputs(generator("torch low", dtype, shape), *shape, dtype=dtype)
    result = verify.check_nearest("torch", x, keys, pairs)
    assert result.ok, result.describe()


def test_the_check_catches_a_wrong_implementation():
    """The check itself can fail: an argmin is caught (whatever backend name it is filed under)."""
    x, keys, pairs = nearest_inputs(generator("argmin"), 2, 9, 2, 10, 6, 1)
    argmin = lambda x, k, p: nearest.cosine_nearest_torch(-x, k, p)  # noqa: E731
    assert not verify.check_nearest("static", x, keys, pairs, impl=argmin).ok


# ----------------------------------------------------------------------------- static (traced graphs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("block_budget", [1 << 22, 64])
def test_static_is_a_float64_argmax(dtype, shape, block_budget, monkeypatch):
    monkeypatch.setattr(nearest, "_STATIC_SIM_PER_FRAME", block_budget)  # 64: several token blocks
    x, keys, pairs = nearest_inputs(generator("static", dtype, shape), *shape, dtype=dtype)
    result = verify.check_nearest("static", x, keys, pairs)
    assert result.ok, result.describe()
    idx = cosine_nearest(x, keys, pairs, backend="static")
    assert idx[pairs < 0].eq(0).all()
    if dtype == torch.float32:
        assert torch.equal(idx, cosine_nearest(x, keys, pairs, backend="torch"))


# ----------------------------------------------------------------------------- faiss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_faiss_is_a_float64_argmax(dtype):
    pytest.importorskip("faiss")
    g = generator("faiss", dtype)
    x, keys = torch.randn(5, 30, 12, generator=g).to(dtype), torch.randn(3, 41, 12, generator=g).to(dtype)
    pairs = torch.tensor([[0, 1], [1, -1], [2, 2], [0, 0], [-1, -1]])
    result = verify.check_nearest("faiss", x, keys, pairs)
    assert result.ok, result.describe()
    if dtype == torch.float32:
        assert torch.equal(cosine_nearest(x, keys, pairs, backend="faiss"), cosine_nearest(x, keys, pairs, backend="torch"))


def test_faiss_gpu_resources_are_built_once_per_device(monkeypatch):
    """A GPU index per call, but one ``StandardGpuResources`` per device for the process (a stand-in
    faiss module with the faiss-gpu names: the GPU path itself is unverified)."""
    from types import SimpleNamespace

    from tokenflow.kernels.nearest import faiss as faiss_backend

    built = []

    class Resources:
        def __init__(self):
            built.append(self)

    fake = SimpleNamespace(StandardGpuResources=Resources, get_num_gpus=lambda: 2,
                           GpuIndexFlatConfig=lambda: SimpleNamespace(device=None),
                           GpuIndexFlatIP=lambda res, channels, config: (res, channels, config.device),
                           IndexFlatIP=lambda channels: ("cpu", channels))
    monkeypatch.setattr(faiss_backend, "_GPU_RESOURCES", {})
    first = [faiss_backend._index(fake, 8, torch.device("cuda", 0)) for _ in range(3)]
    other = faiss_backend._index(fake, 8, torch.device("cuda", 1))
    assert len(built) == 2 and all(index == (built[0], 8, 0) for index in first) and other == (built[1], 8, 1)
    assert faiss_backend._index(fake, 8, torch.device("cpu")) == ("cpu", 8) and len(built) == 2


# ----------------------------------------------------------------------------- triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(2, 50, 2, 70, 20, 1)], ids=str)
def test_triton_is_a_float64_argmax(triton_device, dtype, shape):
    x, keys, pairs = nearest_inputs(generator("triton", dtype, shape), *shape, dtype=dtype, device=triton_device)
    result = verify.check_nearest("triton", x, keys, pairs)
    assert result.ok, result.describe()
    if dtype == torch.float32:
        assert torch.equal(cosine_nearest(x, keys, pairs, backend="triton"), cosine_nearest(x, keys, pairs, backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "reversed"])
def test_triton_channels_not_at_unit_stride(triton_device, dtype, layout):
    """x and keys with channels at a non-unit stride, pairs transposed: the launcher copies what the
    kernel reads contiguously, through the public API and through the custom op that traced graphs
    call without dispatch."""
    from tokenflow.kernels.nearest.triton import cosine_nearest_triton

    x, keys, pairs = nearest_inputs(generator("layout", dtype, layout), 3, 21, 2, 27, 36, 2, dtype=dtype,
                                    device=triton_device)
    x, keys, pairs = channels_strided(x, layout), channels_strided(keys, "reversed"), pairs.T.contiguous().T
    for impl in (None, cosine_nearest_triton):
        result = verify.check_nearest("triton", x, keys, pairs, impl=impl)
        assert result.ok, (impl, result.describe())
    if dtype == torch.float32:
        assert torch.equal(cosine_nearest_triton(x, keys, pairs), cosine_nearest(x, keys, pairs, backend="torch"))


@pytest.mark.parametrize("blocks", [None, (16, 16, 16)])
def test_triton_first_maximum_across_tiles(triton_device, blocks):
    """Exact ties (scaling by 2 or 0.5 is exact) inside one key tile and across tiles: the first
    index wins, as torch.argmax. Keys 3 and 45 lie in different tiles for tiles of 16 and 32."""
    from tokenflow.kernels.nearest.triton import launch_nearest

    keys = torch.randn(1, 80, 6, generator=generator("ties"))
    keys[0, 45] = keys[0, 3] * 2.0       # same direction, another tile
    keys[0, 5] = keys[0, 4] * 0.5        # same direction, same tile
    x = torch.stack([keys[0, 45], keys[0, 4], keys[0, 70]]).unsqueeze(0) * 3.0
    x, keys, pairs = x.to(triton_device), keys.to(triton_device), torch.zeros(1, 1, dtype=torch.long, device=triton_device)
    idx = launch_nearest(x, keys, pairs, blocks=blocks)
    assert idx.flatten().tolist() == [3, 4, 70]
    assert torch.equal(idx, cosine_nearest(x, keys, pairs, backend="torch"))


def test_triton_unpaired_slots_are_zero(triton_device):
    x, keys, _ = nearest_inputs(generator("unpaired"), 2, 5, 2, 6, 8, 1, device=triton_device)
    pairs = torch.tensor([[-1, 1], [-1, -1]], device=triton_device)
    idx = cosine_nearest(x, keys, pairs, backend="triton")
    assert idx[:, 0].eq(0).all() and idx[1].eq(0).all()
    assert torch.equal(idx[0, 1], cosine_nearest(x, keys, pairs, backend="torch")[0, 1])


def test_triton_custom_op_passes_opcheck(triton_device):
    """Schema and fake (meta) implementation of the registered op, as torch.compile needs."""
    import tokenflow.kernels.nearest.triton  # noqa: F401 (registers the op)

    x, keys, pairs = nearest_inputs(generator("opcheck"), 3, 9, 2, 10, 6, 2, device=triton_device)
    torch.library.opcheck(torch.ops.tokenflow.cosine_nearest.default, (x, keys, pairs),
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_traces_through_the_public_api(triton_device):
    """fullgraph=True: the backend choice is a trace-time constant and the op one graph node."""
    x, keys, _ = nearest_inputs(generator("compile"), 3, 9, 2, 10, 32, 1, device=triton_device)
    pairs = torch.tensor([[0, 1], [1, -1], [0, 0]], device=triton_device)

    def block(x, keys, pairs):
        return cosine_nearest(x, keys, pairs, backend="triton") + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, keys, pairs), block(x, keys, pairs))


# ----------------------------------------------------------------------------- triton for sm_90 (no GPU needed)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_sm90_every_config_compiles_and_fits(sm90, dtype):
    from tokenflow.kernels.nearest import triton as nt

    ints = ["sxf", "sxn", "skk", "skm", "spf", "spp", "n_tokens", "n_keys", "channels", "n_pairs"]
    types = {"X": f"*{dtype}", "Keys": f"*{dtype}", "Pairs": "*i64", "Idx": "*i64", **{n: "i32" for n in ints}}
    for config in nt._nearest_configs():
        kernel = sm90.compile(nt._cosine_argmax_kernel, types,
                              dict(config.kwargs, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32"),
                              config.num_warps, config.num_stages, ["X", "Keys", "Pairs", "Idx", "sxf", "sxn", "skk", "skm"])
        assert kernel.metadata.shared <= sm90.SMEM_LIMIT, (config, kernel.metadata.shared)
