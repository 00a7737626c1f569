"""The engine's resource decisions: memory plan, calibration, keyframe store placement, inverted
latents placement, keyframe windows and multi-prompt edits (tiny model, CPU, float32)."""
import pytest
import torch

from tokenflow.config import EditConfig, parse_bytes
from tokenflow.engine import memory
from tokenflow.engine.memory import Calibration, LiveTensorTracker
from tokenflow.engine.planner import CPU_PROPAGATE_ROWS, make_plan
from tokenflow.engine.state import PassKind, StepState
from tokenflow.errors import ConfigError, ResourceError
from tokenflow.io.cache import InversionCache
from tokenflow.method.editor import Editor

SMALL = EditConfig(prompt="glass", inversion_prompt="shapes", frames=6, size=(64, 64), inversion_steps=4, steps=2,
                   keyframe_spacing=2, device="cpu", use_cache=False, attention_backend="torch",
                   nearest_backend="torch")


@pytest.fixture(scope="module")
def editor(tiny_sd):
    ed = Editor(tiny_sd, cache=InversionCache(enabled=False))
    yield ed
    ed.tokenflow.remove()


@pytest.fixture(scope="module")
def inversion(editor, sample_clip):
    return editor.invert(sample_clip, config=SMALL)


@pytest.fixture(scope="module")
def base(editor, inversion):
    return editor.edit(inversion, config=SMALL)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- sizes and budgets ---------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("12GB", 12 * 10**9), ("16GiB", 16 * 2**30), ("800 MB", 800 * 10**6),
                                           ("1.5GiB", int(1.5 * 2**30)), (2048, 2048), ("4096", 4096)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["12 parsecs", "GB", "-1GB", "0", ""])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(ConfigError, match="memory_budget"):
        parse_bytes(text)


def test_layer_shapes_follow_the_unet(tiny_sd):
    shapes = memory.attention_layer_shapes(tiny_sd.unet, 9, 7)  # odd latents: ceil at each level
    assert len(shapes) == 16
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == (63, 32)
    assert shapes["down_blocks.1.attentions.0.transformer_blocks.0.attn1"] == (5 * 4, 32)
    assert shapes["mid_block.attentions.0.transformer_blocks.0.attn1"] == (2 * 1, 64)
    assert shapes["up_blocks.3.attentions.2.transformer_blocks.0.attn1"] == (63, 32)


# --- the planner -----------------------------------------------------------------------------

def _plan(sd, budget, **kw):
    args = dict(frames=40, latent_size=(16, 16), branches=3, keyframes=5, window=0, steps=11, budget=budget,
                budget_source="test", calibration=Calibration(), host=(2**50, "test"))   # the device plan alone
    args.update(kw)
    return make_plan(sd, **args)


def test_smaller_budgets_give_smaller_chunks_and_every_peak_fits(tiny_sd):
    weights = memory.module_bytes(tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder)
    big, small = _plan(tiny_sd, weights + 2**30), _plan(tiny_sd, weights + 24 * 2**20)
    assert big.chunk_frames == CPU_PROPAGATE_ROWS // 3 < 40   # on CPU, capped by rows per call, not memory
    assert big.store_on == "device" and big.latents_on == "device"
    assert _plan(tiny_sd, weights + 2**30, chunk_frames=40).chunk_frames == 40   # --chunk-frames overrides
    assert 1 <= small.chunk_frames < big.chunk_frames and small.vae_frames < big.vae_frames
    for plan in (big, small):
        assert plan.peak <= plan.budget
        assert plan.peaks["propagate"] >= plan.weights_bytes + 3 * plan.chunk_frames * plan.unet_row_bytes
    text = small.describe()
    assert f"{small.chunk_frames} frames per call" in text and "keyframe store" in text


def test_the_plan_counts_the_search_its_backend_runs(editor, sample_clip):
    """Editor.plan passes the run's --backend and --nearest-backend: graph backends search statically."""
    static = editor.plan(sample_clip, config=SMALL.replace(backend="compile", nearest_backend="auto"))
    eager = editor.plan(sample_clip, config=SMALL)
    assert (static.nearest, eager.nearest) == ("static", "torch")
    assert static.nearest_bytes > eager.nearest_bytes and "static search tiles" in static.describe()
    assert static.graph_pool_bytes == 0   # CUDA graphs only on CUDA


