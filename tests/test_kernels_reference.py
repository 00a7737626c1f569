"""The kernel ops' reference backend against brute-force computations written independently."""
import pytest
import torch

from tokenflow.kernels.gather import gather_blend
from tokenflow.kernels.keyframe_attention import keyframe_attention
from tokenflow.kernels.nearest import cosine_nearest


def _attention_bruteforce(q, k, v, heads, inject):
    """Explicit loops over branches, keyframes and heads, with materialised softmax (float64)."""
    three, n_kf, seq, channels = q.shape
    d = channels // heads
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for b in range(3):
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


@pytest.mark.parametrize("n_kf,seq,heads,d", [(1, 7, 1, 8), (3, 13, 2, 5), (2, 33, 3, 16)])
@pytest.mark.parametrize("inject", [False, True])
def test_keyframe_attention_matches_bruteforce(n_kf, seq, heads, d, inject):
    g = torch.Generator().manual_seed(n_kf * 100 + seq)
    q, k, v = (torch.randn(3, n_kf, seq, heads * d, generator=g) for _ in range(3))
    ours = keyframe_attention(q, k, v, heads, inject_qk=inject)
    assert torch.allclose(ours.double(), _attention_bruteforce(q, k, v, heads, inject), atol=1e-5)


def test_keyframe_attention_low_precision_within_twice_torch_error():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 3, 21, 2 * 16, generator=g) for _ in range(3))
    exact = _attention_bruteforce(q, k, v, 2, False)
    for dtype in (torch.bfloat16,):
        ours = keyframe_attention(q.to(dtype), k.to(dtype), v.to(dtype), 2).double()
        naive = _attention_bruteforce(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), 2, False)
        naive = naive.to(dtype).double()  # plain PyTorch in the same dtype: inputs and output rounded
        assert (ours - exact).abs().max() <= 2 * (naive - exact).abs().max() + 1e-3


def _nearest_bruteforce(x, keys, pairs):
    F, N, _ = x.shape
    idx = torch.zeros(F, pairs.shape[1], N, dtype=torch.long)
    for f in range(F):
        for p in range(pairs.shape[1]):
            j = int(pairs[f, p])
            if j < 0:
                continue
            for n in range(N):
                sims = [float(torch.nn.functional.cosine_similarity(x[f, n].double(), keys[j, m].double(), dim=0))
                        for m in range(keys.shape[1])]
                idx[f, p, n] = max(range(len(sims)), key=lambda m: (sims[m], -m))
    return idx


@pytest.mark.parametrize("F,N,K,M,C,P", [(3, 9, 2, 11, 5, 2), (1, 4, 1, 4, 3, 1), (4, 6, 3, 7, 8, 2)])
def test_cosine_nearest_matches_bruteforce(F, N, K, M, C, P):
    g = torch.Generator().manual_seed(F * N + M)
    x, keys = torch.randn(F, N, C, generator=g), torch.randn(K, M, C, generator=g)
    pairs = torch.randint(K, (F, P), generator=g)
    if P == 2:
        pairs[0, 1] = -1
    ours = cosine_nearest(x, keys, pairs)
    expected = _nearest_bruteforce(x, keys, pairs)
    assert torch.equal(ours, expected)


def test_cosine_nearest_first_maximum_on_ties():
    keys = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])  # tokens 0 and 1 have the same direction
    x = torch.tensor([[[3.0, 0.0]]])
    assert cosine_nearest(x, keys, torch.zeros(1, 1, dtype=torch.long)).item() == 0


def test_gather_matches_loops():
    g = torch.Generator().manual_seed(3)
    B, K, M, C, F, P, N = 3, 4, 10, 6, 5, 2, 7
    kf = torch.randn(B, K, M, C, generator=g)
    pairs = torch.randint(K, (F, P), generator=g)
    pairs[1, 1] = -1
    idx = torch.randint(M, (F, P, N), generator=g)
    w = torch.rand(F, P, generator=g)
    w[1, 1] = 0.0
    out = gather_blend(kf, idx, pairs, w)
    expected = torch.zeros(B, F, N, C)
    for b in range(B):
        for f in range(F):
            for p in range(P):
                if pairs[f, p] >= 0:
                    for n in range(N):
                        expected[b, f, n] += w[f, p] * kf[b, pairs[f, p], idx[f, p, n]]
    assert torch.allclose(out, expected, atol=1e-6)
