"""Load a Stable Diffusion model (UNet, VAE, CLIP text encoder(s), tokenizer(s), DDIM config).

``load_model`` accepts ``"tiny"`` / ``"tiny:SEED"`` (a random-weight offline model, see
``tokenflow.models.tiny``; ``tiny-depth``, ``tiny-xl`` its SD 2 depth and SDXL layouts), a short
version (``"1.5"``, ``"2.0"``, ``"2.1"``, ``"2-depth"``, ``"xl"``), a local diffusers
folder, a single-file checkpoint (``tokenflow.models.single_file``) or a Hugging Face Hub id.
Every problem surfaces as a one-line ``ModelError`` (or ``ResourceError`` when the device runs out
of memory).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from tokenflow.config import SD_VERSIONS
from tokenflow.errors import ModelError, ResourceError, one_line
from tokenflow.models import adapters, single_file, text, tiny
from tokenflow.models.hf import download_command, quiet_hf_libraries
from tokenflow.models.unet_layout import check_unet_layout

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_COMPONENTS = ("text_encoder_2", "tokenizer_2")   # SDXL's second text encoder, present together
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx")
CONFIG_SUFFIXES = (".json", ".txt")
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    *(f"{component}/*{suffix}" for component in COMPONENTS for suffix in CONFIG_SUFFIXES),
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    # SDXL: the second text encoder
    *(f"{component}/*{suffix}" for component in XL_COMPONENTS for suffix in CONFIG_SUFFIXES),
    "text_encoder_2/model.safetensors",
    # SD 2 depth: its DPT depth estimator (the default of --depth-model) and its image processor
    *(f"{component}/*{suffix}" for component in ("depth_estimator", "feature_extractor")
      for suffix in CONFIG_SUFFIXES),
    "depth_estimator/model.safetensors",
]
# tiny[:SEED], tiny-depth[:SEED] or tiny-xl[:SEED] (group 1: "-depth", "-xl" or None, group 2: the seed text)
_TINY_PATTERN = re.compile(r"^tiny(-depth|-xl)?(?::(.*))?$")
# torch >= 2.5 names it torch.OutOfMemoryError; older releases only have the CUDA alias
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class SDModel:
    """A loaded Stable Diffusion (1.x/2.x or XL) model, on ``device`` in ``dtype``, eval mode, no gradients.

    ``identity`` fingerprints the weights for cache keys; ``scheduler_config`` builds fresh
    DDIM schedulers. Latents are ``[N, 4, H / vae_scale_factor, W / vae_scale_factor]``;
    ``z = vae.encode(x).mean * scaling_factor``. SDXL: ``text_encoder_2`` / ``tokenizer_2`` are
    set; its prompts are packed text rows (``models.text``); ``vae_upcast``: the VAE runs in
    float32 whatever ``dtype`` (its config's ``force_upcast``: SDXL's VAE overflows in float16).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    name: str
    identity: str
    is_tiny: bool
    device: torch.device
    dtype: torch.dtype
    vae_scale_factor: int = 8
    scaling_factor: float = 0.18215
    path: Optional[Path] = field(default=None, repr=False)
    weights_loaded: bool = True   # False: an architecture on the meta device (models.architectures), for plans
    # multi-vector embedding tokens (--embedding): TOKEN -> (TOKEN, TOKEN_1, ...), expanded in prompts
    embedding_tokens: Dict[str, Tuple[str, ...]] = field(default_factory=dict, repr=False)
    text_encoder_2: Any = None       # SDXL: CLIPTextModelWithProjection
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False   # SDXL pipelines: an empty negative prompt is zeros
    vae_upcast: bool = False         # the VAE is float32 (force_upcast with a 16-bit dtype)
    vae_name: str = ""               # where the VAE came from: the model's own, or --vae

    @property
    def family(self) -> str:
        """``"sdxl"`` (two text encoders, added text/time conditioning) or ``"sd"`` (1.x/2.x)."""
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]


@dataclass(frozen=True)
class ModelSource:
    """Where the weights of a model string live on disk, and how to fingerprint them."""

    name: str
    path: Path
    identity: str
    is_tiny: bool
    kind: str = "folder"                   # or "file": a single-file checkpoint (path is the file)
    model_config: Optional[str] = None     # --model-config, for a file


# ----------------------------------------------------------------------------- public API


