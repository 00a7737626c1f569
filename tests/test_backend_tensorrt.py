"""``--backend tensorrt``: the pure parts run everywhere; everything that needs TensorRT and a GPU
is skipped without them (and, at the time of writing, has never run anywhere).

Here: optimization profiles of the three pass graphs, engine cache keys, call sizes from a memory
plan, the profile check's message, the import guard and the errors on a CPU model. The Engine
lifecycle (build, load, activate, infer, build failures) is checked against a *stand-in* `tensorrt`
module (marker ``fake_tensorrt``, tests named ``test_fake_tensorrt_*``): that checks our reading of
the TensorRT 10 API, not TensorRT. On a CUDA machine with TensorRT: engines of the tiny model
(fp16) against the eager graph passes, engine reuse from the cache, CUDA graphs on and off, and a
call outside the profile.
"""
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch

from tokenflow.engine.backends import tensorrt as trt_backend
from tokenflow.engine.backends.tensorrt import (
    INSTALL,
    CallSizes,
    call_limits,
    engine_key,
    profile_for_spec,
    profile_shapes,
    profile_violation,
)
from tokenflow.engine.backends.tensorrt import engine as trt_engine
from tokenflow.engine.passes import input_names
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.errors import ConfigError
from tokenflow.kernels import KernelChoice

LAYERS = [["down.attn1", 64, 32], ["mid.attn1", 16, 64], ["up.attn1", 64, 32]]
STATIC_INPUTS = {"timestep", "inject_qk", "inject_conv"}


def _profile(kind, b, frames=(1, 4, 6), keyframes=(1, 3, 5)):
    return profile_shapes(kind, b, LAYERS, latent_size=(8, 8), text=(77, 32), frames=frames, keyframes=keyframes)


@pytest.mark.parametrize("kind", ["plain", "keyframes", "propagate"])
@pytest.mark.parametrize("b", [1, 3, 5])
def test_profiles_cover_every_dynamic_input_with_ordered_shapes(kind, b):
    frames, keyframes = (1, 4, 6), (2, 3, 5)
    profile = _profile(kind, b, frames, keyframes)
    names = [layer[0] for layer in LAYERS]
    assert set(profile) == set(input_names(kind, names)) - STATIC_INPUTS
    for name, (low, opt, high) in profile.items():
        assert len(low) == len(opt) == len(high)
        assert all(lo <= o <= hi for lo, o, hi in zip(low, opt, high)), name
        assert low[1:] == opt[1:] == high[1:], f"{name}: only the leading axis is dynamic"
    per_call = keyframes if kind == "keyframes" else frames
    for name in ("sample", "text"):
        assert [s[0] for s in profile[name]] == [b * n for n in per_call], "rows = n_branches * frames"
    assert profile["sample"][2][1:] == (4, 8, 8) and profile["text"][2][1:] == (77, 32)
    if kind == "propagate":
        assert [s for s in profile["pairs"]] == [(n, 2) for n in frames] == [s for s in profile["weights"]]
        for i, (_, s, c) in enumerate(LAYERS):
            assert list(profile[f"features_{i}"]) == [(k, s, c) for k in keyframes]
            assert list(profile[f"outputs_{i}"]) == [(b * k, s, c) for k in keyframes]


def test_profiles_refuse_bad_ranges_and_too_many_rows():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        _profile("plain", 1, frames=(2, 1, 4))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        _profile("propagate", 3, keyframes=(0, 1, 1))
    with pytest.raises(ValueError, match="unknown pass"):
        _profile("decode", 1)
    with pytest.raises(ConfigError, match="--chunk-frames"):
        _profile("propagate", 5, frames=(1, 1, 100_000))


def test_profile_follows_the_graph_spec_of_the_tiny_model(tiny_sd):
    pytest.importorskip("onnx")
    from tokenflow.engine.backends.onnx import graph_spec
    from tokenflow.engine.memory import attention_layer_shapes

    tf = TokenFlowUNet(tiny_sd.unet)
    try:
        shapes = attention_layer_shapes(tiny_sd.unet, 8, 8)
        for kind in ("plain", "keyframes", "propagate"):
            spec = graph_spec(tf, kind, latent_size=(8, 8), n_branches=3, match_on="input", model_identity="tiny",
                              kernels=KernelChoice("torch", "static"))
            profile = profile_for_spec(spec, (1, 2, 4), (1, 3, 3))
            assert set(profile) == set(spec["inputs"]) - STATIC_INPUTS
            b = 1 if kind == "plain" else 3
            assert profile["text"][2] == (b * (3 if kind == "keyframes" else 4), 77,
                                          tiny_sd.unet.config.cross_attention_dim)
            if kind == "propagate":
                for i, layer in enumerate(tf.layers):
                    assert profile[f"features_{i}"][2] == (3, *shapes[layer.name])
    finally:
        tf.remove()


