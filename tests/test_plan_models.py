"""What a depth UNet and N ControlNets cost: the memory plan (device and host), the FLOP model and
``tokenflow bench --compare plain,controlnetN`` (tiny random-weight components, CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tokenflow.benchmark import flops
from tokenflow.config import EditConfig
from tokenflow.engine import KeyframeStore, memory
from tokenflow.engine.conditioning import ControlUnit, UNetConditions
from tokenflow.engine.memory import Calibration
from tokenflow.engine.planner import Controls, make_plan
from tokenflow.engine.state import PassKind, StepState
from tokenflow.io.cache import InversionCache
from tokenflow.method.conditions import EditConditions
from tokenflow.method.editor import Editor
from tokenflow.models.architectures import meta_model
from tokenflow.models.random_weights import build_random

LATENT = (12, 12)
HUGE = 2**40


def controlnets(unet, n):
    """n random-weight ControlNets of ``ControlNetModel.from_unet(unet)``'s shape (CPU, float32)."""
    from diffusers import ControlNetModel

    return [build_random(lambda: ControlNetModel.from_unet(unet, load_weights_from_unet=False), 0, f"cn{i}")
            .eval().requires_grad_(False) for i in range(n)]


@pytest.fixture(scope="module")
def nets(tiny_sd):
    return controlnets(tiny_sd.unet, 2)


@pytest.fixture(scope="module")
def calibration():
    """The analytic sizes as they are (a CPU probe of the tiny model measures 1.03 x them; it takes
    seconds that this file does without)."""
    return Calibration()


def plan_of(model, calibration, controls=Controls(), **kwargs):
    settings = dict(frames=40, latent_size=LATENT, branches=3, keyframes=2, window=0, steps=3, budget=HUGE,
                    budget_source="test", calibration=calibration, host=(HUGE, "test"), nearest_backend="torch",
                    row_cap=10**6)
    return make_plan(model, **{**settings, **kwargs}, controls=controls)


# ----------------------------------------------------------------------------- memory plan


def test_controlnets_raise_the_peaks_and_shrink_the_calls(tiny_sd, nets, calibration):
    plain = plan_of(tiny_sd, calibration, chunk_frames=8)
    # a budget where two ControlNets leave 4 frames per propagation call
    budget = max(plan_of(tiny_sd, calibration, Controls(nets=tuple(nets)), chunk_frames=4).peaks.values())
    plans = [plan_of(tiny_sd, calibration, Controls(nets=tuple(nets[:n])), budget=budget) for n in (0, 1, 2)]
    assert plans[0].chunk_frames > plans[1].chunk_frames >= plans[2].chunk_frames >= 4, \
        [p.chunk_frames for p in plans]
    assert all(p.peak <= budget for p in plans)
    at_eight = [plan_of(tiny_sd, calibration, Controls(nets=tuple(nets[:n])), chunk_frames=8) for n in (0, 1, 2)]
    for stage in ("keyframes", "propagate"):
        assert at_eight[0].peaks[stage] < at_eight[1].peaks[stage] < at_eight[2].peaks[stage]
    two = at_eight[2]
    assert two.controlnet_weights_bytes == memory.module_bytes(*nets)
    assert two.weights_bytes == plain.weights_bytes   # the model's; the ControlNets' are their own line
    assert two.control_images_bytes == 2 * 40 * 3 * 96 * 96
    assert two.breakdown["controlnet_weights"] == two.controlnet_weights_bytes
    assert two.host.parts["conditions"] == two.control_images_bytes   # host memory: the control images
    assert two.host.weights == plain.host.weights + two.controlnet_weights_bytes   # on CPU: host memory too
    assert "ControlNets: 2" in two.describe() and "ControlNets' share of the peaks" in two.describe()
    # not controlled during the inversion: its calls cost what they cost without ControlNets
    assert two.peaks["invert"] - at_eight[0].peaks["invert"] == two.controlnet_weights_bytes
    during = plan_of(tiny_sd, calibration, Controls(nets=tuple(nets), source=True, inversion=True), chunk_frames=8)
    assert during.peaks["invert"] > two.peaks["invert"] and during.peaks["propagate"] > two.peaks["propagate"]


