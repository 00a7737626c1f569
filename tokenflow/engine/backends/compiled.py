"""``--backend compile``: the three TokenFlow passes under ``torch.compile``.

- One compiled module per pass (plain, keyframes, propagate), branch count and propagation mode,
  with ``dynamic=False`` and ``fullgraph=True``: a graph break is an error, so the kernels (the
  Triton custom ops ``tokenflow::*`` on CUDA, the static torch backends elsewhere) stay in the graph.
- Injection switches and the timestep are tensor inputs, so steps never recompile. Shapes are
  held fixed: the runner pads plain and propagation calls to the planned frame count, and an
  offloaded keyframe store stages every chunk into the same, fixed-size buffer.
- Graphs per edit (per branch count and propagation mode), the bound the tests check:
  plain 1 (inversion); propagate 1, 2 after the out-of-memory halving of frames per call;
  keyframes 1 per distinct keyframe-window size, which is ``method.keyframes.window_sizes``: 1
  without ``--keyframe-window``, at most 4 with it (W, the W//2 head of shifted windows, and the
  tails of the even and odd steps). Windows are not padded: extended attention over padding
  would change every keyframe's softmax. Dynamo's recompile limit (8 per pass class, shared by
  every module of that class) is raised to the number of shapes this backend has fed a class.
- CUDA: ``mode="reduce-overhead"`` (CUDA graphs) through inductor itself (``backend="inductor"``
  with the mode, so its config patches apply). Outputs are copied out before the next call. The
  keyframe store and staging tensors are the same tensor objects every call and marked static
  (``torch._dynamo.mark_static_address``), so a replay does not copy the store. CUDA graph trees
  share one memory pool per device: ``stats()`` reports it. UNVERIFIED on a GPU: no GPU was
  available while this was written.
- Compilations are counted from dynamo's own counter (``counters["stats"]["unique_graphs"]``)
  around each call. Inductor's caches (FX graph cache, autotuning) live under
  ``<tokenflow cache>/torch-compile`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set.
- Kernels come from the self-checked choice (``kernels.check_backends``; the self-check runs on
  every device but the CPU): a kernel that failed it is never traced into a graph.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Set, Tuple

import torch
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

from tokenflow.engine.backends.base import UNetBackend, switch
from tokenflow.engine.passes import KeyframePass, PlainPass, PropagatePass
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.engine.state import timestep_tensor
from tokenflow.errors import ConfigError
from tokenflow.kernels import AUTO, KernelChoice, check_backends, implementation
from tokenflow.kernels.dispatch import choose
from tokenflow.kernels.probe import sample_args

GRAPH_SAFE = {"keyframe_attention": ("torch", "triton"), "cosine_nearest": ("static", "triton"),
              "gather": ("static", "triton")}
GRAPH_DEFAULT = {"keyframe_attention": "torch", "cosine_nearest": "static"}


def _graph_name(op: str, name: str, device: torch.device, dtype: torch.dtype) -> str:
    """A checked choice as a backend that traces: ``auto`` is what the dispatcher picks on
    representative arguments, kept when it traces (Triton) and else the static torch form."""
    if name == AUTO:
        name = choose(op, AUTO, *sample_args(op, device, dtype)[0])
        if name not in GRAPH_SAFE[op]:
            name = GRAPH_DEFAULT[op]
    if op == "cosine_nearest" and name == "torch":   # the eager reference has data-dependent shapes
        name = "static"
    return name


def graph_kernels(choice: KernelChoice, device: torch.device, dtype: torch.dtype, *,
                  self_check: Optional[bool] = None) -> KernelChoice:
    """Kernel backends that trace into one graph, from the self-checked choice.

    ``kernels.check_backends`` runs first (on every device but the CPU it self-checks the chosen
    non-reference kernels against the reference, like eager dispatch): a named kernel that fails
    raises BackendUnavailable, one that ``auto`` chose falls back to torch. ``auto`` then becomes
    the dispatcher's pick if it traces (Triton on CUDA in fp16/bf16), else torch attention and
    the static nearest-neighbour search. ``self_check`` forces the self-check on or off."""
    checked = check_backends(device, dtype, choice.attention, choice.nearest, self_check=self_check)
    attention = _graph_name("keyframe_attention", checked.attention, device, dtype)
    nearest = _graph_name("cosine_nearest", checked.nearest, device, dtype)
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
    exist there, so ``auto`` means torch attention and the static search, and Triton is refused.
    (Both are the references' math, so the GPU self-check has nothing to replace them with.)"""
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


