"""LoRA weights and textual-inversion embeddings, applied to a loaded model before anything runs.

``--lora PATH_OR_ID[:SCALE]``: a ``.safetensors`` file, a folder holding one, or a Hub id, in the
kohya/A1111 (``lora_unet_*.lora_down``, ``lora_te[1|2]_*``; SDXL UNet layers by their original
``input_blocks``/``middle_block``/``output_blocks`` names (``models.ldm_names``) or diffusers'),
diffusers (``unet.*.lora.down``, ``text_encoder[_2].*``, ``*.lora_linear_layer``,
``*.processor.to_q_lora``) or PEFT (``*.lora_A``) layout. Each LoRA is injected with PEFT, merged
into the UNet's (and, when the file has them, the text encoders') weights at its scale, and the
adapter modules are removed again: every backend (eager processors, torch.compile, AOTInductor,
ONNX, TensorRT) sees plain fused weights.

``--embedding PATH[:TOKEN]``: diffusers' ``{token: [n, D]}``, A1111's ``{"string_to_param": {"*":
[n, D]}, "name": ...}`` or ``{"emb_params": [n, D]}``; for SDXL ``{"clip_l": [n, D1], "clip_g":
[n, D2]}`` (one set per text encoder). A multi-vector embedding adds TOKEN, TOKEN_1, ...,
TOKEN_{n-1}; ``expand_prompt`` turns TOKEN in a prompt into all of them.

Each adapter contributes one ``identity`` part (content sha256 or Hub commit, and scale or token)
that ``models.load`` appends to the model identity, so inversion caches, checkpoints and exported
graphs of a model with adapters are never those of the plain model. Problems are one-line
``ModelError``s naming the file and the fix.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from tokenflow.errors import ModelError, one_line
from tokenflow.models.hf import download_command
from tokenflow.models.ldm_names import ldm_module_names

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_PICKLE_FIX = ("tokenflow loads safetensors only, because pickle files can run code: convert it to .safetensors "
               "or, for a file you trust, pass --allow-pickle")


# ----------------------------------------------------------------------------- flag values


@dataclass(frozen=True)
class LoraSpec:
    source: str    # a file, a folder or a Hub id
    scale: float


@dataclass(frozen=True)
class EmbeddingSpec:
    path: str
    token: Optional[str]   # None: the token the file names, else its file name


def parse_lora(text: str) -> LoraSpec:
    """``PATH_OR_ID[:SCALE]``: the tail after the last ':' is a scale only when it is a number, so
    ``C:\\loras\\x.safetensors`` and ``owner/name`` stay whole. ModelError for a non-finite scale."""
    text = str(text).strip()
    head, sep, tail = text.rpartition(":")
    if not sep or not head or not _FLOAT.fullmatch(tail.strip()) or Path(text).expanduser().exists():
        return LoraSpec(text, 1.0)
    scale = float(tail)
    if not math.isfinite(scale):
        raise ModelError(f"--lora '{text}': the scale must be a finite number, e.g. {head}:0.8")
    return LoraSpec(head, scale)


def parse_embedding(text: str) -> EmbeddingSpec:
    """``PATH[:TOKEN]``: the tail after the last ':' is a token unless it holds a path separator
    (``C:\\emb.pt``) or the whole string names an existing file."""
    text = str(text).strip()
    head, sep, tail = text.rpartition(":")
    if not sep or not head or not tail.strip() or "/" in tail or "\\" in tail or Path(text).expanduser().exists():
        return EmbeddingSpec(text, None)
    return EmbeddingSpec(head, tail.strip())


# ----------------------------------------------------------------------------- files


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_tensors(path: Path, what: str, allow_pickle: bool) -> dict:
    """The tensors of a .safetensors file (or, with ``allow_pickle``, of a pickle file)."""
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(f"{what} '{path}' is a pickle file: {_PICKLE_FIX}")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise ModelError(f"could not read {what} '{path}' ({one_line(error)}): is it a complete, "
                             "uncorrupted file?") from None
    if path.suffix != ".safetensors":
        raise ModelError(f"{what} '{path}' is not a .safetensors file (nor .bin/.pt/.ckpt with --allow-pickle)")
    from safetensors.torch import load_file  # noqa: PLC0415  start-up time (only with --lora/--embedding)

    try:
        return load_file(str(path))
    except Exception as error:
        raise ModelError(f"could not read {what} '{path}' ({one_line(error)}): is it a complete, "
                         "uncorrupted .safetensors file?") from None


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1
            or text.endswith((".safetensors",) + PICKLE_SUFFIXES))


def resolve_lora_file(source: str, allow_pickle: bool, hub_offline: bool) -> Tuple[Path, str]:
    """(the weights file, its content fingerprint) of a ``--lora`` file, folder or Hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        return path, "sha256:" + sha256_of(path)
    if path.is_dir():
        found = _lora_file_in(path, f"LoRA folder '{source}'", allow_pickle)
        return found, "sha256:" + sha256_of(found)
    if _looks_like_path(source):
        raise ModelError(f"LoRA '{source}' does not exist: pass a .safetensors file, a folder holding one, "
                         "or a Hub id (owner/name)")
    from huggingface_hub import snapshot_download  # noqa: PLC0415  only for Hub ids

    patterns = ["*.safetensors", "*.json"] + (["*.bin"] if allow_pickle else [])
    try:
        folder = Path(snapshot_download(source, allow_patterns=patterns, local_files_only=hub_offline))
    except Exception as error:
        why = "HF_HUB_OFFLINE is set" if hub_offline else one_line(error)
        raise ModelError(f"could not load LoRA '{source}' from the Hugging Face Hub ({why}): download it once with "
                         f"`{download_command(source)}` and pass --lora DIR") from None
    found = _lora_file_in(folder, f"Hub LoRA '{source}'", allow_pickle)
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else sha256_of(found)
    return found, f"{source}@{commit}/{found.name}"


