"""UNet backends against eager: graph-mode passes, torch.compile, ONNX Runtime, `tokenflow export`.

Everything runs on CPU with the tiny model in float32. Eager (diffusers + processors) is the
reference; graph backends must match it within float32 tolerance (their kernels are the static
torch backends, whose results equal the eager references up to summation order).
"""
import json
import os
from pathlib import Path

import pytest
import torch

from tokenflow.config import EditConfig
from tokenflow.engine import KeyframeStore, UNetRunner
from tokenflow.engine.backends.compiled import graph_kernels
from tokenflow.engine.passes import KeyframePass, PlainPass, PropagatePass, store_tensors
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.engine.state import PassKind, StepState
from tokenflow.errors import ConfigError
from tokenflow.kernels import KernelChoice
from tokenflow.method.editor import Editor

STATIC = KernelChoice("torch", "static")


def _texts(sd, n, g):
    return torch.randn(n, 77, sd.unet.config.cross_attention_dim, generator=g)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("inject", [(True, True), (False, True), (False, False)])
def test_graph_passes_equal_the_eager_processors(tiny_sd, tokenflow_unet, inject):
    """Same UNet, same kernels: the tensor-switch graph passes reproduce the eager passes."""
    g = torch.Generator().manual_seed(1)
    runner = UNetRunner(tiny_sd.unet, tokenflow_unet)
    n_kf, m, texts = 3, 4, _texts(tiny_sd, 3, g)
    src, x = torch.randn(n_kf, 4, 8, 8, generator=g), torch.randn(n_kf, 4, 8, 8, generator=g)
    store = KeyframeStore.for_unet(tiny_sd.unet, (8, 8), n_kf)
    qk, conv = inject
    eps = runner.three_branch(src, x, 501, texts, StepState(PassKind.KEYFRAMES, 501, n_kf, store, inject_qk=qk,
                                                            inject_conv=conv, kernels=STATIC))
    kp = KeyframePass(tokenflow_unet, 3, "input", STATIC)
    out = kp(torch.cat([src, x, x]), torch.tensor(501), texts.repeat_interleave(n_kf, 0), torch.tensor(qk),
             torch.tensor(conv))
    assert torch.allclose(out[0].view(3, n_kf, 4, 8, 8), eps, atol=1e-6)
    for i, name in enumerate(kp.layer_names):
        assert torch.equal(out[1 + i], store.features[name])
        assert torch.allclose(out[17 + i], store.outputs[name].flatten(0, 1), atol=1e-6)

    src2, x2 = torch.randn(m, 4, 8, 8, generator=g), torch.randn(m, 4, 8, 8, generator=g)
    pairs = torch.tensor([[0, 1], [1, -1], [2, 1], [0, 2]])
    weights = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.5, 0.5], [0.9, 0.1]])
    eps2 = runner.three_branch(src2, x2, 501, texts, StepState(PassKind.PROPAGATE, 501, m, store, pairs=pairs,
                                                               weights=weights, inject_conv=conv))
    pp = PropagatePass(tokenflow_unet, 3, "input", STATIC)
    out2 = pp(torch.cat([src2, x2, x2]), torch.tensor(501), texts.repeat_interleave(m, 0), torch.tensor(conv),
              pairs, weights, *store_tensors(store, pp.layer_names))
    assert torch.allclose(out2.view(3, m, 4, 8, 8), eps2, atol=1e-6)
    assert not torch.allclose(out2.view(3, m, 4, 8, 8), runner.three_branch(
        src2, x2, 501, texts, StepState(PassKind.KEYFRAMES, 501, m, KeyframeStore.for_unet(tiny_sd.unet, (8, 8), m))),
        atol=1e-3), "propagation must differ from running the frames as keyframes"


def test_graph_kernels_refuse_untraceable_backends():
    cpu = torch.device("cpu")
    assert graph_kernels(KernelChoice(), cpu, torch.float32) == KernelChoice("torch", "static")
    assert graph_kernels(KernelChoice("torch", "torch"), cpu, torch.float32).nearest == "static"
    with pytest.raises(ConfigError, match="faiss"):
        graph_kernels(KernelChoice("auto", "faiss"), cpu, torch.float32)


def _config(clip, **kw):
    base = dict(video=clip, frames=10, size=(64, 64), inversion_steps=10, steps=5, keyframe_spacing=4,
                inversion_prompt="a clip", prompt="a new clip", chunk_frames=4, inversion_batch_size=4)
    return EditConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def eager_edit(tiny_model_dir, sample_clip, tmp_path_factory):
    editor = Editor.from_pretrained(str(tiny_model_dir), device="cpu", use_cache=False)
    return editor.edit(sample_clip, config=_config(sample_clip, cache_dir=str(tmp_path_factory.mktemp("c"))))


