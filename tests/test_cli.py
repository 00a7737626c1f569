"""The command line as a user runs it: end-to-end edits, the cache, JSON events, usage errors.

Bad and hostile inputs (videos, flags, config and job files, models, the environment) are one
corpus in tests/test_fault_corpus.py (table: docs/faults.md).
"""
import json
import os
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest

from tokenflow import __version__

from .conftest import SHARED_DATA
from .inprocess import run_tokenflow

FAST = ["--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--device", "cpu", "--keyframe-spacing", "4"]


def tokenflow_process(*args, cwd=None, env=None):
    """``python -m tokenflow ARGS`` in a fresh interpreter: the end-to-end edit and the doctor (whose
    checks read the environment at import: HF_HUB_CACHE, TRITON_INTERPRET)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tokenflow", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=600)


def tokenflow(*args, cwd=None, env=None):
    """The same command through tokenflow.app.cli.main in this process (tests/inprocess.py)."""
    return run_tokenflow(*args, cwd=cwd, env=env)


def frames_in(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0)), c.streams.video[0]


def test_version_and_help_explain_every_flag():
    assert tokenflow("--version").stdout.strip() == f"tokenflow {__version__}"
    help_text = tokenflow("edit", "--help").stdout
    for flag in ["--model", "--frames", "--size", "--inversion-steps", "--steps", "--keyframe-spacing", "--pnp-attn-t",
                 "--pnp-f-t", "--guidance-scale", "--seed", "--inversion-prompt", "--prompt", "--negative-prompt",
                 "--device", "--dtype", "--save-latents", "--output", "--start", "--stride", "--method",
                 "--propagation", "--config", "--quiet", "--log-json", "--save-frames", "--no-cache",
                 "--attention-backend", "--nearest-backend", "--chunk-frames", "--memory-budget", "--plan",
                 "--keyframe-window", "--keyframe-store", "--inverted-latents"]:
        assert flag in help_text, flag


def test_edit_end_to_end_with_cache_and_json_events(tmp_path, tiny_model_dir, sample_clip):
    out, lat = tmp_path / "out" / "edit.mp4", tmp_path / "lat.npy"
    run = tokenflow_process("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "glass", "--inversion-prompt", "shapes",
                    "--frames", "10", *FAST, "-o", out, "--save-latents", lat, "--save-frames", tmp_path / "png",
                    "--log-json")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    done = [e for e in events if e["event"] == "done"][0]
    assert done["frames"] == 10 and done["output"] == str(out) and done["tiny_model"]
    assert {"invert", "edit", "decode", "write"} <= set(done["stages"])
    n, stream = frames_in(out)
    assert n == 10 and stream.codec_context.name in ("h264", "mpeg4") and (stream.width, stream.height) == (64, 64)
    assert float(stream.average_rate) == pytest.approx(12, rel=0.01)
    latents = np.load(lat)
    assert latents.shape == (10, 4, 8, 8) and np.isfinite(latents).all()
    assert len(list((tmp_path / "png").glob("*.png"))) == 10
    # a second edit with another prompt reuses the inversion and gives the same latents for the same prompt
    again = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "glass", "--inversion-prompt",
                      "shapes", "--frames", "10", *FAST, "-o", out, "--save-latents", lat, "--log-json", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert any("reusing cached" in e.get("message", "") for e in map(json.loads, again.stdout.splitlines()))
    again_done = [e for e in map(json.loads, again.stdout.splitlines()) if e["event"] == "done"][0]
    assert "invert" not in again_done["stages"]
    assert np.array_equal(np.load(lat), latents)


def test_any_frame_count_no_truncation_and_sdedit_and_paper(tmp_path, tiny_model_dir, sample_clip):
    for extra in (["--method", "sdedit", "--start", "0.9"], ["--propagation", "paper"]):
        out = tmp_path / f"{extra[1]}.mp4"
        run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "glass", "--frames", "7", *FAST,
                        "-o", out, "-q", *extra)
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""  # quiet
        assert frames_in(out)[0] == 7  # 7 frames with spacing 4: a short last group, nothing dropped


def test_several_prompts_one_run_one_output_each(tmp_path, tiny_model_dir, sample_clip):
    out = tmp_path / "edit.mp4"
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "glass", "--prompt", "a marble statue",
                    "--frames", "5", *FAST, "-o", out, "--save-latents", tmp_path / "lat.npy", "--log-json")
    assert run.returncode == 0, run.stderr
    done = [e for e in map(json.loads, run.stdout.splitlines()) if e["event"] == "done"][0]
    expected = [str(tmp_path / "edit-1-glass.mp4"), str(tmp_path / "edit-2-a-marble-statue.mp4")]
    assert done["outputs"] == expected and done["prompts"] == ["glass", "a marble statue"]
    assert all(frames_in(p)[0] == 5 for p in expected)
    a, b = np.load(tmp_path / "lat-1-glass.npy"), np.load(tmp_path / "lat-2-a-marble-statue.npy")
    assert a.shape == b.shape == (5, 4, 8, 8) and not np.allclose(a, b)


def test_plan_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_model_dir, sample_clip):
    out = tmp_path / "edit.mp4"
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "glass", "--frames", "9", *FAST,
                    "--memory-budget", "2GiB", "--plan", "-o", out, env={"TOKENFLOW_CACHE": str(tmp_path / "c")})
    assert run.returncode == 0, run.stderr
    assert "budget 2.00 GiB (--memory-budget)" in run.stdout and "propagation:" in run.stdout
    assert "keyframe store" in run.stdout and "predicted peak" in run.stdout
    assert not out.exists() and not (tmp_path / "c" / "inversions").exists()


def test_invert_command_fills_the_cache(tmp_path, tiny_model_dir, sample_clip):
    env = {"TOKENFLOW_CACHE": str(tmp_path / "c")}
    run = tokenflow("invert", sample_clip, "--model", tiny_model_dir, "--frames", "4", "--inversion-steps", "10",
                    "--steps", "5", "--size", "64x64", "--device", "cpu", env=env)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "c" / "inversions").iterdir())) == 1


def test_original_config_file(tmp_path, tiny_model_dir, sample_clip):
    cfg = tmp_path / "config_pnp.yaml"
    cfg.write_text(f"data_path: '{sample_clip}'\nn_frames: 5\nn_inversion_steps: 10\nn_timesteps: 5\nbatch_size: 4\n"
                   f"prompt: 'glass'\nnegative_prompt: 'ugly'\npnp_attn_t: 0.5\npnp_f_t: 0.8\nseed: 1\n"
                   f"output_path: '{tmp_path / 'results'}'\nH: 64\nW: 64\n")
    run = tokenflow("edit", "--config", cfg, "--model", tiny_model_dir, "--device", "cpu", "-q")
    assert run.returncode == 0, run.stderr
    assert frames_in(tmp_path / "results" / "sample-pnp-glass.mp4")[0] == 5


@pytest.mark.skipif(not (SHARED_DATA / "wolf.mp4").exists(), reason="shared/data/wolf.mp4 not present")
def test_real_video(tmp_path, tiny_model_dir):
    out = tmp_path / "wolf.mp4"
    run = tokenflow("edit", SHARED_DATA / "wolf.mp4", "--model", tiny_model_dir, "--prompt", "a robotic wolf",
                    "--inversion-prompt", "a wolf", "--frames", "8", *FAST, "-o", out, "-q")
    assert run.returncode == 0, run.stderr
    n, stream = frames_in(out)
    assert n == 8 and float(stream.average_rate) == pytest.approx(20, rel=0.01)


def test_usage_errors_are_one_line(tmp_path, sample_clip):
    for args in (["edit", sample_clip, "--size", "12y"], ["edit", sample_clip, "--steps", "many"], ["frobnicate"]):
        run = tokenflow(*args)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("tokenflow: error:"), run.stderr


def test_frames_folder_with_foreign_files_fails_before_any_work(tmp_path, tiny_model_dir, sample_clip):
    png = tmp_path / "png"
    png.mkdir()
    (png / "notes.txt").write_text("mine")
    out = tmp_path / "o.mp4"
    run = tokenflow("edit", sample_clip, "--model", tiny_model_dir, "--prompt", "x", *FAST, "--save-frames", png,
                    "-o", out, "--log-json")
    assert run.returncode == 5 and "png" in run.stderr and not out.exists()
    assert '"stage_start"' not in run.stdout  # nothing ran


def fake_hub_snapshot(hub, repo, files):
    """A Hugging Face cache holding ``files`` of ``repo`` (its on-disk layout: refs/main -> snapshot)."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    for name in files:
        (folder / "snapshots" / ("0" * 40) / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / ("0" * 40) / name).write_text("{}")
    return folder / "snapshots" / ("0" * 40)


