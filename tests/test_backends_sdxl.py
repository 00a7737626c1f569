"""SDXL through the graph backends (compile, aot, onnx, tensorrt) and the kernels at SDXL's shapes.

SDXL's added conditioning (the pooled text embedding and 6 time ids) travels packed in the text
rows ``[R, 77 + E, D]`` (``models.text``) and is unpacked inside every pass graph, so the passes
keep SD's signature; what changes is the text input's shape, the layer list (70 on tiny-xl and on
SDXL base) and the graphs' keys, which carry the text layout.

Cost: tracing the 70-layer tiny-xl UNet (dynamo, ``torch.export``) takes minutes on 2 CPU cores,
so the checks against eager here run on a *shallow* SDXL UNet: tiny-xl's config with one ResNet and
one transformer block per level (7 self-attention layers), the same levels, ``text_time``
conditioning and layer roles. What tracing sees of SDXL (the unpacking, the added embedding, the
layer roles) does not depend on the depth. By default: compile (dynamo, ``aot_eager``) of the
keyframe pass, which holds the plain pass's UNet call (~25 s of CPU; this file ~40 s in all).
The full tiny-xl runs where no tracing is needed (graph specs, example inputs); SDXL base's real
shapes come from its architecture on the ``meta`` device (TensorRT profiles, kernel dispatch at 1024²).

``TOKENFLOW_SDXL_BACKENDS=1`` adds what costs more than this file's budget: ONNX Runtime on the
shallow UNet's keyframe graph (one export: ~50 s of CPU) and AOTInductor packages of its plain and
keyframe passes (code generation: ~2 minutes). By default only the AOT package key is checked.
"""
import os

import pytest
import torch

from tokenflow.engine.backends.compiled import CompiledBackend
from tokenflow.engine.memory import attention_layer_shapes
from tokenflow.engine.passes import KeyframePass, PlainPass, PropagatePass
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.kernels import support, verify
from tokenflow.kernels.dispatch import TensorSpec, explain
from tokenflow.models.layouts import SDXL_UNET_LAYOUT
from tokenflow.models.text import layout_of
from tokenflow.models.tiny import XL_UNET_CONFIG

from .kernel_helpers import generator
from .test_backends import STATIC, onnx_needed
from .test_kernel_keyframe_attention import _qkv

# SDXL base 1.0's UNet: widths 320/640/1280, heads 5/10/20 per level (head dim 64), both text
# encoders' hidden states (768 + 1280), pooled 1280 + 6 time ids embedded with 256 channels each
SDXL_BASE_UNET = dict(SDXL_UNET_LAYOUT, sample_size=128, block_out_channels=(320, 640, 1280), norm_num_groups=32,
                      attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=1280 + 6 * 256)
SLOW = pytest.mark.skipif(os.environ.get("TOKENFLOW_SDXL_BACKENDS") != "1",
                          reason="minutes of CPU: set TOKENFLOW_SDXL_BACKENDS=1")
XL_TEXT = {"family": "sdxl", "tokens": 77, "extra": 1, "dim": 64, "pooled": 32, "time_ids": 6}


@pytest.fixture(scope="module")
def sdxl_base():
    """SDXL base's UNet with every weight on the meta device: shapes only, nothing allocated."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_BASE_UNET)


@pytest.fixture(scope="module")
def shallow_xl():
    """tiny-xl's UNet with one ResNet and one transformer block per level: 7 attn1 layers."""
    from diffusers import UNet2DConditionModel

    from tokenflow.models.random_weights import build_random

    config = dict(XL_UNET_CONFIG, layers_per_block=1, transformer_layers_per_block=1)
    return build_random(lambda: UNet2DConditionModel(**config), 0, "unet").eval()


@pytest.fixture
def shallow_tf(shallow_xl):
    tf = TokenFlowUNet(shallow_xl)
    yield tf
    tf.remove()


def _inputs(unet, frames, branches=3, seed=0):
    """sample [B*frames, 4, 8, 8], timestep, text [B*frames, 77 + E, D] (64x64 frames)."""
    g = torch.Generator().manual_seed(seed)
    layout = layout_of(unet.config)
    rows = branches * frames
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.tensor(301),
            torch.randn(rows, layout.rows_tokens, layout.dim, generator=g))


# ----------------------------------------------------------------------------- graph keys and shapes


