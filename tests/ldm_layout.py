"""Test helper: a diffusers Stable Diffusion folder written as one checkpoint in the original LDM
(CompVis) key layout, as CivitAI-style single files are.

The mapping is written here from the layout of the original ``ldm`` modules (independent of the
loader, which converts UNet and VAE with diffusers' converter): a wrong name on either side makes
the single-file test fail.

UNet (``model.diffusion_model.``): ``input_blocks.0`` is conv_in; level ``i``'s layer ``j`` is
``input_blocks.{3i+j+1}`` (``.0`` resnet, ``.1`` transformer), its downsampler
``input_blocks.{3i+3}.0.op``; ``middle_block.{0,1,2}``; up level ``i``'s layer ``j`` is
``output_blocks.{3i+j}`` with the upsampler after the transformer (``.2.conv``, or ``.1.conv``
without one); resnets ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``.
VAE (``first_stage_model.``): ``encoder.down.{i}.block.{j}``, ``decoder.up.{3-i}`` (reversed),
``mid.block_{1,2}``, ``mid.attn_1`` with 1x1-convolution q/k/v/proj_out, ``nin_shortcut``, ``norm_out``.
Text encoder: SD 1 keeps Hugging Face CLIP under ``cond_stage_model.transformer.text_model.``; SD 2
stores OpenCLIP under ``cond_stage_model.model.`` (fused q/k/v ``in_proj``, one more resblock than
the penultimate-layer encoder uses, ``text_projection``).
SDXL (SGM layout, ``write_sdxl_checkpoint``): the same UNet names over three levels plus the added
embedding ``label_emb.0.{0,2}``; CLIP ViT-L under ``conditioner.embedders.0.transformer.text_model.``,
OpenCLIP bigG under ``conditioner.embedders.1.model.`` (all its blocks used, ``text_projection``
stored as ``x @ P``: the transpose of transformers' ``text_projection.weight``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _weights(folder: Path, part: str) -> Dict[str, torch.Tensor]:
    files = sorted((folder / part).glob("*.safetensors"))
    return {k.removeprefix("text_model."): v for k, v in load_file(str(files[0])).items()}


def unet_to_ldm(weights: Dict[str, torch.Tensor], levels: int = 4, layers: int = 2) -> Dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel names -> ``model.diffusion_model.*``."""
    out = {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for name, value in weights.items():
        parts = name.split(".")
        module, leaf = ".".join(parts[:-1]), parts[-1]
        if module in fixed:
            new = f"{fixed[module]}.{leaf}"
        elif parts[0] == "down_blocks":
            level, kind, index = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{3 * level + 3}.0.op.{parts[-1]}"
            else:
                block = 3 * level + index + 1
                new = f"input_blocks.{block}.{0 if kind == 'resnets' else 1}.{_resnet(rest, kind)}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * index if kind == 'resnets' else 1}.{_resnet(rest, kind)}"
        elif parts[0] == "up_blocks":
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "upsamplers":
                has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in weights)
                new = f"output_blocks.{3 * level + layers}.{2 if has_attention else 1}.conv.{parts[-1]}"
            else:
                new = f"output_blocks.{3 * level + index}.{0 if kind == 'resnets' else 1}.{_resnet(rest, kind)}"
        else:
            raise KeyError(f"unmapped UNet weight {name}")
        out["model.diffusion_model." + new] = value
    return out


def _resnet(rest: str, kind: str) -> str:
    if kind != "resnets":
        return rest   # transformer blocks keep their names
    module, leaf = rest.rsplit(".", 1)
    return f"{RESNET[module]}.{leaf}"