def load_model(model: str, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False,
               model_config: Optional[str] = None, loras: Sequence[str] = (),
               embeddings: Sequence[str] = (), vae: Optional[str] = None) -> SDModel:
    """Load ``model`` (tiny[:SEED], 1.5/2.0/2.1/2-depth/xl, local folder, single file or Hub id) onto ``device``.

    ``vae``: another VAE (a diffusers folder or Hub id, --vae) instead of the model's own, e.g. a
    float16-safe SDXL VAE. An SDXL model's VAE whose config says ``force_upcast`` stays in float32
    under a 16-bit ``dtype`` (``SDModel.vae_upcast``); a given ``vae`` follows its own config.

    ``model_config``: a single file's configs (--model-config). ``loras`` ("PATH_OR_ID[:SCALE]") are
    fused into the weights and ``embeddings`` ("PATH[:TOKEN]") added to the tokenizer and text
    encoder before the model moves (``models.adapters``); the identity then names each one's content
    and scale or token. Weights load from safetensors only unless ``allow_pickle`` (pickle files can
    run code when loaded); remote code is never trusted."""
    device = torch.device(device)
    lora_specs = [adapters.parse_lora(text) for text in loras]
    embedding_specs = [adapters.parse_embedding(text) for text in embeddings]
    with quiet_hf_libraries():
        source = resolve_source(model, model_config=model_config)
        text_encoder_2 = tokenizer_2 = None
        if source.kind == "file":
            source, (scheduler_config, unet, vae_module, text_encoder, tokenizer, text_encoder_2,
                     tokenizer_2) = load_single_file(source, dtype, allow_pickle)
            check_unet_layout(unet, source.name)
        else:
            scheduler_config = load_scheduler_config(source)
            unet = load_component(source, "unet", dtype, allow_pickle)
            check_unet_layout(unet, source.name)
            xl = text.is_text_time(unet.config)
            vae_module = load_component(source, "vae", torch.float32 if xl else dtype, allow_pickle)
            text_encoder = load_component(source, "text_encoder", dtype, allow_pickle)
            tokenizer = load_component(source, "tokenizer", dtype)
            if xl:
                check_xl_components(source.path, source.name)
                text_encoder_2 = load_component(source, "text_encoder_2", dtype, allow_pickle)
                tokenizer_2 = load_component(source, "tokenizer_2", dtype)
        vae_name, vae_identity = "the model's own", ""
        if vae is not None:
            vae_source = resolve_vae_source(vae)
            vae_module = load_component(vae_source, "", torch.float32 if text_encoder_2 is not None else dtype,
                                        allow_pickle, loader="vae", what=f"VAE '{vae}' (--vae)")
            vae_name, vae_identity = vae, f"+vae:{vae_source.identity}"
        upcast = (text_encoder_2 is not None and dtype != torch.float32
                  and bool(getattr(vae_module.config, "force_upcast", False)))
        vae_module = vae_module.to(torch.float32 if upcast else dtype)
        parts = adapters.apply_loras(lora_specs, unet, text_encoder, model_name=model, allow_pickle=allow_pickle,
                                     hub_offline=hub_offline(), text_encoder_2=text_encoder_2)
        embedding_parts, embedding_tokens = adapters.apply_embeddings(
            embedding_specs, tokenizer, text_encoder, model_name=model, allow_pickle=allow_pickle,
            tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)
    modules = move_to_device([m for m in (unet, vae_module, text_encoder, text_encoder_2) if m is not None],
                             device, dtype, source.name)
    for module in modules:
        module.eval().requires_grad_(False)
    return SDModel(
        unet=unet, vae=vae_module, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler_config=scheduler_config, name=model,
        identity=adapters.adapters_identity(source.identity + vae_identity, parts + embedding_parts),
        is_tiny=source.is_tiny, device=device, dtype=dtype,
        vae_scale_factor=2 ** (len(vae_module.config.block_out_channels) - 1),
        scaling_factor=float(vae_module.config.scaling_factor), path=source.path, embedding_tokens=embedding_tokens,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=text_encoder_2 is not None and read_force_zeros(source.path),
        vae_upcast=upcast, vae_name=vae_name,
    )


