"""Single-file Stable Diffusion 1.x / 2.x / XL checkpoints (``--model file.safetensors``, CivitAI-style).

A single file holds the original (LDM / CompVis, SGM for SDXL) layout: the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text encoder under
``cond_stage_model.`` (SD 1: Hugging Face CLIP ``cond_stage_model.transformer.*``; SD 2: OpenCLIP
``cond_stage_model.model.*``) or, for SDXL, both under ``conditioner.embedders.`` (``0.transformer.*``:
CLIP ViT-L, Hugging Face layout; ``1.model.*``: OpenCLIP ViT-bigG). Which Stable Diffusion it is
comes from the keys and shapes (``detect``), never from a download:

    SD 1.x    CLIP text encoder, context width 768, 4 UNet input channels   -> configs/sd15
    SD 2.x    OpenCLIP text encoder, context width 1024, 4 input channels   -> configs/sd2-base
    2-depth   OpenCLIP, 1024, 5 input channels (latents + depth)           -> configs/sd2-depth
    SDXL      CLIP-L + OpenCLIP bigG (conditioner.embedders.0/1), context 2048 -> configs/sdxl

SD 2.x base (512px, epsilon) and 768-v (v-prediction) have the same shapes: the file's metadata
(``modelspec.prediction_type`` / ``modelspec.architecture``), a ``v_pred`` key or a sibling
``.yaml`` (``parameterization: v``) tells them apart, else ``--model-config``. TokenFlow needs
epsilon prediction: a v-prediction checkpoint is refused with the reason.

The small configs ship in ``tokenflow/models/configs``, and so does the CLIP tokenizer's vocabulary
(``configs/clip-vocab``: ``vocab.json``, ``merges.txt``, 1.5 MB, written by
``scripts/make_clip_vocab.py`` from OpenAI's CLIP BPE table), so nothing is downloaded;
``--model-config DIR``'s ``tokenizer/`` replaces it (``tokenizer_files``). UNet and VAE are converted by
diffusers' ``from_single_file`` (given the state dict and our config folder); the text encoder by
``text_encoder_state_dict`` here (diffusers has no public single-file loader for transformers'
``CLIPTextModel``); SDXL's two by diffusers' ``convert_ldm_clip_checkpoint`` /
``convert_open_clip_checkpoint`` (``load_xl_text_encoder``).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from tokenflow.errors import ModelError, one_line

CONFIGS = Path(__file__).resolve().parent / "configs"
# --model-config names -> the shipped config folder (2.0 and 2.1 base share one architecture)
CONFIG_NAMES = {"1.5": "sd15", "2.0": "sd2-base", "2.1": "sd2-base", "2-depth": "sd2-depth", "xl": "sdxl"}
FAMILY_CONFIG = {"sd1": "1.5", "sd2": "2.1", "sd2-depth": "2-depth", "sdxl": "xl"}
FAMILY_OF_FOLDER = {"sd15": "sd1", "sd2-base": "sd2", "sd2-depth": "sd2-depth", "sdxl": "sdxl"}
FAMILY_WORDS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sd2-depth": "Stable Diffusion 2 depth",
                "sdxl": "SDXL"}
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."      # SD 1: Hugging Face CLIP (text_model. optional)
OPEN_CLIP = "cond_stage_model.model."       # SD 2: OpenCLIP
XL_CLIP = "conditioner.embedders.0.transformer."   # SDXL: CLIP ViT-L (Hugging Face layout)
XL_OPEN_CLIP = "conditioner.embedders.1.model."    # SDXL: OpenCLIP ViT-bigG
IN_CONV = UNET + "input_blocks.0.0.weight"  # [model channels, in channels, 3, 3]
# the first cross-attention's key projection [width, context dim] (SD: input_blocks.1; SDXL: input_blocks.4)
_CONTEXT = re.compile(re.escape(UNET) + r"input_blocks\.(\d+)\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$")
CONTEXT_WIDTHS = {"sd1": 768, "sd2": 1024, "sd2-depth": 1024, "sdxl": 2048}

# the CLIP BPE tokenizer's vocabulary SD 1.x, 2.x and both SDXL tokenizers share (shipped)
CLIP_VOCAB = CONFIGS / "clip-vocab"
VOCAB_FILES = ("vocab.json", "merges.txt")


@dataclass(frozen=True)
class Detected:
    """What a checkpoint's keys and shapes say: ``family`` (sd1, sd2, sd2-depth, sdxl) and the widths
    (``text_width``: SDXL's is both encoders' summed, the width of its text rows)."""

    family: str
    in_channels: int
    model_channels: int
    context_dim: int
    text_width: int


@dataclass(frozen=True)
class ConfigChoice:
    """The diffusers configs a checkpoint loads with: ``folder`` (unet/ vae/ text_encoder/ scheduler/
    tokenizer/), ``label`` for messages and identities ("1.5", "2.1", "2-depth" or the folder)."""

    folder: Path
    label: str
    named: bool


# ----------------------------------------------------------------------------- reading


def check_file(path: Path, name: str, allow_pickle: bool) -> None:
    """ModelError for a missing file, an unknown suffix or a pickle file without ``allow_pickle``."""
    if not path.is_file():
        raise ModelError(f"model file '{name}' does not exist: pass an existing .safetensors checkpoint, "
                         "a diffusers folder, a Hub id or an SD version (1.5, 2.0, 2.1, 2-depth)")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ModelError(f"model '{name}' is a file, neither a diffusers folder nor a checkpoint TokenFlow reads "
                         f"({'/'.join(SUFFIXES)}): pass a .safetensors Stable Diffusion checkpoint or a diffusers folder")
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(f"model file '{name}' is a pickle checkpoint ({suffix}); tokenflow loads safetensors only, "
                         "because pickle files can run code: use a .safetensors version of it or, for a file you "
                         "trust, pass --allow-pickle")


def read_header(path: Path, name: str) -> Tuple[Dict[str, tuple], Dict[str, str]]:
    """(key -> shape, metadata) of a safetensors file, without reading the weights."""
    from safetensors import safe_open  # noqa: PLC0415  start-up time (only when a file is loaded)

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except Exception as error:
        raise ModelError(f"model file '{name}' is not a readable safetensors file ({one_line(error)}): "
                         "download it again or check its path") from None
    return shapes, metadata


def read_state_dict(path: Path, name: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(state dict, metadata) of the checkpoint (pickle files only after ``check_file`` allowed them)."""
    try:
        if path.suffix.lower() in SAFE_SUFFIXES:
            from safetensors import safe_open  # noqa: PLC0415  start-up time (only when a file is loaded)

            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
        loaded = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)   # --allow-pickle given
    except Exception as error:
        raise ModelError(f"could not read model file '{name}' ({one_line(error)}): download it again or "
                         "check its path") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"model file '{name}' holds no state dict: not a Stable Diffusion checkpoint")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