def _signature(args: Sequence) -> Tuple:
    return tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))


class CompiledBackend(UNetBackend):
    name = "compile"
    pads_calls = True

    def __init__(self, tokenflow: TokenFlowUNet, kernels: KernelChoice = KernelChoice(), *,
                 compiler: str = "inductor", mode: Optional[str] = None, cache_root: Optional[str] = None,
                 self_check: Optional[bool] = None):
        param = next(tokenflow.unet.parameters())
        self.tokenflow, self.device, self.dtype = tokenflow, param.device, param.dtype
        self.kernels = graph_kernels(kernels, self.device, self.dtype, self_check=self_check)
        self.compiler = compiler
        self.mode = mode if mode is not None else ("reduce-overhead" if self.device.type == "cuda" else None)
        self.cache_dir = default_cache_dir(cache_root)
        self.compilations = 0
        self._modules: Dict[Tuple, Callable] = {}
        self._shapes: Dict[Tuple, Set[Tuple]] = {}   # per module: the input signatures it was called with

    def describe(self) -> str:
        mode = f", {self.mode}" if self.mode and self.compiler == "inductor" else ""
        return (f"compile ({self.compiler}{mode}; kernels: attention={self.kernels.attention}, "
                f"nearest={self.kernels.nearest})")

    def stats(self) -> dict:
        """compilations: graphs dynamo compiled for this backend; graphs: per pass, the distinct
        input shapes fed to it (one graph each); cuda_graph_pools: memory pools CUDA graphs hold
        (graph trees share one per device; each is about the largest pass's activations)."""
        graphs: Dict[str, int] = {}
        for (kind, *_), shapes in self._shapes.items():
            graphs[kind] = graphs.get(kind, 0) + len(shapes)
        cuda_graphs = self.mode == "reduce-overhead" and self.compiler == "inductor" and self.device.type == "cuda"
        return {"compilations": self.compilations, "graphs": graphs,
                "cuda_graph_pools": int(cuda_graphs and bool(self._shapes)), "cache_dir": self.cache_dir}

    def _module(self, kind: str, n_branches: int = 0, match_on: str = "input") -> Tuple[Tuple, Callable]:
        key = (kind, n_branches, match_on)
        if key not in self._modules:
            if kind == "plain":
                module = PlainPass(self.tokenflow)
            else:
                cls = KeyframePass if kind == "keyframes" else PropagatePass
                module = cls(self.tokenflow, n_branches, match_on, self.kernels)
            # the mode goes to inductor itself (its config patches: CUDA graphs); other compilers have none
            options = {"mode": self.mode} if self.mode and self.compiler == "inductor" else {}
            self._modules[key] = torch.compile(module, backend=self.compiler, dynamic=False, fullgraph=True,
                                               **options)
            self._shapes[key] = set()
        return key, self._modules[key]

    def _call(self, kind: str, n_branches: int, match_on: str, *args):
        key, fn = self._module(kind, n_branches, match_on)
        self._shapes[key].add(_signature(args))
        # every module of a pass class shares its forward's code object, hence dynamo's recompile limit
        shapes = sum(len(s) for k, s in self._shapes.items() if k[0] == kind)
        limit = max(torch._dynamo.config.recompile_limit, shapes + 2)
        before = counters["stats"]["unique_graphs"]
        try:
            with torch._dynamo.config.patch(recompile_limit=limit):
                if self.mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                    out = fn(*args)
                    return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
                return fn(*args)
        finally:
            self.compilations += counters["stats"]["unique_graphs"] - before

    def plain(self, sample, t, text):
        return self._call("plain", 0, "input", sample, timestep_tensor(t, self.device), text)

    def keyframes(self, sample, t, text, inject_qk, inject_conv, n_branches, match_on):
        out = self._call("keyframes", n_branches, match_on, sample, timestep_tensor(t, self.device),
                         text, switch(inject_qk, self.device), switch(inject_conv, self.device))
        n = len(self.tokenflow.layers)
        return out[0], list(out[1:1 + n]), list(out[1 + n:])

    def propagate(self, sample, t, text, inject_conv, pairs, weights, store, n_branches, match_on):
        for tensor in store:   # the same objects every call (StoreView.graph_tensors): no copy on replay
            torch._dynamo.mark_static_address(tensor, guard=False)
        return self._call("propagate", n_branches, match_on, sample, timestep_tensor(t, self.device),
                          text, switch(inject_conv, self.device), pairs, weights.float(), *store)
