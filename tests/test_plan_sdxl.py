"""The keyframe store, the memory plan and the calibration probe for SDXL (70 attention layers at
two token levels; two text encoders; a float32 VAE under 16-bit dtypes).

Real sizes come from the weightless SDXL base 1.0 architecture (``models.architectures.meta_model``,
planned as for a CUDA device); measured peaks from the tiny SDXL on CPU (the live-tensor tracker,
as tests/test_engine.py does for SD)."""
from __future__ import annotations

import json

import pytest
import torch

from tokenflow.engine import KeyframeStore, memory
from tokenflow.engine.memory import Calibration
from tokenflow.engine.planner import make_plan
from tokenflow.engine.state import PassKind, StepState
from tokenflow.errors import ResourceError
from tokenflow.io.cache import InversionCache
from tokenflow.method.editor import Editor
from tokenflow.models.architectures import architecture_of, meta_model
from tokenflow.models.text import layout_of, unet_keywords

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny-model calls: see tests/conftest.py
GIB = 2**30
FRAMES, LATENT, KEYFRAMES, STEPS = 200, (128, 128), 25, 51   # 200 frames at 1024^2, spacing 8, 50 steps
# stabilityai/stable-diffusion-xl-base-1.0's parameter counts: UNet, VAE, text_encoder, text_encoder_2
RELEASED = (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)


@pytest.fixture(scope="module")
def sdxl():
    """SDXL base 1.0's architecture, weights on the meta device, planned for CUDA in float16."""
    return meta_model("sdxl", "SDXL base 1.0", torch.device("cuda"), torch.float16)


def plan(model, budget, **kw):
    args = dict(frames=FRAMES, latent_size=LATENT, branches=3, keyframes=KEYFRAMES, window=0, steps=STEPS,
                budget=budget, budget_source="test", calibration=Calibration(), host=(2**50, "test"),
                nearest_backend="triton")
    return make_plan(model, **{**args, **kw})


def direct_layer_count(config, h, w):
    """[(tokens, channels)] of every attn1 from the config alone: each level with attention holds
    layers_per_block attentions in the encoder and one more in the decoder, each of
    transformer_layers_per_block[level] blocks; the mid block the last level's."""
    channels, depth = config["block_out_channels"], config["transformer_layers_per_block"]
    per_block, out = config["layers_per_block"], []
    for level, kind in enumerate(config["down_block_types"]):
        if "CrossAttn" in kind:
            tokens = (h >> level) * (w >> level)
            out += [(tokens, channels[level])] * ((2 * per_block + 1) * depth[level])
    out += [((h >> (len(channels) - 1)) * (w >> (len(channels) - 1)), channels[-1])] * depth[-1]
    return out


def test_the_planned_store_is_a_direct_count_over_the_70_layers(sdxl):
    layers = direct_layer_count(dict(sdxl.unet.config), *LATENT)
    assert len(layers) == 70 and sorted(set(layers)) == [(1024, 1280), (4096, 640)]   # two token levels
    shapes = memory.attention_layer_shapes(sdxl.unet, *LATENT)
    assert sorted(shapes.values()) == sorted(layers)
    p = plan(sdxl, 80 * GIB)
    per_keyframe = sum(s * c for s, c in layers) * (1 + 3) * 2   # source features + 3 branch outputs, fp16
    assert per_keyframe == 838_860_800   # 8 bytes x (10 x 4096 x 640 + 60 x 1024 x 1280)
    assert p.store_bytes == KEYFRAMES * per_keyframe


def test_layer_shapes_are_what_the_tiny_sdxl_unet_runs(tiny_xl):
    """Every attn1's input, hooked during a real call at odd latents, is the planned (S, C)."""
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            seen[name] = tuple((args[0] if args else kwargs["hidden_states"]).shape[1:])
        return hook

    hooks = [tiny_xl.unet.get_submodule(name).register_forward_pre_hook(record(name), with_kwargs=True)
             for name in memory.attention_layer_shapes(tiny_xl.unet, 9, 7)]
    layout = layout_of(tiny_xl.unet.config)
    try:
        with torch.no_grad():
            tiny_xl.unet(torch.zeros(1, 4, 9, 7), torch.tensor(10),
                         **unet_keywords(tiny_xl.unet, torch.zeros(1, layout.rows_tokens, layout.dim)))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == 70 and seen == memory.attention_layer_shapes(tiny_xl.unet, 9, 7)
    store = KeyframeStore.for_unet(tiny_xl.unet, (9, 7), 2)
    assert len(store.shapes) == 70