def _lora_file_in(folder: Path, what: str, allow_pickle: bool) -> Path:
    for name in LORA_FILE_NAMES:
        if (folder / name).is_file() and (allow_pickle or name.endswith(".safetensors")):
            return folder / name
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if files:
        raise ModelError(f"{what} holds several .safetensors files ({', '.join(f.name for f in files[:4])}): "
                         "pass the LoRA's file itself with --lora FILE")
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled and not allow_pickle:
        raise ModelError(f"{what} has only pickle weights ({pickled[0]}): {_PICKLE_FIX}")
    raise ModelError(f"{what} holds no LoRA weights ({LORA_FILE_NAMES[0]} or one .safetensors file)")


# ----------------------------------------------------------------------------- LoRA


@dataclass
class LoraPair:
    """One adapted layer: down ``A`` [r, in, ...], up ``B`` [out, r, ...], alpha (None: r)."""

    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    alpha: Optional[float] = None


_COMPONENT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
                       "lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                       "lora_te2_": "text_encoder_2"}
_OLD_PROCESSOR = re.compile(r"^(?P<m>.+?)(?:\.processor)?\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<d>down|up)$")
_DIFFUSERS = re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.(?P<d>down|up)$")
_PEFT = re.compile(r"^(?P<m>.+)\.lora_(?P<d>A|B)$")
_KOHYA = re.compile(r"^(?P<m>.+)\.lora_(?P<d>down|up)$")
_PROCESSOR_NAMES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_PROCESSOR_NAMES["text_encoder_2"] = _PROCESSOR_NAMES["text_encoder"]