SD21_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
              "requires_safety_checker": False, "safety_checker": [None, None],
              "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"]}


def test_doctor_lists_every_op_and_backend_with_reasons(tmp_path):
    import torch

    from tokenflow.app.doctor import MODEL_FILES, model_cache
    from tokenflow.config import DEFAULT_MODEL

    # SD 2.1-base's own files: no text_encoder_2 or depth_estimator (those are other families')
    sd21 = [f for f in MODEL_FILES if f.split("/")[0] in ("model_index.json", "unet", "vae", "text_encoder")]
    snapshot = fake_hub_snapshot(tmp_path / "hub", DEFAULT_MODEL, sd21)
    (snapshot / "model_index.json").write_text(json.dumps(SD21_INDEX))
    cache = tmp_path / "tokenflow-cache"
    (cache / "onnx" / "plain-0123456789abcdef").mkdir(parents=True)
    (cache / "onnx" / "plain-0123456789abcdef" / "unet.onnx").write_bytes(b"x" * 1234)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "TOKENFLOW_CACHE": str(cache)}
    run = tokenflow_process("doctor", "--json", "--device", "cpu", env=env)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["environment"]["packages"]["torch"]
    setup = report["setup"]   # what a newcomer needs
    assert setup["model"] == {"model": DEFAULT_MODEL, "cached": True, "missing": [], "snapshot": str(snapshot),
                              "hub_cache": str(tmp_path / "hub")}
    assert setup["caches"]["root"] == str(cache) and setup["caches"]["total_bytes"] == 1234
    assert {k["kind"]: k["entries"] for k in setup["caches"]["kinds"]}["onnx"] == 1
    assert {"opencv", "matplotlib", "h264", "onnxruntime", "ray", "faiss", "xformers", "triton"} <= set(setup["extras"])
    assert setup["extras"]["h264"]["encoder"] and setup["extras"]["matplotlib"]["present"] in (True, False)
    vram = setup["memory"]["vram"]   # every CUDA device's free memory, whatever --device says
    assert setup["memory"]["ram_available_bytes"] > 0 and len(vram) == torch.cuda.device_count()
    assert all(0 < v["free_bytes"] <= v["total_bytes"] for v in vram)
    partial = model_cache(DEFAULT_MODEL, str(tmp_path / "hub-partial"))
    assert not partial["cached"] and partial["missing"] == sd21
    # an SDXL model needs its second text encoder too
    xl = fake_hub_snapshot(tmp_path / "hub-xl", "someone/xl", sd21)
    xl_index = {**SD21_INDEX, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (xl / "model_index.json").write_text(json.dumps(xl_index))
    assert model_cache("someone/xl", str(tmp_path / "hub-xl"))["missing"] == ["text_encoder_2/model.safetensors"]
    (tmp_path / "hub" / f"models--{DEFAULT_MODEL.replace('/', '--')}" / "snapshots" / ("0" * 40) /
     "unet" / "diffusion_pytorch_model.safetensors").unlink()
    partial = model_cache(DEFAULT_MODEL, str(tmp_path / "hub"))
    assert not partial["cached"] and partial["missing"] == ["unet/diffusion_pytorch_model.safetensors"]
    rows = {(r["op"], r["backend"]): r for r in report["backends"]}
    assert {op for op, _ in rows} == {"keyframe_attention", "cosine_nearest", "gather"}
    assert rows[("keyframe_attention", "torch")]["chosen"]
    for r in rows.values():  # every backend not chosen says why
        assert r["chosen"] or r["reasons"] or r["only_by_name"], r
    text = tokenflow_process("doctor", "--device", "cpu", env=env).stdout
    assert "keyframe_attention on cpu (float32)" in text and "CHOSEN" in text
    assert f"model: {DEFAULT_MODEL} is not in the Hugging Face cache" in text and "--model DIR" in text
    assert f"caches: {cache} (from $TOKENFLOW_CACHE), 1.23 kB in all" in text and "RAM available" in text
    assert "extras: opencv " in text and "h264 " in text


def test_doctor_check_runs_the_backends_against_the_reference():
    pytest.importorskip("triton")
    run = tokenflow_process("doctor", "--check", "--device", "cpu", "--json", env={"TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
    checks = json.loads(run.stdout)["checks"]
    assert {(c["op"], c["backend"]) for c in checks} >= {("keyframe_attention", "triton"), ("cosine_nearest", "triton"),
                                                         ("gather", "triton")}
    assert all(c["ok"] for c in checks)


@pytest.mark.parametrize("with_thread", [False, True])
def test_quick_exit_flushes_output_runs_exit_handlers_and_waits_for_threads(with_thread, tmp_path):
    """exit_now skips the interpreter's teardown but not what a program's end must still do."""
    marker = tmp_path / "thread-done"
    # The thread is alive when exit_now looks (it waits until exit_now has listed the threads), so
    # the outcome does not depend on how fast either runs; its 0.2 s of work after that only gives
    # an exit that does not wait (os._exit) the time to cut it off.
    code = textwrap.dedent(f"""
        import atexit, sys, threading, time
        from tokenflow.app.cli import exit_now
        atexit.register(lambda: print("handler ran", flush=True))
        if {with_thread}:
            listed, threads_listed = threading.enumerate, threading.Event()
            def enumerate_then_signal():
                threads = listed()
                threads_listed.set()
                return threads
            threading.enumerate = enumerate_then_signal
            def work():
                threads_listed.wait()
                time.sleep(0.2)
                open({str(marker)!r}, "w").write("done")
            threading.Thread(target=work).start()
        print("buffered", end="")
        sys.stderr.write("err-buffered")
        exit_now(3)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert done.stdout == "bufferedhandler ran\n" and done.stderr == "err-buffered"
    assert marker.exists() == with_thread
