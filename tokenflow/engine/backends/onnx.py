"""``--backend onnx``: the three TokenFlow passes exported to ONNX and run in ONNX Runtime.

Export (``export_pass``, also ``tokenflow export``): ``torch.onnx.export(dynamo=True)`` of the
graph-mode pass modules (``engine.passes``) with a dynamic batch axis (rows = B * frames;
keyframe features [K', S, C], store outputs [B*K', S, C], pairs/weights [m, P]); spatial size,
branch count, dtype and the text rows' layout are fixed per graph. Injection switches are inputs.
Text rows are ``[R, 77 + E, D]`` (``models.text``): SDXL's pooled embedding and time ids travel
packed in the last E tokens and are unpacked inside the graph, so the added conditioning is a graph
input like the text. Weights go to an external-data file next to the graph (SD UNets exceed
protobuf's 2 GB limit in float32).

Every graph is written with a ``manifest.json`` (model identity, pass, shapes, dtype, text layout, opset,
input/output names, torch/onnx versions, sha256 of the graph) into
``<dir>/<pass>-<key>/``; a graph whose manifest matches what is asked for is reused, not
re-exported. The default folder is ``<tokenflow cache>/onnx``.

Runtime: one ``InferenceSession`` per graph. CPU: numpy views of the torch tensors (no copies).
CUDA: ``CUDAExecutionProvider`` (cuDNN convolution algorithms chosen by heuristics: an exhaustive
search would time every convolution shape on the first calls) with IO binding to torch tensors;
ORT runs on its own stream, so torch's current stream is synchronised before each run (the
inputs it queued must be written). ``TOKENFLOW_ORT_PROVIDERS`` (comma-separated, e.g.
``TensorrtExecutionProvider,CUDAExecutionProvider``) overrides the list. bfloat16 is refused
(``config.ONNX_BF16``): numpy has no bfloat16 for the CPU path and no bfloat16 binding was written
for CUDA. UNVERIFIED on a GPU: only the CPU provider has been run here.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.export import Dim

from tokenflow import __version__
from tokenflow.config import ONNX_BF16
from tokenflow.device import synchronizer
from tokenflow.engine import passes, processors
from tokenflow.engine.backends.base import UNetBackend, switch
from tokenflow.engine.backends.compiled import exported_kernels
from tokenflow.engine.memory import attention_layer_shapes
from tokenflow.engine.passes import KeyframePass, PlainPass, PropagatePass, input_names, output_names
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.engine.state import timestep_tensor
from tokenflow.errors import ConfigError
from tokenflow.io.caches import default_cache_root
from tokenflow.io.outputs import atomic_file, atomic_path
from tokenflow.kernels import KernelChoice
from tokenflow.kernels import gather as gather_op
from tokenflow.kernels import keyframe_attention as keyframe_attention_op
from tokenflow.kernels import nearest as nearest_op
from tokenflow.models.text import layout_of

# 20: GELU exports as ONNX's Gelu op, which ORT runs as one kernel; opset 18's erf decomposition
# (0.5 * (1 + erf(x / sqrt 2)) * x) was left unfused: the tiny UNet's plain pass measured
# 3.2-3.3 ms/row at 20 against 3.4 at 18 (1 thread, 3 runs each, interleaved)
OPSET = 20
MANIFEST_FORMAT = 1
MAX_ROWS = 4096   # upper bound of the dynamic batch axis (rows per call)


def graph_spec(tokenflow: TokenFlowUNet, kind: str, *, latent_size: Tuple[int, int], n_branches: int,
               match_on: str, model_identity: str, kernels: KernelChoice) -> dict:
    """What a graph is: everything that must match for an exported graph to be reused."""
    param = next(tokenflow.unet.parameters())
    layers = [layer.name for layer in tokenflow.layers]
    shapes = attention_layer_shapes(tokenflow.unet, *latent_size)
    return {
        "format": MANIFEST_FORMAT, "pass": kind, "model": model_identity, "latent_size": list(latent_size),
        "n_branches": n_branches if kind != "plain" else None, "match_on": match_on if kind != "plain" else None,
        "dtype": str(param.dtype).replace("torch.", ""), "text": text_spec(tokenflow.unet),
        "layers": [[n, *shapes[n]] for n in layers], "opset": OPSET,
        "kernels": {"attention": kernels.attention, "nearest": kernels.nearest} if kind != "plain" else None,
        "inputs": input_names(kind, layers), "outputs": output_names(kind, layers),
        "versions": _versions(),
    }


def text_spec(unet) -> dict:
    """The text input of a pass graph, from the UNet's config (``models.text.layout_of``): SD
    ``[R, 77, D]``; SDXL ``[R, 77 + E, D]`` with its pooled embedding and time ids in the last E
    tokens (``family`` "sdxl"). Part of every exported graph's key."""
    layout = layout_of(unet.config)
    return {"family": "sdxl" if layout.extra else "sd", "tokens": layout.tokens, "extra": layout.extra,
            "dim": layout.dim, "pooled": layout.pooled, "time_ids": layout.time_ids}