def lora_layers(tensors: dict, modules: Dict[str, Dict[str, torch.nn.Module]], what: str) -> Dict[str, Dict[str, LoraPair]]:
    """``{component: {module name: LoraPair}}`` from a LoRA file's tensors in any supported layout;
    ``modules``: each component's ``named_modules()`` (kohya names are matched against them, the
    UNet's also by their original names: SDXL kohya LoRAs use those)."""
    if not any("lora" in str(key).lower() for key in tensors):
        raise ModelError(f"{what} is not a LoRA: it has no LoRA weights (keys like ...lora_down.weight or "
                         "...lora_A.weight); a full checkpoint goes to --model, a textual inversion to --embedding")
    layers: Dict[str, Dict[str, LoraPair]] = {c: defaultdict(LoraPair) for c in modules}
    kohya_names = {c: {name.replace(".", "_"): name for name in named} for c, named in modules.items()}
    unet = modules.get("unet", {}).get("")
    if unet is not None:
        original = ldm_module_names(modules["unet"], unet.config)
        kohya_names["unet"].update({ldm.replace(".", "_"): name for name, ldm in original.items()})
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            continue
        component, name = _component_of(key, what)
        if component not in layers:
            raise ModelError(f"{what} is a LoRA for SDXL (it has weights for a second text encoder, '{key}'), but "
                             "the model is Stable Diffusion 1.x/2.x: use a LoRA trained for this model's base")
        name = name.removeprefix("base_model.model.")
        if key.startswith("lora_") and "." in name:   # kohya: lora_unet_<module_with_underscores>.lora_down.weight
            module, _, rest = name.partition(".")
            names = kohya_names[component]
            module = names.get(module) or names.get(module.removeprefix("text_model_")) or module
            name = f"{module}.{rest}"
        stem, _, leaf = name.rpartition(".")
        if leaf == "alpha":
            layers[component][_module_of(stem, component) or stem].alpha = float(value)
            continue
        module = _module_of(stem, component) if leaf == "weight" else None
        if module is None:
            raise ModelError(f"{what} has weights tokenflow cannot apply ('{key}'): only LoRA (lora_A/lora_B, "
                             "lora_down/lora_up) layers are supported, not LyCORIS (LoHa, LoKr), DoRA or full weights")
        down = name.endswith(("down.weight", "lora_A.weight"))
        setattr(layers[component][module], "down" if down else "up", value)
    found = {c: dict(pairs) for c, pairs in layers.items() if pairs}
    if not found:
        raise ModelError(f"{what} is not a LoRA: it has no LoRA weights (keys like ...lora_down.weight or "
                         "...lora_A.weight); a full checkpoint goes to --model")
    return found


def _component_of(key: str, what: str) -> Tuple[str, str]:
    """(component, the key without its component prefix)."""
    for prefix, component in _COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix):]
    return "unet", key   # PEFT's own files hold the UNet's layers without a prefix


def _module_of(stem: str, component: str) -> Optional[str]:
    """The module name in a weight key without its ``.weight`` (None: not a LoRA weight)."""
    match = _OLD_PROCESSOR.match(stem)
    if match:
        return f"{match['m']}.{_PROCESSOR_NAMES[component][match['p']]}"
    for pattern in (_DIFFUSERS, _PEFT, _KOHYA):
        match = pattern.match(stem)
        if match:
            return match["m"]
    return None


def check_lora_fits(layers: Dict[str, LoraPair], modules: Dict[str, torch.nn.Module], what: str,
                    component: str, model_name: str) -> Dict[str, LoraPair]:
    """``layers`` with their modules' names as this model spells them; ModelError naming the first
    layer that is missing or has another shape (a LoRA for another base model)."""
    fitted = {}
    for name, pair in layers.items():
        if pair.down is None or pair.up is None:
            raise ModelError(f"{what} is incomplete: layer '{name}' lacks its {'up' if pair.down is not None else 'down'} "
                             "weights (a damaged or truncated file?)")
        spelled = next((n for n in (name, f"text_model.{name}", name.removeprefix("text_model.")) if n in modules), None)
        module = modules.get(spelled)
        if module is None:
            raise ModelError(f"{what} is for another base model: its layer '{name}' matches no layer of the {component} "
                             f"of model '{model_name}' (an SDXL LoRA, or another architecture?); use a LoRA trained for "
                             "this model's base")
        sizes = _in_out(module)
        if sizes is None:
            raise ModelError(f"{what}: layer '{name}' is a {type(module).__name__}, which LoRA cannot adapt here")
        rank = pair.down.shape[0]
        if pair.down.shape[1] != sizes[0] or pair.up.shape[0] != sizes[1] or pair.up.shape[1] != rank:
            raise ModelError(
                f"{what} is for another base model: its layer '{name}' maps {pair.down.shape[1]} -> {pair.up.shape[0]} "
                f"features, but the {component} of model '{model_name}' has {sizes[0]} -> {sizes[1]} there (an SD 1.x "
                "LoRA on an SD 2.x model, or the reverse?); use a LoRA trained for this model's base")
        fitted[spelled] = pair
    return fitted


