"""The DPT depth estimator of SD 2 depth models (transformers ``DPTForDepthEstimation``).

Which one (``--depth-model``, else the default):

* a folder: a DPT model folder (``config.json`` + weights, ``preprocessor_config.json``), or a
  pipeline folder with ``depth_estimator/`` and ``feature_extractor/`` (a depth model's own);
* a Hub id (from the Hugging Face cache; downloaded unless ``HF_HUB_OFFLINE``);
* default: the model's own ``depth_estimator/`` + ``feature_extractor/`` when its folder has them
  (stabilityai/stable-diffusion-2-depth, ``tiny-depth``), else ``Intel/dpt-hybrid-midas``, the one
  diffusers' depth pipeline uses.

``estimate_depth`` returns the raw prediction (relative inverse depth, larger = nearer) resized
bicubically from the network's resolution to the frame size: ``[N, H, W]`` float32 on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from tokenflow.errors import ModelError, one_line
from tokenflow.models.hf import download_command, quiet_hf_libraries
from tokenflow.models.load import hub_error_reason, hub_offline, looks_like_path

DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"
ESTIMATOR_FOLDER, PROCESSOR_FOLDER = "depth_estimator", "feature_extractor"


@dataclass
class DepthEstimator:
    """A loaded DPT (eval, no gradients) on ``device`` in ``dtype`` and its image processor."""

    network: Any
    processor: Any
    name: str
    device: torch.device
    dtype: torch.dtype


def depth_model_location(spec: Optional[str], model_path: Optional[Path]) -> Tuple[str, str, str, bool]:
    """(network location, processor location, name for messages, is a Hub id) of ``--depth-model``
    ``spec`` (None: the default for a model whose folder is ``model_path``)."""
    if spec is None and model_path is not None and (Path(model_path) / ESTIMATOR_FOLDER).is_dir():
        folder = Path(model_path)
        processor = folder / PROCESSOR_FOLDER
        return (str(folder / ESTIMATOR_FOLDER), str(processor if processor.is_dir() else folder / ESTIMATOR_FOLDER),
                f"the model's {ESTIMATOR_FOLDER}/", False)
    spec = DEFAULT_DEPTH_MODEL if spec is None else str(spec).strip()
    local = Path(spec).expanduser()
    if looks_like_path(spec) or local.exists():
        if not local.is_dir():
            what = "is a file, not a folder" if local.exists() else "does not exist"
            raise ModelError(f"--depth-model '{spec}' {what}: give a DPT model folder (config.json + weights), "
                             "a depth pipeline folder with depth_estimator/, or a Hub id")
        if (local / ESTIMATOR_FOLDER).is_dir():
            processor = local / PROCESSOR_FOLDER
            return (str(local / ESTIMATOR_FOLDER), str(processor if processor.is_dir() else local / ESTIMATOR_FOLDER),
                    spec, False)
        return str(local), str(local), spec, False
    return spec, spec, spec, True


def load_depth_estimator(spec: Optional[str], model_path: Optional[Path], device: torch.device,
                         dtype: torch.dtype, *, allow_pickle: bool = False) -> DepthEstimator:
    """Load the DPT ``spec`` names (see the module docstring); ModelError with the fix when it cannot."""
    from transformers import AutoImageProcessor, DPTForDepthEstimation  # noqa: PLC0415  start-up time

    network_at, processor_at, name, hub = depth_model_location(spec, model_path)
    kwargs = {"local_files_only": hub_offline()} if hub else {}
    try:
        with quiet_hf_libraries():
            network = DPTForDepthEstimation.from_pretrained(network_at, use_safetensors=None if allow_pickle else True,
                                                            **kwargs)
            processor = AutoImageProcessor.from_pretrained(processor_at, **kwargs)
    except Exception as error:
        if hub:
            raise ModelError(f"could not load depth model '{name}' ({hub_error_reason(error)}): download it once "
                             f"with `{download_command(name)}` and pass --depth-model DIR, or give your own raw "
                             "maps with --depth-maps") from None
        raise ModelError(f"could not load depth model {name} from '{network_at}' ({one_line(error)}): give a DPT "
                         "folder (transformers DPTForDepthEstimation, safetensors; --allow-pickle for .bin) "
                         "with --depth-model, or your own raw maps with --depth-maps") from None
    network = network.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return DepthEstimator(network, processor, name, torch.device(device), dtype)


@torch.no_grad()
def estimate_depth(estimator: DepthEstimator, frames: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Raw depth of ``frames`` ``[N,3,H,W]`` float in [0, 1]: ``[N,h',w']`` float32 (CPU) at the
    network's output resolution, ``batch`` frames per network call. Not resized here: the original
    resizes the network's prediction once, straight to the latent size (``method.depth.normalise_depth``).
    The processor gets uint8 RGB images, as from a PIL image."""
    n, _, height, width = frames.shape
    out = []
    for start in range(0, n, max(1, batch)):
        chunk = frames[start:start + batch]
        images = [image.numpy() for image in (chunk.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)]
        with quiet_hf_libraries():
            pixels = estimator.processor(images=images, return_tensors="pt")["pixel_values"]
        predicted = estimator.network(pixel_values=pixels.to(estimator.device, estimator.dtype)).predicted_depth
        out.append(predicted.float().cpu())
    return torch.cat(out) if out else frames.new_zeros((0, height, width))
