"""The original implementation's own config files load, as its users cloned them.

tests/data/upstream_configs holds every version of omerbt/TokenFlow's ``configs/*.yaml`` (master and
every pull request, e.g. PR #24's DDPM-inversion fork with ``skip_steps``) and ``keys.json``, every
key any version of its scripts reads; ``scripts/collect_upstream_configs.py`` wrote them from a clone
(README.md there: provenance). Each file is read through the CLI's config path, unchanged, from a
folder where its relative ``data_path`` is a folder of frames named as the original's preprocess.py
writes them (00000.png, ...; or .jpg).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenflow.app.cli import build_parser, main
from tokenflow.app.flags import config_from_args
from tokenflow.config import SD_VERSIONS, from_mapping
from tokenflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT / "tests" / "data" / "upstream_configs"
FILES = sorted(UPSTREAM.glob("*.yaml"))
SD21 = SD_VERSIONS["2.1"]
ROBOT_WOLF = "a shiny silver robotic wolf"
VENUS = "a marble sculpture of a woman running, Venus de Milo"
DEFAULT_NEGATIVE = "ugly, blurry, low res, unrealistic, unaesthetic"

# what each file means here: (field, value) as config_from_args maps it; "ignored": the info line's keys
EXPECTED = {
    "787a86c-config_pnp.yaml": dict(  # master since the code's release
        video="data/woman-running", frames=40, inversion_steps=500, steps=50, keyframe_spacing=8, model=SD21,
        method="pnp", seed=1, device="cuda", output="tokenflow-results/", cache_dir="latents", guidance_scale=7.5,
        prompt=VENUS, negative_prompt=DEFAULT_NEGATIVE, pnp_attn_t=0.5, pnp_f_t=0.8, ignored=[]),
    "787a86c-config_sdedit.yaml": dict(
        video="wolf-part", frames=40, inversion_steps=100, steps=50, keyframe_spacing=8, model=SD21,
        method="sdedit", sdedit_start=0.9, use_ddim_noise=True, prompt=ROBOT_WOLF, cache_dir="latents", ignored=[]),
    "42156af-config_pnp.yaml": dict(   # PR #24, DDPM inversion
        video="data/woman-running", frames=40, inversion_steps=50, steps=50, keyframe_spacing=8, model=SD21,
        method="pnp", negative_prompt="", prompt=VENUS, ignored=["skip_steps"]),
    "42156af-config_sdedit.yaml": dict(
        video="wolf-part", inversion_steps=100, steps=50, method="sdedit", sdedit_start=0.9, use_ddim_noise=True,
        prompt=ROBOT_WOLF, ignored=["skip_steps"]),
}

# every key of keys.json: a value a version of the original gives it (accepted), or why it is no key
EXAMPLES = {
    "H": 384, "W": 672, "batch_size": 8, "cache_dir": "model_cache", "data_path": "data/wolf", "device": "cuda",
    "inversion": "ddim", "inversion_prompt": "a wolf", "latents_path": "latents", "local_files_only": False,
    "n_frames": 40, "n_inversion_steps": 500, "n_timesteps": 50, "negative_prompt": "", "output_path": "out",
    "pnp_attn_t": 0.5, "pnp_f_t": 0.8, "prompt": "a wolf", "reconstruct": False, "save_dir": "latents",
    "save_steps": 50, "sd_version": "2.1", "seed": 1, "skip_steps": 5, "start": 0.9, "steps": 50,
    "use_ddim_noise": True, "guidance_scale": 7.5,
}
NOT_KEYS = {"config_path": "the run scripts' flag naming the YAML file itself"}


def test_every_upstream_config_version_is_here():
    assert [p.name for p in FILES] == sorted(EXPECTED)
    readme = (UPSTREAM / "README.md").read_text()
    assert "Copyright (c) 2023 Michal Geyer, Omer Bar-Tal, Shai Bagon, Tali Dekel" in readme
    assert all(name in readme for name in EXPECTED)


def frame_folder(folder: Path, n: int, suffix: str) -> Path:
    """``n`` frames named as the original's preprocess.py writes them: 00000.png, 00001.png, ..."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(folder / f"{i:05d}{suffix}")
    return folder


