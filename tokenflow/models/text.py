"""Prompt conditioning as one tensor per UNet row: SD's text embeddings, and SDXL's too.

SD 1.x/2.x conditions the UNet on the CLIP text encoder's last hidden state, ``[1, 77, D]``.
SDXL conditions it on three things (diffusers' ``UNet2DConditionModel`` with
``addition_embed_type == "text_time"``):

* ``encoder_hidden_states`` ``[1, 77, D1 + D2]``: the penultimate hidden states of both text
  encoders, concatenated along the channels (768 + 1280 = 2048 for SDXL base);
* ``text_embeds`` ``[1, P]``: the second encoder's pooled, projected embedding (P = 1280);
* ``time_ids`` ``[1, 6]``: the micro-conditioning (original height, width, crop top, left, target
  height, width); TokenFlow uses the frame size, no crop (diffusers' default for an image of that size).

Every code path of the engine (branch batching, padding, the keyframe store, the graph backends'
inputs, checkpoints) moves one text tensor per row. So SDXL's three parts travel *packed* in it:
the rows are ``[R, 77 + E, D]``, whose last ``E`` tokens hold ``[text_embeds, time_ids, 0...]``
laid out flat (``E = ceil((P + 6) / D)``, 1 for SDXL base: 1286 values in a 2048-wide token).
``unet_keywords`` unpacks them right before each UNet or ControlNet call, from the model's own
config; for SD (``E = 0``) the rows are just the hidden states, exactly as before.

Time ids are integers up to a few thousand: exact in float16 and bfloat16 up to 2048 and 256
respectively, so bfloat16 rounds sizes above 256 to its 8-bit mantissa (for example 1000 -> 1000,
1016 -> 1016, 1020 -> 1024). diffusers casts them to the UNet dtype too, so this matches it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from tokenflow.models import adapters
from tokenflow.models.hf import quiet_hf_libraries

TIME_IDS = 6   # original (h, w), crop (top, left), target (h, w)


@dataclass(frozen=True)
class TextLayout:
    """How a model's conditioning is packed into text rows ``[R, tokens + extra, dim]``."""

    tokens: int          # text tokens (77)
    dim: int             # hidden width D (SD: the encoder's; SDXL: both encoders' summed)
    pooled: int = 0      # P: pooled embedding width (0: SD, nothing packed)
    time_ids: int = 0    # 6 for SDXL

    @property
    def extra(self) -> int:
        """Tokens appended for the pooled embedding and time ids (0 for SD)."""
        return math.ceil((self.pooled + self.time_ids) / self.dim) if self.pooled + self.time_ids else 0

    @property
    def rows_tokens(self) -> int:
        return self.tokens + self.extra


def is_text_time(config: Any) -> bool:
    """Whether a UNet / ControlNet config wants SDXL's added conditioning (``text_embeds``, ``time_ids``)."""
    return _get(config, "addition_embed_type") == "text_time"


def layout_of(config: Any, tokens: int = 77) -> TextLayout:
    """The packing of a UNet (or ControlNet) config: ``cross_attention_dim`` wide rows; for
    ``text_time`` models ``projection_class_embeddings_input_dim = P + 6 * addition_time_embed_dim``."""
    dim = int(_get(config, "cross_attention_dim"))
    if not is_text_time(config):
        return TextLayout(tokens, dim)
    pooled = int(_get(config, "projection_class_embeddings_input_dim")) - TIME_IDS * int(_get(config, "addition_time_embed_dim"))
    return TextLayout(tokens, dim, pooled, TIME_IDS)


def micro_conditioning(size: Tuple[int, int]) -> torch.Tensor:
    """``[6]`` float32 time ids of a frame of ``size`` = (width, height) pixels: the frame is the
    original and the target, uncropped."""
    width, height = size
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


