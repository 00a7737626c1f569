"""TokenFlow inside diffusers' UNet, through its public extension points only.

- Every self-attention (``attn1``) of the transformer blocks (16 in SD 1.x/2.x, 70 in SDXL) gets a
  ``TokenFlowAttention`` processor (diffusers' attention-processor API).
- Plug-and-Play feature injection is a forward hook on ``conv2`` of one decoder ResNet
  (``register_forward_hook``): the hook's return value replaces conv2's output, i.e. the
  residual branch before the shortcut add, which is exactly where the original injects.
  Which layers play which role: ``tokenflow.models.unet_layout`` (derived from the layout, so the
  same rules place them in SD and SDXL).

Per-call state (pass kind, timestep, injection switches, keyframe store, pairs and weights)
lives in one ``StepState`` object that the engine hands to ``TokenFlowControl.active``; the
processors and the hook read it from there. Nothing is set on the UNet's modules.

Graph mode (``engine.passes``, for torch.compile and ONNX export): the injection switches are
0-dim bool tensors (selected with ``torch.where``, so one graph serves every step), the frame
count comes from the batch shape (``n_frames=None``), and the store is a ``FeatureSink`` whose
tensors become the graph's outputs.

UNet batches are laid out as B equal branches of ``m`` frames each: [source, uncond, cond] for one
prompt, [source, uncond_1, cond_1, uncond_2, cond_2, ...] for several (one shared source branch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from tokenflow import kernels
from tokenflow.engine.state import PassKind, StepState, TokenFlowControl
from tokenflow.errors import ModelError
from tokenflow.kernels.gather import gather_blend
from tokenflow.kernels.keyframe_attention import keyframe_attention
from tokenflow.kernels.nearest import cosine_nearest
from tokenflow.models.unet_layout import PNP_QK_SKIP_FIRST_DECODER_LAYERS, check_unet_layout, pnp_feature_resnet

# Plug-and-Play (Tumanyan et al.) injects Q/K in the decoder's self-attention layers "4-11": all
# decoder self-attention layers except the first one at the lowest resolution. For SD 1.x/2.x
# those are up_blocks[1].attentions[1, 2], up_blocks[2].attentions[0..2], up_blocks[3].attentions[0..2].
# ... and the residual features of the second ResNet of the decoder block at 1/4 of the latent
# resolution: SD 1.x/2.x's (up_blocks[0] has no attention in SD); SDXL's is up_blocks.0.resnets.1.
PNP_FEATURE_RESNET = "up_blocks.1.resnets.1"


@dataclass(frozen=True)
class LayerInfo:
    name: str          # module path of the attn1, e.g. "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    pnp_qk: bool       # PnP Q/K injection applies here


class TokenFlowAttention:
    """attn1 processor: plain, keyframe (extended attention + store) or propagation pass."""

    def __init__(self, control: TokenFlowControl, layer: LayerInfo):
        self.control, self.layer = control, layer
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        state = self.control.state
        if state is None or state.kind is PassKind.PLAIN:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if state.n_frames is not None and (hidden_states.dim() != 3 or
                                           hidden_states.shape[0] != state.n_branches * state.n_frames):
            raise RuntimeError(f"{self.layer.name}: expected [{state.n_branches}*{state.n_frames}, S, C] hidden states, "
                               f"got {tuple(hidden_states.shape)}")
        if state.kind is PassKind.KEYFRAMES:
            return self._keyframes(attn, hidden_states, state)
        return self._propagate(attn, hidden_states, state)

    def _keyframes(self, attn, h, state: StepState) -> torch.Tensor:
        """h: [B*K, S, C] = norm1 output of the branches' keyframes -> [B*K, S, C]."""
        n_br, seq = state.n_branches, h.shape[1]
        n_kf = h.shape[0] // n_br
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        split = lambda t: t.view(n_br, n_kf, seq, t.shape[-1])  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        inject = state.inject_qk if self.layer.pnp_qk else False
        if isinstance(inject, torch.Tensor):  # graph mode: the switch is an input, both ways in one graph
            q = torch.where(inject, q[:1].expand_as(q), q)
            k = torch.where(inject, k[:1].expand_as(k), k)
            inject = False
        if state.graph_mode:
            out = kernels.implementation("keyframe_attention", state.kernels.attention)(q, k, v, attn.heads, inject)
        else:
            out = keyframe_attention(q, k, v, attn.heads, inject_qk=inject, backend=state.kernels.attention)
        out = _project_out(attn, out.reshape(n_br * n_kf, seq, -1), h)
        source_features = h[:n_kf] if state.match_on == "input" else out[:n_kf]
        state.store.write(self.layer.name, state.keyframe_offset, source_features, out.view(n_br, n_kf, seq, -1))
        return out

    def _propagate(self, attn, h, state: StepState) -> torch.Tensor:
        """h: [B*m, S, C] -> [B*m, S, C], gathered from the stored keyframe outputs."""
        m, seq = h.shape[0] // state.n_branches, h.shape[1]
        if state.match_on == "input":
            source = h[:m]
        else:  # the paper matches on the source branch's own self-attention output
            source = self.plain(attn, h[:m])
        pairs = state.pairs.to(h.device)
        keys, kf_out, weights = (state.store.features[self.layer.name], state.store.outputs[self.layer.name],
                                 state.weights.to(h.device))
        if state.graph_mode:
            idx = kernels.implementation("cosine_nearest", state.kernels.nearest)(source, keys, pairs)
            out = kernels.implementation("gather", state.kernels.gather)(kf_out, idx, pairs, weights)
            if state.match_on == "output":
                out[0] = source
            return out.reshape(state.n_branches * m, seq, -1)
        idx = cosine_nearest(source, keys, pairs, backend=state.kernels.nearest)
        if state.on_correspondences is not None:
            state.on_correspondences(self.layer.name, idx)
        out = gather_blend(kf_out, idx, pairs, weights, backend=state.kernels.gather)
        if state.match_on == "output":  # the paper: the source video keeps its own tokens
            out[0] = source
        return out.reshape(state.n_branches * m, seq, -1)


