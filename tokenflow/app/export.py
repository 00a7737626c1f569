"""``tokenflow export``: write (or reuse) the ONNX graphs of the three TokenFlow passes.

    tokenflow export --model stabilityai/stable-diffusion-2-1-base --size 512x512 --device cuda
    tokenflow export --model tiny --size 64x64 --out graphs/ --json
    tokenflow export --model xl --size 1024x1024 --device cuda     # SDXL: text rows [R, 78, 2048]
    tokenflow export --model 2.1 --lora style.safetensors:0.8 --device cuda   # graphs of the fused model

Graphs go to ``--out`` or to the cache folder ``--backend onnx`` reads (``<cache>/onnx``), each
with its manifest; a graph whose manifest matches is reused, not exported again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenflow.config import DEFAULT_MODEL, PROPAGATIONS, Ranged, Rule, default_size, parse_size
from tokenflow.errors import ConfigError

MAX_PROMPTS = 100   # prompts per edit the graphs are exported for (B = 1 + 2P branches per UNet call)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export the UNet passes to ONNX (for --backend onnx / tensorrt)")
    p.add_argument("--model", default=None, help="Hub id, local diffusers folder, SD version (1.5, 2.1, xl, ...), "
                   "'tiny' or 'tiny-xl' (default stabilityai/stable-diffusion-2-1-base)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID[:SCALE]", help="LoRA fused into the "
                   "UNet before the export, as in `tokenflow edit --lora` (the graphs' key names it); repeatable")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]", help="as in `tokenflow edit "
                   "--embedding`: give the edit's embeddings too, so that its model identity finds these graphs")
    p.add_argument("--size", metavar="WxH", help="frame size the graphs are for, as the edit's --size (default: "
                   "the edit's default for a square video: 512x512, 1024x1024 for SDXL models)")
    p.add_argument("--prompts", type=Ranged("--prompts", int, Rule(minimum=1, maximum=MAX_PROMPTS)), default=1,
                   metavar="P", help="prompts per edit: B = 1 + 2P branches (default 1)")
    p.add_argument("--propagation", choices=PROPAGATIONS, default="original",
                   help="which features correspondences use (default original)")
    p.add_argument("--device", help="cpu or cuda (default: the best available)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default float16 on GPUs, float32 on CPU)")
    p.add_argument("--out", metavar="DIR", help="folder for the graphs (default: the cache folder --backend onnx uses)")
    p.add_argument("--cache-dir", metavar="DIR", help="tokenflow cache root (default $TOKENFLOW_CACHE, "
                   "else $XDG_CACHE_HOME/tokenflow, else ~/.cache/tokenflow)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    Ranged.add_to_help(p)


def main(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415 (torch, diffusers, ONNX: not while the CLI parses flags)

    from tokenflow.device import resolve_device, resolve_dtype  # noqa: PLC0415 (torch, diffusers, ONNX: not while the CLI parses flags)
    from tokenflow.engine.backends import not_supported_reasons  # noqa: PLC0415 (torch, diffusers, ONNX: not while the CLI parses flags)
    from tokenflow.engine.backends.onnx import export_all  # noqa: PLC0415 (torch, diffusers, ONNX: not while the CLI parses flags)
    from tokenflow.engine.processors import TokenFlowUNet  # noqa: PLC0415 (torch, diffusers, ONNX: not while the CLI parses flags)
    from tokenflow.io.caches import default_cache_root  # noqa: PLC0415 (torch, diffusers, ONNX: not while the CLI parses flags)
    from tokenflow.models.load import load_model  # noqa: PLC0415 (torch, diffusers, ONNX: not while the CLI parses flags)

    size = parse_size(args.size) if args.size else None   # a bad --size fails before the load
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    reasons = not_supported_reasons("onnx", device, dtype)
    if reasons:
        raise ConfigError(f"tokenflow export needs the ONNX packages: {'; '.join(reasons)}")
    sd = load_model(args.model or DEFAULT_MODEL, device, dtype, loras=args.lora, embeddings=args.embedding)
    width, height = size or default_size(1, 1, sd.family)
    scale = sd.vae_scale_factor
    folder = Path(args.out) if args.out else Path(args.cache_dir or default_cache_root()) / "onnx"
    tokenflow = TokenFlowUNet(sd.unet)
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    try:
        with torch.no_grad():
            records = export_all(tokenflow, latent_size=(height // scale, width // scale), n_branches=1 + 2 * args.prompts,
                                 match_on="input" if args.propagation == "original" else "output",
                                 model_identity=sd.identity, folder=folder, log=log)
    finally:
        tokenflow.remove()
    if args.json:
        print(json.dumps({"model": sd.identity, "folder": str(folder), "graphs": records}, indent=1))
    else:
        for r in records:
            print(f"{r['pass']:10s} {'reused  ' if r['reused'] else 'exported'} {r['path']}")
    return 0