def test_compile_traces_each_pass_once_across_steps_chunks_and_runs(tiny_model_dir, sample_clip, eager_edit,
                                                                     tmp_path, monkeypatch):
    """10 frames in chunks of 4 (the last padded), 5 steps, with and without injection, two runs:
    one compilation per pass (plain, keyframes, propagate), never per step."""
    monkeypatch.setenv("TOKENFLOW_COMPILER", "aot_eager")   # dynamo's tracing without code generation
    editor = Editor.from_pretrained(str(tiny_model_dir), device="cpu", use_cache=False)
    config = _config(sample_clip, backend="compile", cache_dir=str(tmp_path))
    first = editor.edit(sample_clip, config=config)
    backend = editor.runner.backend
    assert backend.compilations == 3
    second = editor.edit(sample_clip, config=config)
    assert backend.compilations == 3
    assert torch.equal(first.latents, second.latents)
    assert _rel(first.latents, eager_edit.latents) < 1e-4


def test_compile_with_inductor_matches_eager(tiny_model_dir, sample_clip, eager_edit, tmp_path, monkeypatch):
    """The real thing on CPU: inductor-generated kernels for the three passes (a few minutes)."""
    monkeypatch.delenv("TOKENFLOW_COMPILER", raising=False)
    editor = Editor.from_pretrained(str(tiny_model_dir), device="cpu", use_cache=False)
    result = editor.edit(sample_clip, config=_config(sample_clip, backend="compile", cache_dir=str(tmp_path)))
    assert editor.runner.backend.compilations == 3
    # inductor's kernels were cached on disk (under this test's cache unless an earlier test set the folder)
    assert os.path.isdir(editor.runner.backend.cache_dir) and os.listdir(editor.runner.backend.cache_dir)
    rel = _rel(result.latents, eager_edit.latents)
    print(f"compile (inductor) vs eager: relative L2 of the final latents {rel:.2e}")
    assert rel < 1e-4


def test_aot_packages_match_eager_and_later_editors_load_them_without_compiling(tiny_model_dir, sample_clip,
                                                                              eager_edit, tmp_path):
    """AOTInductor: three packages built once (static shapes, padded calls), reused by a new Editor.

    One UNet call differs from eager by float32 rounding (the inversion, plain passes only, within
    1e-5); the 5-step edit with guidance 7.5 amplifies that, hence 1e-3 on the final latents."""
    config = _config(sample_clip, backend="aot", cache_dir=str(tmp_path))
    eager = Editor.from_pretrained(str(tiny_model_dir), device="cpu", use_cache=False)
    editor = Editor.from_pretrained(str(tiny_model_dir), device="cpu", use_cache=False)
    inv_eager = eager.invert(sample_clip, config=config.replace(backend="eager"))
    inv_aot = editor.invert(sample_clip, config=config)
    top = max(inv_eager.latents)
    assert _rel(inv_aot.latents[top], inv_eager.latents[top]) < 1e-5
    result = editor.edit(sample_clip, config=config)
    stats = editor.runner.backend.stats()
    assert stats["packages_built"] == 3 and stats["packages_reused"] == 0, stats
    rel = _rel(result.latents, eager_edit.latents)
    print(f"aot vs eager: relative L2 of the final latents {rel:.2e}")
    assert rel < 1e-3
    again = Editor.from_pretrained(str(tiny_model_dir), device="cpu", use_cache=False)
    second = again.edit(sample_clip, config=config)
    stats = again.runner.backend.stats()
    assert stats["packages_built"] == 0 and stats["packages_reused"] == 3, stats
    assert torch.equal(second.latents, result.latents)


# --- ONNX -------------------------------------------------------------------------------------

onnx_needed = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the onnx extra (pip install 'tokenflow[onnx]')")


@pytest.fixture(scope="module")
def onnx_cache(tiny_model_dir, tmp_path_factory):
    """Graphs of the tiny model at 64x64 (latents 8x8), B = 3, exported once for this module."""
    from tokenflow.engine.backends.onnx import export_all
    from tokenflow.models.load import load_model

    root = tmp_path_factory.mktemp("onnx-cache")
    sd = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    tf = TokenFlowUNet(sd.unet)
    try:
        records = export_all(tf, latent_size=(8, 8), n_branches=3, match_on="input", model_identity=sd.identity,
                             folder=root / "onnx")
    finally:
        tf.remove()
    return root, records


