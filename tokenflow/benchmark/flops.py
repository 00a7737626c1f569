"""Analytic FLOP counts of a whole TokenFlow edit, from the model configs and the latent size.

Counted: the multiply-adds of convolutions, linear layers and attention matrix products, each
as 2 FLOPs per multiply-add, which is what ``torch.utils.flop_counter.FlopCounterMode`` counts:

    convolution   2 * Cin * Cout * k^2 * H_out * W_out        (1x1 projections: k = 1)
    linear        2 * in * out * tokens                       (bias adds not counted)
    attention     4 * S_q * S_kv * C                          (Q K^T and P V, C = heads * head dim)
    nearest       2 * S * (P * S) * C                         (cosine scores of S tokens against
                                                               the S tokens of P keyframes)

Not counted: norms, activations, softmax, GEGLU gating, residual adds, up-sampling
interpolation, the DDIM update, argmax, the weighted gather: elementwise or memory-bound work
with no matrix products (well under 1% of the products' FLOPs for SD), and the text encoder
(a few prompt encodings per edit).

One UNet *sample* is one batch row: one frame of one branch. Per sample, for latents h x w,
the UNet is walked from its config (conv_in, time embedding MLP, ResNets with 3x3 convs, time
projections and 1x1 shortcuts, strided down-sampling convs, up-sampling convs, and the 16
transformer blocks of SD 1.x/2.x (SDXL: 70, ``transformer_layers_per_block`` per level, reversed
in the decoder, the last level's in the mid block; no attention at level 0), each at
S = h_i * w_i tokens, C channels, T = 77 text tokens of width X (SDXL: 2048, both encoders'
hidden states; its packed pooled/time-id token is unpacked before the UNet, ``models.text``):

    transformer  = 2*(2 S C^2)  proj_in / proj_out
                 + 4*(2 S C^2)  self-attention q, k, v, out projections  ("attn1 projections")
                 + 4 S S_kv C   self-attention products                  ("attn1 core")
                 + 2*(2 S C^2) + 2*(2 T X C) + 4 S T C   cross-attention
                 + 2 S C (8C) + 2 S (4C) C               GEGLU feed-forward

SDXL's added embedding (``addition_embed_type="text_time"``): the 6 time ids' sinusoidal
embeddings (no products) concatenated with the pooled text embedding, then a 2-layer MLP
``projection_class_embeddings_input_dim`` (2816) -> 4 C_0 -> 4 C_0, added to the time embedding.

Resolutions follow the convolutions: h_{i+1} = ceil(h_i / 2) (3x3, stride 2, padding 1), and
the decoder up-samples back to the encoder's sizes.

The three kinds of UNet calls of an edit differ only in the self-attention layers:

* plain (inversion): S_kv = S.
* keyframe pass (K keyframes, B*K samples, B = 3 branches [source, uncond, cond], or 1 + 2P
  for P prompts): the source rows attend within their own frame (S_kv = S); the other rows
  attend to all keyframes of their branch (S_kv = K * S; K = the window's keyframes when a
  keyframe window splits the pass into several calls). Every projection is computed as usual.
* propagation pass (B samples per frame): ``TokenFlowAttention._propagate`` replaces the
  self-attention entirely, so no q/k/v/out projection and no attention product is computed;
  instead the source frame's ``norm1`` output is searched against its P paired keyframes'
  stored features: 2 * S * (P * S) * C per frame per layer (source branch only). With the
  paper's propagation (``propagation="paper"``) the source rows additionally run their own
  plain self-attention (projections + 4 S^2 C) to get the features they are matched on.

VAE (per frame, from ``AutoencoderKL``'s config): encoder convs and ResNets down to h x w, the
mid block's single-head attention (4 linear projections + 4 S^2 C at S = h * w), ``quant_conv``;
the decoder mirrors it with one more ResNet per block and 3x3 convs after each 2x up-sampling.

A depth UNet (SD 2-depth) differs only in ``conv_in``'s 5 input channels (its config's ``in_channels``).

ControlNet (``controlnet_cost``, per controlled sample): the UNet's down and mid blocks with plain
self-attention (TokenFlow's processors are not installed on it), its ``conv_in`` and time MLP,
the conditioning embedding on the control image at full resolution H x W (3x3 convs 3 -> E_0,
then per width E_i -> E_i and a stride-2 E_i -> E_{i+1}, then E_last -> C_0 at h x w), and one
1x1 zero convolution per residual (12 down + 1 mid for SD). N ControlNets run on the controlled
rows of every call whose step lies in the control window: the 2P non-source rows of each
TokenFlow pass (all B rows with the source controlled), every inversion row when the inversion
is controlled. ``edit_work(controlnet_config=..., controlnets=N, ...)`` adds them per stage.

The counts are checked against ``FlopCounterMode`` in ``tests/test_benchmark.py`` (UNet, VAE) and
``tests/test_plan_models.py`` (ControlNet, depth UNet).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

TEXT_TOKENS = 77


def conv(cin: int, cout: int, k: int, h: int, w: int) -> float:
    return 2.0 * cin * cout * k * k * h * w


def linear(fan_in: int, fan_out: int, tokens: int) -> float:
    return 2.0 * fan_in * fan_out * tokens


def attention(s_q: int, s_kv: int, channels: int) -> float:
    return 4.0 * s_q * s_kv * channels


def _get(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


@dataclass(frozen=True)
class SelfAttentionLayer:
    """One transformer block's self-attention: S tokens of C channels."""

    tokens: int
    channels: int

    @property
    def projections(self) -> float:
        """q, k, v and out projections of one sample."""
        return 4 * linear(self.channels, self.channels, self.tokens)

    def core(self, kv_tokens: int) -> float:
        """Q K^T and P V of one sample whose queries see ``kv_tokens`` keys."""
        return attention(self.tokens, kv_tokens, self.channels)

    def search(self, n_pairs: int) -> float:
        """Cosine scores of one frame against ``n_pairs`` keyframes."""
        return 2.0 * self.tokens * n_pairs * self.tokens * self.channels


