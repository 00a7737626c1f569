"""Load ControlNets (``--controlnet MODEL[:SCALE]``): a diffusers ControlNet folder, a Hugging Face
Hub id, or a single weights file in the original (LDM) or diffusers key layout.

A single file carries no config: its architecture is the base model's UNet's
(``ControlNetModel.from_unet``), and diffusers' single-file conversion maps its keys, offline.
Every ControlNet is checked against the UNet it will feed (the family: SDXL ControlNets take the
added text/time conditioning, SD 1.x/2.x ones do not; cross-attention width, block widths, layers):
a ControlNet made for another base model (SD 1.5's on an SD 2 model, SD's on SDXL) is refused by name.
SDXL ControlNets get the same packed text rows as the UNet (``models.text.unet_keywords``).
Weights load from safetensors only unless ``allow_pickle``. Every problem is a one-line
``ModelError`` naming the file and the fix.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from tokenflow.errors import ConfigError, ModelError, one_line
from tokenflow.models.hf import download_command, quiet_hf_libraries
from tokenflow.models.load import (
    PICKLE_SUFFIXES,
    hub_error_reason,
    hub_offline,
    looks_like_path,
    move_to_device,
)
from tokenflow.models.text import is_text_time

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
# UNet config entries a ControlNet must share with the UNet it feeds (its residuals are added to the
# UNet's skip connections, its cross-attention reads the UNet's text embeddings)
MATCHING = ("cross_attention_dim", "block_out_channels", "layers_per_block", "down_block_types")
MAX_SCALE = 10.0
_SCALE = re.compile(r"^(?P<model>.+):(?P<scale>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class ControlNetSpec:
    """One ``--controlnet`` value: ``model`` (folder, file or Hub id) and its ``scale``."""

    model: str
    scale: float


def parse_spec(text: str) -> ControlNetSpec:
    """``MODEL[:SCALE]`` -> ControlNetSpec; the scale is the text after the last ``:`` when it is a
    number (``C:\\nets\\canny.safetensors`` and ``owner/name`` keep their colons and slashes)."""
    text = str(text).strip()
    match = _SCALE.match(text)
    model, scale = (match.group("model"), float(match.group("scale"))) if match else (text, 1.0)
    if match and re.fullmatch(r"[A-Za-z]", model):   # "D:5" is a drive, not a model named D at scale 5
        model, scale = text, 1.0
    if not model:
        raise ConfigError(f"--controlnet {text!r}: no model named; give MODEL[:SCALE] (a ControlNet folder, Hub id "
                          "or .safetensors file)")
    if not math.isfinite(scale) or not 0 <= scale <= MAX_SCALE:
        raise ConfigError(f"--controlnet {text!r}: scale {scale} is out of range; give a conditioning scale from 0 "
                          f"to {MAX_SCALE:g} (default 1.0)")
    return ControlNetSpec(model, scale)


def load_controlnet(model: str, unet: Any, device: torch.device, dtype: torch.dtype, *,
                    allow_pickle: bool = False, model_name: str = "") -> Tuple[Any, str]:
    """(``ControlNetModel`` on ``device`` in ``dtype``, eval, no gradients; its identity for cache keys).

    ``model``: a diffusers ControlNet folder, a single weights file or a Hub id; ``unet``: the base
    model's UNet (a single file takes its architecture; every ControlNet must match it);
    ``model_name``: the base model, for messages."""
    base = f"model '{model_name}'" if model_name else "the model"
    with quiet_hf_libraries():
        is_file_name = model.lower().endswith(SINGLE_FILE_SUFFIXES)
        kind = "path" if is_file_name or looks_like_path(model) or Path(model).expanduser().exists() else "hub"
        if kind == "path":
            path = Path(model).expanduser()
            if not path.exists():
                raise ModelError(f"ControlNet '{model}' does not exist: give a ControlNet folder (with {CONFIG_NAME}), "
                                 "a .safetensors file or a Hub id")
            net, identity = (_from_folder(path, model, unet, allow_pickle, base) if path.is_dir()
                             else _from_file(path, model, unet, allow_pickle, base))
        else:   # its config first: a ControlNet for another base model is refused before its weights download
            _check_config(_hub_snapshot(model, allow_pickle, config_only=True)[0], model, unet, base)
            folder, identity = _hub_snapshot(model, allow_pickle)
            net, _ = _from_folder(folder, model, unet, allow_pickle, base)
        (net,) = move_to_device([net.to(dtype=dtype)], torch.device(device), dtype, f"ControlNet {model}")
    net.eval().requires_grad_(False)
    return net, identity


# ----------------------------------------------------------------------------- sources


def _hub_snapshot(repo_id: str, allow_pickle: bool, config_only: bool = False) -> Tuple[Path, str]:
    """A local snapshot of a Hub ControlNet with only its config and weights (``config_only``: its
    config alone); (folder, identity)."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415  only for Hub ids (start-up time)

    patterns = [CONFIG_NAME] if config_only else \
        [CONFIG_NAME, SAFE_WEIGHTS] + (["diffusion_pytorch_model.bin"] if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=hub_offline()))
    except Exception as error:  # offline, not found, gated, invalid id, network ...
        raise ModelError(f"could not load ControlNet '{repo_id}' ({hub_error_reason(error)}): download it once with "
                         f"`{download_command(repo_id)}` and pass --controlnet DIR") from None
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
    return folder, f"{repo_id}@{commit}" if commit else _fingerprint(folder)