@onnx_needed
def test_each_onnx_graph_matches_its_pass(tiny_sd, tokenflow_unet, onnx_cache, record_property):
    from tokenflow.engine.backends.onnx import OnnxSession

    root, records = onnx_cache
    sessions = {r["pass"]: OnnxSession(r["path"], torch.device("cpu"), 1) for r in records}
    g = torch.Generator().manual_seed(3)
    texts = _texts(tiny_sd, 3, g)
    plain = PlainPass(tokenflow_unet)
    kp = KeyframePass(tokenflow_unet, 3, "input", STATIC)
    pp = PropagatePass(tokenflow_unet, 3, "input", STATIC)
    errors = {}
    for frames in (1, 3):   # the batch axis is dynamic: one graph, several sizes
        rows = 3 * frames
        sample, text, t = torch.randn(rows, 4, 8, 8, generator=g), texts.repeat_interleave(frames, 0), torch.tensor(301)
        args = (sample, t, text)
        with torch.no_grad():
            pairs = {"plain": (plain(*args),), "keyframes": kp(*args, torch.tensor(True), torch.tensor(False))}
        kf = pairs["keyframes"]
        store = list(kf[1:])
        prop_args = args + (torch.tensor(True), torch.randint(0, frames, (frames, 2), generator=g),
                            torch.rand(frames, 2, generator=g), *store)
        with torch.no_grad():
            pairs["propagate"] = (pp(*prop_args),)
        feeds = {"plain": args, "keyframes": args + (torch.tensor(True), torch.tensor(False)), "propagate": prop_args}
        for kind, expected in pairs.items():
            got = sessions[kind](*feeds[kind])
            assert len(got) == len(expected)
            err = max(float((a - b).abs().max()) for a, b in zip(got, expected))
            errors[f"{kind}/{frames}"] = err
            assert err < 1e-4, f"{kind} graph, {frames} frames: max abs error {err}"
    print("ONNX Runtime vs eager, max abs error per graph/frames:", json.dumps(errors))
    record_property("onnx_max_abs_errors", errors)


@onnx_needed
def test_onnx_edit_matches_eager_and_reuses_the_exported_graphs(tiny_model_dir, sample_clip, eager_edit, onnx_cache):
    root, _ = onnx_cache
    editor = Editor.from_pretrained(str(tiny_model_dir), device="cpu", use_cache=False)
    result = editor.edit(sample_clip, config=_config(sample_clip, backend="onnx", cache_dir=str(root)))
    stats = editor.runner.backend.stats()
    assert stats["graphs_reused"] == 3 and stats["graphs_exported"] == 0, stats
    rel = _rel(result.latents, eager_edit.latents)
    print(f"onnx vs eager: relative L2 of the final latents {rel:.2e}")
    assert rel < 1e-4


@onnx_needed
def test_onnx_sessions_reuse_the_optimised_graph_bit_for_bit_and_ignore_a_damaged_one(onnx_cache):
    from tokenflow.engine.backends.onnx import OnnxSession

    _, records = onnx_cache
    path = Path(next(r for r in records if r["pass"] == "plain")["path"])
    for old in path.parent.glob("*.ort*"):
        old.unlink()
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(5, 4, 8, 8, generator=g), torch.tensor(401), torch.randn(5, 77, 32, generator=g))
    first = OnnxSession(path, torch.device("cpu"), 1)
    assert first.source == path
    optimised = list(path.parent.glob("*.ort"))
    assert len(optimised) == 1 and (path.parent / (optimised[0].name + ".sha256")).is_file()
    assert not list(path.parent.glob(".*tmp*"))
    expected = first(*args)[0]
    second = OnnxSession(path, torch.device("cpu"), 1)
    assert second.source == optimised[0]
    assert torch.equal(second(*args)[0], expected)
    with open(optimised[0], "ab") as f:    # no longer matches its sha256: optimise the ONNX graph again
        f.write(b"\0")
    third = OnnxSession(path, torch.device("cpu"), 1)
    assert third.source == path and torch.equal(third(*args)[0], expected)
    assert OnnxSession(path, torch.device("cpu"), 1).source == optimised[0]


@onnx_needed
def test_export_cli_reuses_matching_graphs_and_redoes_a_damaged_one(tiny_model_dir, onnx_cache, capsys):
    from tokenflow.app.cli import main

    root, records = onnx_cache
    argv = ["export", "--model", str(tiny_model_dir), "--size", "64x64", "--device", "cpu", "--out",
            str(root / "onnx"), "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [g["reused"] for g in doc["graphs"]] == [True, True, True]
    plain = next(r for r in records if r["pass"] == "plain")
    with open(plain["path"], "ab") as f:     # a graph that no longer matches its manifest's sha256
        f.write(b"\0")
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [g["reused"] for g in doc["graphs"]] == [False, True, True]
    manifest = json.loads((root / "onnx" / f"plain-{plain['key']}" / "manifest.json").read_text())
    assert manifest["opset"] >= 17 and manifest["model"] and manifest["inputs"] == ["sample", "timestep", "text"]


def test_backend_errors_name_what_to_install(tiny_sd, tokenflow_unet):
    from tokenflow.engine.backends import make_backend, not_supported_reasons

    assert not_supported_reasons("compile", torch.device("cpu"), torch.float32) == []
    assert not_supported_reasons("aot", torch.device("cpu"), torch.float32) == []
    with pytest.raises(ConfigError, match="CUDA"):
        make_backend("tensorrt", tokenflow_unet, KernelChoice())
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend("tpu", tokenflow_unet, KernelChoice())