# ----------------------------------------------------------------------------- detection


def detect(shapes: Mapping[str, tuple], name: str) -> Detected:
    """The Stable Diffusion family of a checkpoint from its key -> shape map (no weights needed);
    ModelError naming the file and the fix for anything TokenFlow cannot run."""
    if not any(key.startswith(UNET) for key in shapes):
        hint = " (it looks like a LoRA: pass it with --lora)" if any("lora" in key for key in shapes) else ""
        raise ModelError(f"model file '{name}' is not a Stable Diffusion checkpoint: no UNet weights "
                         f"({UNET}*){hint}; pass a full SD 1.x/2.x checkpoint or a diffusers folder")
    xl = any(key.startswith("conditioner.embedders.") for key in shapes)
    if xl:
        check_xl_conditioner(shapes, name)
    elif any(key.startswith(UNET + "label_emb.") for key in shapes):
        raise ModelError(f"model file '{name}' is a class-conditioned checkpoint (label_emb, e.g. unCLIP): TokenFlow "
                         "runs Stable Diffusion 1.x, 2.x and SDXL base; pass one of those")
    missing = [prefix + "*" for prefix in (VAE,) if not any(key.startswith(prefix) for key in shapes)]
    if not xl and not any(key.startswith((CLIP, OPEN_CLIP)) for key in shapes):
        missing.append("cond_stage_model.*")
    contexts = sorted((int(m.group(1)), key) for key in shapes if (m := _CONTEXT.match(key)))
    if missing or IN_CONV not in shapes or not contexts:
        parts = ", ".join(missing) or (IN_CONV if IN_CONV not in shapes else "a cross-attention (attn2.to_k)")
        raise ModelError(f"model file '{name}' lacks {parts}: TokenFlow needs a full Stable Diffusion 1.x/2.x/XL "
                         "checkpoint (UNet, VAE and text encoder in one file) or a diffusers folder")
    model_channels, in_channels = int(shapes[IN_CONV][0]), int(shapes[IN_CONV][1])
    context_dim = int(shapes[contexts[0][1]][-1])
    open_clip = any(key.startswith(OPEN_CLIP) for key in shapes)
    if xl:
        token = next(key for key in shapes if key.startswith(XL_CLIP) and key.endswith("token_embedding.weight"))
        text_width = int(shapes[token][-1]) + int(shapes[XL_OPEN_CLIP + "token_embedding.weight"][-1])
    else:
        token = OPEN_CLIP + "token_embedding.weight" if open_clip else next(
            (key for key in shapes if key.startswith(CLIP) and key.endswith("embeddings.token_embedding.weight")), None)
        text_width = int(shapes[token][-1]) if token in shapes else 0
    if in_channels == 9:
        raise ModelError(f"model file '{name}' is an inpainting checkpoint (9 UNet input channels): TokenFlow "
                         "needs a text-to-image (4 channels) or depth (5) Stable Diffusion checkpoint")
    if in_channels not in (4, 5):
        raise ModelError(f"model file '{name}' has {in_channels} UNet input channels: TokenFlow needs a "
                         "Stable Diffusion 1.x/2.x text-to-image (4) or depth (5) checkpoint")
    family = "sdxl" if xl else ("sd2-depth" if in_channels == 5 else "sd2") if open_clip else "sd1"
    if in_channels == 5 and xl:
        raise ModelError(f"model file '{name}' is an SDXL checkpoint with a 5-channel UNet: TokenFlow runs SDXL "
                         "text-to-image (4 channels); there is no SDXL depth model (use an SDXL depth ControlNet)")
    if in_channels == 5 and not open_clip:
        raise ModelError(f"model file '{name}' has a 5-channel (depth) UNet but an SD 1 text encoder: only "
                         "Stable Diffusion 2 depth is supported; pass --model-config DIR with its configs")
    if text_width and text_width != context_dim:
        raise ModelError(f"model file '{name}': its text encoder is {text_width} wide but its UNet expects "
                         f"{context_dim}: the file is damaged or a mix of models")
    return Detected(family, in_channels, model_channels, context_dim, text_width)