def test_store_goes_to_the_host_when_the_keyframe_pass_needs_the_room(tiny_sd):
    row = _plan(tiny_sd, 2**40).unet_row_bytes
    weights = memory.module_bytes(tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder)
    # room for the keyframe pass (3 branches x 200 rows) and the few slots an offloaded store stages
    plan = _plan(tiny_sd, weights + 3 * 203 * row, keyframes=200, frames=1600)
    assert plan.store_on == "host" and plan.staging_bytes > 0 and plan.peak <= plan.budget


def test_too_small_a_budget_names_the_budget_that_fits(tiny_sd):
    with pytest.raises(ResourceError, match=r"--memory-budget to at least [0-9.]+GiB"):
        _plan(tiny_sd, 1000)
    with pytest.raises(ResourceError, match="--keyframe-window"):
        weights = memory.module_bytes(tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder)
        _plan(tiny_sd, weights + 2 * 2**20, keyframes=400, frames=3200)


def test_a_window_bounds_the_keyframe_pass(tiny_sd):
    full, windowed = _plan(tiny_sd, 2**40, keyframes=100, frames=800), _plan(tiny_sd, 2**40, keyframes=100,
                                                                               frames=800, window=4)
    assert windowed.keyframe_call == 4 and full.keyframe_call == 100
    assert windowed.peaks["keyframes"] < full.peaks["keyframes"]


def test_calibration_is_measured_once_then_cached(tiny_sd, tmp_path):
    first = memory.calibrate(tiny_sd, tmp_path)
    again = memory.calibrate(tiny_sd, tmp_path)
    assert first.source == "probe measured now" and again.source.startswith("cached")
    assert again.unet == pytest.approx(first.unet) and 0.5 < first.unet < 2.0, first
    assert 0.2 < first.vae < 5.0, first


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), TypeError("not JSON serializable")])
def test_a_calibration_write_that_fails_leaves_no_temp_file(tmp_path, monkeypatch, error):
    """The calibration table goes through io.outputs.atomic_file: when json.dump fails half-way the
    temp file is removed and the previous table is untouched (a full disk only costs a probe next
    time; any other error is raised)."""
    path = tmp_path / "memory-calibration.json"
    memory._write_json(path, {"old": {"unet": 1.0}})

    def dump(data, f, **kwargs):
        f.write('{"half": ')
        raise error

    monkeypatch.setattr(memory.json, "dump", dump)
    if isinstance(error, OSError):
        memory._write_json(path, {"new": {"unet": 2.0}})
    else:
        with pytest.raises(TypeError):
            memory._write_json(path, {"new": {"unet": 2.0}})
    assert [p.name for p in tmp_path.iterdir()] == ["memory-calibration.json"], "no temp file left"
    monkeypatch.undo()
    assert memory._read_json(path) == {"old": {"unet": 1.0}}


@pytest.mark.parametrize("chunk", [2, 5])
def test_predicted_propagation_activations_match_the_measured_ones(editor, tiny_sd, tmp_path, chunk):
    """The plan's rows x bytes-per-row against the live tensor bytes of a real propagation call
    (CPU: a dispatch-mode tracker; the CUDA version below uses max_memory_reserved)."""
    calibration = memory.calibrate(tiny_sd, tmp_path)
    latent = (12, 12)
    plan = _plan(tiny_sd, 2**40, latent_size=latent, calibration=calibration, chunk_frames=chunk)
    measured = _measure_propagation(editor, latent, chunk, tiny_sd.device)
    predicted = plan.peaks["propagate"] - plan.weights_bytes - plan.store_bytes - plan.latents_bytes
    assert 0.7 < measured / predicted < 1.3, (measured, predicted)


