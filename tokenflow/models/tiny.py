"""A tiny, randomly initialised Stable-Diffusion-2.1-base-shaped pipeline, built offline.

The folder is an ordinary diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, safetensors weights), so it goes through the
same ``from_pretrained`` code path as a real model. It keeps SD 2.1-base's block *structure*
(16 transformer blocks, the same module indices TokenFlow hooks into) with tiny widths:

* UNet: 128x128 frames -> latents ``[N, 4, 16, 16]``; cross-attention dim 32, head dim 16.
* VAE: spatial factor 8, 4 latent channels, scaling factor 0.18215.
* Text encoder: CLIP with hidden size 32 -> prompt embeddings ``[1, 77, 32]``.
* Tokenizer: byte-level CLIP vocabulary without merges (one token per character).

Weights, tokenizer and scheduler follow the one random-weight recipe of
``tokenflow.models.random_weights`` (the benchmark's full-size architectures use it too): random
but deterministic, every parameter drawn from its own generator seeded by
``sha256(seed, component, parameter name)``, so they depend neither on module construction order
nor on the diffusers / transformers version. Outputs are *not* real edits.

The depth variant (``--model tiny-depth[:SEED]``, ``depth=True``) has the layout of
stabilityai/stable-diffusion-2-depth: the same components with a UNet of 5 input channels (4 latent
+ 1 depth; ``conv_in`` ``[32,5,3,3]``, every other tensor equal to the plain tiny model's), a tiny
random ``DPTForDepthEstimation`` in ``depth_estimator/`` (ViT, hidden size 32, 4 layers, 32x32
input -> ``[N, 64, 64]`` depth) and its ``DPTImageProcessor`` in ``feature_extractor/``;
``model_index.json`` names ``StableDiffusionDepth2ImgPipeline``.

The SDXL variant (``--model tiny-xl[:SEED]``, ``xl=True``) has the layout of
stabilityai/stable-diffusion-xl-base-1.0 (``layouts.SDXL_UNET_LAYOUT``): three UNet levels, attention
at the last two with 2 and 10 transformer blocks per attention (70 self-attention layers, the real
count), the added text/time embedding, two text encoders (a ``CLIPTextModel`` and a
``CLIPTextModelWithProjection``, hidden size 32 each -> text rows ``[1, 77 + 1, 64]``, pooled 32)
and their tokenizers, and a VAE with SDXL's scaling factor and ``force_upcast``:

* UNet: 128x128 frames -> latents ``[N, 4, 16, 16]``, attention at 8x8 and 4x4 latents, head dim 16.
* ``model_index.json`` names ``StableDiffusionXLPipeline`` (``force_zeros_for_empty_prompt``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from tokenflow.io.caches import default_cache_root
from tokenflow.io.outputs import atomic_path
from tokenflow.models.hf import quiet_hf_libraries
from tokenflow.models.layouts import SD_UNET_LAYOUT, SD_VAE_LAYOUT, SDXL_UNET_LAYOUT, SDXL_VAE_LAYOUT

# Bump whenever the architecture, the weight recipe or the folder layout changes:
# cached folders carry it in their name and marker, so stale ones are rebuilt.
RECIPE = 1
KIND = "tiny-sd21"
DEPTH_KIND = "tiny-sd2-depth"
XL_KIND = "tiny-sdxl"
MARKER_NAME = "tokenflow_tiny.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEPTH_COMPONENTS = COMPONENTS + ("depth_estimator", "feature_extractor")
XL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")

UNET_CONFIG = dict(
    SD_UNET_LAYOUT,
    sample_size=16,
    block_out_channels=(32, 32, 64, 64),
    norm_num_groups=8,
    cross_attention_dim=32,
    # diffusers' legacy name: SD 2.1's config stores the number of heads here -> head dim 16
    attention_head_dim=(2, 2, 4, 4),
    use_linear_projection=True,
)

VAE_CONFIG = dict(SD_VAE_LAYOUT, sample_size=128, block_out_channels=(16, 32, 32, 32), norm_num_groups=8)

DEPTH_UNET_CONFIG = dict(UNET_CONFIG, in_channels=5)   # 4 latent channels + 1 depth channel; 4 out

# SDXL's layout, tiny widths: text rows are both encoders' hidden states (32 + 32), the added
# embedding takes the pooled text (32) and 6 time ids embedded with 8 channels each
XL_TIME_EMBED_DIM = 8
XL_UNET_CONFIG = dict(
    SDXL_UNET_LAYOUT,
    sample_size=16,
    block_out_channels=(32, 64, 64),
    norm_num_groups=8,
    cross_attention_dim=64,
    attention_head_dim=(2, 4, 4),   # heads per level (diffusers' legacy name, as SDXL's config) -> head dim 16
    addition_time_embed_dim=XL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=32 + 6 * XL_TIME_EMBED_DIM,
)
XL_VAE_CONFIG = dict(SDXL_VAE_LAYOUT, sample_size=128, block_out_channels=(16, 32, 32, 32), norm_num_groups=8)

# the tiny DPT (transformers DPTConfig; plain ViT backbone, 4 layers, all four feed the neck)
DPT_CONFIG = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                  image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3], is_hybrid=False,
                  neck_hidden_sizes=[8, 16, 32, 32], reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16)
DPT_PROCESSOR = dict(do_resize=True, size={"height": 32, "width": 32}, keep_aspect_ratio=False,
                     ensure_multiple_of=1, resample=3, do_rescale=True, rescale_factor=1 / 255,
                     do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

# CLIP text encoder widths (random_weights.clip_text_encoder): prompt embeddings [1, 77, 32]
TEXT_ENCODER = dict(hidden=32, intermediate=64, layers=2, heads=2, act="gelu")

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


XL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# like stabilityai/stable-diffusion-2-depth's (no safety checker in a depth2img pipeline)
DEPTH_MODEL_INDEX = {
    **{k: v for k, v in MODEL_INDEX.items() if k not in ("requires_safety_checker", "safety_checker")},
    "_class_name": "StableDiffusionDepth2ImgPipeline",
    "depth_estimator": ["transformers", "DPTForDepthEstimation"],
    "feature_extractor": ["transformers", "DPTImageProcessor"],
}


def kind_of(depth: bool, xl: bool = False) -> str:
    if depth and xl:
        raise ValueError("there is no tiny SDXL depth model")
    return DEPTH_KIND if depth else XL_KIND if xl else KIND


def components_of(depth: bool, xl: bool = False) -> tuple:
    return DEPTH_COMPONENTS if depth else XL_COMPONENTS if xl else COMPONENTS


def marker(seed: int, depth: bool = False, xl: bool = False) -> dict:
    """The contents of ``MARKER_NAME``: what the folder is (written last: its presence means complete)."""
    return {"kind": kind_of(depth, xl), "seed": seed, "recipe": RECIPE,
            "note": "random weights: outputs are not real edits"}


def read_marker(folder: Path) -> Optional[dict]:
    """The tiny-model marker of ``folder``, or None when absent or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_pipeline(folder: Path, seed: int, depth: bool = False, xl: bool = False) -> None:
    """Write the complete pipeline folder (marker last) into an existing empty ``folder``; ``depth``:
    the SD-2-depth layout (5-channel UNet, tiny DPT); ``xl``: SDXL's (module docstring)."""
    import diffusers  # noqa: PLC0415  start-up time: models.load imports this module; diffusers loads only to build
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415  (as above)

    from tokenflow.models import random_weights  # noqa: PLC0415  (as above: it imports diffusers and transformers)

    random_weights.write_tokenizer(folder / "tokenizer")
    random_weights.write_scheduler(folder / "scheduler")
    unet_config = DEPTH_UNET_CONFIG if depth else XL_UNET_CONFIG if xl else UNET_CONFIG
    unet = random_weights.build_random(lambda: UNet2DConditionModel(**unet_config), seed, "unet")
    vae = random_weights.build_random(lambda: AutoencoderKL(**(XL_VAE_CONFIG if xl else VAE_CONFIG)), seed, "vae")
    text_encoder = random_weights.clip_text_encoder(seed, "text_encoder", **TEXT_ENCODER)
    parts = [("unet", unet), ("vae", vae), ("text_encoder", text_encoder)]
    if xl:
        random_weights.write_tokenizer(folder / "tokenizer_2")
        parts.append(("text_encoder_2", random_weights.clip_text_encoder(seed, "text_encoder_2", **TEXT_ENCODER,
                                                                         with_projection=True)))
    for component, model in parts:
        model.eval().save_pretrained(folder / component, safe_serialization=True)
    if depth:
        write_depth_estimator(folder, seed)
    index = DEPTH_MODEL_INDEX if depth else XL_MODEL_INDEX if xl else MODEL_INDEX
    random_weights.write_json(folder / "model_index.json", {"_diffusers_version": diffusers.__version__, **index})
    random_weights.write_json(folder / MARKER_NAME, marker(seed, depth, xl))