def encode_prompt(model: SDModel, prompt: str, size: Optional[Tuple[int, int]] = None, *,
                  negative: bool = False) -> torch.Tensor:
    """The text rows of ``prompt`` (``models.text.encode_prompt``): ``[1, 77, D]`` for SD; SDXL
    needs the frame ``size`` (width, height) and packs its added conditioning (``[1, 78, 2048]``)."""
    return text.encode_prompt(model, prompt, size, negative=negative)


def check_xl_components(folder: Path, name: str) -> None:
    """ModelError naming what an SDXL folder (its UNet wants added text/time conditioning) lacks."""
    missing = [f"{component}/" for component in XL_COMPONENTS if not (folder / component).is_dir()]
    if missing:
        raise ModelError(f"model '{name}' has an SDXL UNet but no {', '.join(missing)}: an SDXL base folder has two "
                         "text encoders (text_encoder/, text_encoder_2/ and their tokenizers); the refiner (one "
                         "encoder, 5 time ids) is not supported")


def read_force_zeros(folder: Optional[Path]) -> bool:
    """``force_zeros_for_empty_prompt`` of an SDXL folder's model_index.json (diffusers' default True)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True)) if isinstance(index, dict) else True


def resolve_vae_source(vae: str) -> ModelSource:
    """A ``--vae`` value: a local diffusers VAE folder (config.json and weights) or a Hub id."""
    folder = Path(vae).expanduser()
    if folder.is_dir() or looks_like_path(vae):
        if not (folder / "config.json").is_file():
            raise ModelError(f"--vae '{vae}' is not a diffusers VAE folder (no config.json): pass a folder saved by "
                             "AutoencoderKL.save_pretrained or a Hub id such as madebyollin/sdxl-vae-fp16-fix")
        return ModelSource(vae, folder.resolve(), folder_fingerprint(folder), is_tiny=False)
    from huggingface_hub import snapshot_download  # noqa: PLC0415  only for Hub ids

    try:
        snapshot = Path(snapshot_download(vae, allow_patterns=["config.json", "diffusion_pytorch_model.safetensors"],
                                          local_files_only=hub_offline()))
    except Exception as error:
        raise ModelError(f"could not load VAE '{vae}' (--vae; {hub_error_reason(error)}): download it once with "
                         f"`{download_command(vae)}` and pass --vae DIR") from None
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    return ModelSource(vae, snapshot, f"{vae}@{commit}" if commit else folder_fingerprint(snapshot), is_tiny=False)


# ----------------------------------------------------------------------------- sources


def resolve_source(model: str, *, model_config: Optional[str] = None) -> ModelSource:
    """Map a ``--model`` string to a local folder (downloading from the Hub if needed) or a
    single-file checkpoint (``model_config``: its --model-config; the file is read when it loads)."""
    kind, value = model_kind(model)
    if model_config is not None and kind != "file":
        raise ModelError(f"--model-config is for single-file checkpoints (--model FILE.safetensors); model '{model}' "
                         "brings its own configs: drop --model-config")
    if kind == "tiny":
        return tiny_source(str(model).strip(), value)
    if kind == "file":
        return file_source(value, model_config)
    return local_source(value) if kind == "path" else hub_source(value)


def model_kind(model: str) -> Tuple[str, Optional[str]]:
    """What a ``--model`` string names: ("tiny", its seed text or None), ("path", the path),
    ("file", the path of a single-file checkpoint: an existing file, or any name ending in a
    checkpoint suffix) or ("hub", the repo id; a version name gives its repository). ModelError for a
    known v-prediction model."""
    model = str(model).strip()
    tiny_match = _TINY_PATTERN.match(model)
    if tiny_match:
        return "tiny", tiny_match.group(2)
    refuse_known_v_prediction(model)
    if model in SD_VERSIONS:
        return "hub", SD_VERSIONS[model]
    if model.lower().endswith(single_file.SUFFIXES) or Path(model).expanduser().is_file():
        return "file", model
    if looks_like_path(model) or Path(model).expanduser().exists():
        return "path", model
    return "hub", model


def tiny_source(model: str, seed_text: Optional[str]) -> ModelSource:
    seed, depth, xl = _tiny_seed(model, seed_text), _tiny_is_depth(model), _tiny_is_xl(model)
    folder = tiny.tiny_model_dir(seed, depth=depth, xl=xl)
    return ModelSource(model, folder, tiny.tiny_identity(seed, depth, xl), is_tiny=True)


def _tiny_is_depth(model: str) -> bool:
    """``tiny-depth[:SEED]``: the tiny SD-2-depth model (5-channel UNet and a tiny DPT)."""
    return model.startswith("tiny-depth")


def _tiny_is_xl(model: str) -> bool:
    """``tiny-xl[:SEED]``: the tiny SDXL model (SDXL's block layout, two text encoders)."""
    return model.startswith("tiny-xl")


def _tiny_seed(model: str, seed_text: Optional[str]) -> int:
    try:
        return 0 if seed_text is None else int(seed_text)
    except ValueError:
        name = "tiny-depth" if _tiny_is_depth(model) else "tiny-xl" if _tiny_is_xl(model) else "tiny"
        raise ModelError(f"bad model '{model}': the tiny model's seed must be an integer, "
                         f"e.g. --model {name}:1") from None


def _tiny_identity(model: str, seed_text: Optional[str]) -> str:
    return tiny.tiny_identity(_tiny_seed(model, seed_text), _tiny_is_depth(model), _tiny_is_xl(model))


def looks_like_path(model: str) -> bool:
    """True for strings that can only be a file system path, never a Hub ``owner/name`` id."""
    return (model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1
            or (os.sep != "/" and os.sep in model))


def local_source(model: str) -> ModelSource:
    folder = Path(model).expanduser()
    if not folder.exists():
        raise ModelError(f"model folder '{model}' does not exist")
    check_components(folder, f"model folder '{model}'")
    return ModelSource(model, folder.resolve(), folder_fingerprint(folder),
                       is_tiny=tiny.read_marker(folder) is not None)


def file_source(model: str, model_config: Optional[str]) -> ModelSource:
    """A single-file checkpoint; its identity (file and configs) is completed when it loads."""
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelError(f"model file '{model}' does not exist: pass an existing .safetensors checkpoint, "
                         "a diffusers folder, a Hub id or an SD version (1.5, 2.0, 2.1, 2-depth)")
    return ModelSource(model, path.resolve(), single_file.file_fingerprint(path), is_tiny=False, kind="file",
                       model_config=model_config)


def load_single_file(source: ModelSource, dtype: torch.dtype, allow_pickle: bool) -> Tuple[ModelSource, tuple]:
    """(the source with its full identity, (scheduler config, unet, vae, text encoder, tokenizer,
    text encoder 2, tokenizer 2)) of a single-file checkpoint: configs chosen from its keys and shapes
    or ``source.model_config``; the last two are None but for SDXL."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415  start-up time (see component_loader)

    name, path = source.name, source.path
    single_file.check_file(path, name, allow_pickle)
    if path.suffix.lower() in single_file.SAFE_SUFFIXES:
        shapes, metadata = single_file.read_header(path, name)
        state = None
    else:
        state, metadata = single_file.read_state_dict(path, name)
        shapes = {key: tuple(value.shape) for key, value in state.items()}
    choice = single_file.choose_config(name, path, shapes, metadata, source.model_config)
    scheduler_config = check_prediction(single_file.scheduler_config(choice), name)
    tokenizer = single_file.load_tokenizer(choice, name)   # before the weights: the missing-vocabulary error is quick
    xl = single_file.detect(shapes, name).family == "sdxl"
    tokenizer_2 = single_file.load_tokenizer(choice, name, "tokenizer_2") if xl else None
    if state is None:
        state, _ = single_file.read_state_dict(path, name)
    dtype_kwarg = component_loader("unet")[1]
    unet = single_file.load_diffusers_part(UNet2DConditionModel, state, choice, "unet", dtype, dtype_kwarg, name)
    vae = single_file.load_diffusers_part(AutoencoderKL, state, choice, "vae", dtype, dtype_kwarg, name)
    if xl:
        text_encoder = single_file.load_xl_text_encoder(state, choice, "text_encoder", dtype, name)
        text_encoder_2 = single_file.load_xl_text_encoder(state, choice, "text_encoder_2", dtype, name)
    else:
        text_encoder, text_encoder_2 = single_file.load_text_encoder(state, choice, dtype, name), None
    identity = f"{source.identity}+{single_file.config_fingerprint(choice)}"
    return (ModelSource(name, path, identity, is_tiny=False, kind="file", model_config=source.model_config),
            (scheduler_config, unet, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2))


def hub_source(repo_id: str) -> ModelSource:
    """Resolve a Hub id to a local snapshot with only the files TokenFlow loads."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415  only for Hub ids (start-up time, see component_loader)

    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS,
                                          local_files_only=hub_offline()))
    except Exception as error:  # offline, not found, gated, invalid id, network ...
        raise ModelError(
            f"could not load model '{repo_id}' ({hub_error_reason(error)}): download it once "
            f"with `{download_command(repo_id)}` and pass --model DIR, "
            "or use --model tiny for an offline demo") from None
    check_components(snapshot, f"Hub model '{repo_id}'")
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    identity = f"{repo_id}@{commit}" if commit else folder_fingerprint(snapshot)
    return ModelSource(repo_id, snapshot, identity, is_tiny=False)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set *now* (huggingface_hub itself reads it once at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_error_reason(error: Exception) -> str:
    """A short, one-line explanation of a ``snapshot_download`` failure."""
    kinds = {cls.__name__ for cls in type(error).__mro__}
    if "GatedRepoError" in kinds:
        return "gated repository: accept its license on huggingface.co and log in"
    if "RepositoryNotFoundError" in kinds:
        return "not found on the Hugging Face Hub, or private"
    if "RevisionNotFoundError" in kinds:
        return "revision not found on the Hugging Face Hub"
    if "HFValidationError" in kinds:
        return "neither an existing folder nor a valid Hub repository id"
    if kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub is unreachable"
        return f"not in the local Hugging Face cache and {why}"
    return one_line(error)


def check_components(folder: Path, what: str) -> None:
    """Raise ModelError naming the diffusers sub-folders ``folder`` lacks."""
    missing = [f"{component}/" for component in COMPONENTS if not (folder / component).is_dir()]
    if missing:
        raise ModelError(f"{what} is not a diffusers Stable Diffusion folder: missing "
                         f"{', '.join(missing)} (needs {' '.join(c + '/' for c in COMPONENTS)})")


def folder_fingerprint(folder: Path, mtimes: bool = True) -> str:
    """sha256 over config/tokenizer file contents and (path, size, mtime_ns) of weight files
    (without ``mtimes``: (path, size), so that copies of one folder agree).

    Cheap: weight files are never read. Only the five pipeline components and
    ``model_index.json`` count.
    """
    digest = hashlib.sha256()
    for path in fingerprinted_files(folder):
        relative = path.relative_to(folder).as_posix()
        if path.suffix in CONFIG_SUFFIXES:
            digest.update(f"{relative}\0".encode() + path.read_bytes() + b"\0")
        else:
            stat = path.stat()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns if mtimes else ''}\0".encode())
    return f"sha256:{digest.hexdigest()}"


