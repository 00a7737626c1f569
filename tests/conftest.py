"""Shared fixtures: a tiny SD-2.1-shaped model built in code, an isolated cache, synthetic clips,
and the device the Triton kernels run on.

Nothing here downloads: HF_HUB_OFFLINE is set for the whole session and caches live in tmp.

Triton: the real kernels on a CUDA machine, the interpreter on a CPU-only one
-------------------------------------------------------------------------------
TRITON_INTERPRET is not set for the session. Tests that run Triton kernels ask for the
``triton_device`` fixture; every other test runs without the variable, as users do (there the
dispatcher refuses ``backend="triton"`` on CPU tensors, naming TRITON_INTERPRET=1 as the fix).

Triton fixes "compile or interpret" once per ``@triton.jit`` function, when the function is
created, for the life of the process: for its own standard library (``tl.zeros``, ``tl.max``)
when ``triton.language`` is first imported, and for our kernels when
``tokenflow.kernels.<op>.triton`` is imported (the dispatcher does that lazily, ``Backend.load``).
The interpreter also reads the variable at every launch (to pick its CPU "driver"), as do the
dispatcher (``support.triton_device``) and the kernels (``support.upcast_bf16``). Hence two parts:

1. Built once, here, at import (before any test module is collected). Without a CUDA device,
   Triton and the three kernel modules are imported with TRITON_INTERPRET=1 set for those imports
   only, then the environment is restored. Setting it later would be too late: any test or
   dispatch check that imports ``triton`` (``support.triton_missing`` does) would build Triton's
   library for the compiler, and no kernel could ever be interpreted in this process. With a CUDA
   device nothing is imported early and the kernels are built for the GPU on first use.
2. Set per test. ``triton_device`` is the device the kernels run on: ``cuda`` with a CUDA device
   (the real kernels; the variable is left alone), else ``cpu`` with TRITON_INTERPRET=1 set for
   that test only (monkeypatch, undone after it). It fails loudly if the kernels in this process
   were built the other way (triton imported before this file ran, e.g. by a plugin).

A TRITON_INTERPRET given to pytest from outside wins: ``1`` interprets on any machine, ``0`` never
does (``triton_device`` tests then skip where there is no CUDA device).

sm_90 compile checks (tests using the ``sm90`` fixture, marked ``sm90_compile``) need kernels built
for the compiler. Where this process interprets them, the first such test starts one fresh pytest
process with TRITON_INTERPRET=0 for all of those selected in this session, and each test reports
the outcome its twin had there: passed, failed (with that traceback) or skipped (with that reason).
Where the kernels are compiled (a CUDA machine, or TRITON_INTERPRET=0) they run in this process.
"""
import functools
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KERNEL_MODULES = ("tokenflow.kernels.keyframe_attention.triton", "tokenflow.kernels.nearest.triton",
                  "tokenflow.kernels.gather.triton")
_GIVEN_INTERPRET = os.environ.get("TRITON_INTERPRET")   # from outside pytest, before any fixture ran
_OUTCOMES_ENV = "TOKENFLOW_TEST_OUTCOMES"                # the fresh process writes its outcomes here


@functools.lru_cache(maxsize=None)
def interpret_kernels() -> bool:
    """Whether this process builds the Triton kernels for the interpreter (see the module docstring)."""
    if _GIVEN_INTERPRET not in (None, ""):
        return _GIVEN_INTERPRET != "0"
    import torch

    return not torch.cuda.is_available()


def _build_kernels_for_the_interpreter() -> None:
    """Part 1 of the module docstring: Triton's library and our kernels, built for the interpreter."""
    if not interpret_kernels() or importlib.util.find_spec("triton") is None:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from tokenflow.kernels import support

        if support.triton_missing() is None:   # too old, or broken: triton_device skips with the reason
            for module in KERNEL_MODULES:
                importlib.import_module(module)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


_build_kernels_for_the_interpreter()


def _built_for(interpreted: bool) -> list:
    """The Triton functions in this process built the other way (empty: all as wanted)."""
    import triton.language as tl

    want = "InterpretedFunction" if interpreted else "JITFunction"
    functions = {"triton.language.zeros": tl.zeros}
    functions.update({m: importlib.import_module(m).KERNEL_FOR_MODE_CHECK for m in KERNEL_MODULES})
    return [f"{name} ({type(fn).__name__})" for name, fn in functions.items() if type(fn).__name__ != want]


@pytest.fixture
def triton_device(monkeypatch):
    """The device this test runs the Triton kernels on: CUDA (the real kernels) or the CPU through
    the interpreter, with TRITON_INTERPRET=1 set for this test only (see the module docstring)."""
    import torch

    from tokenflow.kernels import support

    missing = support.triton_missing()
    if missing:
        pytest.skip(missing)
    if interpret_kernels():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        pytest.skip("TRITON_INTERPRET=0 was given and there is no CUDA device: the Triton kernels cannot run")
    wrong = _built_for(interpreted=device.type == "cpu")
    if wrong:
        pytest.fail(f"Triton functions built the wrong way for {device} in this process: {', '.join(wrong)}; "
                    "something imported triton or a kernel module before tests/conftest.py ran", pytrace=False)
    return device