@onnx_needed
def test_graph_specs_and_example_inputs_follow_the_sdxl_text_layout(tiny_xl, tiny_sd):
    """tiny-xl's graphs: text [R, 78, 64] (77 tokens + 1 packed), 70 layers, the layout in every key."""
    from tokenflow.engine.backends.aot import AotBackend
    from tokenflow.engine.backends.onnx import _example, graph_spec, spec_key

    tf = TokenFlowUNet(tiny_xl.unet)
    try:
        specs = {kind: graph_spec(tf, kind, latent_size=(8, 8), n_branches=3, match_on="input",
                                  model_identity="same", kernels=STATIC) for kind in ("plain", "keyframes", "propagate")}
        for kind, spec in specs.items():
            assert spec["text"] == XL_TEXT and len(spec["layers"]) == 70
            args, dynamic = _example(tf, spec, frames=2)
            rows = 2 if kind == "plain" else 6
            assert args[2].shape == (rows, 78, 64) and set(dynamic["text"]) == {0}
            if kind == "propagate":
                assert len(args) == 6 + 2 * 70
        sd_layout = {**XL_TEXT, "family": "sd", "extra": 0, "pooled": 0, "time_ids": 0}
        assert spec_key({**specs["plain"], "text": sd_layout}) != spec_key(specs["plain"])
        aot = AotBackend(tf, model_identity="same")
        assert aot._spec("plain", 0, "input", _inputs(tiny_xl.unet, 1))["text"] == XL_TEXT
        assert "SDXL packages checked on CPU by an opt-in test, not in CI" in aot.describe()   # the run summary says so
    finally:
        tf.remove()
    sd = TokenFlowUNet(tiny_sd.unet)
    try:
        assert "unverified" not in AotBackend(sd, model_identity="same").describe()
        spec = graph_spec(sd, "plain", latent_size=(8, 8), n_branches=1, match_on="input", model_identity="same",
                          kernels=STATIC)
        assert spec["text"] == {"family": "sd", "tokens": 77, "extra": 0, "dim": 32, "pooled": 0, "time_ids": 0}
        assert _example(sd, spec)[0][2].shape == (2, 77, 32)
    finally:
        sd.remove()


@onnx_needed
def test_tensorrt_profiles_at_sdxl_base_1024(sdxl_base):
    """The engines' profiles at 1024² (latents 128²), B = 3, from SDXL base's architecture: text
    [R, 78, 2048]; 10 layers at 4096 tokens x 640 channels, 60 at 1024 x 1280."""
    from tokenflow.engine.backends.onnx import graph_spec
    from tokenflow.engine.backends.tensorrt import profile_for_spec

    tf = TokenFlowUNet(sdxl_base)
    try:
        for kind in ("plain", "keyframes", "propagate"):
            spec = graph_spec(tf, kind, latent_size=(128, 128), n_branches=3, match_on="input", model_identity="xl",
                              kernels=STATIC)
            assert spec["text"] == {"family": "sdxl", "tokens": 77, "extra": 1, "dim": 2048, "pooled": 1280,
                                    "time_ids": 6}
            profile = profile_for_spec(spec, (1, 4, 8), (1, 5, 5))
            b = 1 if kind == "plain" else 3
            per_call = (1, 5, 5) if kind == "keyframes" else (1, 4, 8)
            assert profile["text"] == tuple((b * n, 78, 2048) for n in per_call)
            assert profile["sample"][2] == (b * per_call[2], 4, 128, 128)
            if kind == "propagate":
                layers = [tuple(profile[f"features_{i}"][2][1:]) for i in range(len(spec["layers"]))]
                assert len(layers) == 70 and layers.count((4096, 640)) == 10 and layers.count((1024, 1280)) == 60
                assert profile["outputs_0"] == ((3, 4096, 640), (15, 4096, 640), (15, 4096, 640))
    finally:
        tf.remove()


# ----------------------------------------------------------------------------- against eager


