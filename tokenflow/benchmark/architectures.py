"""Stable Diffusion 1.5 / 2.1-base architectures with random weights, built in memory (the
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
from tokenflow.models.architectures import ARCHITECTURES, SD15_UNET, SD21_UNET, SD_VAE  # noqa: F401  (re-exported)
from tokenflow.models.hf import quiet_hf_libraries
from tokenflow.models.load import SDModel, load_model, move_to_device
from tokenflow.models.random_weights import build_random, clip_text_encoder, load_tokenizer, scheduler_config

ARCH_CHOICES = ("sd15", "sd21", "sd2-depth", "tiny", "tiny-depth")
TEXT_LAYERS = 1
SEED = 0   # random_weights seed of every architecture (values never matter here, only reproducibility)


def build_model(arch: str, device: torch.device, dtype: torch.dtype) -> SDModel:
    """``"sd15"`` / ``"sd21"`` / ``"sd2-depth"``: random-weight SD model on ``device`` in ``dtype``;
    ``"tiny"``: the tiny offline model; ``"tiny-depth"``: it with a random 5-channel UNet."""
    device = torch.device(device)
    if arch == "tiny":
        return load_model("tiny", device, dtype)
    if arch == "tiny-depth":
        from tokenflow.models.tiny import UNET_CONFIG  # noqa: PLC0415  (the tiny widths)

        tiny = load_model("tiny", device, dtype)
        with quiet_hf_libraries():
            unet = build_random(lambda: UNet2DConditionModel(**dict(UNET_CONFIG, in_channels=5)), SEED,
                                "tiny-depth/unet", device=device, dtype=dtype)
        return dataclasses.replace(tiny, unet=unet.eval().requires_grad_(False), name="bench-random:tiny-depth",
                                   identity="bench-random:tiny-depth")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_CHOICES)}")
    unet_config = ARCHITECTURES[arch][0]
    with quiet_hf_libraries():
        unet = build_random(lambda: UNet2DConditionModel(**unet_config), SEED, f"{arch}/unet", device=device, dtype=dtype)
        vae = build_random(lambda: AutoencoderKL(**SD_VAE), SEED, f"{arch}/vae", device=device, dtype=dtype)
        tokenizer = load_tokenizer()
        text_encoder = build_text_encoder(arch)
    (text_encoder,) = move_to_device([text_encoder.to(dtype)], device, dtype, f"bench-random:{arch}")
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return SDModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   scheduler_config=scheduler_config(), name=f"bench-random:{arch}",
                   identity=f"bench-random:{arch}", is_tiny=False, device=device, dtype=dtype,
                   vae_scale_factor=2 ** (len(SD_VAE["block_out_channels"]) - 1),
                   scaling_factor=float(SD_VAE["scaling_factor"]))


def load(model: str, device: torch.device, dtype: torch.dtype) -> SDModel:
    """A real model (``--model``): whatever ``tokenflow.models.load.load_model`` accepts."""
    return load_model(model, torch.device(device), dtype)


def build_text_encoder(arch: str):
    """The CLIP text encoder of ``arch``'s width with ``TEXT_LAYERS`` layer(s), random weights (CPU)."""
    _, hidden, heads, act = ARCHITECTURES[arch]
    return clip_text_encoder(SEED, f"{arch}/text_encoder", hidden=hidden, intermediate=4 * hidden,
                             layers=TEXT_LAYERS, heads=heads, act=act)
