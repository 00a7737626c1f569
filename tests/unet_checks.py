"""Independent computations of TokenFlow's attention passes, shared by the SD and SDXL tests.

Everything here recomputes from a layer's captured input with the layer's own projections, in
float64 loops over branches, frames and heads: no code of ``tokenflow.kernels`` or the processors.
"""
from typing import Dict, Iterable, List, Tuple

import torch


def capture_attn_inputs(unet, names: Iterable[str]) -> Tuple[Dict[str, torch.Tensor], List]:
    """Forward pre-hooks recording each named attention's ``hidden_states`` (norm1 output, [B*F, S, C])."""
    seen, handles = {}, []
    for name in names:
        def hook(module, args, kwargs, name=name):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).clone()
        handles.append(unet.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def extended_attention_by_hand(attn, h: torch.Tensor, n_branches: int, injected: bool) -> torch.Tensor:
    """The keyframe pass of one attn1 for input ``h`` [B*K, S, C]: the source branch attends within
    each frame, the other branches to all K keyframes of their branch; ``injected``: their Q and K
    are the source branch's (PnP). Returns [B, K, S, C] after the output projection."""
    seq = h.shape[1]
    n_kf = h.shape[0] // n_branches
    q, k, v = (lin(h.float()).double().view(n_branches, n_kf, seq, -1) for lin in (attn.to_q, attn.to_k, attn.to_v))
    heads, d = attn.heads, q.shape[-1] // attn.heads
    by_head = lambda t: t.reshape(-1, heads, d).transpose(0, 1)   # noqa: E731  [tokens, C] -> [heads, tokens, d]
    out = torch.zeros_like(q)
    for b in range(n_branches):
        qb, kb = (q[0], k[0]) if (injected and b) else (q[b], k[b])
        for f in range(n_kf):
            keys, vals = (kb[f], v[b, f]) if b == 0 else (kb, v[b])   # source: its own frame; others: all K
            weights = torch.softmax(by_head(qb[f]) @ by_head(keys).transpose(1, 2) * d ** -0.5, -1)
            out[b, f] = (weights @ by_head(vals)).transpose(0, 1).reshape(seq, -1)
    return attn.to_out[0](out.float().reshape(n_branches * n_kf, seq, -1)).view(n_branches, n_kf, seq, -1)


def nearest_by_hand(source: torch.Tensor, keys: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """int64 [F, P, N]: for each token of source frame f ([F, N, C]) its most cosine-similar token of
    keyframe ``pairs[f, p]`` ([K, M, C] ``keys``), in float64."""
    x, k = source.double(), keys.double()
    x, k = x / x.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    return torch.stack([torch.stack([(x[f] @ k[int(p)].T).argmax(-1) for p in pairs[f]]) for f in range(len(pairs))])


def gathered_by_hand(kf_out: torch.Tensor, idx: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, F, N, C] = sum_p weights[f, p] * kf_out[b, pairs[f, p], idx[f, p, n]], token by token."""
    n_branches, n_frames, n_tokens = kf_out.shape[0], idx.shape[0], idx.shape[2]
    out = torch.zeros(n_branches, n_frames, n_tokens, kf_out.shape[-1], dtype=torch.float64)
    for f in range(n_frames):
        for p in range(pairs.shape[1]):
            out[:, f] += float(weights[f, p]) * kf_out[:, int(pairs[f, p]), idx[f, p]].double()
    return out
