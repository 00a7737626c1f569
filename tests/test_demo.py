"""``./run.sh demo`` (tokenflow/app/demo.py): the model it takes, the settings it picks for the device,
the offline fallback. No network: an empty Hugging Face cache, offline or pointed at a closed port."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"
SMALL = "--preset fast --size 256x256 --frames 16"


def env_for(tmp_path, offline=True, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENFLOW_MODEL", "HF_HUB_OFFLINE")}
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    env.update({"HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"), "HF_ENDPOINT": CLOSED, "HTTP_PROXY": CLOSED,
                "HTTPS_PROXY": CLOSED, "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2",
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])})
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def demo(tmp_path, *args, env):
    return subprocess.run([sys.executable, "-m", "tokenflow.app.demo", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


def command_line(done) -> str:
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("demo: tokenflow edit ")]
    return line


def test_offline_without_the_model_falls_back_to_tiny_and_says_how_to_get_it(tmp_path):
    done = demo(tmp_path, "--dry-run", env=env_for(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "--preset tiny --model tiny" in command_line(done)
    assert "NOT a real edit" in done.stderr
    assert "hf download stabilityai/stable-diffusion-2-1-base --local-dir DIR" in done.stderr
    assert "TOKENFLOW_MODEL=DIR" in done.stderr
    assert not (tmp_path / "tokenflow-results").exists()   # a dry run writes nothing


@pytest.mark.parametrize("flags, expected", [((), SMALL), (("--device", "cpu"), SMALL), (("--device", "mps"), SMALL),
                                             (("--device", "cuda"), "")])
def test_a_real_model_gets_settings_for_the_device(tmp_path, flags, expected):
    """Online (a dry run fetches nothing): the real model, small and fast on a CPU, the defaults on a GPU."""
    done = demo(tmp_path, "--dry-run", *flags, env=env_for(tmp_path, offline=False))
    assert done.returncode == 0, done.stderr
    line = command_line(done)
    assert line.startswith(f"demo: tokenflow edit tokenflow-results/sample.mp4 {expected}".rstrip() + " --model "
                           "stabilityai/stable-diffusion-2-1-base --prompt")
    assert "would be downloaded now" in done.stderr
    assert ("about 22 minutes on a 2-core CPU" in done.stderr) == bool(expected)
    assert line.endswith(" ".join(flags))   # the user's flags come last: they win


def test_a_user_model_folder_is_used_as_given(tmp_path, tiny_model_dir):
    done = demo(tmp_path, "--dry-run", "--device", "cuda", env=env_for(tmp_path, TOKENFLOW_MODEL=str(tiny_model_dir)))
    assert done.returncode == 0, done.stderr
    assert f"--preset tiny --model {tiny_model_dir} " in command_line(done)   # a tiny folder: the tiny settings


def test_a_user_model_that_cannot_load_falls_back_to_tiny(tmp_path):
    done = demo(tmp_path, "--dry-run", env=env_for(tmp_path, TOKENFLOW_MODEL=str(tmp_path / "missing")))
    assert done.returncode == 0, done.stderr
    assert "cannot be loaded (model folder" in done.stderr
    assert "--preset tiny --model tiny" in command_line(done)


def test_a_failed_download_falls_back_to_tiny(tmp_path, sample_clip):
    """Online but the Hub unreachable (a closed port): the download is tried, then the tiny model;
    ``--plan`` (passed on to tokenflow edit) keeps the edit short."""
    done = demo(tmp_path, "--plan", env=env_for(tmp_path, offline=False))
    assert done.returncode == 0, done.stderr
    assert "demo: downloading stabilityai/stable-diffusion-2-1-base" in done.stderr
    assert "could not download" in done.stderr and "--preset tiny --model tiny" in command_line(done)
    assert "memory plan" in done.stdout


def test_offline_demo_edits_the_sample_with_the_tiny_model(tmp_path):
    # flags after demo win: fewer steps and a smaller size keep this test short
    done = demo(tmp_path, "--quiet", "--inversion-steps", "10", "--steps", "5", "--size", "64x64", env=env_for(tmp_path))
    assert done.returncode == 0, done.stderr
    results = tmp_path / "tokenflow-results"
    assert (results / "sample-edit.mp4").stat().st_size > 0
    assert (results / "sample-report" / "index.html").exists()


def test_device_auto_means_the_best_available_and_both_hints_name_one_command():
    from tokenflow.app import demo
    from tokenflow.device import default_device
    from tokenflow.models import load

    assert demo.device_kind(["--device", "auto"]) == demo.device_kind([]) == default_device().type
    assert demo.device_kind(["--device", "cuda:1"]) == "cuda"
    assert demo.download_command("o/m") == load.download_command("o/m")


def test_the_download_shows_progress_bars_and_fetches_only_what_tokenflow_loads(monkeypatch):
    """The 5 GB download shows huggingface_hub's progress bars on stderr (even where something had
    switched them off), unless the user set HF_HUB_DISABLE_PROGRESS_BARS; only HUB_ALLOW_PATTERNS."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from tokenflow.app import demo as demo_module
    from tokenflow.models.load import HUB_ALLOW_PATTERNS

    was_disabled, seen = are_progress_bars_disabled(), []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: seen.append(
        (repo, kw, are_progress_bars_disabled())) or "/somewhere")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    disable_progress_bars()
    assert demo_module.download("some/model") == "/somewhere"
    assert seen == [("some/model", {"allow_patterns": HUB_ALLOW_PATTERNS}, False)]
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # the user's choice is kept
    disable_progress_bars()
    demo_module.download("some/model")
    assert seen[-1][2] is True
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    (disable_progress_bars if was_disabled else enable_progress_bars)()   # as the other tests found it
    run_sh = (ROOT / "run.sh").read_text()   # nothing sends the demo's output to /dev/null
    assert "tokenflow.app.demo" in run_sh and "/dev/null" not in run_sh.split("demo() {")[1].split("}")[0]
