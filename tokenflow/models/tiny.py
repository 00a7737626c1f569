"""A tiny, randomly initialised Stable-Diffusion-2.1-base-shaped pipeline, built offline.

The folder is an ordinary diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, safetensors weights), so it goes through the
same ``from_pretrained`` code path as a real model. It keeps SD 2.1-base's block *structure*
(16 transformer blocks, the same module indices TokenFlow hooks into) with tiny widths:

* UNet: 128x128 frames -> latents ``[N, 4, 16, 16]``; cross-attention dim 32, head dim 16.
* VAE: spatial factor 8, 4 latent channels, scaling factor 0.18215.
* Text encoder: CLIP with hidden size 32 -> prompt embeddings ``[1, 77, 32]``.
* Tokenizer: byte-level CLIP vocabulary without merges (one token per character).

Weights are random but deterministic: every parameter is drawn from its own generator seeded
by ``sha256(seed, component, parameter name)``, so they depend neither on module construction
order nor on the diffusers / transformers version. Outputs are *not* real edits.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from tokenflow.io.cache import default_cache_root
from tokenflow.io.outputs import atomic_path
from tokenflow.models.hf import quiet_hf_libraries

# Bump whenever the architecture, the weight recipe or the folder layout changes:
# cached folders carry it in their name and marker, so stale ones are rebuilt.
RECIPE = 1
KIND = "tiny-sd21"
MARKER_NAME = "tokenflow_tiny.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

MAX_TOKENS = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"  # as in SD 2.x's tokenizer

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    only_cross_attention=False,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=8,
    norm_eps=1e-5,
    cross_attention_dim=32,
    # diffusers' legacy name: SD 2.1's config stores the number of heads here -> head dim 16
    attention_head_dim=(2, 2, 4, 4),
    use_linear_projection=True,
    upcast_attention=False,
    resnet_time_scale_shift="default",
)

VAE_CONFIG = dict(
    sample_size=128,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.18215,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

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


# ----------------------------------------------------------------------------- tokenizer


def clip_byte_alphabet() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for bytes, in CLIP's id order.

    Printable Latin-1 bytes map to themselves and come first (``!``..``~``, ``¡``..``¬``,
    ``®``..``ÿ``); the remaining bytes follow, mapped to code points 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def tokenizer_vocab() -> dict[str, int]:
    """Ids 0..255: byte tokens; 256..511: the same with ``</w>``; 512 BOS; 513 EOS."""
    alphabet = clip_byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer(folder: Path) -> int:
    """Write a CLIPTokenizer folder (vocab, empty merges, special tokens); return the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer_vocab()
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                      "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    tokenizer_config = {**special_tokens, "tokenizer_class": "CLIPTokenizer",
                        "model_max_length": MAX_TOKENS, "do_lower_case": True, "errors": "replace",
                        "add_prefix_space": False, "clean_up_tokenization_spaces": True}
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    _write_json(folder / "special_tokens_map.json", special_tokens)
    _write_json(folder / "tokenizer_config.json", tokenizer_config)
    return len(vocab)


# ----------------------------------------------------------------------------- weights


def parameter_seed(seed: int, component: str, name: str) -> int:
    """Stable 63-bit generator seed for one parameter (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def canonical_parameter_name(name: str) -> str:
    """transformers < 5 prefixes CLIPTextModel parameters with ``text_model.``; drop it."""
    return name.removeprefix("text_model.")


def fan_in(owner: nn.Module, parameter: torch.Tensor) -> int:
    """Inputs per output unit of the module owning ``parameter`` (its weight's row size)."""
    weight = getattr(owner, "weight", None)
    reference = weight if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else parameter
    return max(reference[0].numel() if reference.dim() >= 2 else reference.numel(), 1)


def draw_parameter(owner: nn.Module, leaf: str, parameter: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """New float64 values of one parameter: norms ~ 1 + 0.1 N / 0.1 N, others U(+-1/sqrt(fan_in))."""
    shape = parameter.shape
    if isinstance(owner, (nn.GroupNorm, nn.LayerNorm)):
        noise = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
        return 1.0 + noise if leaf == "weight" else noise
    bound = 1.0 / math.sqrt(fan_in(owner, parameter))
    return (2.0 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1.0) * bound


@torch.no_grad()
def randomize_weights_(model: nn.Module, seed: int, component: str) -> None:
    """Overwrite every parameter of ``model`` in place, each from its own seeded generator."""
    modules = dict(model.named_modules())
    for name, parameter in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        key = canonical_parameter_name(name)
        generator = torch.Generator().manual_seed(parameter_seed(seed, component, key))
        values = draw_parameter(modules[owner_name], leaf, parameter, generator)
        parameter.copy_(values.to(parameter.dtype))


# ----------------------------------------------------------------------------- components


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**UNET_CONFIG)
    randomize_weights_(unet, seed, "unet")
    return unet


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    randomize_weights_(vae, seed, "vae")
    return vae


def build_text_encoder(seed: int, vocab: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        pad_token_id=vocab[PAD_TOKEN],
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
    )
    text_encoder = CLIPTextModel(config)
    randomize_weights_(text_encoder, seed, "text_encoder")
    return text_encoder


def write_scheduler(folder: Path) -> None:
    from diffusers import DDIMScheduler

    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder)


def write_model_index(folder: Path) -> None:
    import diffusers

    _write_json(folder / "model_index.json",
                {"_diffusers_version": diffusers.__version__, **MODEL_INDEX})


def write_marker(folder: Path, seed: int) -> None:
    _write_json(folder / MARKER_NAME, {"kind": KIND, "seed": seed, "recipe": RECIPE,
                                       "note": "random weights: outputs are not real edits"})


def read_marker(folder: Path) -> Optional[dict]:
    """The tiny-model marker of ``folder``, or None when absent or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_pipeline(folder: Path, seed: int) -> None:
    """Write the complete pipeline folder (marker last) into an existing empty ``folder``."""
    write_tokenizer(folder / "tokenizer")
    vocab = tokenizer_vocab()
    write_scheduler(folder / "scheduler")
    for component, model in (("unet", build_unet(seed)), ("vae", build_vae(seed)),
                             ("text_encoder", build_text_encoder(seed, vocab))):
        model.eval().save_pretrained(folder / component, safe_serialization=True)
    write_model_index(folder)
    write_marker(folder, seed)


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


# ----------------------------------------------------------------------------- helpers


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

