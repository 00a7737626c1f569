"""``--backend compile``: the three TokenFlow passes under ``torch.compile``.

- One compiled module per pass (plain, keyframes, propagate) and branch count, with
  ``dynamic=False`` and ``fullgraph=True``: a graph break is an error, so the kernels (the Triton
  custom ops ``tokenflow::*`` on CUDA, the static torch backends elsewhere) stay in the graph.
- Injection switches and the timestep are tensor inputs, so steps never recompile; the runner pads
  plain and propagation calls to the planned frame count, so each pass sees one shape. A
  different keyframe-window size is one more shape (extended attention cannot be padded).
- CUDA: ``mode="reduce-overhead"`` (CUDA graphs). Outputs are copied out before the next call.
  UNVERIFIED on a GPU: no GPU was available while this was written.
- Inductor's caches (FX graph cache, autotuning) live under ``<tokenflow cache>/torch-compile``
  unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so a second run reuses the first one's kernels.
  ``compilations`` counts graph compilations (dynamo -> backend calls) for tests and summaries.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch
from torch._dynamo import lookup_backend
from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

from tokenflow.engine.backends.base import UNetBackend, switch
from tokenflow.engine.passes import KeyframePass, PlainPass, PropagatePass
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.engine.state import timestep_tensor
from tokenflow.errors import ConfigError
from tokenflow.kernels import KernelChoice, implementation
from tokenflow.kernels.support import triton_missing

GRAPH_SAFE = {"keyframe_attention": ("torch", "triton"), "cosine_nearest": ("static", "triton"),
              "gather": ("static", "triton")}


def graph_kernels(choice: KernelChoice, device: torch.device, dtype: torch.dtype) -> KernelChoice:
    """Kernel backends that trace into one graph: Triton custom ops on CUDA in fp16/bf16, else torch."""
    fast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and triton_missing() is None
    attention = choice.attention if choice.attention != "auto" else ("triton" if fast else "torch")
    nearest = choice.nearest if choice.nearest != "auto" else ("triton" if fast else "static")
    if nearest == "torch":   # the eager reference has data-dependent shapes; same math, static form
        nearest = "static"
    if attention not in GRAPH_SAFE["keyframe_attention"] or nearest not in GRAPH_SAFE["cosine_nearest"]:
        raise ConfigError(f"kernel backends attention={choice.attention!r}, nearest={choice.nearest!r} cannot run "
                          f"inside a compiled graph; use auto, torch, static or triton (faiss and xformers run "
                          f"only with --backend eager)")
    chosen = KernelChoice(attention=attention, nearest=nearest)
    for op, name in (("keyframe_attention", chosen.attention), ("cosine_nearest", chosen.nearest),
                     ("gather", chosen.gather)):
        implementation(op, name)   # imported now: tracing must never meet an import
    return chosen


def exported_kernels(choice: KernelChoice, backend: str, dtype: torch.dtype) -> KernelChoice:
    """Kernels for graphs that leave Python (ONNX, TensorRT, AOTInductor): only torch/static ops
    exist there, so ``auto`` means torch attention and the static search, and Triton is refused."""
    chosen = graph_kernels(KernelChoice("torch" if choice.attention == "auto" else choice.attention,
                                        "static" if choice.nearest == "auto" else choice.nearest),
                           torch.device("cpu"), dtype)
    if "triton" in (chosen.attention, chosen.nearest):
        raise ConfigError(f"--backend {backend} cannot contain the Triton custom ops (use --backend compile for "
                          f"them), or choose --attention-backend/--nearest-backend auto or torch")
    return chosen


def default_cache_dir(cache_root: Optional[str]) -> Optional[str]:
    """Point inductor's on-disk caches at ``<cache_root>/torch-compile`` unless the user chose one.

    (Importing torch's inductor writes its default, a per-user temp folder, into the environment;
    only a different value counts as the user's choice.)"""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache_root is None or (current and os.path.abspath(current) != os.path.abspath(torch_default())):
        return current
    path = os.path.join(cache_root, "torch-compile")
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


class CompiledBackend(UNetBackend):
    name = "compile"
    pads_calls = True

    def __init__(self, tokenflow: TokenFlowUNet, kernels: KernelChoice = KernelChoice(), *,
                 compiler: str = "inductor", mode: Optional[str] = None, cache_root: Optional[str] = None):
        param = next(tokenflow.unet.parameters())
        self.tokenflow, self.device, self.dtype = tokenflow, param.device, param.dtype
        self.kernels = graph_kernels(kernels, self.device, self.dtype)
        self.compiler = compiler
        self.mode = mode if mode is not None else ("reduce-overhead" if self.device.type == "cuda" else None)
        self.cache_dir = default_cache_dir(cache_root)
        self.compilations = 0
        self._modules: Dict[Tuple, Callable] = {}

    def describe(self) -> str:
        return (f"compile ({self.compiler}{', ' + self.mode if self.mode else ''}; kernels: attention="
                f"{self.kernels.attention}, nearest={self.kernels.nearest})")

    def stats(self) -> dict:
        return {"compilations": self.compilations, "cache_dir": self.cache_dir}

    def _count(self, gm, example_inputs):
        self.compilations += 1
        return lookup_backend(self.compiler)(gm, example_inputs)

    def _module(self, kind: str, n_branches: int = 0, match_on: str = "input") -> Callable:
        key = (kind, n_branches, match_on)
        if key not in self._modules:
            if kind == "plain":
                module = PlainPass(self.tokenflow)
            else:
                cls = KeyframePass if kind == "keyframes" else PropagatePass
                module = cls(self.tokenflow, n_branches, match_on, self.kernels)
            options = {"mode": self.mode} if self.mode else {}
            self._modules[key] = torch.compile(module, backend=self._count, dynamic=False, fullgraph=True, **options)
        return self._modules[key]

    def _call(self, fn: Callable, *args):
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(*args)
            return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
        return fn(*args)

    def plain(self, sample, t, text):
        return self._call(self._module("plain"), sample, timestep_tensor(t, self.device), text)

    def keyframes(self, sample, t, text, inject_qk, inject_conv, n_branches, match_on):
        out = self._call(self._module("keyframes", n_branches, match_on), sample, timestep_tensor(t, self.device),
                         text, switch(inject_qk, self.device), switch(inject_conv, self.device))
        n = len(self.tokenflow.layers)
        return out[0], list(out[1:1 + n]), list(out[1 + n:])

    def propagate(self, sample, t, text, inject_conv, pairs, weights, store, n_branches, match_on):
        return self._call(self._module("propagate", n_branches, match_on), sample, timestep_tensor(t, self.device),
                          text, switch(inject_conv, self.device), pairs, weights.float(), *store)
