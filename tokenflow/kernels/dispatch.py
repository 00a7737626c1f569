"""Which implementation of a kernel op runs, and why.

Every backend declares what it supports; the dispatcher asks each one, in priority order, for
the reasons it cannot run the given arguments (after xFormers' ``not_supported_reasons``).
``backend=None`` (or ``"auto"``) picks the first backend with no reasons; a backend asked for by
name must support the arguments or the call fails with those reasons. ``explain`` lists every
backend with its reasons, which is what ``tokenflow doctor`` prints.

Backends judge *specs* (device, dtype, shape, strides), never values, so a decision depends on
metadata only; that is what lets ``torch.compile`` treat the choice as a trace-time constant
(``_choose`` runs eagerly while tracing, and the op itself is a custom op).

Two kinds of reasons exist:
- *cannot run*: wrong device, dtype, shape, or the package is not installed (with the command
  that installs it);
- *not picked automatically*: the backend could run, but only runs when asked for by name
  (the Triton interpreter on CPU, backends not yet verified on real hardware).
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from tokenflow.errors import ConfigError

AUTO = "auto"


class BackendUnavailable(ConfigError):
    """A backend asked for by name cannot run these arguments (exit code 2, like a bad flag)."""


class TensorSpec(NamedTuple):
    """What backends may look at to decide: a tensor's metadata."""

    device: torch.device
    dtype: torch.dtype
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


def spec_of(value: Any) -> Any:
    """Plain ints even under torch.compile with dynamic shapes (``int`` specialises a SymInt)."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(value.device, value.dtype, tuple(int(s) for s in value.shape),
                          tuple(int(s) for s in value.stride()))
    return value


@dataclass
class Backend:
    """One implementation of one op.

    op, name: e.g. ("keyframe_attention", "triton").
    priority: higher is tried first by ``backend=None``.
    target: "module:function" of the implementation, imported on first use (so a missing
        optional package only matters when that backend is asked for).
    requires: () -> reason the backend is missing entirely (None: importable).
    unsupported: (*specs) -> reasons it cannot run arguments with these specs.
    not_auto: (*specs) -> reason it is only used when asked for by name (None: it may be picked).
    verified: where it has been checked against the torch reference.
    benchmark_only: registered by ``tokenflow.benchmark`` (the original implementation's compute
        pattern) when a benchmark runs; runs only by name and is never listed as a choice (CLI
        help, config errors, job-file schema, doctor), so a production process never offers it.
    """

    op: str
    name: str
    priority: int
    target: str
    requires: Callable[[], Optional[str]] = lambda: None
    unsupported: Callable[..., List[str]] = lambda *specs: []
    not_auto: Callable[..., Optional[str]] = lambda *specs: None
    verified: str = ""
    benchmark_only: bool = False
    _fn: Optional[Callable] = field(default=None, repr=False)

    def load(self) -> Callable:
        if self._fn is None:
            module, name = self.target.split(":")
            self._fn = getattr(importlib.import_module(module, package=__package__), name)
        return self._fn

    def reasons(self, *specs) -> List[str]:
        missing = self.requires()
        if missing:
            return [missing]
        return list(self.unsupported(*specs))


_REGISTRY: Dict[str, Dict[str, Backend]] = {}
_BY_PRIORITY: Dict[str, List[Backend]] = {}   # kept sorted by register: dispatch runs in every layer


def register(backend: Backend) -> Backend:
    table = _REGISTRY.setdefault(backend.op, {})
    table[backend.name] = backend
    _BY_PRIORITY[backend.op] = sorted(table.values(), key=lambda b: -b.priority)
    return backend


def unregister(op: str, name: str) -> None:
    del _REGISTRY[op][name]
    _BY_PRIORITY[op] = sorted(_REGISTRY[op].values(), key=lambda b: -b.priority)


def backends(op: str, include_benchmark: bool = False) -> List[Backend]:
    """The op's backends, highest priority first (benchmark-only ones only when asked for)."""
    if op not in _BY_PRIORITY:
        raise KeyError(f"unknown kernel op {op!r}; ops: {', '.join(sorted(_REGISTRY))}")
    return [b for b in _BY_PRIORITY[op] if include_benchmark or not b.benchmark_only]


def backend_names(op: str, include_benchmark: bool = False) -> List[str]:
    return [b.name for b in backends(op, include_benchmark)]


def ops() -> List[str]:
    return sorted(_REGISTRY)


@dataclass
class Verdict:
    """One backend's answer for one call: ``runs`` is True when ``reasons`` is empty."""

    name: str
    reasons: List[str]
    auto_reason: Optional[str]
    chosen: bool = False

    @property
    def runs(self) -> bool:
        return not self.reasons

    def describe(self) -> str:
        if self.chosen:
            return f"{self.name}: chosen"
        if self.reasons:
            return f"{self.name}: cannot run: {'; '.join(self.reasons)}"
        if self.auto_reason:
            return f"{self.name}: runs, but only when asked for by name: {self.auto_reason}"
        return f"{self.name}: runs (a higher-priority backend was chosen)"


