"""TokenFlow inside the UNet: processors and the PnP conv hook, against direct computations."""
import pytest
import torch

from tokenflow.engine import KeyframeStore, UNetRunner
from tokenflow.engine.processors import PNP_FEATURE_RESNET, TokenFlowUNet, self_attention_layers
from tokenflow.engine.state import PassKind, StepState

from .unet_checks import capture_attn_inputs, extended_attention_by_hand

ORIGINAL_PNP_QK_BLOCKS = [f"up_blocks.{r}.attentions.{b}.transformer_blocks.0.attn1"
                          for r, bs in {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}.items() for b in bs]


@pytest.fixture
def tokenflow_unet(tiny_sd):
    tf = TokenFlowUNet(tiny_sd.unet)
    yield tf
    tf.remove()


def _inputs(tiny_sd, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    source, x = torch.randn(m, 4, 8, 8, generator=g), torch.randn(m, 4, 8, 8, generator=g)
    texts = torch.randn(3, 77, tiny_sd.text_encoder.config.hidden_size, generator=g)
    return source, x, texts


def test_layers_are_the_sixteen_blocks_and_pnp_layers_are_the_originals(tiny_sd):
    layers = self_attention_layers(tiny_sd.unet)
    assert len(layers) == 16
    assert sorted(layer.name for layer in layers if layer.pnp_qk) == sorted(ORIGINAL_PNP_QK_BLOCKS)


def test_plain_state_leaves_the_unet_unchanged(tiny_sd):
    source, x, texts = _inputs(tiny_sd, 2)
    lat, text, t = torch.cat([source, x, x]), texts.repeat_interleave(2, 0), torch.tensor(501)
    before = tiny_sd.unet(lat, t, encoder_hidden_states=text).sample
    tf = TokenFlowUNet(tiny_sd.unet)
    try:
        during = tiny_sd.unet(lat, t, encoder_hidden_states=text).sample
    finally:
        tf.remove()
    assert torch.allclose(before, during, atol=1e-6)


def _store(sd, keyframes: int) -> KeyframeStore:
    return KeyframeStore.for_unet(sd.unet, (8, 8), keyframes)


def test_one_keyframe_extended_attention_is_plain_attention(tiny_sd, tokenflow_unet):
    source, x, texts = _inputs(tiny_sd, 1)
    runner = UNetRunner(tiny_sd.unet, tokenflow_unet)
    plain = runner.eps(torch.cat([source, x, x]), 301, texts)
    state = StepState(PassKind.KEYFRAMES, 301, 1, _store(tiny_sd, 1))
    extended = runner.three_branch(source, x, 301, texts, state).reshape(3, 4, 8, 8)
    assert torch.allclose(plain, extended, atol=1e-5)
    assert len(state.store.outputs) == 16


@pytest.mark.parametrize("inject", [False, True])
def test_keyframe_pass_extended_attention_and_qk_injection(tiny_sd, tokenflow_unet, inject):
    pnp_layer, other_layer = ORIGINAL_PNP_QK_BLOCKS[0], "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    seen, handles = capture_attn_inputs(tiny_sd.unet, [pnp_layer, other_layer])
    source, x, texts = _inputs(tiny_sd, 3, seed=1)
    state = StepState(PassKind.KEYFRAMES, 901, 3, _store(tiny_sd, 3), inject_qk=inject)
    try:
        UNetRunner(tiny_sd.unet, tokenflow_unet).three_branch(source, x, 901, texts, state)
    finally:
        for h in handles:
            h.remove()
    for name in (pnp_layer, other_layer):
        attn = tiny_sd.unet.get_submodule(name)
        expected = extended_attention_by_hand(attn, seen[name], 3, inject and name == pnp_layer)
        assert torch.allclose(state.store.outputs[name], expected, atol=1e-5), name
        assert torch.equal(state.store.features[name], seen[name][:3])


@pytest.mark.parametrize("inject", [False, True])
def test_conv_injection_replaces_uncond_and_cond_residual_features(tiny_sd, tokenflow_unet, inject):
    captured = {}
    conv2 = tiny_sd.unet.get_submodule(PNP_FEATURE_RESNET).conv2
    handle = conv2.register_forward_hook(lambda m, a, out: captured.setdefault("out", out.clone()))
    source, x, texts = _inputs(tiny_sd, 2, seed=2)
    state = StepState(PassKind.KEYFRAMES, 801, 2, _store(tiny_sd, 2), inject_conv=inject)
    try:
        UNetRunner(tiny_sd.unet, tokenflow_unet).three_branch(source, x, 801, texts, state)
    finally:
        handle.remove()
    out = captured["out"].view(3, 2, *captured["out"].shape[1:])
    assert torch.equal(out[1], out[0]) == inject and torch.equal(out[2], out[0]) == inject


def test_propagating_the_keyframe_onto_itself_reproduces_the_keyframe_pass(tiny_sd, tokenflow_unet):
    """Group = the keyframe itself: every token's nearest neighbour is itself, so the propagated
    self-attention equals the stored one and the UNet output equals the keyframe pass's."""
    source, x, texts = _inputs(tiny_sd, 1, seed=3)
    runner, store = UNetRunner(tiny_sd.unet, tokenflow_unet), _store(tiny_sd, 1)
    kf = runner.three_branch(source, x, 501, texts, StepState(PassKind.KEYFRAMES, 501, 1, store, inject_conv=True))
    fields = []
    state = StepState(PassKind.PROPAGATE, 501, 1, store, inject_conv=True, pairs=torch.zeros(1, 1, dtype=torch.long),
                      weights=torch.ones(1, 1), on_correspondences=lambda layer, idx: fields.append(idx))
    prop = runner.three_branch(source, x, 501, texts, state)
    assert len(fields) == 16
    assert all(torch.equal(f[0, 0], torch.arange(f.shape[-1])) for f in fields)
    assert torch.allclose(kf, prop, atol=1e-5)


def test_propagation_blends_two_keyframes(tiny_sd, tokenflow_unet):
    """With weights (1, 0) the output equals propagating from the first keyframe alone."""
    source, x, texts = _inputs(tiny_sd, 2, seed=4)
    runner, store = UNetRunner(tiny_sd.unet, tokenflow_unet), _store(tiny_sd, 2)
    runner.three_branch(source, x, 501, texts, StepState(PassKind.KEYFRAMES, 501, 2, store))
    s2, x2, _ = _inputs(tiny_sd, 1, seed=5)

    def run(pairs, weights):
        st = StepState(PassKind.PROPAGATE, 501, 1, store, pairs=torch.tensor(pairs), weights=torch.tensor(weights))
        return runner.three_branch(s2, x2, 501, texts, st)

    assert torch.allclose(run([[1, 0]], [[1.0, 0.0]]), run([[1]], [[1.0]]), atol=1e-6)
    assert not torch.allclose(run([[1, 0]], [[0.5, 0.5]]), run([[1]], [[1.0]]), atol=1e-4)