def _in_out(module: torch.nn.Module) -> Optional[Tuple[int, int]]:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def fuse_lora(model: torch.nn.Module, layers: Dict[str, LoraPair], scale: float, adapter: str) -> None:
    """Inject ``layers`` with PEFT (one config per rank and alpha), merge them into the weights at
    ``scale`` and remove the adapter modules: ``model`` keeps its own module types, fused weights."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415  start-up time (only with --lora)
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415  (as above)

    groups: Dict[Tuple[int, float], List[str]] = defaultdict(list)
    for name, pair in layers.items():
        rank = pair.down.shape[0]
        groups[(rank, pair.alpha if pair.alpha is not None else float(rank))].append(name)
    for index, ((rank, alpha), names) in enumerate(sorted(groups.items())):
        name_of = f"{adapter}_{index}"
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, init_lora_weights=False)
        inject_adapter_in_model(config, model, adapter_name=name_of)
        named = dict(model.named_modules())
        with torch.no_grad():
            for name in names:
                layer = named[name]
                for weights, source in ((layer.lora_A[name_of].weight, layers[name].down),
                                        (layer.lora_B[name_of].weight, layers[name].up)):
                    weights.copy_(source.reshape(weights.shape).to(weights.dtype))
                layer.scale_layer(scale)
                layer.merge(adapter_names=[name_of])
        for name in names:   # back to the base layers, their weights now fused
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = parent.get_submodule(child)
            assert isinstance(layer, LoraLayer)
            setattr(parent, child, layer.get_base_layer())
        if "peft_config" in vars(model):   # PEFT's bookkeeping of the adapters just removed
            del model.peft_config


def apply_loras(specs: List[LoraSpec], unet, text_encoder, *, model_name: str, allow_pickle: bool,
                hub_offline: bool, text_encoder_2=None) -> List[str]:
    """Fuse each LoRA into ``unet`` / ``text_encoder`` / (SDXL) ``text_encoder_2`` at its scale;
    their identity parts."""
    parts = []
    components = {"unet": unet, "text_encoder": text_encoder}
    if text_encoder_2 is not None:
        components["text_encoder_2"] = text_encoder_2
    modules = {c: dict(m.named_modules()) for c, m in components.items()}
    for index, spec in enumerate(specs):
        path, fingerprint = resolve_lora_file(spec.source, allow_pickle, hub_offline)
        what = f"LoRA '{spec.source}'"
        layers = lora_layers(read_tensors(path, "LoRA", allow_pickle), modules, what)
        fitted = {c: check_lora_fits(pairs, modules[c], what, c, model_name) for c, pairs in layers.items()}
        for component, pairs in fitted.items():
            fuse_lora(components[component], pairs, spec.scale, f"tokenflow_lora{index}")
        parts.append(f"lora:{fingerprint}*{spec.scale:g}")
    return parts


# ----------------------------------------------------------------------------- embeddings


def embedding_vectors(tensors, path: Path) -> Tuple[torch.Tensor, Optional[str]]:
    """([n, D] vectors, the token the file names or None) of a textual-inversion file."""
    what = f"embedding '{path}'"
    if isinstance(tensors, torch.Tensor):
        return tensors.reshape(-1, tensors.shape[-1]), None
    if not isinstance(tensors, dict):
        raise ModelError(f"{what} is not a textual-inversion embedding (a {type(tensors).__name__})")
    if "string_to_param" in tensors:   # A1111
        params = tensors["string_to_param"]
        vectors = next(iter(params.values())) if isinstance(params, dict) and params else None
        name = tensors.get("name")
        token = name if isinstance(name, str) and name.strip() else None
    elif "emb_params" in tensors:
        vectors, token = tensors["emb_params"], None
    elif {"clip_l", "clip_g"} & set(tensors):
        raise ModelError(f"{what} is an SDXL embedding (clip_l/clip_g vectors), but the model is Stable Diffusion "
                         "1.x/2.x (one text encoder): use an embedding trained for this model's base")
    else:
        tensor_items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
        if len(tensor_items) != 1:
            raise ModelError(f"{what} is not a textual-inversion embedding: expected one {{token: vectors}} entry, "
                             "A1111's string_to_param or emb_params, found "
                             f"{', '.join(map(str, list(tensors)[:4])) or 'nothing'}")
        token, vectors = tensor_items[0]
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
        raise ModelError(f"{what} is not a textual-inversion embedding: its vectors are not a [n, D] tensor")
    return vectors.reshape(-1, vectors.shape[-1]).detach(), token


def xl_embedding_vectors(tensors, path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    """(clip_l ``[n, D1]``, clip_g ``[n, D2]``) of an SDXL textual-inversion file; ModelError for an
    SD 1.x/2.x file (one set of vectors) or mismatched counts."""
    what = f"embedding '{path}'"
    if not (isinstance(tensors, dict) and isinstance(tensors.get("clip_l"), torch.Tensor)
            and isinstance(tensors.get("clip_g"), torch.Tensor)):
        raise ModelError(f"{what} is no SDXL embedding (it lacks clip_l and clip_g vectors, one set per text "
                         "encoder: a Stable Diffusion 1.x/2.x embedding?), but the model is SDXL: use an embedding "
                         "trained for SDXL")
    clip_l, clip_g = (tensors[k].detach().reshape(-1, tensors[k].shape[-1]) for k in ("clip_l", "clip_g"))
    if len(clip_l) != len(clip_g):
        raise ModelError(f"{what} has {len(clip_l)} clip_l but {len(clip_g)} clip_g vectors: a damaged file?")
    return clip_l, clip_g


def apply_embeddings(specs: List[EmbeddingSpec], tokenizer, text_encoder, *, model_name: str,
                     allow_pickle: bool, tokenizer_2=None, text_encoder_2=None
                     ) -> Tuple[List[str], Dict[str, Tuple[str, ...]]]:
    """Add each embedding's tokens to ``tokenizer`` and its vectors to ``text_encoder``'s token
    embeddings (SDXL, ``text_encoder_2`` given: ``clip_l`` to the first pair, ``clip_g`` to
    ``tokenizer_2`` / ``text_encoder_2``); (identity parts, {token: its tokens} of the multi-vector
    ones, for ``expand_prompt``)."""
    parts, multi = [], {}
    for spec in specs:
        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise ModelError(f"embedding '{spec.path}' does not exist: pass a textual-inversion file "
                             "(.safetensors; .pt/.bin with --allow-pickle) as --embedding FILE[:TOKEN]")
        tensors = read_tensors(path, "embedding", allow_pickle)
        if text_encoder_2 is not None:
            clip_l, clip_g = xl_embedding_vectors(tensors, path)
            token = spec.token or path.stem
            pairs = [(tokenizer, text_encoder, clip_l), (tokenizer_2, text_encoder_2, clip_g)]
        else:
            vectors, named = embedding_vectors(tensors, path)
            token = spec.token or named or path.stem
            pairs = [(tokenizer, text_encoder, vectors)]
        tokens = [token] + [f"{token}_{i}" for i in range(1, len(pairs[0][2]))]
        for index, (tok, encoder, vectors) in enumerate(pairs):
            _check_embedding(spec, tok, encoder, vectors, tokens, model_name, "clip_g" if index else "clip_l"
                             if len(pairs) > 1 else "")
        for tok, encoder, vectors in pairs:
            _add_tokens(tok, encoder, vectors, tokens)
        if len(tokens) > 1:
            multi[token] = tuple(tokens)
        parts.append(f"emb:sha256:{sha256_of(path)[:64]}={token}")
    return parts, multi


def _check_embedding(spec: EmbeddingSpec, tokenizer, text_encoder, vectors: torch.Tensor, tokens: List[str],
                     model_name: str, which: str) -> None:
    """ModelError for vectors of another width than ``text_encoder``'s or a token already in ``tokenizer``."""
    table = text_encoder.get_input_embeddings().weight
    if vectors.shape[1] != table.shape[1]:
        bases = {768: " (SD 1.x)", 1024: " (SD 2.x)"} if not which else {}
        label = f"{which} " if which else ""
        raise ModelError(f"embedding '{spec.path}' has {label}vectors of width {vectors.shape[1]}"
                         f"{bases.get(vectors.shape[1], '')}, but model '{model_name}' takes {table.shape[1]}"
                         f"{bases.get(table.shape[1], '')}: use an embedding trained for this model's base")
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        token = tokens[0]
        other = f"<{token}>" if token.strip("<>") == token else f"<{token.strip('<>')}-2>"
        raise ModelError(f"the token '{taken[0]}' of embedding '{spec.path}' is already in the tokenizer's "
                         f"vocabulary (a word, or another embedding's): name another with --embedding "
                         f"{spec.path}:{other}")