def comparable_identity(model: str) -> str:
    """The model as the skip rule compares outputs (docs/farm.md), with no network and no weights
    read: the tiny model's identity; a local folder's fingerprint without modification times (each
    node's copy of one folder agrees); a version name or Hub id as ``hub:<repo id>`` (any snapshot
    of one repository is the same model: a farm node need not have it downloaded to skip)."""
    kind, value = model_kind(model)
    if kind == "tiny":
        return _tiny_identity(str(model).strip(), value)
    if kind in ("path", "file"):
        folder = Path(value).expanduser().resolve()
        if kind == "file" and folder.is_file():
            return single_file.file_fingerprint(folder, mtimes=False)
        return folder_fingerprint(folder, mtimes=False) if folder.is_dir() else f"path:{folder}"
    return f"hub:{value}"


def fingerprinted_files(folder: Path) -> Iterator[Path]:
    index = folder / "model_index.json"
    if index.is_file():
        yield index
    if not index.is_file() and (folder / "config.json").is_file():   # a component folder itself (--vae)
        yield from sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CONFIG_SUFFIXES + WEIGHT_SUFFIXES)
    for component in COMPONENTS + XL_COMPONENTS:
        for path in sorted((folder / component).rglob("*")):
            if path.is_file() and path.suffix in CONFIG_SUFFIXES + WEIGHT_SUFFIXES:
                yield path