def _fingerprint(path: Path) -> str:
    """Config contents and (name, size, mtime) of the weights: cheap, weights are never read."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return f"sha256:{digest.hexdigest()}"


def _check_config(folder: Path, name: str, unet: Any, base: str) -> None:
    """ModelError unless ``folder`` holds a ControlNet config made for ``unet``'s base model."""
    from diffusers import ControlNetModel  # noqa: PLC0415  start-up time (see models.load.component_loader)

    if not (folder / CONFIG_NAME).is_file():
        raise ModelError(f"ControlNet '{name}' has no {CONFIG_NAME} in {folder}: give a diffusers ControlNet folder "
                         "(config.json + diffusion_pytorch_model.safetensors), or the single weights file itself")
    try:
        config = ControlNetModel.load_config(str(folder))
    except Exception as error:
        raise ModelError(f"could not read the config of ControlNet '{name}' ({one_line(error)}): "
                         f"fix or replace {folder / CONFIG_NAME}") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind and "ControlNet" not in str(kind):   # a UNet's or VAE's folder: from_pretrained would half-load it
        raise ModelError(f"'{name}' is not a ControlNet: its {CONFIG_NAME} is a {kind}'s. Give a diffusers "
                         "ControlNet folder (ControlNetModel) or a ControlNet weights file")
    check_base(config, unet, name, base)


def _from_folder(folder: Path, name: str, unet: Any, allow_pickle: bool, base: str) -> Tuple[Any, str]:
    from diffusers import ControlNetModel  # noqa: PLC0415  start-up time (see models.load.component_loader)

    _check_config(folder, name, unet, base)
    if not (folder / SAFE_WEIGHTS).is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickled:
            raise ModelError(f"ControlNet '{name}' has no weights in {folder} (expected {SAFE_WEIGHTS})")
        if not allow_pickle:
            raise ModelError(f"ControlNet '{name}' has only pickle weights ({pickled[0]}); tokenflow loads safetensors "
                             "only, because pickle files can run code: convert them, or for weights you trust pass "
                             "--allow-pickle")
    try:
        net = ControlNetModel.from_pretrained(str(folder), use_safetensors=None if allow_pickle else True)
    except Exception as error:
        raise ModelError(f"could not load the weights of ControlNet '{name}' ({one_line(error)}): "
                         f"the files in {folder} are damaged or incomplete; download them again") from None
    missing = [n for n, p in net.named_parameters() if p.is_meta]   # weights the file did not hold
    if missing:
        raise ModelError(f"ControlNet '{name}': {folder / SAFE_WEIGHTS} lacks {len(missing)} of its weights "
                         f"(e.g. {missing[0]}): it is not this config's ControlNet, or incomplete; download it again")
    return net, _fingerprint(folder)