def _add_tokens(tokenizer, text_encoder, vectors: torch.Tensor, tokens: List[str]) -> None:
    table = text_encoder.get_input_embeddings().weight
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    resize = text_encoder.resize_token_embeddings   # the new rows are set below: no mean init (transformers >= 4.46)
    resize(len(tokenizer), **({"mean_resizing": False} if "mean_resizing" in inspect.signature(resize).parameters else {}))
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids] = vectors.to(table.dtype)


def expand_prompt(text: str, multi: Dict[str, Tuple[str, ...]]) -> str:
    """``text`` with each multi-vector embedding token replaced by all its tokens (one pass)."""
    if not multi:
        return text
    pattern = re.compile("|".join(re.escape(t) for t in sorted(multi, key=len, reverse=True)))
    return pattern.sub(lambda m: " ".join(multi[m.group(0)]), text)


def comparable_adapters(loras: List[str], embeddings: List[str]) -> List[str]:
    """The adapters as the skip rule compares jobs (docs/farm.md), without loading a model or the
    network: each local file's content hash (copies on other nodes agree) with its scale or token,
    a Hub LoRA as ``hub:<id>``; a file that is missing as its path (the load refuses it)."""
    def content(text: str) -> str:
        path = Path(text).expanduser()
        if path.is_dir():
            files = [path / n for n in LORA_FILE_NAMES if (path / n).is_file()] or sorted(path.glob("*.safetensors"))
            path = files[0] if files else path
        if path.is_file():
            return "sha256:" + sha256_of(path)
        return f"path:{text}" if _looks_like_path(text) else f"hub:{text}"

    lora_specs, embedding_specs = [parse_lora(t) for t in loras], [parse_embedding(t) for t in embeddings]
    return ([f"lora:{content(s.source)}*{s.scale:g}" for s in lora_specs]
            + [f"emb:{content(s.path)}={s.token or ''}" for s in embedding_specs])


def adapters_identity(base: str, parts: List[str]) -> str:
    """The model identity with its adapters (the plain model's when there are none)."""
    return base if not parts else base + "".join(f"+{part}" for part in parts)
