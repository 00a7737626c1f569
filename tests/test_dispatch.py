"""Backend dispatch: what is picked, what is refused, and that every refusal says why.

The backends themselves are checked against the reference in ``test_kernel_<op>.py``.
"""
import warnings

import pytest
import torch

from tokenflow.config import EditConfig
from tokenflow.errors import ConfigError
from tokenflow.kernels import BackendUnavailable, KernelChoice, check_backends, explain, probe, support
from tokenflow.kernels.dispatch import TensorSpec
from tokenflow.kernels.keyframe_attention import keyframe_attention
from tokenflow.kernels.nearest import cosine_nearest
from tokenflow.kernels.probe import sample_args, verdicts

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_self_check_cache(monkeypatch):
    """check_backends caches its answers per process: every test here starts from an empty cache
    and leaves the process's cache as it found it (no test sees another's, in any order)."""
    monkeypatch.setattr(probe, "_SELF_CHECKED", {})


def _chosen(op, device=CPU, dtype=torch.float32, backend=None):
    return [v.name for v in verdicts(op, device, dtype, backend) if v.chosen]


@pytest.mark.parametrize("op", ["keyframe_attention", "cosine_nearest", "gather"])
def test_auto_on_cpu_is_the_torch_reference(op):
    assert _chosen(op) == ["torch"]