def test_compiled_keyframe_pass_on_an_sdxl_unet_equals_eager(shallow_tf, tmp_path):
    """dynamo traces the keyframe pass with the added conditioning unpacked inside the graph
    (``aot_eager``: the graph, no code generation) and returns eager's eps, features and outputs."""
    unet = shallow_tf.unet
    sample, t, text = _inputs(unet, 2)
    with torch.no_grad():
        eager = KeyframePass(shallow_tf, 3, "input", STATIC)(sample, t, text, torch.tensor(True), torch.tensor(True))
        backend = CompiledBackend(shallow_tf, compiler="aot_eager", cache_root=str(tmp_path))
        eps, features, outputs = backend.keyframes(sample, 301, text, True, True, 3, "input")
    assert backend.stats()["graphs"] == {"keyframes": 1} and backend.compilations <= 1
    assert len(features) == len(outputs) == len(shallow_tf.layers) == 7
    for got, want in zip((eps, *features, *outputs), eager):
        assert torch.allclose(got, want, atol=1e-6)
    # the packed conditioning reaches the UNet: other time ids, another eps
    other = text.clone()
    other[:, -1, 32:38] += 64.0
    with torch.no_grad():
        assert not torch.allclose(backend.keyframes(sample, 301, other, True, True, 3, "input")[0], eps, atol=1e-3)


def test_compiled_propagation_pass_on_an_sdxl_unet_equals_eager(shallow_tf, tmp_path):
    """The propagation graph (the source branch's features matched, the keyframes' outputs gathered
    into every layer) with SDXL's conditioning, against eager, on a store the keyframe pass made."""
    unet = shallow_tf.unet
    keyframes = KeyframePass(shallow_tf, 3, "input", STATIC)
    propagate = PropagatePass(shallow_tf, 3, "input", STATIC)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        store = list(keyframes(*_inputs(unet, 2, seed=1), torch.tensor(True), torch.tensor(False))[1:])
        sample, t, text = _inputs(unet, 3, seed=2)
        pairs, weights = torch.randint(0, 2, (3, 2), generator=g), torch.rand(3, 2, generator=g)
        eager = propagate(sample, t, text, torch.tensor(True), pairs, weights, *store)
        backend = CompiledBackend(shallow_tf, compiler="aot_eager", cache_root=str(tmp_path))
        got = backend.propagate(sample, 301, text, True, pairs, weights, store, 3, "input")
        other = text.clone()
        other[:, -1, 32:38] += 64.0   # other time ids: another eps
        moved = backend.propagate(sample, 301, other, True, pairs, weights, store, 3, "input")
    assert backend.stats()["graphs"] == {"propagate": 1}
    assert torch.allclose(got, eager, atol=1e-6), (got - eager).abs().max()
    assert not torch.allclose(moved, got, atol=1e-3)


@SLOW
def test_aot_packages_of_an_sdxl_unet_equal_eager(shallow_tf, tmp_path):
    """AOTInductor packages (torch.export + code generation) of the plain and keyframe passes with
    SDXL's conditioning against eager; a second backend loads them instead of compiling."""
    from tokenflow.engine.backends.aot import AotBackend

    unet = shallow_tf.unet
    sample, t, text = _inputs(unet, 2, seed=3)
    plain_rows = sample[:2], t, text[:2]
    with torch.no_grad():
        want_plain = PlainPass(shallow_tf)(*plain_rows)
        want_kf = KeyframePass(shallow_tf, 3, "input", STATIC)(sample, t, text, torch.tensor(True), torch.tensor(True))
        aot = AotBackend(shallow_tf, model_identity="shallow-xl", cache_root=str(tmp_path))
        got_plain = aot.plain(sample[:2], 301, text[:2])
        got_kf = aot.keyframes(sample, 301, text, True, True, 3, "input")
        again = AotBackend(shallow_tf, model_identity="shallow-xl", cache_root=str(tmp_path))
        reloaded = again.plain(sample[:2], 301, text[:2])
    assert aot.built == 2 and again.built == 0 and again.reused == 1
    assert torch.allclose(got_plain, want_plain, atol=1e-4) and torch.equal(reloaded, got_plain)
    got_kf = (got_kf[0], *got_kf[1], *got_kf[2])
    assert len(got_kf) == len(want_kf) == 1 + 2 * 7
    err = max(float((a - b).abs().max()) for a, b in zip(got_kf, want_kf))
    assert err < 1e-4, f"keyframe package: max abs error {err}"


