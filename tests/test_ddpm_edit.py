"""TokenFlow edits with ``--inversion ddpm`` (tiny model, CPU, float32): the editor's DDPM inversion
is ``method.ddpm``'s (batched across timesteps or not), edits do not depend on chunking, windows
or the number of prompts, Inversions and the cache keep their noise maps, the CLI runs it end to
end and says so, and a killed run resumes bit-identically (edit and inversion)."""
import dataclasses
import signal

import numpy as np
import pytest
import torch

from tokenflow.app.cli import main
from tokenflow.config import EditConfig
from tokenflow.errors import ConfigError
from tokenflow.method.ddpm import DDPMSchedule, ddpm_invert
from tokenflow.method.editor import Editor
from tokenflow.method.schedule import make_scheduler
from tokenflow.models.load import encode_prompt

from .test_checkpoint import assert_same_as, edit_args, resumed_at, run, run_signalled, state_files, video_frames

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny-model calls: see tests/conftest.py

DDPM = dict(inversion="ddpm", inversion_prompt="shapes", steps=5, inversion_steps=1,   # unused by ddpm
            size=(64, 64), frames=6, keyframe_spacing=3,
            device="cpu", seed=4)


@pytest.fixture(scope="module")
def editor(tiny_model_dir, tmp_path_factory):
    return Editor.from_pretrained(str(tiny_model_dir), device="cpu", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def clip(editor, sample_clip):
    return editor.load_clip(str(sample_clip), EditConfig(**DDPM))


def test_the_editors_inversion_is_the_methods_batched_or_not(editor, clip):
    """The editor's noisy latents and noise maps equal ddpm_invert's over the plain UNet; batching
    rows across timesteps (any rows per call) changes nothing beyond float rounding."""
    config = EditConfig(**DDPM, use_cache=False)
    found = {rows: editor._invert(clip, config.replace(inversion_batch_size=rows), editor._plan(
        clip, config.replace(inversion_batch_size=rows)), conditions=editor.conditions(clip, config))
        for rows in (1, 4, 30)}
    scheduler = make_scheduler(editor.model.scheduler_config, 5)
    sched = DDPMSchedule.of(scheduler, [int(t) for t in scheduler.timesteps], 1.0)
    text = encode_prompt(editor.model, "shapes", (64, 64))
    z0 = found[1].z0

    def eps_fn(x, t, frames):
        t = torch.tensor(t) if isinstance(t, int) else t
        return editor.model.unet(x, t, encoder_hidden_states=text.expand(x.shape[0], -1, -1)).sample.float()

    with torch.no_grad():
        latents, noise = ddpm_invert(eps_fn, z0, sched, sched.timesteps, seed=4, rows_per_call=6,
                                     across_timesteps=False)
    for inv in found.values():
        assert not inv.from_cache   # use_cache=False: each rows value inverts (not the first one's entry)
        assert inv.inversion == "ddpm" and set(inv.latents) == set(inv.noise) == set(sched.timesteps)
        for t in sched.timesteps:
            assert torch.equal(inv.latents[t], latents[t])   # drawn from the seed alone
            assert torch.allclose(inv.noise[t], noise[t], atol=1e-4), (t, (inv.noise[t] - noise[t]).abs().max())


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_chunks_windows_and_prompts_do_not_change_the_edit(editor, clip):
    config = EditConfig(**DDPM, prompt="glass", use_cache=False)
    base = editor.edit(clip, config=config).latents
    chunked = editor.edit(clip, config=config.replace(chunk_frames=1)).latents
    both = editor.edit_many(clip, ["glass", "wood"], config=config)
    assert _rel(chunked, base) < 1e-5   # relative L2, as tests/test_engine.py: float32 rounding
    # windows of keyframes change which keyframes attend together (docs/memory.md), not the sampler
    windowed = editor.edit(clip, config=config.replace(keyframe_window=1, chunk_frames=2)).latents
    assert torch.isfinite(windowed).all() and _rel(windowed, base) > 1e-4
    assert _rel(both[0].latents, base) < 1e-5 and _rel(both[1].latents, base) > 1e-3
    # not the DDIM edit, and another noise seed is another edit (the keyframe draws aside)
    ddim = editor.edit(clip, config=config.replace(inversion="ddim", inversion_steps=5)).latents
    assert _rel(ddim, base) > 1e-2
    skipped = editor.edit(clip, config=config.replace(skip=2))
    assert skipped.timesteps == [int(t) for t in make_scheduler(editor.model.scheduler_config, 5).timesteps][2:]


def test_the_edit_samples_with_the_inversions_noise_maps(editor, clip):
    """Each edit step is mu_t + sigma_t z_t with the stored z_t: other noise maps give another edit,
    scaled ones in proportion to sigma_t (a DDIM step, which has no z_t, would ignore both)."""
    config = EditConfig(**DDPM, prompt="glass", use_cache=False)
    inv = editor.invert(clip, config=config)
    base = editor.edit(inv, config=config).latents
    again = editor.edit(inv, config=config).latents
    assert torch.equal(base, again)
    zeroed = dataclasses.replace(inv, noise={t: torch.zeros_like(v) for t, v in inv.noise.items()})
    assert _rel(editor.edit(zeroed, config=config).latents, base) > 1e-2
    # the last step alone: only its z_t differs, so the final latents move by exactly sigma_t * dz
    last = min(inv.noise)   # the final step
    bump = torch.randn(inv.noise[last].shape, generator=torch.Generator().manual_seed(1))
    moved = dataclasses.replace(inv, noise={t: v + bump if t == last else v for t, v in inv.noise.items()})
    sigma = DDPMSchedule.of(make_scheduler(editor.model.scheduler_config, 5), sorted(inv.noise, reverse=True),
                            1.0).coefficients([last], "cpu")[0, 4].item()
    shift = editor.edit(moved, config=config).latents - base
    assert sigma > 0 and torch.allclose(shift, sigma * bump.expand_as(shift), atol=1e-4), (shift - sigma * bump).abs().max()


def test_inversions_and_the_cache_keep_the_noise_maps(editor, clip):
    config = EditConfig(**DDPM).replace(seed=11)   # an entry no other test of the module's editor made
    inv = editor.invert(clip, config=config)
    again = editor.invert(clip, config=config)
    assert not inv.from_cache and again.from_cache
    assert all(torch.equal(inv.noise[t], again.noise[t]) and torch.equal(inv.latents[t], again.latents[t])
               for t in inv.latents)
    assert not editor.invert(clip, config=config.replace(seed=12)).from_cache   # the seed draws the noise
    assert not editor.invert(clip, config=config.replace(eta=0.5)).from_cache
    direct = editor.edit(clip, config=config.replace(prompt="glass")).latents
    assert torch.equal(editor.edit(inv, config=config.replace(prompt="glass")).latents, direct)
    assert editor.edit(inv, "glass", skip=3).timesteps == editor.edit(clip, config=config.replace(
        prompt="glass", skip=3)).timesteps
    with pytest.raises(ConfigError, match="DDPM one made for steps=5"):
        editor.edit(inv, "glass", steps=10)
    with pytest.raises(ConfigError, match="inversion='ddim', but the given Inversion"):
        editor.edit(inv, "glass", inversion="ddim")


def test_cli_edit_with_ddpm_inversion_says_so(tmp_path, tiny_model_dir, sample_clip, capsys):
    out = tmp_path / "edit.mp4"
    args = ["edit", str(sample_clip), "--model", str(tiny_model_dir), "--inversion", "ddpm", "--steps", "4",
            "--skip", "1", "--eta", "0.8", "--size", "64x64", "--frames", "5", "--prompt", "glass",
            "--cache-dir", str(tmp_path / "cache"), "-o", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert out.stat().st_size > 0
    assert "inversion: edit-friendly DDPM at the edit's 4 timesteps (eta 0.8, noise seed 1, skip 1" in err
    assert "batching frames and timesteps together" in err
    for bad, needle in ((["--skip", "1"], "skip: applies to the DDPM inversion"),
                        (["--inversion", "ddpm", "--skip", "4", "--steps", "4"], "skip: 4 skips"),
                        (["--eta", "0"], "eta: must be")):
        code = main(["edit", str(sample_clip), "--model", str(tiny_model_dir), "--prompt", "x",
                     "-o", str(tmp_path / "bad.mp4"), *bad])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
        assert not (tmp_path / "bad.mp4").exists()


DDPM_FLAGS = ("--inversion", "ddpm", "--inversion-batch-size", "4", "--keyframe-window", "1", "--chunk-frames", "2")


@pytest.fixture(scope="module")
def ddpm_reference(tmp_path_factory, tiny_model_dir, sample_clip):
    out = tmp_path_factory.mktemp("ddpm-reference")
    code, _, err = run(edit_args(sample_clip, tiny_model_dir, out, "--no-cache", *DDPM_FLAGS))
    assert code == 0, err
    return {"latents": np.load(out / "latents.npy"), "frames": video_frames(out / "edit.mp4")}


@pytest.mark.parametrize("phase,step", [("edit", 3), ("invert", 4)])
def test_sigkill_then_resume_is_bit_identical(phase, step, tmp_path, ddpm_reference, tiny_model_dir, sample_clip):
    """6 frames x 6 timesteps in calls of 4 rows: 9 inversion calls; killed in call or edit step ``step``;
    keyframe windows of 1 and propagation chunks of 2 frames (the checkpoint keeps both)."""
    out, folder = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    args = edit_args(sample_clip, tiny_model_dir, out, "--no-cache", "--checkpoint-dir", folder,
                     "--checkpoint-every", "1", *DDPM_FLAGS)
    code, _, _ = run_signalled(["progress", phase, step], signal.SIGKILL, args)
    assert code == -signal.SIGKILL
    assert state_files(folder) == (["edit.pt", "inversion.pt"] if phase == "edit" else ["inversion.pt"])
    code, events, err = run(args + ["--resume"])
    assert code == 0, err
    assert step <= resumed_at(events, "edit" if phase == "edit" else "inversion") <= step + 1
    assert_same_as(ddpm_reference, out)
    assert state_files(folder) == []


def test_gpu_check_dry_run_of_the_inversion_stage(tmp_path):
    """The opt-in GPU stage 9 (DDIM 500 + 50 against DDPM at 50, SD 2.1 512^2 on the GPU) on the CPU."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_CHECK_INJECT_NAN")}
    env.update(HF_HUB_OFFLINE="1", TOKENFLOW_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py"), "--dry-run", "--stages", "9",
                           "--deadline", "200", "--out", str(tmp_path / "out")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check_summary.json").read_text())
    stage = summary["stages"]["inversion"]
    assert stage["status"] == "PASS" and stage["measured"]["ddim500_over_ddpm50_total"] > 0
    assert stage["details"]["ddim4"]["inversion_steps"] == 4 and stage["details"]["ddpm2"]["finite"]
    keys = [t["key"] for t in summary["targets"]]   # opt-in stages not chosen (8, sdxl) get no row
    assert keys[-1] == "ddim500_over_ddpm50_total" and not any(k.startswith("sdxl") for k in keys)


def test_graph_backends_invert_one_timestep_per_call_and_agree(tiny_model_dir, sample_clip, monkeypatch):
    """``--backend compile`` (dynamo's graph, ``aot_eager``: no code generation) takes one timestep per
    call: the inversion groups rows by timestep, says so, and gives eager's noise maps."""
    monkeypatch.setenv("TOKENFLOW_COMPILER", "aot_eager")
    editor = Editor.from_pretrained(str(tiny_model_dir), device="cpu", use_cache=False)
    infos = []
    editor.reporter.info = infos.append
    config = EditConfig(**DDPM, use_cache=False).replace(inversion_batch_size=4)
    clip = editor.load_clip(str(sample_clip), config)
    try:
        eager = editor.invert(clip, config=config)
        graph = editor.invert(clip, config=config.replace(backend="compile"))
    finally:
        editor.tokenflow.remove()
    said = [m for m in infos if m.startswith("inversion: edit-friendly DDPM")]
    assert "frames and timesteps together" in said[0] and "backend compile's graphs take one timestep" in said[1]
    assert "8 UNet calls" in said[0] and "10 UNet calls" in said[1]   # 30 rows by 4 / 5 timesteps x (4 + 2)
    for t in eager.noise:
        assert torch.allclose(graph.noise[t], eager.noise[t], atol=1e-4), t


def test_the_plan_sizes_ddpm_inversion_calls_in_rows_beyond_the_frames(editor, clip):
    """Eager DDPM inversions batch (timestep, frame) rows: the plan may give a call more rows than
    the clip has frames (here all 6 x 5); DDIM's and a graph backend's calls stay within the frames."""
    config = EditConfig(**DDPM, use_cache=False)
    assert editor._plan(clip, config).inversion_frames == 30
    assert editor._plan(clip, config.replace(backend="compile")).inversion_frames <= 6
    assert editor._plan(clip, config.replace(inversion="ddim", inversion_steps=5)).inversion_frames <= 6
    assert "5 noisy latents and 5 noise maps" in editor._plan(clip, config).describe()
    assert "inversion:     30 rows (a frame at a timestep) per call" in editor._plan(clip, config).describe()
    assert "frames per call" in editor._plan(clip, config.replace(backend="compile")).describe().split("inversion:")[1]
    with pytest.raises(ConfigError, match="skip: 5 skips every timestep this sdedit edit"):
        editor.edit(clip, config=config.replace(prompt="x", method="sdedit", sdedit_start=0.6, steps=8, skip=5))


def test_sdedit_with_the_ddpm_inversion_and_who_batches_across_timesteps(editor, clip):
    from tokenflow.method.editor import _ddpm_across_timesteps

    config = EditConfig(**DDPM, prompt="glass", use_cache=False).replace(method="sdedit", sdedit_start=0.6, steps=8)
    result = editor.edit(clip, config=config)
    full = [int(t) for t in make_scheduler(editor.model.scheduler_config, 8).timesteps]
    assert result.timesteps == full[-3:] and torch.isfinite(result.latents).all()   # int(1 - 0.6 * 8) = -3
    assert _ddpm_across_timesteps(config, None)
    assert not _ddpm_across_timesteps(config.replace(backend="onnx"), None)
    controlled = config.replace(controlnet="lllyasviel/sd-controlnet-canny", control="canny")
    assert _ddpm_across_timesteps(controlled, None)   # ControlNets on the edit only: the inversion batches
    assert not _ddpm_across_timesteps(controlled.replace(control_during_inversion=True), None)