@pytest.fixture
def upstream_data(tmp_path, monkeypatch):
    """A working folder where each file's relative data_path is a folder of frames (as upstream)."""
    frame_folder(tmp_path / "data" / "woman-running", 5, ".png")
    frame_folder(tmp_path / "wolf-part", 5, ".jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_config(*argv):
    """The config `tokenflow edit ARGV` runs with, and the info lines its --config gave."""
    notes = []
    return config_from_args(build_parser().parse_args(["edit", *map(str, argv)]), note=notes.append), notes


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_each_upstream_config_maps_to_its_meaning(path, upstream_data):
    from tokenflow.app.jobs import check_model_and_steps
    from tokenflow.io.read import read_video

    config, notes = cli_config("--config", path)
    expected = dict(EXPECTED[path.name])
    ignored = expected.pop("ignored")
    assert {name: getattr(config, name) for name in expected} == expected
    assert len(notes) == (1 if ignored else 0)
    for key in ignored:
        assert key in notes[0] and "changes nothing here" in notes[0] and "DDIM" in notes[0]
    runnable = config.replace(device="cpu")   # the files say cuda
    runnable.validate()
    check_model_and_steps(runnable)   # the steps fit the inversion, before any model loads
    clip = read_video(runnable.video, frames=runnable.frames, size=(64, 64))
    assert clip.frames.shape == (5, 3, 64, 64) and clip.indices == list(range(5))


@pytest.mark.parametrize("name", ["42156af-config_pnp.yaml", "787a86c-config_sdedit.yaml"])
def test_upstream_config_plans_through_the_cli(name, upstream_data, tiny_model_dir, capsys):
    """The whole command, the file unchanged: its frame folder read, one info line for skip_steps."""
    code = main(["edit", "--config", str(UPSTREAM / name), "--plan", "--model", str(tiny_model_dir),
                 "--device", "cpu", "--size", "64x64", "--log-json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    plan = [e for e in events if e["event"] == "plan"]
    assert len(plan) == 1 and plan[0]["frames"] == 5
    infos = [e["message"] for e in events if e["event"] == "info" and "ignoring" in e["message"]]
    assert len(infos) == (1 if name.startswith("42156af") else 0)
    assert not [e for e in events if e["event"] == "warning"]


def test_every_key_the_original_reads_is_accepted():
    keys = json.loads((UPSTREAM / "keys.json").read_text())
    assert set(keys) == set(EXAMPLES) | set(NOT_KEYS), "a key of the original is neither mapped nor ignored"
    notes = []
    for key, value in EXAMPLES.items():
        from_mapping({key: value}, note=notes.append)   # no "unknown key"
    assert len(notes) == 3 and all("changes nothing here" in n for n in notes)   # skip_steps, reconstruct, ...
    # the DDPM-inversion fork's skip_steps is our skip once its inversion is DDPM
    assert from_mapping({"inversion": "ddpm", "skip_steps": 5}).skip == 5
    # one side alone: the other is the original's default (preprocess.py --H/--W 512)
    assert from_mapping({"W": 672}).size == (672, 512) and from_mapping({"H": 384}).size == (512, 384)
    with pytest.raises(ConfigError, match="unknown key 'config_path'"):
        from_mapping({"config_path": "configs/config_pnp.yaml"})


@pytest.mark.parametrize("data,match", [
    ({"inversion": "ddpm_plus"}, "inversion"),
    ({"inversion": "ddpm", "skip_steps": "five"}, "skip"),
    ({"local_files_only": True}, "HF_HUB_OFFLINE=1"),
    ({"skip_steps": "five"}, "skip_steps='five'"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_keys_that_would_change_something_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(data).validate(need_prompt=False)


def test_ignored_keys_without_a_note_are_a_warning():
    with pytest.warns(UserWarning, match="ignoring skip_steps, reconstruct of the original: changes nothing here"):
        config = from_mapping({"skip_steps": 5, "reconstruct": True, "n_timesteps": 25})
    assert config.steps == 25


def test_the_collect_script_reproduces_this_folder():
    """Provenance: the files are what the script writes from a clone of omerbt/TokenFlow (where one is here)."""
    repo = Path(os.environ.get("TOKENFLOW_UPSTREAM_REPO", "/work/.mirror/omerbt+TokenFlow/repo"))
    if not (repo / "HEAD").exists() and not (repo / ".git").exists():
        pytest.skip(f"no clone of omerbt/TokenFlow at {repo} (set TOKENFLOW_UPSTREAM_REPO)")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_upstream_configs.py"), "--repo", str(repo),
                          "--check"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
