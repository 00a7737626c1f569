"""Which UNet layers play which TokenFlow role, derived from what the layers are, not from indices.

TokenFlow (and the Plug-and-Play injection it inherits) was written for the SD 1.x/2.x UNet; SDXL
has another layout (three levels instead of four, attention only at the two lowest resolutions,
2 or 10 transformer blocks per attention: 70 self-attention layers instead of 16). The roles:

* extended attention and propagation: every transformer self-attention (``attn1``), as the
  original does for SD (``engine.processors.self_attention_layers``);
* PnP Q/K injection: the decoder's self-attention layers except the first one (SD: the original's
  layers "4-11" of ``up_blocks[1..3]``); the same rule on SDXL's decoder (``up_blocks[0..1]``,
  36 layers) injects into 35 of them;
* PnP ResNet feature injection: the second ResNet of the decoder block that runs at 1/4 of the
  latent resolution (1/32 of the image): SD's ``up_blocks.1.resnets.1`` (16x16 latents at 512²),
  SDXL's ``up_blocks.0.resnets.1`` (32x32 latents at 1024²). Decoder block ``i`` of ``n`` runs at
  ``latent / 2**(n - 1 - i)`` (each block but the last upsamples by 2 at its end).
"""
from __future__ import annotations

from typing import Any

from tokenflow.errors import ModelError

PNP_QK_SKIP_FIRST_DECODER_LAYERS = 1
PNP_FEATURE_DOWNSAMPLING = 4   # the PnP ResNet runs at latent / 4 (image / 32)
PNP_FEATURE_RESNET_INDEX = 1   # its second ResNet


def pnp_feature_block(n_up_blocks: int) -> int:
    """Index of the decoder block at latent / ``PNP_FEATURE_DOWNSAMPLING``: 1 of SD's 4, 0 of SDXL's 3."""
    return n_up_blocks - 1 - (PNP_FEATURE_DOWNSAMPLING.bit_length() - 1)


def pnp_feature_resnet(unet: Any) -> str:
    """Module path of the ResNet whose residual features PnP injects (see the module docstring)."""
    block = pnp_feature_block(len(unet.up_blocks))
    return f"up_blocks.{block}.resnets.{PNP_FEATURE_RESNET_INDEX}"


def is_sdxl_unet(unet: Any) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def check_unet_layout(unet: Any, name: str) -> None:
    """Raise ModelError unless ``unet`` has a layout TokenFlow can hook into: SD 1.x/2.x's or SDXL's.

    SD 1.x/2.x: 4 input channels (or 5: 4 latent + 1 depth, SD 2 depth) and 4 output channels, 4 up
    blocks with 3 single-block transformers in each of ``up_blocks[1..3]`` and 16
    ``BasicTransformerBlock``s in total. SDXL (``addition_embed_type == "text_time"``): 4 channels in
    and out, 3 up blocks, attention in ``up_blocks[0..1]``, none in ``up_blocks[2]``. Both: the PnP
    ResNet (``pnp_feature_resnet``) exists.
    """
    from diffusers.models.attention import BasicTransformerBlock  # noqa: PLC0415  start-up time

    xl = is_sdxl_unet(unet)
    problems = []
    in_channels, out_channels = unet.config.in_channels, unet.config.out_channels
    allowed = (4,) if xl else (4, 5)
    if in_channels not in allowed:
        what = " (an inpainting model: not supported)" if in_channels == 9 else ""
        problems.append(f"{in_channels} input channels instead of 4" + ("" if xl else " (or 5 for a depth model: "
                                                                       "4 latent + 1 depth)") + what)
    if out_channels != 4:
        problems.append(f"{out_channels} output channels instead of 4")
    up_blocks = list(getattr(unet, "up_blocks", []))
    expected_up = 3 if xl else 4
    blocks = sum(isinstance(module, BasicTransformerBlock) for module in unet.modules())
    if len(up_blocks) != expected_up:
        problems.append(f"{len(up_blocks)} up blocks instead of {expected_up}")
    else:
        feature = pnp_feature_block(len(up_blocks))
        if len(getattr(up_blocks[feature], "resnets", [])) < 2:
            problems.append(f"no up_blocks[{feature}].resnets[1]")
        if xl:
            for index, wanted in ((0, True), (1, True), (2, False)):
                if bool(getattr(up_blocks[index], "attentions", None)) != wanted:
                    problems.append(f"up_blocks[{index}] {'has no' if wanted else 'has'} attention")
        else:
            for index in (1, 2, 3):
                attentions = list(getattr(up_blocks[index], "attentions", None) or [])
                sizes = [len(getattr(a, "transformer_blocks", [])) for a in attentions]
                if sizes != [1, 1, 1]:
                    problems.append(f"up_blocks[{index}] has {len(attentions)} attention modules "
                                    "instead of 3 with one transformer block each")
            if blocks != 16:
                problems.append(f"{blocks} transformer blocks instead of 16")
    if problems:
        family = "SDXL" if xl else "Stable Diffusion 1.x/2.x"
        raise ModelError(f"model '{name}' does not have the {family} UNet layout TokenFlow needs "
                         f"({'; '.join(problems)}); SD 3, Flux and other architectures are not supported")