def explain(op: str, *args, backend: Optional[str] = None) -> List[Verdict]:
    """Every backend of ``op`` with the reasons it cannot run (or is not picked for) these arguments.

    Exactly one verdict is marked ``chosen`` when a backend would run.
    """
    specs = tuple(spec_of(a) for a in args)
    verdicts = []
    for b in backends(op, include_benchmark=True):
        if b.benchmark_only and b.name != backend:
            continue
        reasons = b.reasons(*specs)
        auto = None if reasons else b.not_auto(*specs)
        verdicts.append(Verdict(b.name, reasons, auto))
    wanted = None if backend in (None, AUTO) else backend
    for v in verdicts:
        if v.runs and (v.name == wanted if wanted else v.auto_reason is None):
            v.chosen = True
            break
    return verdicts


def implementation(op: str, name: str) -> Callable:
    """Backend ``name`` of ``op`` without looking at arguments (traced graphs: looking at shapes
    would specialise symbolic sizes; the graph backends check their kernels by name up front)."""
    try:
        return _REGISTRY[op][name].load()
    except KeyError:
        raise BackendUnavailable(f"{op}: unknown backend {name!r}; choose one of {', '.join(backend_names(op))}") from None


def resolve(op: str, backend: Optional[str], *args) -> Callable:
    """The implementation of ``op`` that runs these arguments (see module docstring); counted in
    ``used()`` when called eagerly (not while tracing, not inside ``unrecorded()``)."""
    name = choose(op, backend, *args)
    if not torch.compiler.is_compiling() and _RECORDING[0]:   # (this order: no guard on the flag while tracing)
        counts = _USED.setdefault(op, {})
        counts[name] = counts.get(name, 0) + 1
    return _REGISTRY[op][name].load()


# What ran: op -> backend name -> eager calls resolved to it since ``forget_used()`` (one process:
# the run summary, the ``done`` event and ``tokenflow bench`` read it after an edit). Traced graphs
# resolve by name at trace time (``implementation``): the graph backends say what they contain.
_USED: Dict[str, Dict[str, int]] = {}
_RECORDING = [True]


def used() -> Dict[str, Dict[str, int]]:
    """{op: {backend: calls}} resolved eagerly since the last ``forget_used()``."""
    return {op: dict(counts) for op, counts in _USED.items()}


def forget_used() -> None:
    _USED.clear()


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Calls that are not the run's work (self-checks, probes) are left out of ``used()``."""
    before, _RECORDING[0] = _RECORDING[0], False
    try:
        yield
    finally:
        _RECORDING[0] = before


def choose(op: str, backend: Optional[str], *args) -> str:
    """The name of the backend ``resolve`` would use."""
    return _choose(op, backend or AUTO, tuple(spec_of(a) for a in args))


@torch.compiler.assume_constant_result
def _choose(op: str, backend: str, specs: tuple) -> str:
    """The backend name for these specs; also imports it, so tracing never meets an import."""
    table = _REGISTRY.get(op, {})
    if backend != AUTO:
        if backend not in table:
            raise BackendUnavailable(f"{op}: unknown backend {backend!r}; choose one of "
                                     f"{', '.join([AUTO] + backend_names(op))}")
        reasons = table[backend].reasons(*specs)
        if reasons:
            raise BackendUnavailable(f"{op}: backend {backend!r} cannot run here: {'; '.join(reasons)} "
                                     f"(choose 'auto' or 'torch': --attention-backend / --nearest-backend, "
                                     f"or backend= in Python)")
        table[backend].load()
        return backend
    for b in backends(op):
        # not_auto first: it reads shapes only, while requires() imports the package (faiss: 0.25 s)
        if b.not_auto(*specs) is None and not b.reasons(*specs):
            b.load()
            return b.name
    details = "; ".join(v.describe() for v in explain(op, *specs))
    raise BackendUnavailable(f"{op}: no backend can run these arguments: {details}")


@dataclass(frozen=True)
class KernelChoice:
    """Backends of the kernel ops for one edit (``"auto"``: the dispatcher's pick)."""

    attention: str = AUTO
    nearest: str = AUTO

    # The gather follows the nearest-neighbour backend where it has one (torch, triton). Derived
    # once here: it is read on every propagation call of every layer.
    gather: str = field(init=False)

    def __post_init__(self) -> None:
        gather = self.nearest if self.nearest in backend_names("gather", include_benchmark=True) else AUTO
        object.__setattr__(self, "gather", gather)


def check_names(op: str, name: Optional[str], what: str) -> None:
    """Reject an unknown backend name early (config validation), naming the choices."""
    if name not in (None, AUTO) and name not in backend_names(op, include_benchmark=True):
        raise ConfigError(f"{what}: unknown backend {name!r}; choose one of {', '.join([AUTO] + backend_names(op))}")