def vae_to_ldm(weights: Dict[str, torch.Tensor], levels: int = 4) -> Dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> ``first_stage_model.*`` (attention linears as 1x1 convolutions)."""
    out = {}
    for name, value in weights.items():
        parts = name.split(".")
        side, leaf = parts[0], parts[-1]
        if side in ("quant_conv", "post_quant_conv"):
            new = name
        elif parts[1] in ("conv_in", "conv_out"):
            new = name
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{leaf}"
        elif parts[1] == "mid_block":
            kind, index, module = parts[2], int(parts[3]), ".".join(parts[4:-1])
            if kind == "resnets":
                new = f"{side}.mid.block_{index + 1}.{_vae_resnet(module)}.{leaf}"
            else:
                new = f"{side}.mid.attn_1.{VAE_ATTENTION[module]}.{leaf}"
                if value.dim() == 2:
                    value = value[:, :, None, None]
        elif parts[1] in ("down_blocks", "up_blocks"):
            level, kind = int(parts[2]), parts[3]
            ldm_level = level if side == "encoder" else levels - 1 - level
            group = "down" if side == "encoder" else "up"
            if kind in ("downsamplers", "upsamplers"):
                new = f"{side}.{group}.{ldm_level}.{kind[:-2]}.conv.{leaf}"
            else:
                index, module = int(parts[4]), ".".join(parts[5:-1])
                new = f"{side}.{group}.{ldm_level}.block.{index}.{_vae_resnet(module)}.{leaf}"
        else:
            raise KeyError(f"unmapped VAE weight {name}")
        out["first_stage_model." + new] = value
    return out


def _vae_resnet(module: str) -> str:
    return "nin_shortcut" if module == "conv_shortcut" else module


def clip_to_ldm(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """SD 1 layout: Hugging Face CLIP under ``cond_stage_model.transformer.text_model.``."""
    return {f"cond_stage_model.transformer.text_model.{k}": v for k, v in weights.items()}


def open_clip_to_ldm(weights: Dict[str, torch.Tensor], prefix: str = "cond_stage_model.model.",
                     extra_block: bool = True) -> Dict[str, torch.Tensor]:
    """SD 2 layout: OpenCLIP, with one extra (unused) final resblock and a text projection (SDXL's
    bigG: ``extra_block`` False, the projection from ``text_projection.weight``)."""
    out = {prefix + "token_embedding.weight": weights["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": weights["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": weights["final_layer_norm.weight"],
           prefix + "ln_final.bias": weights["final_layer_norm.bias"]}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers."))
    for index in range(layers + int(extra_block)):
        source = min(index, layers - 1)   # the extra last block: a copy, never used by SD 2
        block = f"{prefix}transformer.resblocks.{index}."
        scale = 1.0 if index < layers else -3.0   # distinct values: using it would change the output
        for kind in ("weight", "bias"):
            qkv = [weights[f"encoder.layers.{source}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv) * scale
            for ours, theirs in renames.items():
                out[f"{block}{theirs}.{kind}"] = weights[f"encoder.layers.{source}.{ours}.{kind}"] * scale
    width = weights["final_layer_norm.weight"].shape[0]
    projection = weights.get("text_projection.weight")
    out[prefix + "text_projection"] = torch.eye(width) if projection is None else projection.T
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def write_ldm_checkpoint(folder: Path, path: Path, *, text: str = "open_clip", extra: Optional[dict] = None,
                         metadata: Optional[Dict[str, str]] = None) -> Path:
    """The diffusers model in ``folder`` as one LDM-layout safetensors file at ``path``.
    ``text``: "open_clip" (SD 2) or "clip" (SD 1); ``extra``: more tensors to store."""
    folder = Path(folder)
    levels = len(json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"])
    state = {**unet_to_ldm(_weights(folder, "unet"), levels=levels), **vae_to_ldm(_weights(folder, "vae")),
             **(open_clip_to_ldm if text == "open_clip" else clip_to_ldm)(_weights(folder, "text_encoder"))}
    state.update(extra or {})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return Path(path)


def write_sdxl_checkpoint(folder: Path, path: Path, *, extra: Optional[dict] = None) -> Path:
    """The diffusers SDXL model in ``folder`` as one SGM-layout safetensors file at ``path``."""
    folder = Path(folder)
    state = {**unet_to_ldm(_weights(folder, "unet"), levels=3), **vae_to_ldm(_weights(folder, "vae")),
             **{f"conditioner.embedders.0.transformer.text_model.{k}": v
                for k, v in _weights(folder, "text_encoder").items()},
             **open_clip_to_ldm(_weights(folder, "text_encoder_2"), "conditioner.embedders.1.model.", False)}
    state.update(extra or {})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