def test_engine_key_changes_with_each_input_and_only_then():
    profile = _profile("propagate", 3)
    base = dict(graph_key="abc", trt_version="10.3.0", gpu_name="NVIDIA H100", capability=(9, 0), profile=profile,
                options={"strongly_typed": True})
    key = engine_key(**base)
    assert key == engine_key(**base) == engine_key(**{**base, "profile": dict(reversed(list(profile.items())))})
    assert len(key) == 16
    changed = {"graph_key": "abd", "trt_version": "10.4.0", "gpu_name": "NVIDIA L4", "capability": (8, 9),
               "profile": _profile("propagate", 3, frames=(1, 4, 8)), "options": {"strongly_typed": False}}
    keys = {name: engine_key(**{**base, name: value}) for name, value in changed.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(keys), keys


def test_call_sizes_from_a_plan_and_from_a_first_call():
    plan = SimpleNamespace(keyframes=6, keyframe_call=3, chunk_frames=4, inversion_frames=8, store_on="device")
    sizes = CallSizes.from_plan(plan)
    assert sizes.ranges("plain")[0] == (1, 8, 8)
    assert sizes.ranges("keyframes")[1] == (1, 3, 3)
    assert sizes.ranges("propagate") == ((1, 4, 4), (1, 6, 6))
    offloaded = CallSizes.from_plan(SimpleNamespace(**{**vars(plan), "store_on": "host", "chunk_frames": 2}))
    assert offloaded.store == (1, 4, 6), "a staged store: about 2 per frame, at most all K"
    assert CallSizes.from_call("propagate", 4, 3) == ((1, 4, 4), (1, 3, 8))
    assert CallSizes.from_call("keyframes", 1, 5)[1] == (1, 5, 5)


def test_shapes_outside_the_profile_are_named():
    profile = _profile("propagate", 3)          # frames 1..6, keyframes 1..5
    assert profile_violation(profile, {"sample": (12, 4, 8, 8), "pairs": (4, 2), "timestep": ()}) is None
    problem = profile_violation(profile, {"sample": (21, 4, 8, 8)})
    assert "sample" in problem and "(21, 4, 8, 8)" in problem
    assert "features_1" in profile_violation(profile, {"features_1": (6, 16, 64)})
    assert profile_violation(profile, {"pairs": (4, 3)}) is not None
    assert "--chunk-frames" in call_limits("propagate", (1, 6, 6), (1, 5, 5))


def test_the_module_imports_without_tensorrt(monkeypatch):
    """A fresh import of the backend succeeds where `import tensorrt` fails (installed here or not):
    TensorRT is imported only when an engine is built or loaded. The modules of this process are
    put back afterwards."""
    import tokenflow.engine.backends as backends

    name = trt_backend.__name__
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setattr(backends, "tensorrt", trt_backend)      # the fresh import rebinds it; undone after
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # makes `import tensorrt` raise ImportError
    fresh = importlib.import_module(name)
    assert fresh is not trt_backend
    assert fresh.profile_shapes("plain", 1, LAYERS, latent_size=(8, 8), text=(77, 32), frames=(1, 4, 6),
                                keyframes=(1, 3, 5)) == _profile("plain", 1)


def test_the_import_guard_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)     # makes `import tensorrt` raise ImportError
    with pytest.raises(ConfigError) as info:
        trt_engine._tensorrt()
    assert "--backend tensorrt needs TensorRT (pip install tensorrt --extra-index-url https://pypi.nvidia.com)" \
        in str(info.value)


def test_a_cpu_model_is_refused_with_what_tensorrt_needs(tiny_sd):
    from tokenflow.engine.backends import make_backend
    from tokenflow.engine.backends.tensorrt import TensorRTBackend

    tf = TokenFlowUNet(tiny_sd.unet)
    try:
        with pytest.raises(ConfigError) as info:
            make_backend("tensorrt", tf, KernelChoice())
        message = str(info.value)
        assert "TensorRT runs on CUDA devices only" in message
        if importlib.util.find_spec("tensorrt") is None:   # with TensorRT installed only the device is wrong
            assert INSTALL in message
        with pytest.raises(ConfigError, match="CUDA devices only") as info:
            TensorRTBackend(tf, KernelChoice())
        assert INSTALL in str(info.value)
    finally:
        tf.remove()


