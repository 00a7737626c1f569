"""CLIP scores of an edited video: text alignment and frame consistency.

Both are *raw* cosine similarities in [-1, 1] of L2-normalised CLIP embeddings (not x100).
With ``e_t`` the image embedding of frame ``t`` (N frames) and ``u`` that of the prompt:

* ``text_alignment = mean_t cos(e_t, u)``. CLIPScore (Hessel et al., 2021) reports
  ``2.5 * max(cos, 0)`` and many editing papers report ``100 * cos``: multiply by 100 to compare.
* ``frame_consistency = mean_{t < N-1} cos(e_t, e_{t+1})``: the "frame consistency" of
  Tune-A-Video / TokenFlow-style evaluations (mean cosine of *consecutive* frames). ``None``
  for a single frame.

Preprocessing follows the model's own ``preprocessor_config.json`` (CLIPImageProcessor values:
resize the shortest side to ``size``, centre-crop ``crop_size``, normalise with ``image_mean``
/ ``image_std``) but runs as torch ops on the ``[0, 1]`` float frames, in batches on the device:
bicubic resize with antialias (PIL's kernel; width then height, clamped in between as PIL
does), crop offset ``(h - crop) // 2``. The processor itself rounds to uint8 after each PIL
resize pass, so its pixels differ from these by about one uint8 level (1/255 before /std).

Loading is safetensors only (``use_safetensors=True``) and never runs remote code.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from tokenflow.device import resolve_device
from tokenflow.errors import ModelError, one_line
from tokenflow.models.hf import quiet_hf_libraries
from tokenflow.models.load import (
    download_command,
    hub_error_reason,
    hub_offline,
    looks_like_path,
    move_to_device,
    transformers_major_minor,
)

CLIP_SKIPPED = ("CLIP metrics skipped: no CLIP model given; enable them with --clip-model "
                "HUB_ID_OR_FOLDER (e.g. --clip-model openai/clip-vit-base-patch32)")
HUB_ALLOW_PATTERNS = ["*.json", "*.txt", "model.safetensors", "model-*-of-*.safetensors"]
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values


@dataclass
class ClipScorer:
    """A transformers ``CLIPModel`` (eval, no grad) and tokenizer on ``device`` in ``dtype``.

    ``resize``: shortest side (int) or exact ``(h, w)``; ``crop``: ``(h, w)``; ``mean`` / ``std``:
    per-channel, ``None`` when the processor does not normalise.
    """

    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    resize: Union[int, tuple[int, int], None]
    crop: Optional[tuple[int, int]]
    mean: Optional[tuple[float, ...]]
    std: Optional[tuple[float, ...]]
    resample: str = "bicubic"

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, crop_h, crop_w]`` float32 model input."""
        x = frames.to(self.device, torch.float32)
        if self.resize is not None:
            height, width = x.shape[-2:]
            if isinstance(self.resize, int):
                short, long = sorted((height, width))
                new_long = int(self.resize * long / short)
                size = (self.resize, new_long) if height <= width else (new_long, self.resize)
            else:
                size = self.resize
            for step in ((height, size[1]), size):  # like PIL: rows then columns, clamped
                x = F.interpolate(x, size=step, mode=self.resample, align_corners=False,
                                  antialias=True).clamp(0, 1)
        if self.crop is not None:
            (height, width), (crop_h, crop_w) = x.shape[-2:], self.crop
            pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
            x = F.pad(x, (math.ceil(pad_w / 2), pad_w // 2, math.ceil(pad_h / 2), pad_h // 2))
            top, left = (x.shape[-2] - crop_h) // 2, (x.shape[-1] - crop_w) // 2
            x = x[..., top:top + crop_h, left:left + crop_w]
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(-1, 1, 1)
            x = (x - mean) / torch.tensor(self.std, device=x.device).view(-1, 1, 1)
        return x

    @torch.no_grad()
    def image_embeddings(self, frames: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Frames ``[N, 3, H, W]`` (float in [0, 1]; uint8 is divided by 255) -> ``[N, D]``."""
        if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"frames must be [N >= 1, 3, H, W], got {list(frames.shape)}")
        if frames.dtype == torch.uint8:
            frames = frames.float() / 255
        out = [pooled(self.model.get_image_features(
            pixel_values=self.preprocess(frames[i:i + batch]).to(self.dtype)))
            for i in range(0, frames.shape[0], batch)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """``T`` prompts -> ``[T, D]`` L2-normalised float32 (cut at the model's 77 tokens)."""
        limit = min(self.tokenizer.model_max_length,
                    self.model.config.text_config.max_position_embeddings)
        with quiet_hf_libraries():
            tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit,
                                    return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                                attention_mask=tokens.attention_mask.to(self.device))
        return F.normalize(pooled(features).float(), dim=-1)


def pooled(output) -> torch.Tensor:
    """Projected features: a tensor (transformers < 5) or ``.pooler_output`` (>= 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_metrics(scorer: ClipScorer, frames: torch.Tensor, prompt: Optional[str]) -> dict:
    """Scores of frames ``[N, 3, H, W]`` in [0, 1] (see the module docstring), JSON-ready.

    ``text_alignment`` is ``None`` (and its per-frame list empty) without a prompt;
    ``frame_consistency`` is ``None`` (and its per-pair list empty) for a single frame.
    """
    images = scorer.image_embeddings(frames)
    pairs = (images[:-1] * images[1:]).sum(-1).tolist()
    per_frame = []
    if prompt is not None and prompt.strip():
        per_frame = (images @ scorer.text_embeddings([prompt])[0]).tolist()
    return {
        "model": scorer.name,
        "text_alignment": sum(per_frame) / len(per_frame) if per_frame else None,
        "frame_consistency": sum(pairs) / len(pairs) if pairs else None,
        "per_frame_text_alignment": per_frame,
        "per_pair_consistency": pairs,
    }


def load_clip_scorer(model: str, device=None, dtype: torch.dtype = torch.float32) -> ClipScorer:
    """Load a CLIP model (Hub id or local transformers folder); problems raise ``ModelError``."""
    from transformers import AutoTokenizer, CLIPModel  # noqa: PLC0415  transformers CLIP: only when CLIP scores are asked for

    model = str(model).strip()
    device = resolve_device(device)
    folder = clip_folder(model)
    check_clip_folder(folder, model)
    dtype_kwarg = "dtype" if transformers_major_minor() >= (4, 56) else "torch_dtype"
    with quiet_hf_libraries():
        try:
            clip = CLIPModel.from_pretrained(folder, use_safetensors=True, **{dtype_kwarg: dtype})
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except Exception as error:
            raise ModelError(f"could not load CLIP model '{model}' ({one_line(error)})") from None
    try:
        steps = preprocessing(folder, clip.config.vision_config.image_size)
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"CLIP model '{model}' has an unreadable preprocessor_config.json "
                         f"({one_line(error)})") from None
    clip = move_to_device([clip], device, dtype, model)[0].eval().requires_grad_(False)
    return ClipScorer(clip, tokenizer, model, device, dtype, **steps)


def clip_folder(model: str) -> Path:
    """The local folder of ``model``: itself, or a Hub snapshot (config, tokenizer, safetensors)."""
    if looks_like_path(model) or Path(model).expanduser().exists():
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ModelError(f"CLIP model folder '{model}' does not exist" if not folder.exists()
                             else f"CLIP model '{model}' is a file, not a transformers folder")
        return folder
    from huggingface_hub import snapshot_download  # noqa: PLC0415  only for Hub ids (start-up time)

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_ALLOW_PATTERNS,
                                      local_files_only=hub_offline()))
    except Exception as error:
        raise ModelError(
            f"could not load CLIP model '{model}' ({hub_error_reason(error)}): download it first "
            f"with `{download_command(model)}` and pass --clip-model DIR"
        ) from None


def check_clip_folder(folder: Path, model: str) -> None:
    """Raise ModelError unless ``folder`` holds a CLIPModel config and safetensors weights."""
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8"))["model_type"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"CLIP model '{model}' has no readable config.json with a model_type: "
                         "expected a transformers CLIPModel folder") from None
    if model_type != "clip":
        raise ModelError(f"model '{model}' is a '{model_type}' model, not a CLIP model (transformers"
                         " CLIPModel, model_type 'clip'), e.g. openai/clip-vit-base-patch32")
    if not any(folder.glob("model*.safetensors")):
        raise ModelError(
            f"CLIP model '{model}' has no safetensors weights (model.safetensors): only safetensors "
            "are loaded, as pickle weights (.bin) can run code; convert them once where you trust "
            "them with CLIPModel.from_pretrained(DIR).save_pretrained(DIR)")


def preprocessing(folder: Path, image_size: int) -> dict:
    """ClipScorer's resize/crop/mean/std/resample from ``preprocessor_config.json``.

    Accepts old (``size: 224``) and new (``{"shortest_edge": 224}``) forms; without the file,
    CLIP's defaults for ``image_size`` (OpenAI mean/std), with a warning.
    """
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: PLC0415  transformers CLIP (as above)

    path = folder / "preprocessor_config.json"
    if not path.is_file():
        warnings.warn(f"{folder} has no preprocessor_config.json: using CLIP's defaults "
                      f"({image_size} px, OpenAI mean/std)", stacklevel=3)
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    size, crop = config.get("size", image_size), config.get("crop_size", image_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge") or (size["height"], size["width"])
    crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
    normalize = config.get("do_normalize", True)
    return {
        "resize": size if config.get("do_resize", True) else None,
        "crop": crop if config.get("do_center_crop", True) else None,
        "mean": tuple(config.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else None,
        "std": tuple(config.get("image_std", OPENAI_CLIP_STD)) if normalize else None,
        "resample": RESAMPLE_MODES.get(config.get("resample", 3), "bicubic"),
    }