def _measured_propagation(editor, units, chunk):
    """Live tensor bytes of one real propagation call (3 branches) under the ControlNets ``units``."""
    g = torch.Generator().manual_seed(0)
    h, w = LATENT
    texts = torch.randn(3, 77, editor.model.text_encoder.config.hidden_size, generator=g)
    store = KeyframeStore.for_unet(editor.model.unet, LATENT, 2)
    with editor.runner.conditioned(UNetConditions(controls=units, timesteps=(501,))), torch.no_grad():
        keyframes = StepState(PassKind.KEYFRAMES, 501, 2, store)
        editor.runner.branches(torch.randn(2, 4, h, w), torch.randn(1, 2, 4, h, w), 501, texts, keyframes,
                               frames=slice(0, 2))
        state = StepState(PassKind.PROPAGATE, 501, chunk, store, pairs=torch.tensor([[0, 1]] * chunk),
                          weights=torch.full((chunk, 2), 0.5))
        source, x = torch.randn(chunk, 4, h, w), torch.randn(1, chunk, 4, h, w)
        return memory.measure_peak(lambda: editor.runner.branches(source, x, 501, texts, state,
                                                                  frames=slice(0, chunk)), torch.device("cpu"))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_the_plan_bounds_a_measured_call_with_controlnets(tiny_sd, nets, calibration, n):
    """The plan's propagation activations against the live tensor bytes of a real call with tiny
    ControlNets (CPU tracker, as tests/test_engine.py): a bound, not far above."""
    chunk, frames = 3, 8
    units = [ControlUnit(net=net, images=torch.randint(0, 256, (frames, 3, 96, 96), dtype=torch.uint8), scale=1.0,
                         name=f"c{i}") for i, net in enumerate(nets[:n])]
    plan = plan_of(tiny_sd, calibration, Controls(nets=tuple(nets[:n])), frames=frames, chunk_frames=chunk)
    editor = Editor(tiny_sd, cache=InversionCache(enabled=False))
    try:
        measured = _measured_propagation(editor, units, chunk)
    finally:
        editor.tokenflow.remove()
    predicted = (plan.peaks["propagate"] - plan.weights_bytes - plan.controlnet_weights_bytes - plan.store_bytes
                 - plan.latents_bytes - plan.depth_bytes)
    assert 0.6 * predicted < measured <= predicted, (n, measured, predicted)


def test_the_editor_plans_its_controlnets_and_a_plan_without_them_loaded_agrees(tiny_sd, nets, tmp_path,
                                                                               sample_clip):
    """``edit_many`` hands its conditions to the plan; ``Editor.plan`` (``--plan``) counts
    ``config.controlnet`` by shape without loading: a folder's config.json, or the UNet's shape."""
    folder = tmp_path / "cn"
    nets[0].save_pretrained(folder)
    editor = Editor(tiny_sd, cache=InversionCache(enabled=False))
    key = memory.calibration_key(tiny_sd, torch.device("cpu"))   # a cached probe: no probe run here
    (tmp_path / "memory-calibration.json").write_text(json.dumps({key: {"unet": 1.0, "vae": 1.0}}))
    config = EditConfig(prompt="x", frames=6, size=(64, 64), device="cpu", memory_budget="64GB", cache_dir=str(tmp_path),
                        controlnet=(str(folder), "./not-here:0.5"), control=("canny", "canny"))
    try:
        clip = editor.load_clip(sample_clip, config)
        units = tuple(ControlUnit(net=net, images=torch.zeros(6, 3, 64, 64, dtype=torch.uint8), scale=1.0,
                                  name=f"c{i}") for i, net in enumerate(nets))
        loaded = editor._plan(clip, config, EditConditions(edit=UNetConditions(controls=units)))
        planned = editor.plan(clip, config)
        plain = editor.plan(clip, config.replace(controlnet=(), control=()))
    finally:
        editor.tokenflow.remove()
    assert planned.peaks == loaded.peaks and planned.chunk_frames == loaded.chunk_frames
    assert planned.controlnets == loaded.controlnets == 2 and plain.controlnets == 0
    assert planned.controlnet_note == "planned from its config (1) and the model's UNet's shape (1), not loaded"
    assert loaded.controlnet_note == "c0, c1"
    assert planned.peaks["propagate"] > plain.peaks["propagate"]


def offline_env(tmp_path) -> dict:
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    closed = "http://127.0.0.1:9"
    return {**os.environ, "HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"), "HF_HUB_OFFLINE": "1",
            "HF_ENDPOINT": closed, "HTTPS_PROXY": closed, "TOKENFLOW_CACHE": str(tmp_path / "tf-cache")}


