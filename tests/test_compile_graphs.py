"""--backend compile: the graphs it builds (a stated bound), CUDA-graph mode on CPU, static store
inputs, and kernels taken from the self-checked choice. CPU, tiny model, float32.

What needs a GPU (CUDA graphs replaying without copying the store, the events of the offloaded
store, Triton inside the graphs) is UNVERIFIED here; tests/gpu owes it.
"""
import warnings

import pytest
import torch

from tokenflow.config import EditConfig
from tokenflow.engine.backends.compiled import CompiledBackend, graph_kernels
from tokenflow.kernels import BackendUnavailable, KernelChoice, dispatch, probe
from tokenflow.kernels.keyframe_attention import keyframe_attention_torch
from tokenflow.method.editor import Editor
from tokenflow.method.keyframes import window_sizes


def wrong_attention(q, k, v, heads, inject_qk=False):
    """A broken kernel: what a miscompiled Triton kernel would be, for the self-check to catch."""
    return keyframe_attention_torch(q, k, v, heads, inject_qk) + 1.0


@pytest.fixture
def broken_triton_attention():
    """The attention registry's 'triton' entry replaced, through the registry's own API, by a
    kernel that runs on CPU (so 'auto' picks it) and is wrong."""
    original = dispatch.backends("keyframe_attention")[0]
    assert original.name == "triton"
    dispatch.register(dispatch.Backend("keyframe_attention", "triton", 30,
                                       "tests.test_compile_graphs:wrong_attention"))
    probe._SELF_CHECKED.clear()
    try:
        yield
    finally:
        dispatch.register(original)
        probe._SELF_CHECKED.clear()


def test_graph_kernels_follow_the_self_check(broken_triton_attention):
    cpu = torch.device("cpu")
    assert graph_kernels(KernelChoice(), cpu, torch.float32, self_check=False).attention == "triton", \
        "without the self-check, auto would trace the broken kernel into the graph"
    with pytest.warns(UserWarning, match="failed its self-check"):
        checked = graph_kernels(KernelChoice(), cpu, torch.float32, self_check=True)
    assert checked == KernelChoice("torch", "static")
    with pytest.raises(BackendUnavailable, match="failed its self-check"):
        graph_kernels(KernelChoice("triton", "auto"), cpu, torch.float32, self_check=True)


def test_reduce_overhead_mode_runs_on_cpu_through_inductor_and_matches_eager(tiny_sd, tokenflow_unet, tmp_path):
    """The CUDA-graph mode goes to inductor itself (no TypeError from a counting callable); on CPU
    inductor skips the CUDA graphs and the graph must equal eager. Counted once, not per call."""
    backend = CompiledBackend(tokenflow_unet, compiler="inductor", mode="reduce-overhead", cache_root=str(tmp_path))
    assert "reduce-overhead" in backend.describe()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, tiny_sd.unet.config.cross_attention_dim,
                                                                generator=g)
    with torch.no_grad():
        eager = tiny_sd.unet(x, torch.tensor(301), encoder_hidden_states=text).sample
        first = backend.plain(x, 301, text)
        second = backend.plain(x + 0, 301, text)
    assert backend.compilations == 1 and backend.stats()["graphs"] == {"plain": 1}
    assert backend.stats()["cuda_graph_pools"] == 0, "no CUDA graphs on CPU"
    assert torch.allclose(first, eager, atol=1e-4, rtol=1e-4) and torch.equal(first, second)


def _config(clip, **kw):
    base = dict(video=clip, frames=8, size=(64, 64), inversion_steps=10, steps=2, keyframe_spacing=2,
                keyframe_window=2, keyframe_store="host", inversion_prompt="a clip", prompt="a new clip",
                chunk_frames=3, inversion_batch_size=4, use_cache=False)
    return EditConfig(**{**base, **kw})


def test_host_store_and_windows_compile_the_stated_graphs_and_match_eager(tiny_model_dir, sample_clip, tmp_path,
                                                                          monkeypatch):
    """8 frames, 4 keyframes in windows of 2 (shifted on the odd step: sizes 1 and 2), an
    offloaded store whose chunks read 2 or 3 keyframes, chunks of 3 (the last padded): plain 1 +
    keyframes len(window_sizes) + propagate 1 graphs, as the compile module states; the store
    tensors are the same marked objects on every propagation call; the edit equals eager."""
    monkeypatch.setenv("TOKENFLOW_COMPILER", "aot_eager")   # dynamo's tracing without code generation
    editor = Editor.from_pretrained(str(tiny_model_dir), device="cpu", use_cache=False)
    eager = editor.edit(sample_clip, config=_config(sample_clip, cache_dir=str(tmp_path)))
    config = _config(sample_clip, backend="compile", cache_dir=str(tmp_path))
    editor.use_backend(config)
    backend = editor.runner.backend
    seen = []
    propagate = backend.propagate

    def recording(*args):
        seen.append(list(args[6]))
        return propagate(*args)

    backend.propagate = recording
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # no recompile-limit or graph-break warnings either
        result = editor.edit(sample_clip, config=config)
    stated = {"plain": 1, "keyframes": len(window_sizes(4, 2)), "propagate": 1}
    assert stated["keyframes"] == 2
    assert backend.stats()["graphs"] == stated
    # dynamo reuses a graph this process compiled earlier for an identical pass (same code, shapes,
    # guards and backend: e.g. another test's tiny UNet), so it may compile fewer, never more
    assert 1 <= backend.compilations <= sum(stated.values())
    assert len(seen) == 2 * 3 and all(len(s) == 2 * len(backend.tokenflow.layers) for s in seen)
    for call in seen[1:]:
        assert all(a is b for a, b in zip(call, seen[0])), "the staged store: the same tensors every chunk"
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in seen[0]), "marked static for CUDA graphs"
    rel = float((result.latents - eager.latents).norm() / eager.latents.norm())
    assert rel < 1e-4
