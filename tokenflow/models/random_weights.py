"""Random-weight Stable Diffusion components: the one recipe for weights, tokenizer and scheduler.

Two users: the tiny offline model (``models.tiny``: SD 2.1-base's structure with tiny widths,
saved as an ordinary pipeline folder) and the benchmark's full-size architectures
(``benchmark.architectures``: SD 1.5 / 2.1-base shapes, built in memory on the target device).

Weights (``randomize_weights_``): every parameter is drawn from its own generator seeded by
``sha256(seed, component, parameter name)``, so values depend neither on module construction
order nor on the diffusers / transformers version:

    GroupNorm / LayerNorm   weight 1 + 0.1 N(0, 1), bias 0.1 N(0, 1)
    everything else         U(-1/sqrt(fan_in), 1/sqrt(fan_in))   (fan_in: the owner's weight row size)

drawn in float64 on the parameter's device (float32 where the device has no float64: MPS) and
cast to the parameter's dtype. On the CPU that is bit for bit what the tiny model has always been
built from. The bound keeps activations O(1) through the residual stacks, so float16 stays finite.
``build_random`` constructs a module and fills it; for a large one it builds on ``meta`` and
allocates it directly on the device (no multi-GB host copy).

Tokenizer (``write_tokenizer`` / ``load_tokenizer``): CLIP's byte-level vocabulary without merges
(one token per character), 77 tokens. Scheduler (``SCHEDULER_CONFIG``): SD's DDIM settings.
Text encoder (``clip_text_encoder``): a CLIP text model of any width sized for that vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"  # as in SD 2.x's tokenizer

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
    """New values of one parameter (see the module docstring), on the parameter's device."""
    shape, device = parameter.shape, parameter.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    if isinstance(owner, (nn.GroupNorm, nn.LayerNorm)):
        noise = 0.1 * torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return 1.0 + noise if leaf == "weight" else noise
    bound = 1.0 / math.sqrt(fan_in(owner, parameter))
    return (2.0 * torch.rand(shape, generator=generator, dtype=dtype, device=device) - 1.0) * bound


@torch.no_grad()
def randomize_weights_(model: nn.Module, seed: int, component: str) -> None:
    """Overwrite every parameter of ``model`` in place, each from its own seeded generator."""
    modules = dict(model.named_modules())
    for name, parameter in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        key = canonical_parameter_name(name)
        generator = torch.Generator(device=parameter.device).manual_seed(parameter_seed(seed, component, key))
        values = draw_parameter(modules[owner_name], leaf, parameter, generator)
        parameter.copy_(values.to(parameter.dtype))


def build_random(factory: Callable[[], nn.Module], seed: int, component: str, *,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``factory()`` with weights from ``randomize_weights_``, built without touching the caller's
    global RNG (default initialisers draw from it).

    Without ``device``: built on the CPU in float32. With it: built on ``meta`` and allocated
    directly on ``device`` in ``dtype`` (no host copy of a multi-GB model); modules with buffers
    cannot be built that way (``to_empty`` would leave their values undefined)."""
    if device is None:
        with torch.random.fork_rng(devices=[]):
            module = factory()
    else:
        with torch.device("meta"):
            module = factory()
        if any(True for _ in module.buffers()):   # none in diffusers' UNet / VAE
            raise RuntimeError(f"{component}: modules with buffers cannot be built on meta")
        module = module.to(dtype=dtype).to_empty(device=device)
    randomize_weights_(module, seed, component)
    return module


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
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    write_json(folder / "special_tokens_map.json", special_tokens)
    write_json(folder / "tokenizer_config.json", tokenizer_config)
    return len(vocab)


def load_tokenizer() -> CLIPTokenizer:
    """The byte-level tokenizer in memory (written to a temp folder and loaded from there)."""
    with tempfile.TemporaryDirectory(prefix="tokenflow-tokenizer-") as folder:
        write_tokenizer(Path(folder))
        return CLIPTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------- text encoder, scheduler


def clip_text_encoder(seed: int, component: str, *, hidden: int, intermediate: int, layers: int, heads: int,
                      act: str = "gelu", projection: int = 0, with_projection: bool = False) -> CLIPTextModel:
    """A CLIP text encoder for the byte-level vocabulary (CPU, float32) with random weights;
    ``with_projection``: a ``CLIPTextModelWithProjection`` (SDXL's second encoder: pooled, projected)."""
    vocab = tokenizer_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate,
        projection_dim=projection or hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=act,
        layer_norm_eps=1e-5,
        pad_token_id=vocab[PAD_TOKEN],
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    text_encoder = build_random(lambda: model_class(config), seed, component)
    return text_encoder


def scheduler_config() -> dict:
    """SD's DDIM config with every field diffusers fills in (what ``write_scheduler`` saves)."""
    return dict(DDIMScheduler(**SCHEDULER_CONFIG).config)


def write_scheduler(folder: Path) -> None:
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder)


def write_json(path: Path, content: dict) -> None:
    """A JSON file of a model folder being built (the folder is staged: no atomic write needed)."""
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