def check_xl_conditioner(shapes: Mapping[str, tuple], name: str) -> None:
    """ModelError unless a ``conditioner.embedders.*`` file is SDXL base's: CLIP ViT-L at 0, OpenCLIP at 1."""
    has_l = any(key.startswith(XL_CLIP) and key.endswith("token_embedding.weight") for key in shapes)
    has_g = XL_OPEN_CLIP + "token_embedding.weight" in shapes
    if has_l and has_g:
        return
    if not has_l and any(key.startswith("conditioner.embedders.0.model.") for key in shapes):
        raise ModelError(f"model file '{name}' is an SDXL refiner checkpoint (one OpenCLIP text encoder): TokenFlow "
                         "runs SDXL base 1.0 and its fine-tunes; pass a base checkpoint")
    lacking = " and ".join(p + "*" for p, ok in ((XL_CLIP, has_l), (XL_OPEN_CLIP, has_g)) if not ok)
    raise ModelError(f"model file '{name}' is an SDXL-type checkpoint without {lacking}: TokenFlow needs an SDXL "
                     "base checkpoint with both text encoders (CLIP ViT-L and OpenCLIP ViT-bigG)")


def prediction_evidence(path: Path, shapes: Mapping[str, tuple], metadata: Mapping[str, str]) -> Optional[Tuple[str, str]]:
    """("v" or "epsilon", where it was read) when the checkpoint says how it predicts, else None."""
    kind = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if kind:
        return ("v" if kind.startswith("v") else "epsilon"), f"its metadata (modelspec.prediction_type={kind})"
    architecture = str(metadata.get("modelspec.architecture", "")).strip().lower()
    if architecture.startswith("stable-diffusion-v"):
        is_v = architecture.endswith("-v") or "768-v" in architecture
        return ("v" if is_v else "epsilon"), f"its metadata (modelspec.architecture={architecture})"
    if "v_pred" in shapes:
        return "v", "its v_pred key"
    yaml_file = path.with_suffix(".yaml")
    if yaml_file.is_file():
        match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml_file.read_text(errors="replace"), re.M)
        kind = match.group(1).lower() if match else "eps"
        return ("v" if kind == "v" else "epsilon"), f"{yaml_file.name} (parameterization: {kind})"
    return None


