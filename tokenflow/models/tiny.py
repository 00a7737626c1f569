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
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from tokenflow.io.caches import default_cache_root
from tokenflow.io.outputs import atomic_path
from tokenflow.models.hf import quiet_hf_libraries
from tokenflow.models.layouts import SD_UNET_LAYOUT, SD_VAE_LAYOUT

# Bump whenever the architecture, the weight recipe or the folder layout changes:
# cached folders carry it in their name and marker, so stale ones are rebuilt.
RECIPE = 1
KIND = "tiny-sd21"
MARKER_NAME = "tokenflow_tiny.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

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


def marker(seed: int) -> dict:
    """The contents of ``MARKER_NAME``: what the folder is (written last: its presence means complete)."""
    return {"kind": KIND, "seed": seed, "recipe": RECIPE, "note": "random weights: outputs are not real edits"}


def read_marker(folder: Path) -> Optional[dict]:
    """The tiny-model marker of ``folder``, or None when absent or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_pipeline(folder: Path, seed: int) -> None:
    """Write the complete pipeline folder (marker last) into an existing empty ``folder``."""
    import diffusers  # noqa: PLC0415  start-up time: models.load imports this module; diffusers loads only to build
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415  (as above)

    from tokenflow.models import random_weights  # noqa: PLC0415  (as above: it imports diffusers and transformers)

    random_weights.write_tokenizer(folder / "tokenizer")
    random_weights.write_scheduler(folder / "scheduler")
    unet = random_weights.build_random(lambda: UNet2DConditionModel(**UNET_CONFIG), seed, "unet")
    vae = random_weights.build_random(lambda: AutoencoderKL(**VAE_CONFIG), seed, "vae")
    text_encoder = random_weights.clip_text_encoder(seed, "text_encoder", **TEXT_ENCODER)
    for component, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        model.eval().save_pretrained(folder / component, safe_serialization=True)
    random_weights.write_json(folder / "model_index.json", {"_diffusers_version": diffusers.__version__, **MODEL_INDEX})
    random_weights.write_json(folder / MARKER_NAME, marker(seed))


# ----------------------------------------------------------------------------- public API


def build_tiny_model(folder: Union[str, os.PathLike], seed: int = 0) -> Path:
    """Build the tiny pipeline into ``folder`` (replacing it) and return its path.

    The folder is written under a temporary sibling name and swapped into place
    (``io.outputs.atomic_path``), so readers never see a half-written model: if the marker is
    there, the folder is complete. Two processes building it at once both leave a complete one.
    """
    folder = Path(folder).expanduser().absolute()
    with atomic_path(folder, make_parents=True) as staging:
        staging.mkdir()
        with quiet_hf_libraries():
            write_pipeline(staging, seed)
    return folder


def tiny_model_dir(seed: int = 0, root: Union[str, os.PathLike, None] = None) -> Path:
    """Path of the cached tiny model for ``seed``; built on first use, reused afterwards."""
    root = Path(root).expanduser() if root is not None else default_cache_root() / "models"
    folder = root / f"{KIND}-seed{seed}-r{RECIPE}"
    if not is_tiny_model_dir(folder, seed):
        build_tiny_model(folder, seed)
    return folder


def is_tiny_model_dir(folder: Union[str, os.PathLike], seed: Optional[int] = None) -> bool:
    """True if ``folder`` holds a complete tiny model of the current recipe (and ``seed``)."""
    marker = read_marker(Path(folder))
    if marker is None or marker.get("kind") != KIND or marker.get("recipe") != RECIPE:
        return False
    if seed is not None and marker.get("seed") != seed:
        return False
    return all((Path(folder) / component).is_dir() for component in COMPONENTS)


def tiny_identity(seed: int) -> str:
    """Cache-key fingerprint of the tiny model: fully determined by seed and recipe."""
    return f"{KIND}:seed{seed}:r{RECIPE}"
