"""TokenFlow on the tiny SDXL (SDXL's real block layout, 70 attn1 layers, two text encoders), against
independent computations: the layer roles, the keyframe and propagation passes recomputed by hand
in every layer at both token levels, the PnP injection sites, the conditioning against diffusers'
own SDXL pipeline, and whole edits that must not change with chunk size or kernel backend."""
import pytest
import torch

from tokenflow.config import EditConfig
from tokenflow.engine import KeyframeStore, UNetRunner
from tokenflow.engine.processors import PNP_FEATURE_RESNET, TokenFlowUNet, self_attention_layers
from tokenflow.engine.state import PassKind, StepState
from tokenflow.io.cache import InversionCache
from tokenflow.kernels import KernelChoice
from tokenflow.method.editor import Editor
from tokenflow.models import text as tx
from tokenflow.models.unet_layout import pnp_feature_resnet

from .unet_checks import capture_attn_inputs, extended_attention_by_hand, gathered_by_hand, nearest_by_hand

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny-model calls: see tests/conftest.py
SIZE = (64, 64)   # frames (W, H) -> latents 8x8: attention at 4x4 (16 tokens) and 2x2 (4 tokens)
LATENT = (8, 8)


@pytest.fixture
def tokenflow_xl(tiny_xl):
    tf = TokenFlowUNet(tiny_xl.unet)
    yield tf
    tf.remove()


@pytest.fixture(scope="module")
def texts(tiny_xl):
    """Packed rows [3, 78, 64] of [source prompt, negative, prompt] at 128x128."""
    return torch.cat([tx.encode_prompt(tiny_xl, "a wolf", SIZE), tx.encode_prompt(tiny_xl, "", SIZE, negative=True),
                      tx.encode_prompt(tiny_xl, "a robot wolf", SIZE)])


def _latents(m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 4, *LATENT, generator=g), torch.randn(m, 4, *LATENT, generator=g)


def _resnet_names(unet):
    return [n for n, mod in unet.named_modules() if type(mod).__name__ == "ResnetBlock2D"]


# ----------------------------------------------------------------------------- layer roles


def test_sdxl_layer_roles_follow_the_documented_rule(tiny_xl):
    layers = self_attention_layers(tiny_xl.unet)
    assert len(layers) == 70
    decoder = [layer.name for layer in layers if layer.name.startswith("up_blocks.")]
    assert len(decoder) == 36 and all(n.startswith(("up_blocks.0.", "up_blocks.1.")) for n in decoder)
    assert [layer.name for layer in layers if layer.pnp_qk] == decoder[1:]
    assert decoder[0] == "up_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert pnp_feature_resnet(tiny_xl.unet) == "up_blocks.0.resnets.1"


def test_sd_mapping_is_unchanged(tiny_sd):
    layers = self_attention_layers(tiny_sd.unet)
    decoder = [layer for layer in layers if layer.name.startswith("up_blocks.")]
    assert len(layers) == 16 and len(decoder) == 9 and sum(layer.pnp_qk for layer in layers) == 8
    assert not decoder[0].pnp_qk and decoder[0].name == "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert pnp_feature_resnet(tiny_sd.unet) == PNP_FEATURE_RESNET == "up_blocks.1.resnets.1"


# ----------------------------------------------------------------------------- the passes by hand


def _hook_resnets(unet, outputs):
    return [unet.get_submodule(name).conv2.register_forward_hook(
        lambda m, a, out, name=name: outputs.setdefault(name, out.clone())) for name in _resnet_names(unet)]


def _resnets_handing_on_the_source(outputs, frames):
    """ResNets whose conv2 output is the source branch's in every other branch."""
    return {name for name, out in outputs.items()
            if all(torch.equal(b, out.unflatten(0, (-1, frames))[0]) for b in out.unflatten(0, (-1, frames))[1:])}