def _project_out(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The tail of diffusers' attention processors: output projection, dropout, optional residual."""
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def self_attention_layers(unet: torch.nn.Module) -> List[LayerInfo]:
    """The UNet's transformer self-attention layers (every ``attn1`` diffusers ``Attention``) in
    module order, with their PnP role. The one place that finds them: the processors, the memory
    model (``engine.memory.attention_layer_shapes``) and the graph specs all go through here."""
    names = [name for name, module in unet.named_modules()
             if name.endswith(".attn1") and type(module).__name__ == "Attention"]
    decoder = [n for n in names if n.startswith("up_blocks.")]
    pnp = set(decoder[PNP_QK_SKIP_FIRST_DECODER_LAYERS:])
    return [LayerInfo(n, n in pnp) for n in names]


class TokenFlowUNet:
    """Installs the TokenFlow processors and the PnP conv hook on a diffusers UNet (reversibly)."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.control = TokenFlowControl()
        self.layers = self_attention_layers(unet)
        self._check_layout()
        self._saved_processors = dict(unet.attn_processors)
        processors: Dict[str, object] = dict(self._saved_processors)
        for layer in self.layers:
            processors[f"{layer.name}.processor"] = TokenFlowAttention(self.control, layer)
        unet.set_attn_processor(processors)
        self.feature_resnet = pnp_feature_resnet(unet)
        conv2 = unet.get_submodule(self.feature_resnet).conv2
        self._hook = conv2.register_forward_hook(self._inject_residual_features)

    def _check_layout(self) -> None:
        check_unet_layout(self.unet, "the UNet")
        for layer in self.layers:
            module = self.unet.get_submodule(layer.name)
            dim = module.inner_dim // module.heads
            if abs(module.scale - dim ** -0.5) > 1e-6 or module.norm_q is not None or module.spatial_norm is not None:
                raise ModelError(f"{layer.name}: unsupported attention variant (custom scale or q/k norms)")

    def _inject_residual_features(self, module, inputs, output):
        state = self.control.state
        if state is None or state.kind is PassKind.PLAIN:
            return None
        inject = state.inject_conv
        if isinstance(inject, torch.Tensor):  # graph mode
            source = output[: output.shape[0] // state.n_branches]
            return torch.where(inject, torch.cat([source] * state.n_branches), output)
        if not inject:
            return None
        source = output[: output.shape[0] // state.n_branches]
        return torch.cat([source] * state.n_branches)

    def remove(self) -> None:
        """Restore the UNet's own processors and drop the hook."""
        self._hook.remove()
        self.unet.set_attn_processor(self._saved_processors)