# ----------------------------------------------------------------------------- loading


def load_scheduler_config(source: ModelSource) -> dict:
    """The DDIM config from ``scheduler/``; TokenFlow needs epsilon prediction."""
    from diffusers import DDIMScheduler  # noqa: PLC0415  start-up time (see component_loader)

    try:
        scheduler = DDIMScheduler.from_pretrained(source.path, subfolder="scheduler")
    except Exception as error:
        raise ModelError(f"could not load the scheduler of model '{source.name}' "
                         f"({one_line(error)})") from None
    return check_prediction(dict(scheduler.config), source.name)


def check_prediction(scheduler_config: dict, name: str) -> dict:
    """``scheduler_config``, or ModelError when the model does not predict epsilon."""
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ModelError(
            f"model '{name}' predicts '{prediction}', but TokenFlow (like the original) "
            "needs an epsilon-prediction model such as stabilityai/stable-diffusion-2-1-base "
            "(--model 2.1)")
    return scheduler_config


# v-prediction Stable Diffusion models (768x768), refused by name before anything is downloaded
V_PREDICTION_MODELS = {
    "2.1-768": "stabilityai/stable-diffusion-2-1",
    "2.0-768": "stabilityai/stable-diffusion-2",
}


def refuse_known_v_prediction(model: str) -> None:
    """ModelError for a name or Hub id of V_PREDICTION_MODELS (it would be refused after its download)."""
    name = model.strip()
    hub_ids = {repo.lower(): version for version, repo in V_PREDICTION_MODELS.items()}
    version = name if name in V_PREDICTION_MODELS else hub_ids.get(name.lower())
    if version:
        base = version.split("-")[0]
        repo = "" if name.lower() == V_PREDICTION_MODELS[version].lower() else f" ({V_PREDICTION_MODELS[version]})"
        raise ModelError(
            f"model '{name}'{repo} is Stable Diffusion {base} at 768x768, a v-prediction model: TokenFlow, like the "
            f"original, needs an epsilon-prediction model; use --model {base} ({SD_VERSIONS[base]}, 512x512)")


