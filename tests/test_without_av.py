"""PyAV (and diffusers) are imported only where they are used (issue 18, item 11).

Each case runs a fresh interpreter whose prelude makes ``import av`` fail (``sys.modules["av"] =
None``, what Python does for a module that cannot be imported), as on a GPU image without the
wheel: ``tokenflow doctor``, ``tokenflow bench`` on a synthetic clip, the kernels and the sample
module work; reading or writing a video says, in one line, what to install.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_AV = "import sys; sys.modules['av'] = None\n"
NO_DIFFUSERS = "sys.modules['diffusers'] = None\n"


def _python(code: str, tmp_path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENFLOW_CACHE": str(tmp_path / "cache")}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=timeout)


def test_kernels_and_samples_import_without_av_and_diffusers(tmp_path):
    done = _python(NO_AV + NO_DIFFUSERS + (
        "import torch\n"
        "import tokenflow.kernels, tokenflow.kernels.probe, tokenflow.kernels.verify, tokenflow.io.samples\n"
        "from tokenflow.kernels.keyframe_attention import keyframe_attention\n"
        "from tokenflow.kernels.nearest import cosine_nearest\n"
        "x = torch.randn(2, 2, 5, 8)\n"
        "assert keyframe_attention(x, x, x, 2).shape == x.shape\n"
        "assert cosine_nearest(x[0], x[1], torch.zeros(2, 1, dtype=torch.long)).shape == (2, 1, 5)\n"
        "assert tokenflow.io.samples.render_frames(2, (32, 32), 0).shape == (2, 32, 32, 3)\n"
        "print('ok')\n"), tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_doctor_runs_without_av_and_says_what_to_install(tmp_path):
    done = _python(NO_AV + "from tokenflow.app.cli import main\nsys.exit(main(['doctor']))\n", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "PyAV is missing" in done.stdout and "pip install 'av>=12'" in done.stdout


def test_bench_on_a_synthetic_clip_runs_without_av(tmp_path):
    out = tmp_path / "bench.json"
    done = _python(NO_AV + "from tokenflow.app.cli import main\nsys.exit(main(%r))\n" % [
        "bench", "--preset", "smoke", "--frames", "4", "--inversion-steps", "2", "--steps", "2",
        "--keyframe-spacing", "2", "--idle-wait", "0", "--threads", "1", "--repeats", "1", "--json", str(out)],
        tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text())["variants"], out.read_text()[:500]


def test_reading_a_video_without_av_is_one_line_naming_the_install(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 64)
    done = _python(NO_AV + (
        "from tokenflow.errors import ConfigError\n"
        "from tokenflow.io.read import probe, read_video\n"
        "for read in (read_video, probe):\n"
        "    try:\n"
        "        read('clip.mp4')\n"
        "    except ConfigError as error:\n"
        "        print(error)\n"), tmp_path)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 2, (done.stdout, done.stderr)
    for line in lines:
        assert "reading the video 'clip.mp4' needs PyAV" in line and line.endswith("pip install 'av>=12'"), line

    # the CLI: one `tokenflow: error:` line, a config exit code, no output
    done = _python(NO_AV + "from tokenflow.app.cli import main\nsys.exit(main(%r))\n" % [
        "edit", str(video), "--prompt", "a cat", "--model", "tiny", "-o", str(tmp_path / "out.mp4")], tmp_path)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("tokenflow: error:")]
    assert len(errors) == 1 and "needs PyAV" in errors[0] and "pip install 'av>=12'" in errors[0], done.stderr
    assert not (tmp_path / "out.mp4").exists()