def refuse_v_prediction(name: str, where: str) -> None:
    raise ModelError(f"model file '{name}' is a v-prediction checkpoint (from {where}): TokenFlow, like the "
                     "original, needs an epsilon-prediction model such as a Stable Diffusion 1.5 or 2.x-base "
                     "(512px) checkpoint")


def choose_config(name: str, path: Path, shapes: Mapping[str, tuple], metadata: Mapping[str, str],
                  model_config: Optional[str]) -> ConfigChoice:
    """The configs ``path`` loads with: ``--model-config`` (a name or a folder), else the family
    ``detect`` reads from the shapes. ModelError for v-prediction or an SD 2.x file that does not
    say whether it is base or 768-v."""
    detected = detect(shapes, name)
    evidence = prediction_evidence(path, shapes, metadata)
    if evidence and evidence[0] == "v":
        refuse_v_prediction(name, evidence[1])
    if model_config is not None:
        choice = config_from_option(model_config)
        if choice.named:
            if FAMILY_OF_FOLDER[choice.folder.name] != detected.family:
                raise ModelError(f"model file '{name}' is a {FAMILY_WORDS[detected.family]} checkpoint "
                                 f"({describe(detected)}), not {choice.label}: pass --model-config "
                                 f"{FAMILY_CONFIG[detected.family]}, or DIR with its own configs")
    elif detected.family == "sd2" and evidence is None:
        raise ModelError(f"model file '{name}' is a Stable Diffusion 2.x checkpoint, and nothing in it says whether "
                         "it is a 512px base model (epsilon) or a 768px v-prediction one (which TokenFlow cannot "
                         "use): if it is a base model pass --model-config 2.1 (or 2.0)")
    else:
        choice = named_config(FAMILY_CONFIG[detected.family])
    check_widths(name, detected, choice)
    return choice


def describe(detected: Detected) -> str:
    return f"{detected.in_channels} input channels, context width {detected.context_dim}"


def config_from_option(model_config: str) -> ConfigChoice:
    """``--model-config``: a name (1.5, 2.0, 2.1, 2-depth, xl) or a diffusers folder with the configs."""
    value = str(model_config).strip()
    if value in CONFIG_NAMES:
        return named_config(value)
    if value in ("2.0-768", "2.1-768"):
        refuse_v_prediction(value, "--model-config")
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise ModelError(f"--model-config '{value}' is neither {', '.join(CONFIG_NAMES)} nor a folder: pass one "
                         "of those names or a diffusers folder with unet/ vae/ text_encoder/ scheduler/ configs")
    missing = [f"{part}/{file}" for part, file in (("unet", "config.json"), ("vae", "config.json"),
                                                  ("text_encoder", "config.json"),
                                                  ("scheduler", "scheduler_config.json"))
               if not (folder / part / file).is_file()]
    if missing:
        raise ModelError(f"--model-config '{value}' lacks {', '.join(missing)}: pass a diffusers folder with "
                         "the model's configs, or one of " + ", ".join(CONFIG_NAMES))
    return ConfigChoice(folder.resolve(), str(folder), named=False)