@dataclass(frozen=True)
class UNetCost:
    """FLOPs of one UNet sample at one latent size, split for the three kinds of calls.

    base: everything but the self-attention layers (convs, time MLP, cross-attention,
    feed-forward, transformer projections in/out). layers: the self-attention layers.
    """

    base: float
    layers: Tuple[SelfAttentionLayer, ...] = field(default_factory=tuple)

    @property
    def attn1_projections(self) -> float:
        return sum(layer.projections for layer in self.layers)

    def plain(self) -> float:
        """One ordinary UNet sample (inversion)."""
        return self.base + sum(layer.projections + layer.core(layer.tokens) for layer in self.layers)

    def keyframe_pass(self, n_keyframes: int, branches: int = 3) -> float:
        """One keyframe-pass call: B*K samples; branches 1.. use extended attention over K frames."""
        k = n_keyframes
        total = branches * k * (self.base + self.attn1_projections)
        for layer in self.layers:
            total += k * layer.core(layer.tokens) + (branches - 1) * k * layer.core(k * layer.tokens)
        return total

    def propagation_frame(self, n_pairs: int, propagation: str = "original", branches: int = 3) -> float:
        """The B samples of one frame in a propagation pass, matched against ``n_pairs`` keyframes."""
        total = branches * self.base + sum(layer.search(n_pairs) for layer in self.layers)
        if propagation == "paper":  # the source rows compute their own self-attention output first
            total += sum(layer.projections + layer.core(layer.tokens) for layer in self.layers)
        return total


