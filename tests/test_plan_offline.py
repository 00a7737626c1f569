"""``tokenflow edit --plan`` of a named SD version whose weights are not on this machine: planned from
the architecture alone (``tokenflow.models.architectures``), offline, nothing downloaded."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tokenflow.engine import memory
from tokenflow.models.architectures import architecture_of, meta_model

# the released models' parameter counts (UNet, VAE, text encoder)
RELEASED = {"sd15": (859_520_964, 83_653_863, 123_060_480), "sd21": (865_910_724, 83_653_863, 340_387_840)}


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    from tokenflow.io.samples import make_sample_clip

    return make_sample_clip(str(tmp_path_factory.mktemp("clips") / "clip.mp4"), n_frames=200, size=(64, 64), fps=12)


def offline_env(tmp_path) -> dict:
    """An empty Hugging Face cache, offline, and any network attempt pointed at a closed port."""
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    closed = "http://127.0.0.1:9"
    return {**os.environ, "HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"), "HF_HUB_OFFLINE": "1",
            "HF_ENDPOINT": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "ALL_PROXY": closed,
            "TOKENFLOW_CACHE": str(tmp_path / "tf-cache")}


def plan(tmp_path, clip, *args, env=None):
    return subprocess.run([sys.executable, "-m", "tokenflow", "edit", str(clip), "--plan", *map(str, args)],
                          capture_output=True, text=True, env=env or offline_env(tmp_path), cwd=tmp_path, timeout=600)


def files_under(folder):
    return [p for p in folder.rglob("*") if p.is_file()]


def test_plan_of_sd21_without_weights_is_made_from_its_architecture(tmp_path, long_clip):
    # a budget this machine's RAM can hold even when busy: on CPU the host check counts the plan's calls
    done = plan(tmp_path, long_clip, "--model", "2.1", "--frames", "200", "--size", "256x256", "--memory-budget", "8GB",
                "--device", "cpu")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "memory plan on cpu (float32)" in out
    assert "made from the architecture of SD 2.1-base (its weights are not on this machine)" in out
    assert "200 frames" in out
    assert "uncalibrated: the analytic sizes x 1.0" in out
    weights = sum(RELEASED["sd21"]) * 4 / 2**30
    assert f"weights {weights:.2f} GiB" in out
    assert files_under(tmp_path / "hf") == []   # nothing downloaded, not even a config


def test_plan_of_sd15_by_hub_id_json_event(tmp_path, sample_clip):
    done = plan(tmp_path, sample_clip, "--model", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--device", "cpu",
                "--dtype", "bfloat16", "--log-json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    (event,) = [e for e in events if e.get("event") == "plan"]
    assert event["made_from"] == "the architecture of SD 1.5 (its weights are not on this machine)"
    assert event["weights_bytes"] == sum(RELEASED["sd15"]) * 2 + 77 * 8   # + CLIP's int64 position ids
    assert event["calibration"].startswith("uncalibrated")
    assert 0 < event["host"]["held"] < event["weights_bytes"]   # the decoded frames only: no weights are loaded


def test_unknown_model_without_weights_still_says_how_to_download(tmp_path, sample_clip):
    done = plan(tmp_path, sample_clip, "--model", "someone/not-a-cached-model", "--device", "cpu")
    assert done.returncode != 0
    assert "memory plan" not in done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tokenflow: error: could not load model 'someone/not-a-cached-model'")
    assert "download" in line and "--model tiny" in line


def test_named_version_in_the_hf_cache_is_planned_from_its_weights(tmp_path, sample_clip, tiny_model_dir):
    """Weights on disk: the plan loads them (here the tiny model's files stand in for SD 2.1's)."""
    env = offline_env(tmp_path)
    repo = tmp_path / "hf" / "hub" / "models--stabilityai--stable-diffusion-2-1-base"
    commit = "0" * 40
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    done = plan(tmp_path, sample_clip, "--model", "2.1", "--device", "cpu", env=env)
    assert done.returncode == 0, done.stderr
    assert "memory plan on cpu" in done.stdout
    assert "made from" not in done.stdout


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_meta_models_have_the_released_parameter_counts(arch):
    model = meta_model(arch, arch, torch.device("cpu"), torch.float16)
    counts = tuple(sum(p.numel() for p in m.parameters()) for m in (model.unet, model.vae, model.text_encoder))
    assert counts == RELEASED[arch]
    assert all(p.is_meta for p in model.unet.parameters())


def test_named_versions():
    assert architecture_of("2.1") == ("sd21", "SD 2.1-base")
    assert architecture_of("stabilityai/stable-diffusion-2-base") == ("sd21", "SD 2.0-base")
    assert architecture_of("1.5")[0] == "sd15"
    assert architecture_of("tiny") is None and architecture_of("./my-model") is None


def test_a_cached_probe_of_the_architecture_is_used(tmp_path):
    model = meta_model("sd21", "SD 2.1-base", torch.device("cpu"), torch.float32)
    assert memory.calibrate(model, tmp_path).source.startswith("uncalibrated")
    key = memory.calibration_key(model, torch.device("cpu"))
    (tmp_path / "memory-calibration.json").write_text(json.dumps({key: {"unet": 1.3, "vae": 0.7, "unet_fixed": 5}}))
    calibration = memory.calibrate(model, tmp_path)
    assert (calibration.unet, calibration.vae, calibration.unet_fixed) == (1.3, 0.7, 5)
    assert calibration.source.startswith("cached probe")