def named_config(label: str) -> ConfigChoice:
    return ConfigChoice(CONFIGS / CONFIG_NAMES[label], label, named=True)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"could not read config '{path}' ({one_line(error)}): fix or replace it") from None


def check_widths(name: str, detected: Detected, choice: ConfigChoice) -> None:
    """ModelError when the checkpoint's widths (from its shapes) do not fit the chosen configs."""
    unet = read_json(choice.folder / "unet" / "config.json")
    text = read_json(choice.folder / "text_encoder" / "config.json")
    if detected.family == "sdxl":
        second = choice.folder / "text_encoder_2" / "config.json"
        if not second.is_file():
            raise ModelError(f"model file '{name}' is an SDXL checkpoint but the {choice.label} configs have no "
                             "text_encoder_2/config.json: pass --model-config xl, or DIR with an SDXL folder's configs")
        text = {"hidden_size": (text.get("hidden_size") or 0) + (read_json(second).get("hidden_size") or 0)}
    expected = {"UNet input channels": (unet.get("in_channels"), detected.in_channels),
                "UNet width": ((unet.get("block_out_channels") or [None])[0], detected.model_channels),
                "context width": (unet.get("cross_attention_dim"), detected.context_dim)}
    if detected.text_width:
        expected["text encoder width"] = (text.get("hidden_size"), detected.text_width)
    wrong = [f"{what} {got} (config: {want})" for what, (want, got) in expected.items() if want != got]
    if wrong:
        raise ModelError(f"model file '{name}' does not fit the {choice.label} configs: {'; '.join(wrong)}; "
                         "pass --model-config with the right name or a folder with its configs")


# ----------------------------------------------------------------------------- identity