def test_weights_count_both_text_encoders_and_the_float32_vae(sdxl):
    assert architecture_of("xl") == ("sdxl", "SDXL base 1.0")
    assert architecture_of("stabilityai/stable-diffusion-xl-base-1.0")[0] == "sdxl"
    modules = (sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2)
    assert tuple(sum(p.numel() for p in m.parameters()) for m in modules) == RELEASED
    assert sdxl.vae_upcast and next(sdxl.vae.parameters()).dtype == torch.float32
    p = plan(sdxl, 80 * GIB)
    positions = 2 * 77 * 8   # each CLIP encoder's int64 position ids
    assert p.weights_bytes == 2 * (RELEASED[0] + RELEASED[2] + RELEASED[3]) + 4 * RELEASED[1] + positions
    # the VAE's activations are float32 too: 10 x 128 channels x 1024^2 x 4 bytes a frame
    assert p.vae_row_bytes == 10 * 128 * 1024 * 1024 * 4
    assert p.unet_row_bytes == memory.unet_row_elements(sdxl.unet.config, *LATENT) * 2


def test_200_frames_at_1024_on_24_and_80_gib(sdxl):
    """80 GiB holds everything on the device; 24 GiB refuses the 25-keyframe pass and names the
    keyframe window, with which the store goes to the host and every call fits."""
    big = plan(sdxl, 80 * GIB)
    assert big.store_on == big.latents_on == "device" and big.peak <= big.usable
    with pytest.raises(ResourceError, match=r"the keyframe pass needs .*--keyframe-window") as refused:
        plan(sdxl, 24 * GIB)
    assert "--dtype float16" not in str(refused.value)   # already float16
    small = plan(sdxl, 24 * GIB, window=8)
    assert small.keyframe_call == 8 and small.store_on == "host" and small.peak <= small.usable
    assert small.staging_bytes < small.store_bytes
    assert max(small.largest_tensor.values()) <= memory.INT32_ELEMENTS
    # level 0 has no attention: the largest UNet tensor is level 1's GEGLU projection [4096, 8 x 640]
    assert memory.unet_largest_row_elements(sdxl.unet.config, *LATENT) == 8 * 640 * 4096


def test_the_plan_matches_a_measured_tiny_sdxl_propagation_call(tiny_xl):
    """The plan's propagation activations (the analytic sizes as they are: a CPU probe of the tiny
    SDXL measures 0.92 x them) against the live tensor bytes of a real call (CPU tracker)."""
    latent, chunk = (12, 12), 3
    p = make_plan(tiny_xl, frames=8, latent_size=latent, branches=3, keyframes=2, window=0, steps=3, budget=2**40,
                  budget_source="test", calibration=Calibration(), host=(2**50, "test"), chunk_frames=chunk,
                  nearest_backend="torch")
    editor = Editor(tiny_xl, cache=InversionCache(enabled=False))
    try:
        measured = _measure_propagation(editor, latent, chunk)
    finally:
        editor.tokenflow.remove()
    predicted = p.peaks["propagate"] - p.weights_bytes - p.store_bytes - p.latents_bytes
    assert 0.7 < measured / predicted < 1.3, (measured, predicted)


def _measure_propagation(editor, latent, chunk):
    g = torch.Generator().manual_seed(0)
    h, w = latent
    layout = layout_of(editor.model.unet.config)
    texts = torch.randn(3, layout.rows_tokens, layout.dim, generator=g)
    store = KeyframeStore.for_unet(editor.model.unet, latent, 2)
    editor.runner.three_branch(torch.randn(2, 4, h, w), torch.randn(2, 4, h, w), 501, texts,
                               StepState(PassKind.KEYFRAMES, 501, 2, store))
    state = StepState(PassKind.PROPAGATE, 501, chunk, store, pairs=torch.tensor([[0, 1]] * chunk),
                      weights=torch.full((chunk, 2), 0.5))
    source, x = torch.randn(chunk, 4, h, w), torch.randn(chunk, 4, h, w)
    with torch.no_grad():
        return memory.measure_peak(lambda: editor.runner.three_branch(source, x, 501, texts, state),
                                   torch.device("cpu"))