def scheduler_config_for(model: str, guess: bool = True) -> Optional[dict]:
    """The DDIM scheduler config of ``model`` without loading (or downloading) its weights, for the
    checks before the load: the tiny model's, a local folder's ``scheduler/scheduler_config.json``,
    a Hub model's when the Hugging Face cache has it, Stable Diffusion's for the named versions;
    for another Hub model not in the cache, Stable Diffusion's as a guess (every SD 1.x/2.x base
    model has it; the load checks the real one), or None when ``guess`` is False. ModelError for a
    v-prediction model."""
    from diffusers import DDIMScheduler  # noqa: PLC0415  start-up time (see component_loader)

    from tokenflow.models.random_weights import scheduler_config  # noqa: PLC0415  builds on diffusers/transformers

    kind, value = model_kind(model)
    path = None
    if kind == "path":
        path = Path(value).expanduser() / "scheduler" / "scheduler_config.json"
    elif kind == "hub" and value not in SD_VERSIONS.values():
        path = _cached_hub_file(value, "scheduler/scheduler_config.json")
        if (path is None or not path.is_file()) and not guess:
            return None
    if path is None or not path.is_file():
        return scheduler_config()
    try:
        with quiet_hf_libraries():
            config = dict(DDIMScheduler.from_config(DDIMScheduler.load_config(str(path.parent))).config)
    except Exception:   # unreadable: the load reports it, with its reason
        return scheduler_config()
    return check_prediction(config, model)


def family_of(model: str) -> str:
    """``"sdxl"`` or ``"sd"`` for a ``--model`` string without loading (or downloading) anything, for
    what must be known before the frames are read (the default size): ``tiny-xl``, the ``xl``
    version, a folder or a Hub model in the Hugging Face cache whose ``unet/config.json`` asks for
    SDXL's added conditioning, a safetensors single file whose header has SDXL's OpenCLIP encoder.
    Anything else (a Hub model not downloaded, a pickle checkpoint) is taken for SD; the load finds
    the real family."""
    try:
        kind, value = model_kind(model)
    except ModelError:   # the checks before the load say what is wrong
        return "sd"
    if kind == "tiny":
        return "sdxl" if _tiny_is_xl(str(model).strip()) else "sd"
    if kind == "hub" and value == SD_VERSIONS["xl"]:
        return "sdxl"
    if kind == "path":
        path = Path(value).expanduser() / "unet" / "config.json"
    elif kind == "hub":
        path = _cached_hub_file(value, "unet/config.json")
    elif str(value).lower().endswith(single_file.SAFE_SUFFIXES):   # a safetensors file: its header names the parts
        try:
            shapes, _ = single_file.read_header(Path(value).expanduser(), str(model))
        except (ModelError, OSError):
            return "sd"
        return "sdxl" if any(key.startswith(single_file.XL_OPEN_CLIP) for key in shapes) else "sd"
    else:
        return "sd"
    try:
        return "sdxl" if text.is_text_time(json.loads(path.read_text(encoding="utf-8"))) else "sd"
    except (OSError, ValueError, TypeError, AttributeError):
        return "sd"