def pack(hidden: torch.Tensor, layout: TextLayout, pooled: Optional[torch.Tensor] = None,
         time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hidden ``[B, T, D]`` (+ pooled ``[B, P]``, time ids ``[B, 6]`` or ``[6]``) -> ``[B, T + E, D]``."""
    if layout.extra == 0:
        return hidden
    if pooled is None or time_ids is None:
        raise ValueError("an SDXL-type UNet needs the pooled text embedding and the time ids")
    rows = hidden.shape[0]
    flat = torch.cat([pooled.reshape(rows, layout.pooled).to(hidden.dtype),
                      time_ids.reshape(-1, layout.time_ids).expand(rows, -1).to(hidden.device, hidden.dtype)], dim=1)
    flat = torch.nn.functional.pad(flat, (0, layout.extra * layout.dim - flat.shape[1]))
    return torch.cat([hidden, flat.view(rows, layout.extra, layout.dim)], dim=1)


def unpack(text: torch.Tensor, layout: TextLayout) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """text rows ``[R, T + E, D]`` -> (encoder_hidden_states ``[R, T, D]``, added_cond_kwargs or None)."""
    if layout.extra == 0:
        return text, None
    hidden = text[:, : text.shape[1] - layout.extra]
    flat = text[:, text.shape[1] - layout.extra:].reshape(text.shape[0], -1)
    return hidden, {"text_embeds": flat[:, : layout.pooled],
                    "time_ids": flat[:, layout.pooled: layout.pooled + layout.time_ids]}


def unet_keywords(module: Any, text: torch.Tensor) -> Dict[str, Any]:
    """The conditioning keywords of a diffusers UNet or ControlNet call for packed ``text`` rows:
    ``encoder_hidden_states`` and, for SDXL-type models, ``added_cond_kwargs``."""
    if not is_text_time(module.config):   # SD: the rows are the hidden states; the width needs no config
        return {"encoder_hidden_states": text}
    hidden, added = unpack(text, layout_of(module.config))
    return {"encoder_hidden_states": hidden} if added is None else {"encoder_hidden_states": hidden,
                                                                    "added_cond_kwargs": added}


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


# ----------------------------------------------------------------------------- prompt encoding


@torch.no_grad()
def encode_prompt(model: Any, text: str, size: Optional[Tuple[int, int]] = None, *,
                  negative: bool = False) -> torch.Tensor:
    """The text rows of one prompt: ``[1, 77, D]`` for SD, ``[1, 77 + E, D]`` for SDXL.

    SD: the text encoder's last hidden state, padded to the tokenizer's max length, no attention
    mask (the original). SDXL (``model.text_encoder_2``): both encoders' penultimate hidden states
    (diffusers' default, ``clip_skip`` None) concatenated, the second's pooled projection, and the
    micro-conditioning of frames of ``size`` = (width, height); an empty ``negative`` prompt gives
    zeros when the pipeline says ``force_zeros_for_empty_prompt`` (SDXL base does: diffusers' rule
    for a negative prompt left out).
    Warns when a prompt is cut at the tokenizer's length. A multi-vector embedding's token stands
    for all its vectors (``adapters.expand_prompt``).
    """

    text = adapters.expand_prompt(text, model.embedding_tokens)
    if getattr(model, "text_encoder_2", None) is None:
        return model.text_encoder(_token_ids(model.tokenizer, text).to(model.device))[0]
    if size is None:
        raise ValueError("an SDXL prompt needs the frame size (its micro-conditioning time ids)")
    layout = layout_of(model.unet.config, model.tokenizer.model_max_length)
    if negative and getattr(model, "force_zeros_for_empty_prompt", False) and not text.strip():
        hidden = torch.zeros(1, layout.tokens, layout.dim, device=model.device, dtype=model.dtype)
        pooled = torch.zeros(1, layout.pooled, device=model.device, dtype=model.dtype)
    else:
        states = []
        for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
            out = encoder(_token_ids(tokenizer, text).to(model.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]   # the last encoder's: CLIPTextModelWithProjection's text_embeds
        hidden = torch.cat(states, dim=-1)
    return pack(hidden, layout, pooled, micro_conditioning(size))


def _token_ids(tokenizer: Any, text: str) -> torch.Tensor:

    max_length = tokenizer.model_max_length
    with quiet_hf_libraries():
        full_length = len(tokenizer(text, truncation=False).input_ids)
        ids = tokenizer(text, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
    if full_length > max_length:
        warnings.warn(f"prompt {text[:40]!r}... is {full_length} tokens long; the text encoder "
                      f"only sees the first {max_length}", stacklevel=3)
    return ids