def _measure_propagation(editor, latent, chunk, device):
    from tokenflow.engine import KeyframeStore

    g = torch.Generator().manual_seed(0)
    h, w = latent
    texts = torch.randn(3, 77, editor.model.text_encoder.config.hidden_size, generator=g).to(device)
    store = KeyframeStore.for_unet(editor.model.unet, latent, 2)
    kf = StepState(PassKind.KEYFRAMES, 501, 2, store)
    editor.runner.three_branch(torch.randn(2, 4, h, w).to(device), torch.randn(2, 4, h, w).to(device), 501, texts, kf)
    pairs = torch.tensor([[0, 1]] * chunk, device=device)
    weights = torch.full((chunk, 2), 0.5, device=device)
    state = StepState(PassKind.PROPAGATE, 501, chunk, store, pairs=pairs, weights=weights)
    source, x = torch.randn(chunk, 4, h, w).to(device), torch.randn(chunk, 4, h, w).to(device)
    with torch.no_grad():
        return memory.measure_peak(lambda: editor.runner.three_branch(source, x, 501, texts, state), device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks the plan against CUDA's allocator (GPU only)")
def test_plan_predicts_cuda_peak_of_a_whole_edit(tmp_path, sample_clip):
    editor = Editor.from_pretrained("tiny", device="cuda", dtype="float16", use_cache=False)
    config = SMALL.replace(device="cuda", dtype="float16", attention_backend="auto", nearest_backend="auto",
                           cache_dir=str(tmp_path))
    torch.cuda.reset_peak_memory_stats()
    result = editor.edit(sample_clip, config=config)
    measured = torch.cuda.max_memory_reserved()   # the plan predicts torch's reserved memory on CUDA
    assert 0.5 < measured / result.plan.peak < 1.5, (measured, result.plan.describe())


def test_live_tensor_tracker_counts_what_is_alive():
    tracker = LiveTensorTracker()
    with tracker:
        a = torch.ones(1000)
        b = torch.ones(1000)
        del a
        c = torch.ones(500)
        del b, c
    assert tracker.peak == 8000 and tracker.live == 0


# --- placement and windows do not change the edit ----------------------------------------------

@pytest.mark.parametrize("store,latents", [("host", "host"), ("device", "disk"), ("host", "device")])
def test_store_and_latents_placement_do_not_change_the_edit(editor, inversion, base, store, latents):
    result = editor.edit(inversion, config=SMALL.replace(keyframe_store=store, inverted_latents=latents,
                                                         chunk_frames=4))
    assert _rel(result.latents, base.latents) < 1e-5


class _Recorder:
    """Wraps the runner to record (pass kind, frames per branch, keyframe offset) of every call."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def branches(self, source, xs, t, texts, state, **kwargs):
        self.calls.append((state.kind, source.shape[0], state.keyframe_offset, xs.shape[0]))
        return self.runner.branches(source, xs, t, texts, state, **kwargs)


def test_keyframe_window_runs_windows_and_is_chunk_invariant(editor, inversion, base):
    windowed = SMALL.replace(keyframe_window=2)  # 3 keyframes: windows (0,2),(2,3) then (0,1),(1,3)
    plain = editor.runner
    try:
        editor.runner = _Recorder(plain)
        a = editor.edit(inversion, config=windowed.replace(chunk_frames=6))
        calls = [c for c in editor.runner.calls if c[0] is PassKind.KEYFRAMES]
    finally:
        editor.runner = plain
    assert [(n, off) for _, n, off, _ in calls] == [(2, 0), (1, 2), (1, 0), (2, 1)]
    b = editor.edit(inversion, config=windowed.replace(chunk_frames=1))
    assert _rel(a.latents, b.latents) < 1e-5
    assert _rel(a.latents, base.latents) > 1e-4  # a window is a different (local) extended attention
    full = editor.edit(inversion, config=SMALL.replace(keyframe_window=3))
    assert _rel(full.latents, base.latents) < 1e-5


def test_several_prompts_share_the_source_branch_and_match_single_edits(editor, inversion, base):
    plain = editor.runner
    try:
        editor.runner = _Recorder(plain)
        both = editor.edit_many(inversion, ["glass", "marble statue"], config=SMALL)
        calls = editor.runner.calls
    finally:
        editor.runner = plain
    assert all(p == 2 for *_, p in calls)       # one call per pass for both prompts: B = 5 branches
    marble = editor.edit(inversion, config=SMALL.replace(prompt="marble statue"))
    assert [r.prompt for r in both] == ["glass", "marble statue"]
    assert _rel(both[0].latents, base.latents) < 1e-5
    assert _rel(both[1].latents, marble.latents) < 1e-5
    assert _rel(both[0].latents, both[1].latents) > 1e-3


def test_edit_refuses_several_prompts(editor, inversion):
    with pytest.raises(ConfigError, match="edit_many"):
        editor.edit(inversion, config=SMALL.replace(prompt=("a", "b")))
