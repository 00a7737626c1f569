"""The real Stable Diffusion architectures (1.5, 2.x-base and XL base 1.0) as configs, and weightless models of them.

Two users: the benchmark builds random-weight models of these shapes (``tokenflow.benchmark.
architectures``), and ``tokenflow edit --plan`` plans a named version whose weights are not on
this machine from its architecture alone (``meta_model``: every parameter on the ``meta`` device,
so the weights' size and the layers' shapes are known and nothing is allocated or downloaded).

* UNet: SD 2.x-base (``block_out_channels`` 320/640/1280/1280, head counts 5/10/20/20, i.e. head
  dim 64, cross-attention dim 1024, linear projections) or SD 1.5 (8 heads, cross-attention dim
  768, 1x1 convolution projections): latents ``[N, 4, H/8, W/8]``.
* VAE: ``AutoencoderKL``, 128/256/512/512 channels, 4 latent channels, scale 0.18215.
* Text encoder: CLIP ViT-L/14's (SD 1.5: 12 layers of 768) or OpenCLIP ViT-H/14's as SD 2.x
  ships it (23 layers of 1024): ``[1, 77, 768]`` / ``[1, 77, 1024]``.

* SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0's published configs): UNet with three
  levels 320/640/1280, attention at the last two only, 1/2/10 transformer blocks per attention
  (70 ``attn1``), head dim 64 (5/10/20 heads), cross-attention dim 2048, the added text/time
  embedding (256 per time id, 2816 = 1280 pooled + 6 x 256 in); latents ``[N, 4, H/8, W/8]``
  (128 x 128 at 1024^2); SD's VAE layout with scale 0.13025 and ``force_upcast`` (float32 under a
  16-bit dtype, as ``models.load`` keeps it); text encoders CLIP ViT-L (12 layers of 768,
  quick_gelu) and OpenCLIP bigG (``CLIPTextModelWithProjection``: 32 layers of 1280, 20 heads,
  gelu, projection 1280): text rows ``[1, 78, 2048]`` (``models.text``).

SD 2.0-base and 2.1-base share one architecture (2.1 is 2.0 fine-tuned). SD 2-depth is SD 2-base
with a 5-channel UNet input (latents and a depth map: ``[N, 5, H/8, W/8]``), otherwise the same.

ControlNets a plan cannot load (``controlnet_stand_ins``) stand in with their ``config.json`` when it is
on this machine (a folder, or the Hugging Face cache), else with the shape ``ControlNetModel.from_unet``
gives the model's UNet (what every SD 1.5 / 2.1 ControlNet has), on the ``meta`` device.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tokenflow.config import SD_VERSIONS
from tokenflow.models.hf import quiet_hf_libraries
from tokenflow.models.layouts import SD_UNET_LAYOUT, SD_VAE_LAYOUT, SDXL_UNET_LAYOUT, SDXL_VAE_LAYOUT
from tokenflow.models.load import COMPONENTS, HUB_ALLOW_PATTERNS, SDModel

_SD_UNET_COMMON = dict(SD_UNET_LAYOUT, sample_size=64, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32)

# diffusers' legacy ``attention_head_dim`` holds the number of heads for SD 1.x / 2.x
SD15_UNET = dict(_SD_UNET_COMMON, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False)
SD21_UNET = dict(_SD_UNET_COMMON, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True)
SD2_DEPTH_UNET = dict(SD21_UNET, in_channels=5)

SD_VAE = dict(SD_VAE_LAYOUT, sample_size=512, block_out_channels=(128, 256, 512, 512), norm_num_groups=32)

SDXL_UNET = dict(SDXL_UNET_LAYOUT, sample_size=128, block_out_channels=(320, 640, 1280), norm_num_groups=32,
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(SDXL_VAE_LAYOUT, sample_size=1024, block_out_channels=(128, 256, 512, 512), norm_num_groups=32)

# (UNet config, text hidden size, text heads, text activation)
ARCHITECTURES: Dict[str, tuple] = {
    "sd15": (SD15_UNET, 768, 12, "quick_gelu"),
    "sd21": (SD21_UNET, 1024, 16, "gelu"),
    "sd2-depth": (SD2_DEPTH_UNET, 1024, 16, "gelu"),
    "sdxl": (SDXL_UNET, 768, 12, "quick_gelu"),   # its first text encoder; the second: TEXT_ENCODERS_2
}
# each architecture's VAE config (SD's unless listed)
VAES = {"sdxl": SDXL_VAE}
# SDXL's second text encoder (OpenCLIP bigG, CLIPTextModelWithProjection): (hidden, heads, layers, projection, act)
TEXT_ENCODERS_2 = {"sdxl": (1280, 20, 32, 1280, "gelu")}
# the released text encoders: (layers, projection dim); vocabulary and positions are CLIP's
TEXT_ENCODERS = {"sd15": (12, 768), "sd21": (23, 512), "sd2-depth": (23, 512), "sdxl": (12, 768)}
CLIP_VOCAB, CLIP_POSITIONS = 49408, 77
# what each named version is, by its short name and its Hub id
NAMES = {"1.5": ("sd15", "SD 1.5"), "2.0": ("sd21", "SD 2.0-base"), "2.1": ("sd21", "SD 2.1-base"),
         "2-depth": ("sd2-depth", "SD 2-depth"), "xl": ("sdxl", "SDXL base 1.0")}


def architecture_of(model: str) -> Optional[tuple]:
    """(architecture, human name) of a named SD version (``1.5``/``2.0``/``2.1``/``xl`` or its Hub id), else None."""
    model = str(model).strip()
    for short, repo in SD_VERSIONS.items():
        if model in (short, repo) and short in NAMES:
            return NAMES[short]
    return None


def meta_model(arch: str, name: str, device: torch.device, dtype: torch.dtype) -> SDModel:
    """An ``SDModel`` of ``arch`` ("sd15"/"sd21"/"sd2-depth"/"sdxl") whose weights are all on the ``meta``
    device: sizes and shapes only. ``device``/``dtype`` are what the plan is for; its modules cannot
    run. SDXL: both text encoders, and the VAE in float32 under a 16-bit dtype (``vae_upcast``, as
    ``models.load`` keeps its ``force_upcast`` VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415  start-up time (as models.load)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415  start-up time

    from tokenflow.models.random_weights import scheduler_config  # noqa: PLC0415  imports diffusers

    unet_config, hidden, heads, act = ARCHITECTURES[arch]
    layers, projection = TEXT_ENCODERS[arch]
    vae_config = VAES.get(arch, SD_VAE)
    upcast = bool(vae_config.get("force_upcast")) and arch in TEXT_ENCODERS_2 and dtype != torch.float32
    second = None
    with torch.device("meta"), quiet_hf_libraries():
        unet = UNet2DConditionModel(**unet_config).to(dtype)
        vae = AutoencoderKL(**vae_config).to(torch.float32 if upcast else dtype)
        text_encoder = CLIPTextModel(text_config(hidden, heads, layers, projection, act)).to(dtype)
        if arch in TEXT_ENCODERS_2:
            second = CLIPTextModelWithProjection(text_config(*TEXT_ENCODERS_2[arch])).to(dtype)
    return SDModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=None,
                   scheduler_config=scheduler_config(), name=name, identity=f"architecture:{arch}",
                   is_tiny=False, device=torch.device(device), dtype=dtype,
                   vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
                   scaling_factor=float(vae_config["scaling_factor"]), weights_loaded=False,
                   text_encoder_2=second, force_zeros_for_empty_prompt=second is not None, vae_upcast=upcast)


