"""The Triton kernels at Stable Diffusion 2.1-base shapes (512x512) in float16 and bfloat16.

Rule (``tokenflow.kernels.verify``): the kernel's max error against a float64 reference is at most
twice the torch backend's own error in the same dtype. Attention's float64 reference is computed on
sampled query rows (the full one does not fit at K=25: [K*S]^2 scores per head); nearest indices
must be float64 argmaxes except for ties within ``verify.TIE_TOL``. Each check asserts that
``backend=None`` (auto) actually chose Triton.
"""
import pytest
import torch

from tokenflow.kernels import verify
from tokenflow.kernels.dispatch import choose
from tokenflow.kernels.keyframe_attention import keyframe_attention, keyframe_attention_torch
from tokenflow.kernels.nearest import cosine_nearest

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
ROWS = 256          # sampled query rows per branch
DIM = 64            # SD 2.1 head dim at every resolution


def _sample(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.randperm(n, generator=g)[:ROWS].to(device)


def _attention_rows(q, k, v, heads: int, inject_qk: bool, rows: torch.Tensor) -> torch.Tensor:
    """float64 [B, R, C]: the keyframe attention output at flattened query rows ``rows`` (K*S)."""
    n_branches, n_kf, seq, channels = q.shape
    q, k, v = q.double(), k.double(), v.double()
    dim = channels // heads
    out = torch.empty(n_branches, len(rows), channels, dtype=torch.float64, device=q.device)

    def attend(queries, keys, values):   # [R, C], [M, C], [M, C] -> [R, C]
        qh = queries.view(-1, heads, dim).transpose(0, 1)
        kh, vh = keys.view(-1, heads, dim).transpose(0, 1), values.view(-1, heads, dim).transpose(0, 1)
        p = torch.softmax(qh @ kh.transpose(1, 2) * dim ** -0.5, dim=-1)
        return (p @ vh).transpose(0, 1).reshape(-1, channels)

    frames = rows // seq
    for b in range(n_branches):
        qb, kb = (q[0], k[0]) if inject_qk and b else (q[b], k[b])
        queries = qb.reshape(n_kf * seq, channels)[rows]
        if b == 0:   # the source branch attends within its own frame
            for f in frames.unique().tolist():
                sel = frames == f
                out[b, sel] = attend(queries[sel], k[0, f], v[0, f])
        else:
            out[b] = attend(queries, kb.reshape(-1, channels), v[b].reshape(-1, channels))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq,heads,n_kf", [(4096, 5, 5), (4096, 5, 25), (1024, 10, 25), (256, 20, 25)])
def test_keyframe_attention_at_sd_shapes(cuda, dtype, seq, heads, n_kf):
    g = torch.Generator().manual_seed(seq + n_kf)
    q, k, v = (torch.randn(3, n_kf, seq, heads * DIM, generator=g).to(cuda, dtype) for _ in range(3))
    assert choose("keyframe_attention", None, q, k, v, heads) == "triton"
    rows = _sample(n_kf * seq, g, cuda)
    for inject_qk in (False, True):
        exact = _attention_rows(q, k, v, heads, inject_qk, rows)
        ours = keyframe_attention(q, k, v, heads, inject_qk=inject_qk).reshape(3, n_kf * seq, -1)[:, rows]
        same = keyframe_attention_torch(q, k, v, heads, inject_qk).reshape(3, n_kf * seq, -1)[:, rows]
        err = (ours.double() - exact).abs().max().item()
        torch_err = (same.double() - exact).abs().max().item()
        assert err <= 2 * torch_err, f"inject_qk={inject_qk}: triton {err:.3g} > 2 x torch {torch_err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq,channels", [(4096, 320), (1024, 640), (256, 1280)])
def test_nearest_at_sd_shapes(cuda, dtype, seq, channels):
    g = torch.Generator().manual_seed(seq)
    x = torch.randn(8, seq, channels, generator=g).to(cuda, dtype)
    keys = torch.randn(5, seq, channels, generator=g).to(cuda, dtype)
    pairs = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [4, -1], [0, 4], [1, 3], [2, -1]], device=cuda)
    assert choose("cosine_nearest", None, x, keys, pairs) == "triton"
    idx = cosine_nearest(x, keys, pairs)
    tokens = _sample(seq, g, cuda)
    xn = torch.nn.functional.normalize(x.double(), dim=-1)[:, tokens]          # [F, R, C]
    kn = torch.nn.functional.normalize(keys.double(), dim=-1)                  # [K, M, C]
    bad = 0
    for f in range(len(pairs)):
        for p in range(pairs.shape[1]):
            picked = idx[f, p, tokens]
            if pairs[f, p] < 0:
                bad += int((picked != 0).sum())   # unpaired slots hold 0
                continue
            sims = xn[f] @ kn[pairs[f, p]].T                                   # [R, M]
            best = sims.max(dim=-1).values
            bad += int((best - sims.gather(-1, picked.unsqueeze(-1)).squeeze(-1) > verify.TIE_TOL).sum())
    assert bad == 0, f"{bad} sampled tokens are not float64 nearest neighbours (ties within {verify.TIE_TOL} aside)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq,channels", [(4096, 320), (1024, 640), (256, 1280)])
def test_gather_at_sd_shapes(cuda, dtype, seq, channels):
    g = torch.Generator().manual_seed(seq)
    kf_out = torch.randn(3, 5, seq, channels, generator=g).to(cuda, dtype)
    idx = torch.randint(seq, (8, 2, seq), generator=g).to(cuda)
    pairs = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [4, -1], [0, 4], [1, 3], [2, -1]], device=cuda)
    weights = torch.rand(8, 2, generator=g).to(cuda)
    weights[pairs < 0] = 0
    weights = weights / weights.sum(dim=1, keepdim=True)
    assert choose("gather", None, kf_out, idx, pairs, weights) == "triton"
    result = verify.check_gather("triton", kf_out, idx, pairs, weights)
    assert result.ok, result.describe()