@SLOW
@onnx_needed
def test_onnx_keyframe_graph_of_an_sdxl_unet_equals_eager(shallow_tf, tmp_path):
    """The keyframe graph (the plain graph's UNet call plus the features it returns) in ONNX
    Runtime, 1 and 2 keyframes on one dynamic batch axis."""
    from tokenflow.engine.backends.onnx import OnnxSession, export_pass, graph_spec

    module = KeyframePass(shallow_tf, 3, "input", STATIC)
    spec = graph_spec(shallow_tf, "keyframes", latent_size=(8, 8), n_branches=3, match_on="input",
                      model_identity="xl", kernels=STATIC)
    path, reused = export_pass(shallow_tf, spec, STATIC, tmp_path)
    assert not reused and spec["text"]["extra"] == 1
    session = OnnxSession(path, torch.device("cpu"), 1)
    for frames in (1, 2):
        args = _inputs(shallow_tf.unet, frames, seed=frames) + (torch.tensor(True), torch.tensor(False))
        with torch.no_grad():
            want = module(*args)
        got = session(*args)
        assert len(got) == len(want) == 1 + 2 * 7
        err = max(float((a - b).abs().max()) for a, b in zip(got, want))
        assert err < 1e-4, f"{frames} keyframes: max abs error {err}"


# ----------------------------------------------------------------------------- kernels at SDXL's shapes


def _spec(device, dtype, *shape):
    stride, step = [], 1
    for size in reversed(shape):
        stride.insert(0, step)
        step *= size
    return TensorSpec(torch.device(device), dtype, tuple(shape), tuple(stride))


def _chosen(op, *specs):
    verdicts = {v.name: v for v in explain(op, *specs)}
    return next(name for name, v in verdicts.items() if v.chosen), verdicts


def test_kernel_dispatch_at_sdxl_base_1024(sdxl_base, monkeypatch):
    """Every attn1 of SDXL base has head dim 64; at 1024² (4096 and 1024 tokens, 10 and 20 heads),
    5 keyframes, 3 branches: CUDA fp16 runs the three Triton kernels, CUDA fp32 torch attention and
    Triton search and gather; the CPU the torch attention and gather, and FAISS for the searches
    (above its 2^24-similarity threshold) when installed. Specs only: no GPU needed."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(support, "_kernels_interpreted", lambda: None)   # however this process built them
    shapes = attention_layer_shapes(sdxl_base, 128, 128)
    heads = {name: sdxl_base.get_submodule(name).heads for name in shapes}
    levels = sorted({(s, c, heads[name]) for name, (s, c) in shapes.items()})
    assert levels == [(1024, 1280, 20), (4096, 640, 10)]
    faiss = support.faiss_missing() is None
    for seq, channels, n_heads in levels:
        assert channels // n_heads == 64
        for device, dtype in (("cuda", torch.float16), ("cuda", torch.float32), ("cpu", torch.float32)):
            q = _spec(device, dtype, 3, 5, seq, channels)
            name, verdicts = _chosen("keyframe_attention", q, q, q, n_heads)
            assert name == ("triton" if (device, dtype) == ("cuda", torch.float16) else "torch"), (device, dtype)
            assert verdicts["triton"].runs == (device == "cuda")
            if dtype == torch.float32 and device == "cuda":
                assert "tensor cores" in verdicts["triton"].auto_reason
            x, keys = _spec(device, dtype, 8, seq, channels), _spec(device, dtype, 5, seq, channels)
            pairs, weights = _spec(device, torch.int64, 8, 2), _spec(device, torch.float32, 8, 2)
            nearest, _ = _chosen("cosine_nearest", x, keys, pairs)
            gather, _ = _chosen("gather", _spec(device, dtype, 3, 5, seq, channels), _spec(device, torch.int64, 8, 2, seq),
                                pairs, weights)
            if device == "cuda":
                assert (nearest, gather) == ("triton", "triton")
            else:
                assert (nearest, gather) == ("faiss" if faiss else "torch", "torch")


@pytest.mark.parametrize("dtype,inject", [(torch.float32, False), (torch.float16, True)], ids=str)
def test_triton_attention_at_head_dim_64(triton_device, dtype, inject):
    """SDXL's (and SD 2.x's) head dim, 64 = BLOCK_D: no masked lanes, unlike the other kernel tests'
    dims; 2 heads, 37 tokens (no tile multiple), 3 keyframes, two prompts (5 branches)."""
    q, k, v = _qkv(generator("xl", dtype, inject), 3, 37, 2, 64, dtype=dtype, device=triton_device, branches=5)
    result = verify.check_attention("triton", q, k, v, 2, inject)
    assert result.ok, result.describe()