# --- the Engine lifecycle against a stand-in `tensorrt` module ------------------------------------
# These check tokenflow's own logic (which calls, in which order, with which shapes, which errors)
# against the TensorRT 10 API as we read its documentation, by way of a fake module written from
# that reading; they cannot show that the real TensorRT agrees (marker: fake_tensorrt).

class _Enum:
    def __init__(self, *names):
        for i, name in enumerate(names):
            setattr(self, name, i)


def _fake_tensorrt(inputs, outputs, parse_ok=True, build_ok=True):
    """A `tensorrt` stand-in. inputs/outputs: {name: (shape with -1 for dynamic axes, dtype name)}."""
    calls = {"set_shape": {}, "flags": [], "input_shapes": {}, "addresses": {}, "executed": 0, "strategy": None}
    dt = _Enum("FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64", "INT4")

    class ILogger:
        Severity = _Enum("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")

        def __init__(self):
            pass

    class Network:
        num_inputs = len(inputs)

        def get_input(self, i):
            name = list(inputs)[i]
            return SimpleNamespace(name=name, shape=inputs[name][0])

    class ParserError:
        def code(self):
            return "UNSUPPORTED_NODE"

        def desc(self):
            return "no importer for op FancyOp"

        def node(self):
            return 7

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            calls["parsed"] = path
            return parse_ok

        def get_error(self, i):
            return ParserError()

    class Cache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return self.blob + b"+timings"

    class Config:
        def set_flag(self, flag):
            calls["flags"].append(flag)

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def add_optimization_profile(self, profile):
            calls["profiles"] = calls.get("profiles", 0) + 1

        def create_timing_cache(self, blob):
            return Cache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, low, opt, high):
            calls["set_shape"][name] = (tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if not build_ok:
                self.logger.log(ILogger.Severity.ERROR, "out of tactics for node 12")
                return None
            return b"PLAN"

    class Context:
        def set_device_memory(self, ptr, size):
            calls["scratch"] = size

        def set_input_shape(self, name, shape):
            calls["input_shapes"][name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            calls["addresses"][name] = ptr
            return True

        def get_tensor_shape(self, name):
            return calls["input_shapes"]["sample"]     # the stand-in's only output is shaped like sample

        def execute_async_v3(self, stream):
            calls["executed"] += 1
            return True

    class CudaEngine:
        num_io_tensors = len(inputs) + len(outputs)
        device_memory_size_v2 = 4096

        def __init__(self):
            self.io = {**inputs, **outputs}

        def get_tensor_name(self, i):
            return list(self.io)[i]

        def get_tensor_mode(self, name):
            return mode.INPUT if name in inputs else mode.OUTPUT

        def get_tensor_dtype(self, name):
            return getattr(dt, self.io[name][1])

        def get_tensor_shape(self, name):
            return self.io[name][0]

        def is_shape_inference_io(self, name):
            return False

        def create_execution_context(self, strategy):
            calls["strategy"] = strategy
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return CudaEngine() if blob == b"PLAN" else None

    mode = _Enum("INPUT", "OUTPUT")
    module = SimpleNamespace(
        __version__="10.0.fake", ILogger=ILogger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        # as TensorRT 11: no BuilderFlag.FP16/BF16 (weak typing was removed); STRONGLY_TYPED not bit 0
        NetworkDefinitionCreationFlag=_Enum("EXPLICIT_BATCH", "STRONGLY_TYPED"), BuilderFlag=_Enum("DEBUG"),
        MemoryPoolType=_Enum("WORKSPACE"), TensorIOMode=mode, DataType=dt,
        ExecutionContextAllocationStrategy=_Enum("STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"))
    return module, calls


PLAIN_IO = ({"sample": ((-1, 4, 8, 8), "HALF"), "timestep": ((), "INT64"), "text": ((-1, 77, 32), "HALF")},
            {"eps": ((-1, 4, 8, 8), "HALF")})


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kw):
        module, calls = _fake_tensorrt(*PLAIN_IO, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(trt_engine, "_LOGGER", None)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(cuda_stream=1234))
        return calls
    return install


@pytest.mark.fake_tensorrt
def test_fake_tensorrt_engine_build_load_activate_infer(fake_trt, tmp_path):
    """Our Engine against the stand-in: which TensorRT calls it makes, in which order, with which
    shapes and flags (our reading of the TensorRT 10 API; not TensorRT itself)."""
    calls = fake_trt()
    profile = _profile("plain", 1)                       # 1..6 frames
    engine = trt_backend.Engine("plain pass", profile, torch.device("cpu"), cuda_graphs=False,
                                limits=call_limits("plain", (1, 4, 6), (1, 1, 1)))
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old")
    engine.build(tmp_path / "unet.onnx", tmp_path / "plain.engine", profile, timing, workspace_bytes=2**30)
    assert calls["parsed"] == str(tmp_path / "unet.onnx")
    assert calls["network_flags"] == 1 << 1, "strongly typed: precision comes from the fp16 graph"
    assert calls["flags"] == [] and calls["workspace"] == 2**30 and calls["profiles"] == 1
    assert calls["set_shape"] == {"sample": profile["sample"], "text": profile["text"]}
    assert (tmp_path / "plain.engine").read_bytes() == b"PLAN" and timing.read_bytes() == b"old+timings"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp files left"

    engine.load()
    engine.activate()
    assert engine.inputs == ["sample", "timestep", "text"] and engine.outputs == ["eps"]
    assert engine.dynamic == {"sample", "text"} and engine.dtypes["timestep"] == torch.int64
    assert calls["strategy"] == 2 and calls["scratch"] == 4096, "user-managed scratch of device_memory_size_v2"
    feeds = {"sample": torch.zeros(3, 4, 8, 8), "timestep": torch.tensor(5), "text": torch.zeros(3, 77, 32)}
    out = engine.infer(feeds)
    assert out["eps"].shape == (3, 4, 8, 8) and out["eps"].dtype == torch.float16
    assert calls["input_shapes"] == {"sample": (3, 4, 8, 8), "text": (3, 77, 32)}, "static inputs keep their shape"
    assert set(calls["addresses"]) == {"sample", "timestep", "text", "eps"} and calls["executed"] == 1
    with pytest.raises(ConfigError, match="--chunk-frames") as info:
        engine.infer({**feeds, "sample": torch.zeros(7, 4, 8, 8), "text": torch.zeros(7, 77, 32)})
    assert "1..6 frames per inversion call" in str(info.value) and calls["executed"] == 1


@pytest.mark.fake_tensorrt
def test_fake_tensorrt_build_failures_name_the_graph_and_the_reason(fake_trt, tmp_path):
    """Parser and builder failures reported the way the stand-in reports them (our reading of the
    TensorRT 10 API: OnnxParser.get_error, a logger ERROR and a None plan), turned into one message."""
    from tokenflow.errors import ModelError

    profile = _profile("plain", 1)
    fake_trt(parse_ok=False)
    engine = trt_backend.Engine("plain pass", profile, torch.device("cpu"))
    with pytest.raises(ModelError, match=r"cannot parse the plain pass graph .*unet.onnx.*node 7.*FancyOp"):
        engine.build(tmp_path / "unet.onnx", tmp_path / "e.engine", profile, tmp_path / "t.cache")
    fake_trt(build_ok=False)
    with pytest.raises(ModelError, match="could not build the plain pass engine .*out of tactics for node 12"):
        engine.build(tmp_path / "unet.onnx", tmp_path / "e.engine", profile, tmp_path / "t.cache")
    assert not (tmp_path / "e.engine").exists()
    with pytest.raises(ModelError, match="does not fit the profile"):
        engine.build(tmp_path / "unet.onnx", tmp_path / "e.engine", {"text": profile["text"]}, tmp_path / "t.cache")


# --- TensorRT + CUDA (never run where this was written) -------------------------------------------

@pytest.fixture(scope="module")
def cuda_sd(tiny_model_dir):
    pytest.importorskip("tensorrt")
    pytest.importorskip("onnx")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from tokenflow.models.load import load_model

    return load_model(str(tiny_model_dir), torch.device("cuda"), torch.float16)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-6))