def resolutions(h: int, w: int, levels: int) -> List[Tuple[int, int]]:
    """Latent sizes at each UNet level: 3x3 stride-2 padding-1 convs give ceil(x / 2)."""
    out = [(h, w)]
    for _ in range(levels - 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        out.append((h, w))
    return out


def _resnet(cin: int, cout: int, h: int, w: int, temb: int) -> float:
    flops = conv(cin, cout, 3, h, w) + conv(cout, cout, 3, h, w)
    if temb:
        flops += linear(temb, cout, 1)
    if cin != cout:
        flops += conv(cin, cout, 1, h, w)
    return flops


def _transformer_base(channels: int, tokens: int, cross_dim: int, text_tokens: int, depth: int) -> float:
    """One Transformer2DModel without its self-attention layers (see the module docstring)."""
    c, s = channels, tokens
    per_block = (2 * linear(c, c, s)                                      # cross q, out
                 + 2 * linear(cross_dim, c, text_tokens) + attention(s, text_tokens, c)
                 + linear(c, 8 * c, s) + linear(4 * c, c, s))             # GEGLU feed-forward
    return 2 * linear(c, c, s) + depth * per_block                        # proj_in / proj_out


def _block_shape(config):
    """(block widths, layers per block, transformer depth per level, cross-attention width) of a
    UNet or ControlNet config (one depth for every level in SD 1.x/2.x, one per level in SDXL)."""
    channels = list(_get(config, "block_out_channels"))
    per_block = _get(config, "layers_per_block")
    depth = _get(config, "transformer_layers_per_block", 1)
    if not isinstance(per_block, int):
        raise ValueError("layers_per_block must be a single integer for the FLOP model")
    depths = [depth] * len(channels) if isinstance(depth, int) else list(depth)
    if len(depths) != len(channels) or not all(isinstance(d, int) for d in depths):
        raise ValueError("transformer_layers_per_block must be one integer per level for the FLOP model")
    return channels, per_block, depths, _get(config, "cross_attention_dim")


def _added_embedding(config, temb: int) -> float:
    """SDXL's text/time embedding MLP (module docstring); 0 for SD 1.x/2.x."""
    if _get(config, "addition_embed_type") != "text_time":
        return 0.0
    return linear(int(_get(config, "projection_class_embeddings_input_dim")), temb, 1) + linear(temb, temb, 1)


def unet_cost(config, h: int, w: int, text_tokens: int = TEXT_TOKENS) -> UNetCost:
    """Per-sample FLOPs of an SD 1.x/2.x or SDXL ``UNet2DConditionModel`` (config) on latents h x w."""
    channels, per_block, depths, cross = _block_shape(config)
    n = len(channels)
    k_in, k_out = _get(config, "conv_in_kernel", 3), _get(config, "conv_out_kernel", 3)
    temb = 4 * channels[0]
    res = resolutions(h, w, n)
    base = linear(channels[0], temb, 1) + linear(temb, temb, 1)          # time embedding MLP
    base += _added_embedding(config, temb)
    base += conv(_get(config, "in_channels"), channels[0], k_in, h, w)
    layers: List[SelfAttentionLayer] = []

    def transformer(c: int, hw: Tuple[int, int], depth: int) -> float:
        s = hw[0] * hw[1]
        layers.extend(SelfAttentionLayer(s, c) for _ in range(depth))
        return _transformer_base(c, s, cross, text_tokens, depth)

    previous = channels[0]
    for i, kind in enumerate(_get(config, "down_block_types")):
        out, (hi, wi) = channels[i], res[i]
        for j in range(per_block):
            base += _resnet(previous if j == 0 else out, out, hi, wi, temb)
            if "CrossAttn" in kind:
                base += transformer(out, res[i], depths[i])
        if i < n - 1:
            base += conv(out, out, 3, *res[i + 1])
        previous = out
    mid = channels[-1]
    base += 2 * _resnet(mid, mid, *res[-1], temb)
    if "CrossAttn" in str(_get(config, "mid_block_type")):
        base += transformer(mid, res[-1], depths[-1])
    reversed_channels = channels[::-1]
    previous = reversed_channels[0]
    for i, kind in enumerate(_get(config, "up_block_types")):
        out, level = reversed_channels[i], n - 1 - i
        skip_last = reversed_channels[min(i + 1, n - 1)]
        for j in range(per_block + 1):
            skip = skip_last if j == per_block else out
            base += _resnet((previous if j == 0 else out) + skip, out, *res[level], temb)
            if "CrossAttn" in kind:
                base += transformer(out, res[level], depths[level])
        if i < n - 1:
            base += conv(out, out, 3, *res[level - 1])
        previous = out
    base += conv(channels[0], _get(config, "out_channels"), k_out, h, w)
    # the attention of each self-attention layer's rows is added per kind of call
    return UNetCost(base=base, layers=tuple(layers))


def controlnet_cost(config, h: int, w: int, height: int, width: int, text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one sample through a diffusers ``ControlNetModel`` (config) on latents h x w and a
    control image height x width (module docstring): its self-attention is always plain."""
    channels, per_block, depths, cross = _block_shape(config)
    n = len(channels)
    temb = 4 * channels[0]
    res = resolutions(h, w, n)
    flops = linear(channels[0], temb, 1) + linear(temb, temb, 1) + _added_embedding(config, temb)
    flops += conv(_get(config, "in_channels"), channels[0], _get(config, "conv_in_kernel", 3) or 3, h, w)
    widths = list(_get(config, "conditioning_embedding_out_channels") or (16, 32, 96, 256))
    eh, ew = height, width
    flops += conv(_get(config, "conditioning_channels", 3) or 3, widths[0], 3, eh, ew)
    for a, b in zip(widths, widths[1:]):
        flops += conv(a, a, 3, eh, ew)
        eh, ew = math.ceil(eh / 2), math.ceil(ew / 2)
        flops += conv(a, b, 3, eh, ew)
    flops += conv(widths[-1], channels[0], 3, h, w)
    flops += conv(channels[0], channels[0], 1, h, w)                     # zero conv of conv_in's output

    def transformer(c: int, hw: Tuple[int, int], depth: int) -> float:
        layer = SelfAttentionLayer(hw[0] * hw[1], c)
        return depth * (layer.projections + layer.core(layer.tokens)) + \
            _transformer_base(c, layer.tokens, cross, text_tokens, depth)

    previous = channels[0]
    for i, kind in enumerate(_get(config, "down_block_types")):
        out, hw = channels[i], res[i]
        for j in range(per_block):
            flops += _resnet(previous if j == 0 else out, out, *hw, temb) + conv(out, out, 1, *hw)
            if "CrossAttn" in kind:
                flops += transformer(out, hw, depths[i])
        if i < n - 1:
            flops += conv(out, out, 3, *res[i + 1]) + conv(out, out, 1, *res[i + 1])
        previous = out
    mid = channels[-1]
    flops += 2 * _resnet(mid, mid, *res[-1], temb) + conv(mid, mid, 1, *res[-1])
    if "CrossAttn" in str(_get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")):
        flops += transformer(mid, res[-1], depths[-1])
    return flops


def _vae_mid(c: int, h: int, w: int, attention_layer: bool) -> float:
    flops = 2 * _resnet(c, c, h, w, 0)
    if attention_layer:
        s = h * w
        flops += 4 * linear(c, c, s) + attention(s, s, c)
    return flops


def vae_encode(config, height: int, width: int) -> float:
    """One frame through ``AutoencoderKL``'s encoder and ``quant_conv`` (the posterior mean)."""
    channels = list(_get(config, "block_out_channels"))
    per_block, latent = _get(config, "layers_per_block"), _get(config, "latent_channels")
    h, w = height, width
    flops = conv(_get(config, "in_channels"), channels[0], 3, h, w)
    previous = channels[0]
    for i, out in enumerate(channels):
        for j in range(per_block):
            flops += _resnet(previous if j == 0 else out, out, h, w, 0)
        if i < len(channels) - 1:
            h, w = h // 2, w // 2                      # stride 2 after one-sided padding
            flops += conv(out, out, 3, h, w)
        previous = out
    flops += _vae_mid(channels[-1], h, w, _get(config, "mid_block_add_attention", True))
    flops += conv(channels[-1], 2 * latent, 3, h, w)
    if _get(config, "use_quant_conv", True):
        flops += conv(2 * latent, 2 * latent, 1, h, w)
    return flops


def vae_decode(config, h: int, w: int) -> float:
    """One latent [4, h, w] through ``post_quant_conv`` and the decoder."""
    channels = list(_get(config, "block_out_channels"))[::-1]
    per_block, latent = _get(config, "layers_per_block"), _get(config, "latent_channels")
    flops = conv(latent, latent, 1, h, w) if _get(config, "use_post_quant_conv", True) else 0.0
    flops += conv(latent, channels[0], 3, h, w)
    flops += _vae_mid(channels[0], h, w, _get(config, "mid_block_add_attention", True))
    previous = channels[0]
    for i, out in enumerate(channels):
        for j in range(per_block + 1):
            flops += _resnet(previous if j == 0 else out, out, h, w, 0)
        if i < len(channels) - 1:
            h, w = 2 * h, 2 * w
            flops += conv(out, out, 3, h, w)
        previous = out
    return flops + conv(channels[-1], _get(config, "out_channels"), 3, h, w)


@dataclass
class EditWork:
    """FLOPs and UNet samples of each stage of one edit (see ``edit_work``)."""

    flops: dict
    samples: dict
    frames: int


def edit_work(unet_config, vae_config, n_frames: int, latent_hw: Tuple[int, int],
              inversion_steps: int, keyframe_calls: Sequence[Sequence[int]],
              pairs_per_step: Sequence[Sequence[int]], propagation: str = "original",
              branches: int = 3, text_tokens: int = TEXT_TOKENS, controlnet_config=None, controlnets: int = 0,
              control_source: bool = False, control_inversion: bool = False,
              control_steps: Optional[Sequence[bool]] = None) -> EditWork:
    """Work of a whole edit.

    Args:
        n_frames: N frames; latent_hw: (h, w) latent size; inversion_steps: DDIM inversion steps
            (every one evaluates all N frames, one sample each).
        keyframe_calls: per edit step, the number of keyframes of each keyframe-pass call
            (one call of all K keyframes unless a keyframe window splits them).
        pairs_per_step: per edit step, the number of valid keyframe pairs P_f of each frame.
        branches: B = 1 + 2 * prompts rows per frame in the edit's UNet calls.
        controlnet_config, controlnets: N ControlNets of that config on every controlled row
            (``controlnet_cost``): the edit's non-source rows (all with ``control_source``), every
            inversion row with ``control_inversion``; ``control_steps``: per edit step, whether it
            lies in the control window (default: every step).
    Returns:
        ``EditWork`` with per-stage dicts keyed encode, invert, keyframes, propagate, edit,
        decode, total.
    """
    h, w = latent_hw
    cost = unet_cost(unet_config, h, w, text_tokens)
    scale = 2 ** (len(list(_get(vae_config, "block_out_channels"))) - 1)
    flops = {
        "encode": n_frames * vae_encode(vae_config, h * scale, w * scale),
        "invert": n_frames * inversion_steps * cost.plain(),
        "keyframes": sum(cost.keyframe_pass(k, branches) for step in keyframe_calls for k in step),
        "propagate": sum(cost.propagation_frame(p, propagation, branches) for step in pairs_per_step for p in step),
        "decode": n_frames * vae_decode(vae_config, h, w),
    }
    samples = {
        "encode": 0, "invert": n_frames * inversion_steps,
        "keyframes": sum(branches * k for step in keyframe_calls for k in step),
        "propagate": sum(branches * len(step) for step in pairs_per_step), "decode": 0,
    }
    if controlnets and controlnet_config is not None:
        per = controlnets * controlnet_cost(controlnet_config, h, w, h * scale, w * scale, text_tokens)
        rows = branches - (0 if control_source else 1)
        active = list(control_steps) if control_steps is not None else [True] * len(keyframe_calls)
        flops["keyframes"] += per * rows * sum(k for on, step in zip(active, keyframe_calls) if on for k in step)
        flops["propagate"] += per * rows * sum(len(step) for on, step in zip(active, pairs_per_step) if on)
        if control_inversion:
            flops["invert"] += per * n_frames * inversion_steps
    for table in (flops, samples):
        table["edit"] = table["keyframes"] + table["propagate"]
        table["total"] = table["encode"] + table["invert"] + table["edit"] + table["decode"]
    return EditWork(flops=flops, samples=samples, frames=n_frames)
