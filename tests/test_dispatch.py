"""Backend dispatch: what is picked, what is refused, and that every refusal says why."""
import pytest
import torch

from tokenflow.config import EditConfig
from tokenflow.errors import ConfigError
from tokenflow.kernels import BackendUnavailable, KernelChoice, check_backends, explain
from tokenflow.kernels.keyframe_attention import keyframe_attention
from tokenflow.kernels.nearest import cosine_nearest
from tokenflow.kernels.probe import sample_args, verdicts

CPU = torch.device("cpu")


def _chosen(op, device=CPU, dtype=torch.float32, backend=None):
    return [v.name for v in verdicts(op, device, dtype, backend) if v.chosen]


@pytest.mark.parametrize("op", ["keyframe_attention", "cosine_nearest", "gather"])
def test_auto_on_cpu_is_the_torch_reference(op):
    assert _chosen(op) == ["torch"]


def test_interpreted_triton_only_by_name(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    v = {x.name: x for x in verdicts("keyframe_attention", CPU, torch.float32)}
    assert v["triton"].runs and "interpreter" in v["triton"].auto_reason and not v["triton"].chosen
    assert _chosen("keyframe_attention", backend="triton") == ["triton"]


def test_triton_on_cpu_without_interpreter_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args, _ = sample_args("keyframe_attention", CPU, torch.float32)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        keyframe_attention(*args, backend="triton")


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


def test_faiss_matches_reference_on_cpu():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(3)
    x, keys = torch.randn(5, 30, 12, generator=g), torch.randn(3, 41, 12, generator=g)
    pairs = torch.tensor([[0, 1], [1, -1], [2, 2], [0, 0], [-1, -1]])
    assert torch.equal(cosine_nearest(x, keys, pairs, backend="faiss"),
                       cosine_nearest(x, keys, pairs, backend="torch"))


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
        with pytest.raises(BackendUnavailable, match="'broken' failed its self-check"):
            check_backends(CPU, torch.float32, attention="broken", self_check=True)
    finally:
        dispatch.unregister("keyframe_attention", "broken")


def test_self_check_passes_the_interpreted_triton_kernels():
    pytest.importorskip("triton")
    from tokenflow.kernels.probe import _self_check

    for op in ("keyframe_attention", "cosine_nearest", "gather"):
        assert _self_check(op, "triton", CPU, torch.float16) is None