def file_fingerprint(path: Path, mtimes: bool = True) -> str:
    """sha256 over the file's size, (with ``mtimes``) its mtime_ns, and 16 samples of 64 KiB spread
    over it: cheap (1 MiB read), yet two fine-tunes of one architecture (same size) differ."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}\0{stat.st_mtime_ns if mtimes else ''}\0".encode())
    with open(path, "rb") as handle:
        for index in range(16):
            handle.seek(stat.st_size * index // 16)
            digest.update(handle.read(1 << 16))
    return f"file:sha256:{digest.hexdigest()}"


def config_fingerprint(choice: ConfigChoice) -> str:
    """sha256 of the config (and tokenizer config) files the checkpoint is loaded with."""
    digest = hashlib.sha256()
    for path in sorted(choice.folder.rglob("*.json")):
        relative = path.relative_to(choice.folder).as_posix()
        if relative.split("/")[0] in ("unet", "vae", "text_encoder", "scheduler", "tokenizer", "text_encoder_2",
                                      "tokenizer_2"):
            digest.update(f"{relative}\0".encode() + path.read_bytes() + b"\0")
    return f"config:{choice.folder.name if choice.named else 'folder'}:sha256:{digest.hexdigest()[:16]}"


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_files(choice: ConfigChoice, part: str = "tokenizer") -> Tuple[Path, Path]:
    """(vocab.json, merges.txt) of the CLIP tokenizer: ``--model-config DIR``'s ``part`` folder
    (``tokenizer/``, SDXL's ``tokenizer_2/``; then its ``tokenizer/``) when it holds them, else the
    shipped vocabulary (``CLIP_VOCAB``): SD 1.x, 2.x and both SDXL tokenizers share it."""
    for own in (choice.folder / part, choice.folder / "tokenizer", CLIP_VOCAB):
        if all((own / f).is_file() for f in VOCAB_FILES):
            return own / VOCAB_FILES[0], own / VOCAB_FILES[1]
    raise ModelError(f"the CLIP vocabulary is missing from {CLIP_VOCAB}: reinstall tokenflow")


def load_tokenizer(choice: ConfigChoice, name: str, part: str = "tokenizer"):
    """The CLIP tokenizer ``part`` (``tokenizer``, SDXL's ``tokenizer_2``): the vocabulary files
    (``tokenizer_files``) with the chosen configs' tokenizer settings (SD 2.x and SDXL's second pad
    with ``!``, SD 1.x and SDXL's first with ``<|endoftext|>``)."""
    from transformers import CLIPTokenizer  # noqa: PLC0415  start-up time

    files = tokenizer_files(choice, part)
    with tempfile.TemporaryDirectory(prefix="tokenflow-tokenizer-") as folder:
        for source in files:
            shutil.copyfile(source, Path(folder) / source.name)
        for config in ("tokenizer_config.json", "special_tokens_map.json"):
            given = choice.folder / part / config
            if given.is_file():
                shutil.copyfile(given, Path(folder) / config)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(folder)
        except Exception as error:
            raise ModelError(f"could not load the tokenizer for model file '{name}' from {files[0].parent} "
                             f"({one_line(error)}): replace its vocab.json and merges.txt") from None
    encoder = choice.folder / ("text_encoder_2" if part == "tokenizer_2" else "text_encoder") / "config.json"
    try:
        fits = json.loads(encoder.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):   # the text encoder's own load says what is wrong with its config
        fits = None
    if isinstance(fits, int) and len(tokenizer) > fits:
        raise ModelError(f"model file '{name}': the tokenizer vocabulary {files[0]} has {len(tokenizer)} "
                         f"tokens but the text encoder of {choice.folder} takes {fits}: put the model's own "
                         f"tokenizer (vocab.json, merges.txt) in {choice.folder / part}")
    return tokenizer


# ----------------------------------------------------------------------------- text encoder


def text_encoder_state_dict(state: Mapping[str, torch.Tensor], layers: int) -> Dict[str, torch.Tensor]:
    """The text encoder's weights under transformers' ``CLIPTextModel`` names (without ``text_model.``).

    SD 1 stores Hugging Face CLIP already (``cond_stage_model.transformer.[text_model.]*``). SD 2 stores
    OpenCLIP (``cond_stage_model.model.*``): fused ``attn.in_proj_*`` [3D, D] split into q, k, v;
    ``ln_1/ln_2/mlp.c_fc/mlp.c_proj`` renamed; resblocks past ``layers`` dropped (SD 2 uses the
    penultimate layer: its config has 23 of OpenCLIP's 24); ``text_projection``/``logit_scale`` unused.
    """
    out: Dict[str, torch.Tensor] = {}
    if any(key.startswith(CLIP) for key in state):
        for key, value in state.items():
            if key.startswith(CLIP):
                out[key[len(CLIP):].removeprefix("text_model.")] = value
        return out
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
    block = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")   # attn.in_proj_weight
    for key, value in state.items():
        if not key.startswith(OPEN_CLIP):
            continue
        rest = key[len(OPEN_CLIP):]
        if rest == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = value
        elif rest == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif rest.startswith("ln_final."):
            out["final_layer_norm." + rest.split(".", 1)[1]] = value
        elif (match := block.match(rest)) and int(match.group(1)) < layers:
            index, part, kind = int(match.group(1)), match.group(2), match.group(3)
            prefix = f"encoder.layers.{index}."
            if part == "attn.in_proj":
                for projection, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{projection}_proj.{kind}"] = chunk
            elif part in renames:
                out[f"{prefix}{renames[part]}.{kind}"] = value
    return out


def load_text_encoder(state: Mapping[str, torch.Tensor], choice: ConfigChoice, dtype: torch.dtype, name: str):
    """transformers' ``CLIPTextModel`` from the chosen config with the checkpoint's weights, in ``dtype``."""
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415  start-up time

    config = CLIPTextConfig.from_pretrained(str(choice.folder / "text_encoder"))
    weights = text_encoder_state_dict(state, config.num_hidden_layers)
    model = CLIPTextModel(config)
    own = model.state_dict()
    given = {key for key in own if key.removeprefix("text_model.") in weights}
    missing = [key for key, _ in model.named_parameters() if key not in given]
    if missing:
        raise ModelError(f"model file '{name}' lacks {len(missing)} text encoder weights (e.g. {missing[0]}): "
                         f"it does not fit the {choice.label} configs; pass --model-config with its configs")
    try:
        model.load_state_dict({key: weights[key.removeprefix("text_model.")] for key in given}, strict=False)
    except RuntimeError as error:   # shape mismatch
        raise ModelError(f"model file '{name}': its text encoder does not fit the {choice.label} configs "
                         f"({one_line(error)}); pass --model-config with its configs") from None
    return model.to(dtype).eval()


def load_xl_text_encoder(state: Mapping[str, torch.Tensor], choice: ConfigChoice, part: str, dtype: torch.dtype,
                         name: str):
    """SDXL's ``text_encoder`` (``CLIPTextModel`` from ``conditioner.embedders.0.transformer.*``) or
    ``text_encoder_2`` (``CLIPTextModelWithProjection`` from the OpenCLIP ``conditioner.embedders.1.model.*``:
    fused q/k/v split, ``text_projection`` transposed; all its layers are used, as SDXL takes the
    penultimate hidden states through ``output_hidden_states``), converted by diffusers' public
    single-file helpers, in ``dtype``."""
    from diffusers.loaders.single_file_utils import (  # noqa: PLC0415  start-up time
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415  (as above)

    config = CLIPTextConfig.from_pretrained(str(choice.folder / part))
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel)(config)
    try:
        weights = (convert_open_clip_checkpoint(model, state, prefix=XL_OPEN_CLIP) if part == "text_encoder_2"
                   else convert_ldm_clip_checkpoint(state, remove_prefix=XL_CLIP))
    except Exception as error:
        raise ModelError(f"could not convert the {part} of model file '{name}' ({one_line(error)}): it is damaged "
                         f"or does not fit the {choice.label} configs; pass --model-config with its configs") from None
    # transformers 5's CLIPTextModel names its weights without "text_model." (WithProjection keeps it)
    weights = {key.removeprefix("text_model."): value for key, value in weights.items()}
    own = {key.removeprefix("text_model."): key for key in model.state_dict()}
    shapes = {key.removeprefix("text_model."): tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key, _ in model.named_parameters() if key.removeprefix("text_model.") not in weights]
    wrong = [key for key in own if key in weights and tuple(weights[key].shape) != shapes[key]]
    if missing or wrong:
        what = f"lacks {len(missing)} {part} weights (e.g. {missing[0]})" if missing else (
            f"has a {part} weight {wrong[0]} of shape {list(weights[wrong[0]].shape)} (config: {list(shapes[wrong[0]])})")
        raise ModelError(f"model file '{name}' {what}: it does not fit the {choice.label} configs; pass "
                         "--model-config with its configs")
    model.load_state_dict({name: weights[key].to(dtype) for key, name in own.items() if key in weights},
                          strict=False, assign=True)
    for key, buffer in list(model.named_buffers()):   # position_ids when the file has none
        if buffer.is_meta:
            owner, _, leaf = key.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                                       persistent=False)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- UNet, VAE


def load_diffusers_part(cls, state: Mapping[str, torch.Tensor], choice: ConfigChoice, part: str,
                        dtype: torch.dtype, dtype_kwarg: str, name: str):
    """``cls.from_single_file`` (diffusers converts the LDM keys) with the chosen ``part`` config."""
    try:
        model = cls.from_single_file(dict(state), config=str(choice.folder), subfolder=part, local_files_only=True,
                                     **{dtype_kwarg: dtype})
    except Exception as error:
        raise ModelError(f"could not load the {part} of model file '{name}' with the {choice.label} configs "
                         f"({one_line(error)}); pass --model-config with its configs") from None
    empty = [key for key, value in model.named_parameters() if value.is_meta]
    if empty:
        raise ModelError(f"model file '{name}' lacks {len(empty)} {part} weights (e.g. {empty[0]}): it does not "
                         f"fit the {choice.label} configs; pass --model-config with its configs")
    return model.eval()


def scheduler_config(choice: ConfigChoice) -> dict:
    """The chosen configs' DDIM scheduler config (every field diffusers fills in)."""
    from diffusers import DDIMScheduler  # noqa: PLC0415  start-up time

    return dict(DDIMScheduler.from_config(read_json(choice.folder / "scheduler" / "scheduler_config.json")).config)