def _cached_hub_file(repo_id: str, filename: str) -> Optional[Path]:
    """``filename`` of ``repo_id`` when the Hugging Face cache holds it (no network)."""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415  only for Hub ids

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:   # not a valid repository id: the load says so
        return None
    return Path(found) if isinstance(found, str) else None


def load_component(source: ModelSource, component: str, dtype: torch.dtype, allow_pickle: bool = False, *,
                   loader: Optional[str] = None, what: Optional[str] = None):
    """``from_pretrained`` of one pipeline component (on CPU, in ``dtype``); safetensors only
    unless ``allow_pickle``. ``component`` "" with ``loader``: a folder that is the component itself
    (--vae); ``what`` names it in errors."""
    kind = loader or component
    what = what or f"the {component} of model '{source.name}'"
    loader_class, dtype_kwarg = component_loader(kind)
    folder = source.path / component if component else source.path
    if kind.startswith("tokenizer"):
        kwargs = {}
    else:
        kwargs = {dtype_kwarg: dtype, "use_safetensors": None if allow_pickle else True}
        if not allow_pickle and not any(folder.glob("*.safetensors")):
            pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise ModelError(f"{what} has only pickle weights ({pickled[0]}); "
                                 "tokenflow loads safetensors only, because pickle files can run code. Convert "
                                 "them (diffusers: from_pretrained(DIR).save_pretrained(DIR)) or, for weights "
                                 "you trust, pass --allow-pickle")
    try:
        if component:
            return loader_class.from_pretrained(source.path, subfolder=component, **kwargs)
        return loader_class.from_pretrained(source.path, **kwargs)
    except Exception as error:
        raise ModelError(f"could not load {what} ({one_line(error)})") from None


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def component_loader(component: str):
    """(class, name of its dtype keyword) for a pipeline component."""
    # diffusers / transformers load (seconds) when a pipeline is loaded, not with this module:
    # `tokenflow metrics` imports it (through quality.clip_metrics) and loads no pipeline
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415  start-up time
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: PLC0415  start-up time

    transformers_dtype_kwarg = "dtype" if transformers_major_minor() >= (4, 56) else "torch_dtype"
    diffusers_dtype_kwarg = "dtype" if major_minor("diffusers") >= (0, 40) else "torch_dtype"
    return {
        "unet": (UNet2DConditionModel, diffusers_dtype_kwarg),
        "vae": (AutoencoderKL, diffusers_dtype_kwarg),
        "text_encoder": (CLIPTextModel, transformers_dtype_kwarg),
        "tokenizer": (CLIPTokenizer, None),
        "text_encoder_2": (CLIPTextModelWithProjection, transformers_dtype_kwarg),
        "tokenizer_2": (CLIPTokenizer, None),
    }[component]


def transformers_major_minor() -> tuple[int, int]:
    return major_minor("transformers")


def major_minor(package: str) -> tuple[int, int]:
    """(major, minor) of an installed package's version (diffusers 0.40 and transformers 4.56 renamed
    ``torch_dtype`` to ``dtype``: the old name warns)."""
    major, minor = (int(re.match(r"\d+", part).group()) for part in
                    importlib.metadata.version(package).split(".")[:2])
    return major, minor


def move_to_device(modules: list, device: torch.device, dtype: torch.dtype, name: str) -> list:
    """``module.to(device)`` for each; out-of-memory becomes a ResourceError.

    On out-of-memory the modules go back to the CPU so the device memory is released.
    """
    try:
        return [module.to(device) for module in modules]
    except (OUT_OF_MEMORY, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
    for module in modules:
        module.to("cpu")
    release_device_memory(device)
    raise ResourceError(f"out of memory moving model '{name}' to {device} in "
                        f"{str(dtype).removeprefix('torch.')}: close other GPU programs, use "
                        "--dtype float16, or --device cpu")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, OUT_OF_MEMORY) or "out of memory" in str(error).lower()


def release_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
