"""The original (LDM / SGM) module names of a diffusers UNet, as kohya/A1111 SDXL LoRAs spell them.

kohya's SDXL LoRAs name UNet layers after the original modules (``lora_unet_input_blocks_4_1_
transformer_blocks_0_attn1_to_q``), SD 1.x/2.x ones mostly after diffusers' (``lora_unet_down_blocks_
...``). ``ldm_module_names`` maps each diffusers module name to its original one, from the UNet
config alone (levels, ``layers_per_block``, which up levels have attention):

    down level i, layer j      input_blocks.{i*(L+1)+j+1}.{0: resnet | 1: transformer}
    its downsampler            input_blocks.{(i+1)*(L+1)}.0.op
    mid block                  middle_block.{0: resnet, 1: transformer, 2: resnet}
    up level i, layer j        output_blocks.{i*(L+1)+j}.{0 | 1}; upsampler .{2 | 1}.conv
    resnet parts               norm1 in_layers.0, conv1 in_layers.2, time_emb_proj emb_layers.1,
                               norm2 out_layers.0, conv2 out_layers.3, conv_shortcut skip_connection
    embeddings                 time_embed.{0,2}, label_emb.0.{0,2} (SDXL's added embedding), out.{0,2}

(L = ``layers_per_block``; an up level has L + 1 layers.) Transformer internals keep their names.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Optional

RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")


def ldm_module_names(names: Iterable[str], config) -> Dict[str, str]:
    """{diffusers module name: original module name} for the UNet modules ``names`` (its
    ``named_modules()`` names) of a UNet with ``config``; names without an original one are left out."""
    names = list(names)
    per_block = int(_get(config, "layers_per_block") or 2)
    up_with_attention = {int(n.split(".")[1]) for n in names if n.startswith("up_blocks.") and ".attentions." in n}
    out = {}
    for name in names:
        ldm = _ldm_name(name, per_block, up_with_attention)
        if ldm is not None:
            out[name] = ldm
    return out


def _ldm_name(name: str, per_block: int, up_with_attention: set) -> Optional[str]:
    if name in FIXED:
        return FIXED[name]
    if match := _MID.match(name):
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        block = f"middle_block.{2 * index}" if kind == "resnets" else "middle_block.1"
        return _join(block, _rest(rest, kind))
    match = _BLOCK.match(name)
    if match is None:
        return None
    side, level, kind, index, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
    if side == "down_blocks":
        if kind == "downsamplers":   # the conv itself is "op" (its container has no name of its own)
            if rest != "conv":
                return None
            return _join(f"input_blocks.{(level + 1) * (per_block + 1)}.0.op", None)
        block = f"input_blocks.{level * (per_block + 1) + index + 1}.{0 if kind == 'resnets' else 1}"
        return _join(block, _rest(rest, kind))
    if kind == "upsamplers":
        slot = 2 if level in up_with_attention else 1
        return _join(f"output_blocks.{level * (per_block + 1) + per_block}.{slot}", rest)
    block = f"output_blocks.{level * (per_block + 1) + index}.{0 if kind == 'resnets' else 1}"
    return _join(block, _rest(rest, kind))


def _rest(rest: Optional[str], kind: str) -> Optional[str]:
    if rest is None or kind != "resnets":
        return rest
    head, _, tail = rest.partition(".")
    return RESNET_PARTS.get(head, head) + (f".{tail}" if tail else "")


def _join(block: str, rest: Optional[str]) -> str:
    return f"{block}.{rest}" if rest else block


def _get(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)