def test_interpreted_triton_only_by_name(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(support, "_kernels_interpreted", lambda: True)   # however this process built them
    v = {x.name: x for x in verdicts("keyframe_attention", CPU, torch.float32)}
    assert v["triton"].runs and "interpreter" in v["triton"].auto_reason and not v["triton"].chosen
    assert _chosen("keyframe_attention", backend="triton") == ["triton"]


def test_triton_on_cpu_without_interpreter_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args, _ = sample_args("keyframe_attention", CPU, torch.float32)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        keyframe_attention(*args, backend="triton")


def test_kernels_built_the_other_way_are_refused_with_the_fix(monkeypatch):
    """Triton fixes compile-or-interpret when the kernel modules are imported: a process whose
    kernels were built one way cannot run them the other way, and says so (specs only: no GPU needed)."""
    pytest.importorskip("triton")
    cpu, cuda = (TensorSpec(torch.device(d), torch.float32, (3, 1, 4, 8), (32, 32, 8, 1)) for d in ("cpu", "cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(support, "_kernels_interpreted", lambda: False)
    assert support.triton_device((cpu,)) == ["TRITON_INTERPRET=1 was set after the kernels were imported; "
                                             "set it before starting Python"]
    monkeypatch.setattr(support, "_kernels_interpreted", lambda: True)
    assert support.triton_device((cpu,)) == []
    assert "imported under TRITON_INTERPRET=1" in support.triton_device((cuda,))[0]
    monkeypatch.setattr(support, "_kernels_interpreted", lambda: None)   # not imported yet: either way is open
    assert support.triton_device((cpu,)) == [] and support.triton_device((cuda,)) == []


def test_unknown_backend_lists_the_choices():
    args, _ = sample_args("cosine_nearest", CPU, torch.float32)
    with pytest.raises(BackendUnavailable, match="auto, triton, faiss, torch"):
        cosine_nearest(*args, backend="cuvs")


def test_every_backend_explains_integer_inputs():
    q = torch.zeros(3, 1, 4, 8, dtype=torch.int32)
    verdict = explain("keyframe_attention", q, q, q, 2)
    assert all(v.reasons for v in verdict) and not any(v.chosen for v in verdict)
    assert all("dtype int32" in " ".join(v.reasons) or "not installed" in " ".join(v.reasons) for v in verdict)
    with pytest.raises(BackendUnavailable, match="no backend can run"):
        keyframe_attention(q, q, q, 2)


def test_missing_package_names_the_install_command():
    from tokenflow.kernels import support

    reason = support._missing("tokenflow_no_such_package", "pip install something")
    assert reason == "tokenflow_no_such_package is not installed (pip install something)"


def test_meta_device_is_not_a_triton_device():
    q = torch.zeros(3, 1, 4, 8, device="meta")
    v = {x.name: x for x in explain("keyframe_attention", q, q, q, 2)}
    assert v["triton"].reasons == ["meta tensors are not supported (CUDA only)"]


def test_mixed_devices_are_refused():
    x = torch.zeros(2, 3, 4)
    keys = torch.zeros(1, 3, 4, device="meta")
    v = explain("cosine_nearest", x, keys, torch.zeros(2, 1, dtype=torch.long))
    assert all(v_.reasons for v_ in v)


@pytest.mark.parametrize("op", ["cosine_nearest", "gather"])
def test_static_backends_are_only_used_by_name(op):
    """For traced graphs (--backend compile/onnx): never the eager pick, but runnable when asked for."""
    v = {x.name: x for x in verdicts(op, CPU, torch.float32)}
    assert v["static"].runs and "traced graphs" in v["static"].auto_reason and not v["static"].chosen
    assert _chosen(op, backend="static") == ["static"]


def test_gather_follows_the_nearest_backend_where_it_exists():
    assert KernelChoice(nearest="triton").gather == "triton"
    assert KernelChoice(nearest="torch").gather == "torch"
    assert KernelChoice(nearest="faiss").gather == "auto"


def test_config_rejects_unknown_backend_names():
    with pytest.raises(ConfigError, match="attention_backend: unknown backend 'flash'"):
        EditConfig(prompt="x", attention_backend="flash").validate()
    with pytest.raises(ConfigError, match="nearest_backend"):
        EditConfig(prompt="x", nearest_backend="annoy").validate()


def test_check_backends_fails_early_for_a_backend_that_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_backends(CPU, torch.float32)  # auto always finds the reference
    with pytest.raises(BackendUnavailable, match="keyframe_attention: backend 'triton' cannot run"):
        check_backends(CPU, torch.float32, attention="triton")
    with pytest.raises(BackendUnavailable, match="keyframe_attention: backend 'xformers'"):
        check_backends(CPU, torch.float32, attention="xformers")


def _broken_attention(q, k, v, heads, inject_qk=False):
    return torch.zeros_like(q)


def test_self_check_replaces_a_failing_auto_backend_and_rejects_a_named_one():
    """A backend that computes the wrong thing: auto falls back to torch loudly; by name it is an error."""
    from tokenflow.kernels import dispatch

    dispatch.register(dispatch.Backend("keyframe_attention", "broken", 99, "tests.test_dispatch:_broken_attention"))
    try:
        with pytest.warns(UserWarning, match="'broken' failed its self-check"):
            choice = check_backends(CPU, torch.float32, self_check=True)
        assert choice.attention == "torch" and choice.nearest == "auto"
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # the answer is cached: no second check, no second warning
            assert check_backends(CPU, torch.float32, self_check=True) is choice
        with pytest.raises(BackendUnavailable, match="'broken' failed its self-check"):
            check_backends(CPU, torch.float32, attention="broken", self_check=True)
    finally:
        dispatch.unregister("keyframe_attention", "broken")


def test_self_check_passes_the_triton_kernels(triton_device):
    from tokenflow.kernels.probe import _self_check

    for op in ("keyframe_attention", "cosine_nearest", "gather"):
        assert _self_check(op, "triton", triton_device, torch.float16) is None


def test_benchmark_only_backends_are_never_offered_as_choices():
    """The "original" backends register when a benchmark runs; even then no choice list shows them
    (CLI help, config errors, job-file schema, doctor), so the schema does not depend on which
    tests ran before. By name they still run (the benchmark asks for them)."""
    from tokenflow.benchmark import original_kernels  # noqa: F401  registers them
    from tokenflow.kernels.dispatch import backend_names, check_names

    for op in ("keyframe_attention", "cosine_nearest", "gather"):
        assert "original" not in backend_names(op)
        assert "original" in backend_names(op, include_benchmark=True)
        check_names(op, "original", "backend")          # accepted once registered
        args, _ = sample_args(op, torch.device("cpu"), torch.float32)
        assert "original" not in [v.name for v in explain(op, *args)]
        assert [v.name for v in explain(op, *args, backend="original") if v.chosen] == ["original"]
    assert KernelChoice(nearest="original").gather == "original"