def test_the_probe_runs_sdxl_and_its_upcast_vae_in_float32(tiny_xl_dir, tmp_path, monkeypatch):
    """bfloat16 SDXL: the probe runs the UNet on packed text rows and the VAE in float32; the plan
    counts UNet rows at 2 bytes and VAE rows at 4, and a measured decode stays within its VAE call.
    (The probe at 16 x 16 latents instead of 32 x 32: a quarter of its CPU time, the same code.)"""
    from tokenflow.models.load import load_model

    monkeypatch.setattr(memory, "PROBE_LATENT", 16)
    model = load_model(str(tiny_xl_dir), torch.device("cpu"), torch.bfloat16)
    assert model.vae_upcast
    calibration = memory.calibrate(model, tmp_path)
    assert calibration.source == "probe measured now"
    assert 0.6 < calibration.unet < 1.3 and 0.5 < calibration.vae < 1.5, calibration
    p = make_plan(model, frames=4, latent_size=(16, 16), branches=3, keyframes=2, window=0, steps=3, budget=2**40,
                  budget_source="test", calibration=calibration, host=(2**50, "test"))
    assert p.vae_row_bytes == int(memory.vae_decode_row_elements(model.vae.config, 128, 128) * 4 * calibration.vae)
    assert p.unet_row_bytes == int(memory.unet_row_elements(model.unet.config, 16, 16) * 2 * calibration.unet)
    z = torch.zeros(2, 4, 16, 16)
    with torch.no_grad():
        measured = memory.measure_peak(lambda: model.vae.decode(z), torch.device("cpu"))
    assert 0.7 * 2 * p.vae_row_bytes < measured <= 1.3 * 2 * p.vae_row_bytes, (measured, p.vae_row_bytes)


def test_plan_of_xl_without_weights_on_the_cli(tmp_path, sample_clip, capsys, monkeypatch):
    """``tokenflow edit --model xl --plan`` offline: from the architecture, nothing downloaded."""
    from tokenflow.app.cli import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TOKENFLOW_CACHE", str(tmp_path / "tf-cache"))
    code = main(["edit", str(sample_clip), "--plan", "--model", "xl", "--device", "cpu", "--dtype", "bfloat16",
                 "--size", "256x256", "--frames", "8", "--memory-budget", "20GB", "--log-json"])
    out = capsys.readouterr().out
    assert code == 0, out
    (event,) = [e for e in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))
                if e.get("event") == "plan"]
    assert event["made_from"] == "the architecture of SDXL base 1.0 (its weights are not on this machine)"
    assert event["weights_bytes"] == 2 * (RELEASED[0] + RELEASED[2] + RELEASED[3]) + 4 * RELEASED[1] + 2 * 77 * 8
    assert event["latent_size"] == [32, 32]
    assert not (tmp_path / "hf").exists() or not any(p.is_file() for p in (tmp_path / "hf").rglob("*"))


def test_long_videos_fit_24_gib_with_a_keyframe_window(sdxl):
    """1000 frames: the 97 GiB store goes to the host and its staged slots (0.8 GiB each) need the
    device room the 12 GiB of latents would take, so those go to the host too; any window fits."""
    for window in (8, 4):
        p = plan(sdxl, 24 * GIB, frames=1000, keyframes=125, window=window)
        assert (p.store_on, p.latents_on) == ("host", "host") and p.peak <= p.usable, window
    with pytest.raises(ResourceError, match="int32 indexing allows. Use a keyframe window"):
        plan(sdxl, 80 * GIB, frames=1000, keyframes=125)   # 375 rows in one keyframe pass


def test_the_documented_sdxl_plan_tables_are_the_recorded_plans():
    """README's and docs/memory.md's SDXL tables at 1024² are bench/results/plans_sdxl_1024_fp16.json
    (bench/plan_long_videos.py --arch sdxl): a planner change that moves them must regenerate them."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    recorded = json.loads((root / "bench" / "results" / "plans_sdxl_1024_fp16.json").read_text())
    table_rows = [line for line in recorded["table"].splitlines() if re.match(r"\| \d+ \|", line)]
    memory = [line for line in (root / "docs" / "memory.md").read_text().splitlines()
              if re.match(r"\| (200|1000) \| (24|80) GiB \|", line) and ("GiB on" in line or "no (" in line)]
    assert memory and all(line in table_rows for line in memory), [m for m in memory if m not in table_rows]
    readme = (root / "README.md").read_text().split("<!-- sdxl-plan-table -->")[1].split("<!--")[0]
    shown = [line.strip() for line in readme.splitlines() if re.match(r"\s*\| 200 \|", line)]
    assert len(shown) == 3
    for line in shown:
        cells = [c.strip() for c in line.strip("|").split("|")]
        frames, budget, window = int(cells[0]), float(cells[1].split()[0]) * 2**30, cells[2]
        (case,) = [c for c in recorded["results"] if c["frames"] == frames and c["budget_bytes"] == budget
                   and str(c["keyframe_window"] or "all") == window]
        if not case["fits"]:
            assert "does not fit" in cells[3] and re.search(r"at least ([\d.]+) ?GiB", case["error"]).group(1) in cells[3]
            continue
        plan = case["plan"]
        assert cells[3] == f"{plan['store_bytes'] / 2**30:.1f} GiB on {plan['store_on']}", line
        assert cells[4] == f"{plan['keyframe_call']} / {plan['chunk_frames']} / {plan['inversion_frames']}", line
        assert cells[5] == f"{max(plan['peaks'].values()) / 2**30:.1f} GiB", line