@pytest.fixture
def sm90(tmp_path, monkeypatch):
    """Compiles kernels ahead of time for sm_90 (H100/H200) without a GPU: ``sm90.compile(...)``,
    ``sm90.SMEM_LIMIT``. The test body runs where the kernels are compiled, not interpreted (module
    docstring). A private Triton cache makes every test compile for real."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    nvidia = Path(triton.__file__).parent / "backends" / "nvidia"
    if not nvidia.is_dir() or not any((nvidia / "bin").glob("ptxas*")):
        pytest.skip("this triton wheel has no NVIDIA backend/ptxas")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from tests import kernel_helpers

    return SimpleNamespace(compile=kernel_helpers.compile_for_sm90, SMEM_LIMIT=kernel_helpers.SM90_SMEM_LIMIT,
                           ESIZE=kernel_helpers.ESIZE)


def pytest_configure(config):
    config.addinivalue_line("markers", "sm90_compile: compiles the Triton kernels for sm_90 (added to every "
                                       "test using the sm90 fixture; runs in a fresh process where this one "
                                       "interprets the kernels)")
    config.addinivalue_line("markers", "fake_tensorrt: checks tokenflow's calls against a stand-in `tensorrt` "
                                       "module written from the TensorRT 10 docs, not against TensorRT")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "sm90" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.sm90_compile)


_FRESH = pytest.StashKey[dict]()


def _fresh_process_outcomes(session) -> dict:
    """Run every selected sm90 test once in a fresh pytest process with TRITON_INTERPRET=0:
    {nodeid: [(phase, outcome, text), ...]}, plus "" -> the process's output tail."""
    if _FRESH in session.stash:
        return session.stash[_FRESH]
    nodeids = [item.nodeid for item in session.items if "sm90" in getattr(item, "fixturenames", ())]
    root = session.config.rootpath
    folder = tempfile.mkdtemp(prefix="tokenflow-sm90-")
    report = Path(folder) / "outcomes.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "0", _OUTCOMES_ENV: str(report)}
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids],
                             capture_output=True, text=True, env=env, cwd=root, timeout=1200)
        tail = run.stdout[-3000:] + run.stderr[-2000:]
    except subprocess.TimeoutExpired as timeout:
        tail = f"the fresh process did not finish in {timeout.timeout} s"
    outcomes = {"": tail}
    if report.exists():
        for line in report.read_text().splitlines():
            record = json.loads(line)
            outcomes.setdefault(record["nodeid"], []).append((record["when"], record["outcome"], record["text"]))
    shutil.rmtree(folder, ignore_errors=True)
    session.stash[_FRESH] = outcomes
    return outcomes


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """sm90 tests in a process that interprets the kernels: the outcome of the fresh process's twin."""
    if "sm90" not in pyfuncitem.fixturenames or not interpret_kernels():
        return None
    outcomes = _fresh_process_outcomes(pyfuncitem.session)
    phases = outcomes.get(pyfuncitem.nodeid)
    if not phases:
        pytest.fail(f"no outcome from the fresh sm_90 process (TRITON_INTERPRET=0):\n{outcomes['']}", pytrace=False)
    for when, outcome, text in phases:
        if outcome == "failed":
            pytest.fail(f"failed ({when}) in the fresh process with TRITON_INTERPRET=0:\n{text}", pytrace=False)
    for when, outcome, text in phases:
        if outcome == "skipped":
            pytest.skip(f"in the fresh process: {text}")
    return True


def pytest_runtest_logreport(report):
    """In the fresh sm_90 process: every phase's outcome, for the process that started it."""
    path = os.environ.get(_OUTCOMES_ENV)
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    if report.skipped and isinstance(report.longrepr, tuple):
        text = str(report.longrepr[2]).removeprefix("Skipped: ")
    else:
        text = report.longreprtext
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "text": text}) + "\n")


@pytest.fixture(scope="session", autouse=True)
def _offline_and_isolated(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokenflow-cache")
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TOKENFLOW_CACHE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENFLOW_CACHE"] = str(cache)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model calls (``pytestmark = pytest.mark.usefixtures(...)``):
    their ops are far too small to split, and on a busy 2-core runner a second thread makes every op
    wait for a descheduled peer (the tiny SDXL UNet: ~0.1 s a call with one thread, ~2.5 s with two
    under load). Restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tokenflow.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_xl_dir(tmp_path_factory):
    """The tiny SDXL folder (``--model tiny-xl``'s layout: 70 attn1 layers, two text encoders), once per session."""
    from tokenflow.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-xl", seed=0, xl=True)


@pytest.fixture(scope="session")
def tiny_xl(tiny_xl_dir):
    """The tiny SDXL loaded on CPU in float32 (shared: tests must not keep processors installed)."""
    import torch

    from tokenflow.models.load import load_model

    return load_model(str(tiny_xl_dir), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_sd(tiny_model_dir):
    """The tiny model loaded on CPU in float32 (shared: tests must not keep processors installed)."""
    import torch

    from tokenflow.models.load import load_model

    return load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)


@pytest.fixture
def tokenflow_unet(tiny_sd):
    """The TokenFlow processors installed on the shared tiny UNet for one test, removed after it."""
    from tokenflow.engine.processors import TokenFlowUNet

    tf = TokenFlowUNet(tiny_sd.unet)
    yield tf
    tf.remove()


@pytest.fixture(scope="session")
def sample_clip(tmp_path_factory):
    from tokenflow.io.samples import make_sample_clip

    path = tmp_path_factory.mktemp("clips") / "sample.mp4"
    return make_sample_clip(str(path), n_frames=12, size=(96, 64), fps=12)
