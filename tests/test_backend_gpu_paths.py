"""The ONNX Runtime and TensorRT paths for CUDA, checked where a CPU can check them (issue 18,
item 10): bfloat16 with ``--backend onnx`` refused in one line before anything loads; the CUDA
provider's options; torch's stream synchronised before ORT reads the bound inputs; TensorRT's
network flags (strongly typed only). The CUDA runs themselves remain unverified."""
from types import SimpleNamespace

import pytest
import torch

from tokenflow.app.cli import main
from tokenflow.config import ONNX_BF16, EditConfig
from tokenflow.engine.backends import make_backend
from tokenflow.engine.backends import onnx as onnx_backend
from tokenflow.engine.backends.tensorrt.engine import network_flags
from tokenflow.errors import ConfigError
from tokenflow.kernels import KernelChoice


def test_bfloat16_with_onnx_is_one_config_line_before_anything_loads(tmp_path, capsys):
    video, out = tmp_path / "clip.mp4", tmp_path / "out.mp4"
    video.write_bytes(b"\0" * 64)   # never read: the config is refused first
    code = main(["edit", str(video), "--prompt", "a cat", "--model", "tiny", "--backend", "onnx",
                 "--dtype", "bfloat16", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tokenflow: error:"), err
    assert "--backend onnx" in err[0] and "--dtype float16" in err[0], err
    assert not out.exists()
    assert [e.field for e in EditConfig(prompt="x", backend="onnx", dtype="bfloat16").errors()] == ["dtype"]
    assert not EditConfig(prompt="x", backend="onnx", dtype="float16").errors()
    assert not EditConfig(prompt="x", backend="compile", dtype="bfloat16").errors()


def test_onnx_backend_refuses_a_bfloat16_unet():
    """An Editor loaded in bfloat16 (no --dtype in the config) meets the same refusal at the backend."""
    tokenflow = SimpleNamespace(unet=torch.nn.Linear(2, 2, dtype=torch.bfloat16))
    with pytest.raises(ConfigError) as info:
        make_backend("onnx", tokenflow, KernelChoice())
    assert str(info.value) == ONNX_BF16
    with pytest.raises(ConfigError, match="--backend onnx"):
        onnx_backend._numpy_dtype(torch.bfloat16)


def test_cuda_provider_uses_heuristic_convolution_search(monkeypatch):
    monkeypatch.delenv("TOKENFLOW_ORT_PROVIDERS", raising=False)
    ort = SimpleNamespace(get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_backend._providers(ort, torch.device("cuda", 1)) == [
        ("CUDAExecutionProvider", {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]
    assert onnx_backend._providers(ort, torch.device("cpu")) == ["CPUExecutionProvider"]


def test_cuda_run_synchronises_torchs_stream_before_ort_reads_the_inputs(monkeypatch):
    """IO binding hands ORT torch's memory; ORT runs on its own stream, so the work torch queued
    must be finished first (the order of calls, with stand-ins for the session and the stream)."""
    events = []
    monkeypatch.setattr(onnx_backend, "synchronizer", lambda device: (lambda: None))   # an asynchronous device
    monkeypatch.setattr(torch.accelerator, "current_stream",
                        lambda device: SimpleNamespace(synchronize=lambda: events.append(("synchronize", device))))

    class Binding:
        def bind_input(self, name, *args):
            events.append(("bind", name))

        def bind_output(self, name, *args):
            events.append(("bind", name))

        def get_outputs(self):
            return []

    session = onnx_backend.OnnxSession.__new__(onnx_backend.OnnxSession)
    session.device, session.inputs, session.outputs = torch.device("cuda", 0), ["sample"], ["eps"]
    session.session = SimpleNamespace(io_binding=Binding, run_with_iobinding=lambda binding: events.append("run"))
    session._run_cuda([torch.zeros(2, 4)])
    assert events == [("bind", "sample"), ("bind", "eps"), ("synchronize", torch.device("cuda", 0)), "run"]

    events.clear()
    monkeypatch.setattr(onnx_backend, "synchronizer", lambda device: None)   # a synchronous device: nothing to wait for
    onnx_backend.wait_for_torch(torch.device("cpu"))
    assert events == []


def test_tensorrt_networks_are_strongly_typed_only():
    """TensorRT 11 removed weak typing: the only network flag is STRONGLY_TYPED, whatever its bit."""
    for bit in (0, 1, 5):
        trt = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=bit))
        assert network_flags(trt) == 1 << bit
