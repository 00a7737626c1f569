"""Stable Diffusion 1.5 / 2.1-base / XL base 1.0 architectures with random weights, built in memory (the
configs live in ``tokenflow.models.architectures``, which ``--plan`` shares).

A throughput benchmark needs the real layer shapes, not the real weights: the cost of a UNet
call depends on channels, tokens and batch, never on the values. ``build_model("sd21", ...)``
returns a ``tokenflow.models.load.SDModel`` with

* the UNet of SD 2.1-base (``block_out_channels`` 320/640/1280/1280, head counts 5/10/20/20
  i.e. head dim 64, cross-attention dim 1024, linear projections) or SD 1.5 (8 heads,
  cross-attention dim 768, 1x1 convolution projections): latents ``[N, 4, H/8, W/8]``;
* the SD VAE (``AutoencoderKL``, 128/256/512/512 channels, 4 latent channels, scale 0.18215);
* a CLIP text encoder of the right width (768 / 1024) but one layer: prompts give
  ``[1, 77, 768]`` / ``[1, 77, 1024]``; its cost is negligible next to the UNet's in any case;
* the byte-level tokenizer and SD's DDIM scheduler config of ``tokenflow.models.random_weights``.

Weights follow the one random-weight recipe of ``tokenflow.models.random_weights`` (the tiny
model's): UNet and VAE are constructed on the ``meta`` device and materialised directly on the
target device in the target dtype (no multi-GB host copy), every parameter drawn on the device
from a generator seeded by its name; norms near 1, other weights U(+-1/sqrt(fan_in)), which keeps
activations O(1) through the residual stacks, so float16 runs stay finite. Outputs are noise:
these models time edits, nothing else.

``"sdxl"`` is SDXL base 1.0's UNet (70 transformer blocks, the added text/time embedding) and
VAE (kept float32 under a 16-bit dtype: ``force_upcast``, as ``models.load`` does), with both text
encoders at their real widths (768, and 1280 with a 1280 projection) but one layer each: text rows
``[1, 78, 2048]`` (``models.text``).

``"sd2-depth"`` is SD 2.1-base's shapes with SD 2-depth's 5-channel UNet input (the benchmark
supplies depth maps: ``benchmark.conditions``); ``"tiny-depth"`` the tiny model with a random
5-channel UNet of the tiny widths, built in memory.

``"tiny"`` is ``tokenflow.models.load.load_model("tiny")``; any other string (a folder, a Hub id, an
SD version) is loaded with ``load_model`` as well, i.e. real weights.
"""
from __future__ import annotations

import dataclasses

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from tokenflow.errors import ConfigError
from tokenflow.models.architectures import ARCHITECTURES, SD_VAE, TEXT_ENCODERS_2, VAES
from tokenflow.models.hf import quiet_hf_libraries
from tokenflow.models.load import SDModel, load_model, move_to_device
from tokenflow.models.random_weights import build_random, clip_text_encoder, load_tokenizer, scheduler_config
from tokenflow.models.tiny import UNET_CONFIG

ARCH_CHOICES = ("sd15", "sd21", "sd2-depth", "sdxl", "tiny", "tiny-depth")
TEXT_LAYERS = 1
SEED = 0   # random_weights seed of every architecture (values never matter here, only reproducibility)


def build_model(arch: str, device: torch.device, dtype: torch.dtype) -> SDModel:
    """``"sd15"`` / ``"sd21"`` / ``"sd2-depth"`` / ``"sdxl"``: random-weight model on ``device`` in ``dtype``;
    ``"tiny"``: the tiny offline model; ``"tiny-depth"``: it with a random 5-channel UNet."""
    device = torch.device(device)
    if arch == "tiny":
        return load_model("tiny", device, dtype)
    if arch == "tiny-depth":
        tiny = load_model("tiny", device, dtype)
        with quiet_hf_libraries():
            unet = build_random(lambda: UNet2DConditionModel(**dict(UNET_CONFIG, in_channels=5)), SEED,
                                "tiny-depth/unet", device=device, dtype=dtype)
        return dataclasses.replace(tiny, unet=unet.eval().requires_grad_(False), name="bench-random:tiny-depth",
                                   identity="bench-random:tiny-depth")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_CHOICES)}")
    unet_config = ARCHITECTURES[arch][0]
    vae_config = VAES.get(arch, SD_VAE)
    xl = arch in TEXT_ENCODERS_2
    upcast = xl and bool(vae_config.get("force_upcast")) and dtype != torch.float32
    with quiet_hf_libraries():
        unet = build_random(lambda: UNet2DConditionModel(**unet_config), SEED, f"{arch}/unet", device=device, dtype=dtype)
        vae = build_random(lambda: AutoencoderKL(**vae_config), SEED, f"{arch}/vae", device=device,
                           dtype=torch.float32 if upcast else dtype)
        tokenizer = load_tokenizer()
        encoders = [build_text_encoder(arch)] + ([build_text_encoder_2(arch)] if xl else [])
    encoders = move_to_device([e.to(dtype) for e in encoders], device, dtype, f"bench-random:{arch}")
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return SDModel(unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
                   scheduler_config=scheduler_config(), name=f"bench-random:{arch}",
                   identity=f"bench-random:{arch}", is_tiny=False, device=device, dtype=dtype,
                   vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
                   scaling_factor=float(vae_config["scaling_factor"]),
                   text_encoder_2=encoders[1] if xl else None, tokenizer_2=load_tokenizer() if xl else None,
                   force_zeros_for_empty_prompt=xl, vae_upcast=upcast, vae_name="the model's own" if xl else "")


def load(model: str, device: torch.device, dtype: torch.dtype) -> SDModel:
    """A real model (``--model``): whatever ``tokenflow.models.load.load_model`` accepts."""
    return load_model(model, torch.device(device), dtype)


def build_text_encoder(arch: str):
    """The CLIP text encoder of ``arch``'s width with ``TEXT_LAYERS`` layer(s), random weights (CPU)."""
    _, hidden, heads, act = ARCHITECTURES[arch]
    return clip_text_encoder(SEED, f"{arch}/text_encoder", hidden=hidden, intermediate=4 * hidden,
                             layers=TEXT_LAYERS, heads=heads, act=act)


def build_text_encoder_2(arch: str):
    """SDXL's second text encoder (``CLIPTextModelWithProjection``) at its width and projection,
    ``TEXT_LAYERS`` layer(s), random weights (CPU)."""
    hidden, heads, _, projection, act = TEXT_ENCODERS_2[arch]
    return clip_text_encoder(SEED, f"{arch}/text_encoder_2", hidden=hidden, intermediate=4 * hidden,
                             layers=TEXT_LAYERS, heads=heads, act=act, projection=projection, with_projection=True)