def _from_file(path: Path, name: str, unet: Any, allow_pickle: bool, base: str) -> Tuple[Any, str]:
    """A single weights file: the architecture of ``unet``'s ControlNet, keys converted by diffusers."""
    from diffusers import ControlNetModel  # noqa: PLC0415  start-up time
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: PLC0415  start-up time

    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelError(f"ControlNet '{name}' is a {suffix or 'suffix-less'} file: give a .safetensors file (or "
                         f"{', '.join(PICKLE_SUFFIXES)} with --allow-pickle), a diffusers folder or a Hub id")
    if suffix != ".safetensors" and not allow_pickle:
        raise ModelError(f"ControlNet '{name}' is a pickle file ({suffix}); tokenflow loads safetensors only, because "
                         "pickle files can run code: convert it to .safetensors, or for weights you trust pass "
                         "--allow-pickle")
    checkpoint = _read_state_dict(path, name)
    xl_file = any(".label_emb." in f".{k}" or k.startswith("add_embedding.") for k in checkpoint)
    _check_family(xl_file, is_text_time(unet.config), name, base)
    config = controlnet_config(unet, in_channels=_file_in_channels(checkpoint))
    try:
        converted = convert_controlnet_checkpoint(checkpoint, config)
    except Exception as error:
        raise ModelError(f"ControlNet file '{name}' is not a Stable Diffusion ControlNet ({one_line(error)}): "
                         "give a ControlNet made for this base model") from None
    converted = {k: v for k, v in converted.items() if v is not None}
    if is_text_time(config):   # diffusers' converter leaves SDXL's added embedding (label_emb) behind
        for ours, theirs in (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")):
            for leaf in ("weight", "bias"):
                for prefix in ("control_model.", ""):
                    if f"{ours}.{leaf}" not in converted and f"{prefix}{theirs}.{leaf}" in checkpoint:
                        converted[f"{ours}.{leaf}"] = checkpoint[f"{prefix}{theirs}.{leaf}"]
    with torch.device("meta"):
        net = ControlNetModel.from_config(config)
    expected = net.state_dict()
    _check_tensors(converted, expected, name, unet)
    # own storage per weight: the converter returns views into split tensors, whose unaligned
    # addresses make some CPU kernels round differently from the same weights loaded from a folder
    del checkpoint   # the file's tensors live on only through the views being replaced here
    converted = {k: converted.pop(k).clone(memory_format=torch.contiguous_format) for k in list(converted)}
    net.load_state_dict(converted, strict=True, assign=True)
    return net, _fingerprint(path)


def controlnet_config(unet: Any, in_channels: Optional[int] = None) -> Dict[str, Any]:
    """The config of a ControlNet for ``unet`` (``ControlNetModel.from_unet``, built on ``meta``:
    nothing is allocated), with ``in_channels`` latent input channels when given (a 4-channel
    ControlNet on a depth UNet's 5-channel input reads its first 4)."""
    from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: PLC0415  start-up time

    with torch.device("meta"):
        empty = UNet2DConditionModel.from_config(unet.config)
        config = dict(ControlNetModel.from_unet(empty, load_weights_from_unet=False).config)
    if in_channels is not None:
        config["in_channels"] = in_channels
    return config


def _file_in_channels(checkpoint: Dict[str, torch.Tensor]) -> Optional[int]:
    """The latent input channels of a single-file ControlNet (its first conv), if the keys say."""
    for key, value in checkpoint.items():
        if key.endswith(("input_blocks.0.0.weight", "conv_in.weight")) and getattr(value, "ndim", 0) == 4:
            return int(value.shape[1])
    return None


def _read_state_dict(path: Path, name: str) -> Dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415  only for single files

            state = load_file(str(path))
        else:   # --allow-pickle was given: the user trusts this file
            state = torch.load(str(path), map_location="cpu", weights_only=False)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as error:
        raise ModelError(f"could not read ControlNet file '{name}' ({one_line(error)}): it is damaged or not a "
                         "weights file; download it again") from None
    if not isinstance(state, dict) or not state:
        raise ModelError(f"ControlNet file '{name}' holds no weights")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _check_tensors(found: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], name: str, unet: Any) -> None:
    """Refuse a converted single file whose keys or shapes are not those of ``unet``'s ControlNet."""
    missing = sorted(set(expected) - set(found))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k].shape))
    if wrong:
        key = next((k for k in wrong if "attn2.to_k" in k), wrong[0])
        raise ModelError(f"ControlNet file '{name}' was made for another base model: {key} is "
                         f"{list(found[key].shape)}, this model's UNet needs {list(expected[key].shape)} "
                         f"(cross_attention_dim {unet.config.cross_attention_dim}); use a ControlNet made for "
                         "this base model (SD 1.x ControlNets need an SD 1.x model, SD 2.x ones an SD 2.x model)")
    if missing:
        raise ModelError(f"ControlNet file '{name}' lacks {len(missing)} of the ControlNet's weights (e.g. "
                         f"{missing[0]}): it is no ControlNet for a Stable Diffusion 1.x/2.x UNet, or incomplete")


def _check_family(xl_net: bool, xl_model: bool, name: str, base: str) -> None:
    """ModelError naming both when an SDXL ControlNet meets an SD 1.x/2.x model or the reverse."""
    if xl_net != xl_model:
        words = {True: "SDXL", False: "Stable Diffusion 1.x/2.x"}
        raise ModelError(f"ControlNet '{name}' is {'an' if xl_net else 'a'} {words[xl_net]} ControlNet but {base} "
                         f"is {words[xl_model]}: use a ControlNet made for {words[xl_model]}")


def check_base(config: Dict[str, Any], unet: Any, name: str, base: str = "the model") -> None:
    """ModelError when a ControlNet config does not fit ``unet`` (another base model's ControlNet)."""
    _check_family(is_text_time(config), is_text_time(unet.config), name, base)
    differ = []
    for key in MATCHING:
        mine, theirs = config.get(key), unet.config.get(key)
        if mine is not None and theirs is not None and _norm(mine) != _norm(theirs):
            differ.append(f"{key} {_norm(mine)} vs the UNet's {_norm(theirs)}")
    if differ:
        raise ModelError(f"ControlNet '{name}' was made for another base model ({'; '.join(differ)}): use a "
                         "ControlNet made for this model (SD 1.x ControlNets need an SD 1.x model, SD 2.x ones an "
                         "SD 2.x model)")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value