def text_shape(spec: dict) -> Tuple[int, int]:
    """(tokens per row, width) of a graph's text input: ``[R, tokens, width]``."""
    text = spec["text"]
    return text["tokens"] + text["extra"], text["dim"]


def _versions() -> dict:
    import onnx  # noqa: PLC0415  optional package (the onnx extra)

    return {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__, "tokenflow": __version__,
            "graph_code": graph_code_fingerprint()}


def graph_code_fingerprint() -> str:
    """sha256 (16 hex) of the sources that define what a pass graph computes: a code change
    invalidates exported graphs even when the version number did not move."""
    digest = hashlib.sha256()
    for module in (passes, processors, keyframe_attention_op, nearest_op, gather_op):   # the ops' torch references
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _example(tokenflow: TokenFlowUNet, spec: dict, frames: int = 2):
    """Example inputs (device/dtype of the UNet) and dynamic shapes for torch.export."""
    param = next(tokenflow.unet.parameters())
    dev, dt = param.device, param.dtype
    h, w = spec["latent_size"]
    b = spec["n_branches"] or 1
    m = Dim("frames", min=1, max=MAX_ROWS // b)
    rows = b * frames
    channels = int(tokenflow.unet.config.in_channels)   # 4, or 5 for a depth model (latents + depth)
    base = (torch.randn(rows, channels, h, w, device=dev, dtype=dt), timestep_tensor(501, dev),
            torch.randn(rows, *text_shape(spec), device=dev, dtype=dt))
    dyn = {"sample": {0: b * m}, "timestep": None, "text": {0: b * m}}
    if spec["pass"] == "plain":
        return base, dyn
    if spec["pass"] == "keyframes":
        return base + (switch(True, dev), switch(True, dev)), {**dyn, "inject_qk": None, "inject_conv": None}
    k = Dim("keyframes", min=1, max=MAX_ROWS // b)
    n_kf = 2
    pairs = torch.zeros(frames, 2, dtype=torch.long, device=dev)
    pairs[:, 1] = 1
    weights = torch.full((frames, 2), 0.5, device=dev)
    feats = [torch.randn(n_kf, s, c, device=dev, dtype=dt) for _, s, c in spec["layers"]]
    outs = [torch.randn(b * n_kf, s, c, device=dev, dtype=dt) for _, s, c in spec["layers"]]
    # PropagatePass takes the store as *args: torch.export wants their shapes as one tuple entry
    dyn = {**dyn, "inject_conv": None, "pairs": {0: m}, "weights": {0: m},
           "store": tuple([{0: k}] * len(feats) + [{0: b * k}] * len(outs))}
    return base + (switch(True, dev), pairs, weights, *feats, *outs), dyn


def _module(tokenflow: TokenFlowUNet, spec: dict, kernels: KernelChoice) -> torch.nn.Module:
    if spec["pass"] == "plain":
        return PlainPass(tokenflow)
    cls = KeyframePass if spec["pass"] == "keyframes" else PropagatePass
    return cls(tokenflow, spec["n_branches"], spec["match_on"], kernels)


def export_pass(tokenflow: TokenFlowUNet, spec: dict, kernels: KernelChoice, folder: Path,
                log=None) -> Tuple[Path, bool]:
    """(path of the graph for ``spec`` under ``folder``, whether it was reused). Atomic: the graph
    and its manifest are written in a temp folder that is renamed into place."""
    target = folder / f"{spec['pass']}-{spec_key(spec)}"
    graph = target / "unet.onnx"
    if _manifest_matches(target, spec):
        return graph, True
    if log:
        log(f"exporting the {spec['pass']} pass to ONNX (once per model, size and dtype): {target}")
    args, dynamic = _example(tokenflow, spec)
    module = _module(tokenflow, spec, kernels).eval()
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET,
                                    input_names=spec["inputs"], output_names=spec["outputs"],
                                    external_data=True, verbose=False)
    with atomic_path(target, make_parents=True) as tmp:
        tmp.mkdir()
        program.save(str(tmp / "unet.onnx"), external_data=True)
        manifest = {**spec, "sha256": _sha256(tmp / "unet.onnx")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return graph, False


def _manifest_matches(target: Path, spec: dict) -> bool:
    try:
        manifest = json.loads((target / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    sha = manifest.pop("sha256", None)
    return manifest == spec and sha == _sha256(target / "unet.onnx")


def _sha256(path: Path) -> Optional[str]:
    if not path.exists():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxSession:
    """One exported pass in ONNX Runtime, called with torch tensors, returning torch tensors.

    On the CPU provider the graph ORT optimised (fusions, NCHWc layouts) is kept next to the ONNX
    file in ORT format, keyed by ORT version and CPU, with its sha256 beside it: later processes load
    that instead of optimising again (measured here: 0.11 s instead of 0.25 s for the plain pass,
    0.24 s instead of 0.49 s for the keyframe pass). NCHWc layouts depend on the CPU's vector width,
    hence the key.
    """

    def __init__(self, path: Path, device: torch.device, threads: int):
        import onnxruntime as ort  # noqa: PLC0415  optional package (the onnx extra)

        path = Path(path)
        self.device = device
        providers = _providers(ort, device)
        optimized = _optimized_path(path, ort) if providers == ["CPUExecutionProvider"] else None
        self.session = None
        digest = _sha256(optimized) if optimized is not None else None
        if digest is not None and digest == _read_text(optimized.with_name(optimized.name + ".sha256")):
            try:
                self.session = ort.InferenceSession(str(optimized), _options(ort, device, threads), providers=providers)
                self.source = optimized
            except Exception:   # written by another ORT build, or damaged: optimise the ONNX graph again
                self.session = None
        if self.session is None:
            self.source = path
            if optimized is None:
                self.session = ort.InferenceSession(str(path), _options(ort, device, threads), providers=providers)
            else:
                self.session = _session_keeping_optimized(ort, path, _options(ort, device, threads), providers,
                                                          optimized)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, *args: torch.Tensor) -> List[torch.Tensor]:
        if len(args) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs ({', '.join(self.inputs[:6])}, ...), got {len(args)}")
        if self.device.type != "cuda":
            feeds = {name: a.detach().contiguous().numpy() for name, a in zip(self.inputs, args)}
            return [torch.from_numpy(o) for o in self.session.run(self.outputs, feeds)]
        return self._run_cuda(args)

    def _run_cuda(self, args: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """IO binding: inputs read from torch's memory, outputs allocated by ORT on the device. UNVERIFIED."""
        binding = self.session.io_binding()
        keep = [a.contiguous() for a in args]
        for name, a in zip(self.inputs, keep):
            binding.bind_input(name, "cuda", self.device.index or 0, _numpy_dtype(a.dtype), tuple(a.shape), a.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, "cuda", self.device.index or 0)
        wait_for_torch(self.device)
        self.session.run_with_iobinding(binding)
        return [torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack") else torch.from_numpy(o.numpy()).to(self.device)
                for o in binding.get_outputs()]


def wait_for_torch(device: torch.device) -> None:
    """Block until the work torch queued on ``device``'s current stream is done (nothing to wait
    for on synchronous devices): ONNX Runtime reads the bound inputs from its own stream."""
    if synchronizer(device) is not None:
        torch.accelerator.current_stream(device).synchronize()


def _options(ort, device: torch.device, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The memory pattern is planned on the first run and then allocated afresh on the second, so
    # both pay page faults for the whole activation memory (measured on CPU: 1.5 s and 1.4 s
    # instead of 0.38 s for the 120-sample propagation pass); without it only the first run does.
    options.enable_mem_pattern = device.type == "cuda"
    return options


def _providers(ort, device: torch.device) -> list:
    available = ort.get_available_providers()
    wanted = [p.strip() for p in os.environ.get("TOKENFLOW_ORT_PROVIDERS", "").split(",") if p.strip()]
    if wanted:   # e.g. TensorrtExecutionProvider,CUDAExecutionProvider (UNVERIFIED: never run here)
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ConfigError(f"TOKENFLOW_ORT_PROVIDERS asks for {', '.join(missing)}; this onnxruntime has "
                              f"{', '.join(available)}")
        return wanted
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError("--backend onnx on CUDA needs onnxruntime-gpu (pip install onnxruntime-gpu); "
                              f"this onnxruntime has {', '.join(available)}")
        return [("CUDAExecutionProvider", cuda_provider_options(device)), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def cuda_provider_options(device: torch.device) -> dict:
    """CUDAExecutionProvider's options: the device, and cuDNN's heuristic convolution algorithm
    choice (ORT's default, EXHAUSTIVE, benchmarks every algorithm per new shape: slow first calls)."""
    return {"device_id": device.index or 0, "cudnn_conv_algo_search": "HEURISTIC"}


def cpu_key(ort) -> str:
    """ORT version, machine and the CPU's feature flags: what an optimised CPU graph depends on."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    text = "|".join([ort.__version__, platform.system(), platform.machine(), " ".join(sorted(flags.split()))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _optimized_path(path: Path, ort) -> Path:
    return path.with_name(f"{path.stem}.cpu-{cpu_key(ort)}.ort")


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _session_keeping_optimized(ort, path: Path, options, providers, optimized: Path):
    """A session of the ONNX graph ``path`` whose ORT-optimised graph is kept as ``optimized``:
    ORT writes it to a temp name, its sha256 goes beside the target first (a reader that finds the
    graph without a matching hash ignores it), then it is renamed into place. A read-only cache
    folder only costs the reuse."""
    session = None
    try:
        with atomic_path(optimized) as staged:
            options.optimized_model_filepath = str(staged)
            options.add_session_config_entry("session.save_model_format", "ORT")
            options.log_severity_level = 3   # ORT warns that NCHWc graphs are hardware specific: we key on the CPU
            session = ort.InferenceSession(str(path), options, providers=providers)
            digest = _sha256(staged)
            if digest is not None:   # else ORT wrote nothing: the rename fails, the session stays
                with atomic_file(optimized.with_name(optimized.name + ".sha256"), "w") as f:
                    f.write(digest + "\n")
    except OSError:
        if session is None:
            raise
    return session


def _numpy_dtype(dtype: torch.dtype):
    table = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}
    if dtype not in table:
        raise ConfigError(ONNX_BF16 if dtype == torch.bfloat16 else f"--backend onnx binds no {dtype} tensors")
    return table[dtype]


class OnnxBackend(UNetBackend):
    name = "onnx"

    def __init__(self, tokenflow: TokenFlowUNet, kernels: KernelChoice = KernelChoice(), *, model_identity: str = "",
                 cache_root: Optional[str] = None, folder: Optional[str] = None, log=None):
        param = next(tokenflow.unet.parameters())
        if param.dtype == torch.bfloat16:   # an Editor loaded in bfloat16 (EditConfig refuses --dtype bfloat16 earlier)
            raise ConfigError(ONNX_BF16)
        self.tokenflow, self.device, self.dtype = tokenflow, param.device, param.dtype
        self.kernels = exported_kernels(kernels, "onnx", self.dtype)
        self.model_identity = model_identity
        self.folder = Path(folder or os.path.join(cache_root or default_cache_root(), "onnx"))
        self.log = log
        self.exported = self.reused = 0
        self._sessions: Dict[Tuple, OnnxSession] = {}

    def describe(self) -> str:
        return f"onnx (ONNX Runtime, graphs in {self.folder})"

    def stats(self) -> dict:
        return {"graphs_exported": self.exported, "graphs_reused": self.reused, "folder": str(self.folder)}

    def session(self, kind: str, latent_size: Tuple[int, int], n_branches: int = 0, match_on: str = "input") -> OnnxSession:
        key = (kind, latent_size, n_branches, match_on)
        if key not in self._sessions:
            spec = graph_spec(self.tokenflow, kind, latent_size=latent_size, n_branches=n_branches, match_on=match_on,
                              model_identity=self.model_identity, kernels=self.kernels)
            path, reused = export_pass(self.tokenflow, spec, self.kernels, self.folder, self.log)
            self.reused += reused
            self.exported += not reused
            self._sessions[key] = OnnxSession(path, self.device, max(1, torch.get_num_threads()))
        return self._sessions[key]

    def plain(self, sample, t, text):
        (eps,) = self.session("plain", tuple(sample.shape[-2:]))(sample, timestep_tensor(t, self.device), text)
        return eps.to(self.device)

    def keyframes(self, sample, t, text, inject_qk, inject_conv, n_branches, match_on):
        out = self.session("keyframes", tuple(sample.shape[-2:]), n_branches, match_on)(
            sample, timestep_tensor(t, self.device), text, switch(inject_qk, self.device), switch(inject_conv, self.device))
        out = [o.to(self.device) for o in out]
        n = len(self.tokenflow.layers)
        return out[0], out[1:1 + n], out[1 + n:]

    def propagate(self, sample, t, text, inject_conv, pairs, weights, store, n_branches, match_on):
        (eps,) = self.session("propagate", tuple(sample.shape[-2:]), n_branches, match_on)(
            sample, timestep_tensor(t, self.device), text, switch(inject_conv, self.device), pairs.long(),
            weights.float(), *store)
        return eps.to(self.device)


def export_all(tokenflow: TokenFlowUNet, *, latent_size: Tuple[int, int], n_branches: int, match_on: str,
               model_identity: str, folder: Path, kernels: KernelChoice = KernelChoice("torch", "static"),
               log=None) -> List[dict]:
    """Export (or reuse) the plain, keyframe and propagation graphs; one record per graph."""
    records = []
    for kind in ("plain", "keyframes", "propagate"):
        spec = graph_spec(tokenflow, kind, latent_size=latent_size, n_branches=n_branches, match_on=match_on,
                          model_identity=model_identity, kernels=kernels)
        path, reused = export_pass(tokenflow, spec, kernels, folder, log)
        records.append({"pass": kind, "path": str(path), "reused": reused, "key": spec_key(spec)})
    return records