def write_depth_estimator(folder: Path, seed: int) -> None:
    """The tiny random DPT into ``folder/depth_estimator`` and its processor into ``feature_extractor``."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor  # noqa: PLC0415  (as above)

    from tokenflow.models import random_weights  # noqa: PLC0415  (as above)

    dpt = random_weights.build_random(lambda: DPTForDepthEstimation(DPTConfig(**DPT_CONFIG)), seed, "depth_estimator")
    dpt.eval().save_pretrained(folder / "depth_estimator", safe_serialization=True)
    DPTImageProcessor(**DPT_PROCESSOR).save_pretrained(folder / "feature_extractor")


# ----------------------------------------------------------------------------- public API


def build_tiny_model(folder: Union[str, os.PathLike], seed: int = 0, depth: bool = False, xl: bool = False) -> Path:
    """Build the tiny pipeline (``depth``: the tiny SD-2-depth one; ``xl``: the tiny SDXL) into
    ``folder`` (replacing it) and return its path.

    The folder is written under a temporary sibling name and swapped into place
    (``io.outputs.atomic_path``), so readers never see a half-written model: if the marker is
    there, the folder is complete. Two processes building it at once both leave a complete one.
    """
    folder = Path(folder).expanduser().absolute()
    with atomic_path(folder, make_parents=True) as staging:
        staging.mkdir()
        with quiet_hf_libraries():
            write_pipeline(staging, seed, depth, xl)
    return folder


def tiny_model_dir(seed: int = 0, root: Union[str, os.PathLike, None] = None, depth: bool = False,
                   xl: bool = False) -> Path:
    """Path of the cached tiny model (``depth``: tiny-depth, ``xl``: tiny-xl) for ``seed``; built on
    first use, reused afterwards."""
    root = Path(root).expanduser() if root is not None else default_cache_root() / "models"
    folder = root / f"{kind_of(depth, xl)}-seed{seed}-r{RECIPE}"
    if not is_tiny_model_dir(folder, seed, depth, xl):
        build_tiny_model(folder, seed, depth, xl)
    return folder


def is_tiny_model_dir(folder: Union[str, os.PathLike], seed: Optional[int] = None, depth: bool = False,
                      xl: bool = False) -> bool:
    """True if ``folder`` holds a complete tiny model of the kind (``depth``, ``xl``) and current recipe (and ``seed``)."""
    marker = read_marker(Path(folder))
    if marker is None or marker.get("kind") != kind_of(depth, xl) or marker.get("recipe") != RECIPE:
        return False
    if seed is not None and marker.get("seed") != seed:
        return False
    return all((Path(folder) / component).is_dir() for component in components_of(depth, xl))


def tiny_identity(seed: int, depth: bool = False, xl: bool = False) -> str:
    """Cache-key fingerprint of the tiny model: fully determined by kind, seed and recipe."""
    return f"{kind_of(depth, xl)}:seed{seed}:r{RECIPE}"