def test_plan_of_2_depth_with_a_controlnet_from_the_architectures_alone(tmp_path, sample_clip):
    done = subprocess.run([sys.executable, "-m", "tokenflow", "edit", str(sample_clip), "--plan", "--model", "2-depth",
                           "--device", "cpu", "--memory-budget", "24GB", "--controlnet", "someone/a-controlnet",
                           "--control", "canny", "--log-json"],
                          capture_output=True, text=True, env=offline_env(tmp_path), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    (event,) = [e for e in map(json.loads, filter(lambda s: s.startswith("{"), done.stdout.splitlines()))
                if e.get("event") == "plan"]
    assert event["made_from"] == "the architecture of SD 2-depth (its weights are not on this machine)"
    assert event["controlnets"] == 1 and event["controlnet_note"].startswith("planned from the model's UNet's shape")
    h, w = event["latent_size"]
    assert event["depth_bytes"] == event["frames"] * h * w * 4
    assert event["latents_bytes"] % (4 * h * w * 4) == 0 and event["latents_bytes"] % (5 * h * w * 4) != 0
    sd21 = meta_model("sd21", "2.1", torch.device("cpu"), torch.float32)
    depth = meta_model("sd2-depth", "2-depth", torch.device("cpu"), torch.float32)
    extra = sum(p.numel() for p in depth.unet.parameters()) - sum(p.numel() for p in sd21.unet.parameters())
    assert extra == 320 * 3 * 3   # conv_in's fifth input channel
    assert event["weights_bytes"] == memory.module_bytes(depth.unet, depth.vae, depth.text_encoder)
    # a ControlNet of SD 2.1's shape: the UNet's down and mid half, zero convs and the condition embedding
    assert 1_300_000_000 < event["controlnet_weights_bytes"] < 1_500_000_000
    assert set(event["breakdown"]) >= {"controlnet_weights", "controlnet_activations", "depth_maps"}


# ----------------------------------------------------------------------------- FLOPs


def _counted(module, *args, **kwargs) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("h,w", [(16, 16), (11, 9)])
def test_controlnet_and_depth_unet_flops_match_the_flop_counter(tiny_sd, nets, h, w):
    from diffusers import UNet2DConditionModel

    x, text, t = torch.randn(2, 4, h, w), torch.randn(2, 77, 32), torch.tensor(500)
    counted = _counted(nets[0], x, t, encoder_hidden_states=text, controlnet_cond=torch.rand(2, 3, 8 * h, 8 * w))
    assert counted == pytest.approx(2 * flops.controlnet_cost(nets[0].config, h, w, 8 * h, 8 * w), rel=1e-9)
    depth_unet = UNet2DConditionModel.from_config({**tiny_sd.unet.config, "in_channels": 5})
    counted = _counted(depth_unet, torch.randn(2, 5, h, w), t, encoder_hidden_states=text)
    assert counted == pytest.approx(2 * flops.unet_cost(depth_unet.config, h, w).plain(), rel=1e-9)


def test_edit_flops_grow_with_n_controlnets_as_counted_by_hand(tiny_sd, nets):
    unet, vae, cn = tiny_sd.unet.config, tiny_sd.vae.config, nets[0].config
    calls, pairs = [[3], [3]], [[2] * 10, [1] * 10]     # 2 steps: 3 keyframes, 10 frames
    h, w = 16, 16
    args = (unet, vae, 10, (h, w), 5, calls, pairs)
    base = flops.edit_work(*args, branches=5)
    per = flops.controlnet_cost(cn, h, w, 128, 128)
    for n in (1, 2):
        work = flops.edit_work(*args, branches=5, controlnet_config=cn, controlnets=n)
        # 2 prompts: 4 controlled rows per frame; 3 keyframes and 10 frames per step, 2 steps
        assert work.flops["keyframes"] - base.flops["keyframes"] == pytest.approx(n * per * 4 * 3 * 2)
        assert work.flops["propagate"] - base.flops["propagate"] == pytest.approx(n * per * 4 * 10 * 2)
        assert work.flops["invert"] == base.flops["invert"] and work.samples == base.samples
    inverted = flops.edit_work(*args, branches=5, controlnet_config=cn, controlnets=2, control_source=True,
                               control_inversion=True, control_steps=[True, False])
    assert inverted.flops["invert"] - base.flops["invert"] == pytest.approx(2 * per * 10 * 5)
    assert inverted.flops["keyframes"] - base.flops["keyframes"] == pytest.approx(2 * per * 5 * 3)


# ----------------------------------------------------------------------------- tokenflow bench


def test_bench_compares_plain_and_controlnets_on_a_depth_unet(tmp_path, capsys):
    from tokenflow.app.cli import build_parser
    from tokenflow.app.run import run_command
    from tokenflow.benchmark import cli

    path = tmp_path / "bench.json"
    args = build_parser().parse_args([
        "bench", "--arch", "tiny-depth", "--frames", "4", "--size", "64x64", "--inversion-steps", "2", "--steps", "1",
        "--keyframe-spacing", "2", "--idle-wait", "0", "--threads", "1", "--warmup", "0", "--repeats", "1",
        "--compare", "plain,controlnet2", "--json", str(path)])
    assert run_command(lambda: cli.main(args)) == 0
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert doc["model"]["in_channels"] == 5 and doc["model"]["controlnets_built"] == 2
    plain, controlled = doc["variants"]
    assert (plain["controlnets"], controlled["controlnets"]) == (0, 2)
    assert controlled["plan"]["controlnets"] == 2 and controlled["plan"]["depth_bytes"] == 4 * 8 * 8 * 4
    assert controlled["plan"]["peaks"]["propagate"] > plain["plan"]["peaks"]["propagate"]
    assert controlled["stages"]["invert"]["flops"] == plain["stages"]["invert"]["flops"]
    assert controlled["stages"]["edit"]["flops"] > plain["stages"]["edit"]["flops"]
    assert controlled["max_abs_latent_diff_vs_first"] > 0   # the random ControlNets change the edit
    assert doc["ratios"]["controlnet2"]["total"] > 0
    assert "FLOPs x first" in out and "speed-up vs plain" in out