def text_config(hidden: int, heads: int, layers: int, projection: int, act: str):
    """A ``CLIPTextConfig`` of CLIP's vocabulary and 77 positions at these sizes (feed-forward 4 x hidden)."""
    from transformers import CLIPTextConfig  # noqa: PLC0415  start-up time

    return CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
                          projection_dim=projection, num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=CLIP_POSITIONS, hidden_act=act)


def weights_on_disk(model: str) -> bool:
    """Whether a named version's weights are already in the local Hugging Face cache (no network)."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415  start-up time

    repo = SD_VERSIONS.get(str(model).strip(), str(model).strip())
    try:
        folder = snapshot_download(repo, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True)
    except Exception:   # not cached (LocalEntryNotFoundError), or a cache we cannot read
        return False
    root = Path(folder)
    return all((root / c).is_dir() for c in COMPONENTS) and any((root / "unet").glob("*.safetensors"))


def controlnet_model(spec: str) -> str:
    """The model part of a ``--controlnet MODEL[:SCALE]`` value."""
    model, sep, scale = str(spec).rpartition(":")
    try:
        float(scale)
    except ValueError:
        return str(spec)
    return model if sep and model else str(spec)


def _local_controlnet_config(model: str) -> Optional[dict]:
    """A ControlNet's ``config.json`` found on this machine without downloading: a folder's, or the
    Hugging Face cache's for a Hub id; None for a single file or a model not here."""
    path = Path(model).expanduser()
    found = path / "config.json" if path.is_dir() else None
    if found is None and not path.exists() and model.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415  start-up time

            cached = try_to_load_from_cache(model, "config.json")
            found = Path(cached) if isinstance(cached, str) else None
        except Exception:   # an id the hub library refuses: no config here
            found = None
    if found is None or not found.is_file():
        return None
    try:
        config = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("_class_name", "ControlNetModel") == "ControlNetModel" \
        else None


def controlnet_from_unet_config(unet) -> dict:
    """The config ``ControlNetModel.from_unet(unet)`` gives, with the UNet's latent channels as its
    input (a depth UNet's fifth channel is no ControlNet input)."""
    from diffusers import ControlNetModel  # noqa: PLC0415  start-up time

    with torch.device("meta"), quiet_hf_libraries():
        net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    config["in_channels"] = int(unet.config.out_channels)
    return config


def controlnet_stand_ins(specs: Sequence[str], unet, dtype: torch.dtype) -> Tuple[List[torch.nn.Module], str]:
    """Weightless (``meta``) ControlNets of the shapes the ``--controlnet`` values ``specs`` will
    load, for a memory plan made before they load; and a note of where each shape came from."""
    from diffusers import ControlNetModel  # noqa: PLC0415  start-up time

    nets, sources = [], []
    fallback = None
    for spec in specs:
        config = _local_controlnet_config(controlnet_model(spec))
        if config is None:
            fallback = fallback or controlnet_from_unet_config(unet)
        try:
            with torch.device("meta"), quiet_hf_libraries():
                net = ControlNetModel.from_config(config or fallback).to(dtype)
        except Exception:   # a config diffusers cannot build: the loader will say so; plan the usual shape
            fallback = fallback or controlnet_from_unet_config(unet)
            config = None
            with torch.device("meta"), quiet_hf_libraries():
                net = ControlNetModel.from_config(fallback).to(dtype)
        nets.append(net)
        sources.append("its config" if config is not None else "the model's UNet's shape")
    counts = {s: sources.count(s) for s in dict.fromkeys(sources)}
    note = "planned from " + " and ".join(f"{s}" if len(sources) == 1 else f"{s} ({n})" for s, n in counts.items())
    return nets, note + ", not loaded"