def test_keyframe_pass_in_every_layer_and_injection_at_exactly_the_documented_layers(tiny_xl, tokenflow_xl, texts):
    """One keyframe pass with Q/K and ResNet injection on. All 70 layers (both token levels): the
    stored outputs equal extended attention by hand, with the source's Q/K in exactly the 35
    documented layers and plain extended attention in the other 35; of the 17 ResNets exactly
    up_blocks.0.resnets.1 hands uncond/cond the source branch's features."""
    unet, layers = tiny_xl.unet, tokenflow_xl.layers
    seen, handles = capture_attn_inputs(unet, [layer.name for layer in layers])
    resnets = {}
    handles += _hook_resnets(unet, resnets)
    source, x = _latents(2, seed=1)
    state = StepState(PassKind.KEYFRAMES, 901, 2, KeyframeStore.for_unet(unet, LATENT, 2), inject_qk=True,
                      inject_conv=True)
    try:
        UNetRunner(unet, tokenflow_xl).three_branch(source, x, 901, texts, state)
    finally:
        for h in handles:
            h.remove()
    injected, tokens = set(), set()
    for layer in layers:
        attn, h = unet.get_submodule(layer.name), seen[layer.name]
        tokens.add(h.shape[1])
        stored = state.store.outputs[layer.name]
        if torch.allclose(stored, extended_attention_by_hand(attn, h, 3, injected=True), atol=1e-5):
            injected.add(layer.name)   # (the source's Q/K differ from each branch's own: no layer fits both)
        else:
            assert torch.allclose(stored, extended_attention_by_hand(attn, h, 3, injected=False), atol=1e-5), layer.name
        assert torch.equal(state.store.features[layer.name], h[:2])
    assert tokens == {LATENT[0] * LATENT[1] // 4, LATENT[0] * LATENT[1] // 16}
    assert injected == {layer.name for layer in layers if layer.pnp_qk} and len(injected) == 35
    assert len(resnets) == 17 and _resnets_handing_on_the_source(resnets, 2) == {"up_blocks.0.resnets.1"}


def test_propagated_tokens_are_the_gathered_keyframe_outputs(tiny_xl, tokenflow_xl, texts):
    """Every layer of a propagation pass returns, per branch and token, the weighted keyframe
    outputs at the cosine-nearest keyframe tokens of the source branch's features (by hand)."""
    unet, layers = tiny_xl.unet, tokenflow_xl.layers
    runner, store = UNetRunner(unet, tokenflow_xl), KeyframeStore.for_unet(unet, LATENT, 2)
    source, x = _latents(2, seed=3)
    runner.three_branch(source, x, 501, texts, StepState(PassKind.KEYFRAMES, 501, 2, store))
    s2, x2 = _latents(3, seed=4)
    pairs, weights = torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.tensor([[0.7, 0.3], [0.6, 0.4], [1.0, 0.0]])
    seen, handles = capture_attn_inputs(unet, [layer.name for layer in layers])
    produced = {}
    for layer in layers:
        handles.append(unet.get_submodule(layer.name).register_forward_hook(
            lambda m, a, out, name=layer.name: produced.setdefault(name, out.clone())))
    resnets, fields = {}, {}
    handles += _hook_resnets(unet, resnets)
    state = StepState(PassKind.PROPAGATE, 501, 3, store, pairs=pairs, weights=weights,
                      on_correspondences=lambda name, idx: fields.setdefault(name, idx))
    try:
        runner.three_branch(s2, x2, 501, texts, state)
    finally:
        for h in handles:
            h.remove()
    assert len(fields) == len(produced) == 70
    assert _resnets_handing_on_the_source(resnets, 3) == set()   # injection off: every branch its own
    for layer in layers:
        idx = nearest_by_hand(seen[layer.name][:3], store.features[layer.name], pairs)
        agree = (idx == fields[layer.name]).float().mean().item()
        assert agree > 0.99, (layer.name, agree)   # float32 vs float64 near-ties only
        expected = gathered_by_hand(store.outputs[layer.name], fields[layer.name], pairs, weights)
        assert torch.allclose(produced[layer.name].double().view(3, 3, *expected.shape[2:]), expected, atol=1e-5), layer.name


# ----------------------------------------------------------------------------- conditioning


@pytest.fixture(scope="module")
def pipeline(tiny_xl):
    """diffusers' own SDXL pipeline around the same tiny components."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    m = tiny_xl
    return StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                                     tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=m.unet,
                                     scheduler=DDIMScheduler.from_config(m.scheduler_config),
                                     force_zeros_for_empty_prompt=True)


def _layout(model):
    return tx.layout_of(model.unet.config, model.tokenizer.model_max_length)


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_encode_prompt_equals_diffusers_sdxl_pipeline(tiny_xl, pipeline, negative):
    assert tiny_xl.force_zeros_for_empty_prompt
    hidden, neg_hidden, pooled, neg_pooled = pipeline.encode_prompt(
        "a robot wolf", device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt=negative or None)
    width, height = 96, 64
    time_ids = pipeline._get_add_time_ids((height, width), (0, 0), (height, width), torch.float32,
                                          text_encoder_projection_dim=tiny_xl.text_encoder_2.config.projection_dim)
    for prompt, is_negative, want_hidden, want_pooled in (("a robot wolf", False, hidden, pooled),
                                                          (negative, True, neg_hidden, neg_pooled)):
        ours, added = tx.unpack(tx.encode_prompt(tiny_xl, prompt, (width, height), negative=is_negative), _layout(tiny_xl))
        assert torch.equal(ours, want_hidden) and torch.equal(added["text_embeds"], want_pooled)
        assert torch.equal(added["time_ids"], time_ids)
    if not negative:   # force_zeros_for_empty_prompt: an empty negative prompt is zeros, pooled too
        assert not neg_hidden.any() and not neg_pooled.any()


def test_pack_unpack_round_trip(tiny_xl):
    layout = _layout(tiny_xl)
    assert (layout.tokens, layout.dim, layout.pooled, layout.extra) == (77, 64, 32, 1)
    g = torch.Generator().manual_seed(0)
    hidden, pooled = torch.randn(3, 77, 64, generator=g), torch.randn(3, 32, generator=g)
    time_ids = torch.stack([tx.micro_conditioning((w, h)) for w, h in ((64, 64), (1344, 768), (768, 1344))])
    rows = tx.pack(hidden, layout, pooled, time_ids)
    assert rows.shape == (3, 78, 64) and not rows[:, 77, 38:].any()
    back, added = tx.unpack(rows, layout)
    assert torch.equal(back, hidden) and torch.equal(added["text_embeds"], pooled) and torch.equal(added["time_ids"], time_ids)
    assert time_ids[1].tolist() == [768, 1344, 0, 0, 768, 1344]
    sd = tx.TextLayout(77, 64)
    assert tx.pack(hidden, sd) is hidden and tx.unpack(hidden, sd) == (hidden, None)


def test_tokenflow_step_equals_a_direct_unet_call_with_each_branchs_own_conditioning(tiny_xl, tokenflow_xl, texts):
    """One keyframe, injection off: extended attention is plain attention, so the TokenFlow pass is
    diffusers' UNet called with each branch's own hidden states, pooled embedding and time ids."""
    source, x = _latents(1, seed=6)
    runner = UNetRunner(tiny_xl.unet, tokenflow_xl)
    ours = runner.three_branch(source, x, 301, texts,
                               StepState(PassKind.KEYFRAMES, 301, 1, KeyframeStore.for_unet(tiny_xl.unet, LATENT, 1)))
    hidden, added = [], []
    for prompt, negative in (("a wolf", False), ("", True), ("a robot wolf", False)):
        h, a = tx.unpack(tx.encode_prompt(tiny_xl, prompt, SIZE, negative=negative), _layout(tiny_xl))
        hidden.append(h)
        added.append(a)
    added = {k: torch.cat([a[k] for a in added]) for k in ("text_embeds", "time_ids")}
    with torch.no_grad():   # diffusers' own UNet forward, TokenFlow's state off
        direct = tiny_xl.unet(torch.cat([source, x, x]), torch.tensor(301), encoder_hidden_states=torch.cat(hidden),
                              added_cond_kwargs=added).sample
    assert torch.allclose(ours, direct[:, None], atol=1e-5)


# ----------------------------------------------------------------------------- whole edits

SMALL = EditConfig(prompt=("glass", "marble"), inversion_prompt="shapes", frames=4, size=SIZE, inversion_steps=2,
                   steps=2, keyframe_spacing=2, device="cpu", use_cache=False, attention_backend="torch",
                   nearest_backend="torch")


@pytest.fixture(scope="module")
def editor(tiny_xl):
    ed = Editor(tiny_xl, cache=InversionCache(enabled=False))
    yield ed
    ed.tokenflow.remove()


@pytest.fixture(scope="module")
def recorded(editor, tiny_xl, sample_clip):
    """An inversion and a two-prompt edit, with the added conditioning of every UNet call recorded."""
    calls = []

    def record(module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        if added["time_ids"].any():   # not the memory probe's zero inputs
            calls.append((kwargs["encoder_hidden_states"].clone(), added["text_embeds"].clone(), added["time_ids"].clone()))

    handle = tiny_xl.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        inversion = editor.invert(sample_clip, config=SMALL)
        n_inversion = len(calls)
        results = editor.edit_many(inversion, config=SMALL)
    finally:
        handle.remove()
    return inversion, results, calls[:n_inversion], calls[n_inversion:]


def test_every_pass_and_branch_gets_its_own_prompts_conditioning(tiny_xl, recorded):
    _, results, inversion_calls, edit_calls = recorded
    assert inversion_calls and edit_calls
    own = {p: tx.unpack(tx.encode_prompt(tiny_xl, p, SIZE), _layout(tiny_xl)) for p in ("shapes", "glass", "marble")}
    negative = tx.unpack(tx.encode_prompt(tiny_xl, SMALL.negative_prompt, SIZE, negative=True), _layout(tiny_xl))
    time_ids = tx.micro_conditioning(SIZE)
    for hidden, pooled, ids in inversion_calls:
        assert torch.equal(hidden, own["shapes"][0].expand_as(hidden))
        assert torch.equal(pooled, own["shapes"][1]["text_embeds"].expand_as(pooled))
        assert (ids == time_ids).all()
    branches = [own["shapes"], negative, own["glass"], negative, own["marble"]]
    for hidden, pooled, ids in edit_calls:   # [source, uncond_1, cond_1, uncond_2, cond_2] x m frames
        assert (ids == time_ids).all()
        m = hidden.shape[0] // 5
        for b, (want_hidden, want_added) in enumerate(branches):
            assert torch.equal(hidden[b * m:(b + 1) * m], want_hidden.expand(m, -1, -1))
            assert torch.equal(pooled[b * m:(b + 1) * m], want_added["text_embeds"].expand(m, -1))
    assert [r.prompt for r in results] == ["glass", "marble"]
    assert not torch.allclose(results[0].latents, results[1].latents)


def _agree(a, b):
    rel = ((a.latents - b.latents).norm() / b.latents.norm()).item()
    assert rel < 1e-5, rel


def test_chunk_size_does_not_change_the_sdxl_edit(editor, recorded):
    inversion, results, _, _ = recorded
    one = editor.edit_many(inversion, config=SMALL.replace(chunk_frames=1))
    for a, b in zip(one, results):
        _agree(a, b)


@pytest.mark.parametrize("backend", ["faiss", "triton"])
def test_kernel_backends_give_the_torch_passes(tiny_xl, tokenflow_xl, texts, backend, request):
    """A keyframe pass (Q/K and ResNet injection on) and a propagation pass through another kernel
    backend give the torch kernels' noise and correspondences in all 70 layers. Triton runs on CUDA
    only here: 70 layers through the CPU interpreter take over ten minutes (the interpreter's
    whole-edit check is SD's, tests/test_edit_invariance.py; the kernels' own tests cover SDXL's
    head dim)."""
    if backend == "faiss":
        pytest.importorskip("faiss")
        choice = KernelChoice("torch", "faiss")
    else:
        if request.getfixturevalue("triton_device").type == "cpu":
            pytest.skip("70 SDXL layers through the Triton interpreter take over ten minutes on a CPU; on CUDA "
                        "tests/gpu/test_edit_gpu.py (bench/gpu_check stage 2) edits tiny-xl with Triton")
        choice = KernelChoice("triton", "triton")
    unet = tiny_xl.unet
    runner = UNetRunner(unet, tokenflow_xl)
    source, x = _latents(2, seed=7)
    s2, x2 = _latents(2, seed=8)
    results = []
    for kernels in (KernelChoice("torch", "torch"), choice):
        fields = []
        if not results or kernels.attention != "torch":   # the keyframe pass runs the attention kernel only
            store = KeyframeStore.for_unet(unet, LATENT, 2, device=source.device)
            kf = runner.three_branch(source, x, 701, texts, StepState(PassKind.KEYFRAMES, 701, 2, store, inject_qk=True,
                                                                      inject_conv=True, kernels=kernels))
        prop = runner.three_branch(s2, x2, 701, texts, StepState(
            PassKind.PROPAGATE, 701, 2, store, pairs=torch.tensor([[0, 1], [1, 0]]),
            weights=torch.tensor([[0.8, 0.2], [0.5, 0.5]]), kernels=kernels,
            on_correspondences=lambda name, idx, fields=fields: fields.append(idx)))
        results.append((kf, prop, fields))
    (kf, prop, fields), (kf_other, prop_other, fields_other) = results
    assert len(fields) == len(fields_other) == 70 and all(torch.equal(a, b) for a, b in zip(fields, fields_other))
    assert torch.allclose(kf_other, kf, atol=1e-5) and torch.allclose(prop_other, prop, atol=1e-5)