def _pass_inputs(sd, frames, n_kf, g):
    dev, dt = torch.device("cuda"), torch.float16
    d = sd.unet.config.cross_attention_dim
    texts = torch.randn(3, 77, d, generator=g).to(dev, dt)
    sample = torch.randn(3 * frames, 4, 8, 8, generator=g).to(dev, dt)
    kf_sample = torch.randn(3 * n_kf, 4, 8, 8, generator=g).to(dev, dt)
    pairs = torch.randint(0, n_kf, (frames, 2), generator=g).to(dev)
    pairs[0, 1] = -1                               # "no pair", as the runner pads
    weights = torch.rand(frames, 2, generator=g).to(dev)
    weights[0, 1] = 0.0
    return texts, sample, kf_sample, pairs, weights


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_engines_match_the_eager_passes_and_are_reused(cuda_sd, tmp_path, cuda_graphs):
    from tokenflow.engine.backends.tensorrt import TensorRTBackend
    from tokenflow.engine.passes import KeyframePass, PlainPass, PropagatePass

    static = KernelChoice("torch", "static")
    tf = TokenFlowUNet(cuda_sd.unet)
    try:
        sizes = CallSizes(plain=(1, 4, 4), keyframes=(1, 3, 3), propagate=(1, 4, 4), store=(1, 3, 3))
        backend = TensorRTBackend(tf, KernelChoice(), model_identity=cuda_sd.identity, cache_root=str(tmp_path),
                                  cuda_graphs=cuda_graphs, call_sizes=sizes)
        assert "NEVER RUN" in backend.describe()
        plain, kp, pp = PlainPass(tf), KeyframePass(tf, 3, "input", static), PropagatePass(tf, 3, "input", static)
        g = torch.Generator().manual_seed(0)
        errors = {}
        for frames, n_kf in ((4, 3), (1, 2), (3, 3)):     # several shapes per engine, in profile
            texts, sample, kf_sample, pairs, weights = _pass_inputs(cuda_sd, frames, n_kf, g)
            t = 401
            rows = texts.repeat_interleave(frames, 0)
            with torch.no_grad():
                ref = plain(sample[:frames], torch.tensor(t, device="cuda"), rows[:frames])
                errors[f"plain/{frames}"] = _rel(backend.plain(sample[:frames], t, rows[:frames]), ref)
                kf_text = texts.repeat_interleave(n_kf, 0)
                ref_kf = kp(kf_sample, torch.tensor(t, device="cuda"), kf_text, torch.tensor(True, device="cuda"),
                            torch.tensor(True, device="cuda"))
                eps, features, outputs = backend.keyframes(kf_sample, t, kf_text, True, True, 3, "input")
                errors[f"keyframes/{n_kf}"] = max(_rel(a, b) for a, b in zip([eps, *features, *outputs], ref_kf))
                store = [*ref_kf[1:]]
                ref_prop = pp(sample, torch.tensor(t, device="cuda"), rows, torch.tensor(False, device="cuda"),
                              pairs, weights, *store)
                got = backend.propagate(sample, t, rows, False, pairs, weights, store, 3, "input")
                errors[f"propagate/{frames}"] = _rel(got, ref_prop)
        print("TensorRT vs eager fp16, relative L2:", errors)
        assert all(e < 2e-2 for e in errors.values()), errors
        stats = backend.stats()
        assert stats["engines_built"] == 3 and stats["engines_reused"] == 0, stats
        assert stats["infer_calls"] == {"plain": 3, "keyframes": 3, "propagate": 3}
        assert (stats["cuda_graphs"] > 0) == cuda_graphs

        with pytest.raises(ConfigError, match="--chunk-frames"):
            texts, sample, _, pairs, weights = _pass_inputs(cuda_sd, 5, 3, g)     # 5 frames > max 4
            backend.propagate(sample, 401, texts.repeat_interleave(5, 0), False, pairs, weights, store, 3, "input")

        again = TensorRTBackend(tf, KernelChoice(), model_identity=cuda_sd.identity, cache_root=str(tmp_path),
                                cuda_graphs=cuda_graphs, call_sizes=sizes)
        again.plain(sample[:2], 401, texts.repeat_interleave(2, 0)[:2])
        assert again.stats()["engines_reused"] == 1 and again.stats()["engines_built"] == 0
        assert list((tmp_path / "tensorrt").glob("timing-*.cache")), "the timing cache is kept"
    finally:
        tf.remove()


def test_tensorrt_edit_matches_eager(tiny_model_dir, sample_clip, cuda_sd, tmp_path):
    from tokenflow.config import EditConfig
    from tokenflow.method.editor import Editor

    base = dict(video=sample_clip, frames=10, size=(64, 64), inversion_steps=10, steps=5, keyframe_spacing=4,
                inversion_prompt="a clip", prompt="a new clip", chunk_frames=4, inversion_batch_size=4,
                device="cuda", dtype="float16", cache_dir=str(tmp_path))
    editor = Editor.from_pretrained(str(tiny_model_dir), device="cuda", dtype="float16", use_cache=False)
    eager = editor.edit(sample_clip, config=EditConfig(**base))
    result = editor.edit(sample_clip, config=EditConfig(**base, backend="tensorrt"))
    rel = _rel(result.latents, eager.latents)
    print(f"tensorrt vs eager (fp16): relative L2 of the final latents {rel:.2e}; {editor.runner.backend.stats()}")
    assert rel < 5e-2
