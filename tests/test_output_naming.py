"""Default output names carry the prompt, and "skip when it exists" holds only for the same job.

Each output records the settings fingerprint of the job that made it (tokenflow/io/stamps.py); a
rerun of the same job skips, another job at the same path is refused (exit 5) unless --overwrite.
"""
import json
import os
import re
from pathlib import Path

import av

from tokenflow.app import cli
from tokenflow.app.outputs import SLUG_WORDS, default_output, prompt_outputs, prompt_slug, resolve_output
from tokenflow.config import EditConfig
from tokenflow.io.outputs import FOLDER_STAMP
from tokenflow.io.stamps import VIDEO_TAG, read_stamp, sidecar_path

FAST = ["--frames", "4", "--inversion-steps", "10", "--steps", "5", "--size", "64x64", "--device", "cpu",
        "--keyframe-spacing", "4"]


def made_by(config, path, kind="video"):
    """Put an output at ``path`` that records ``config``'s job (as if that job wrote it): a tiny
    MP4, a .npy with its sidecar, or a frames folder. The input and model must exist (the record
    holds their identities)."""
    import numpy as np
    import torch

    from tokenflow.app.skip import job_fields
    from tokenflow.io.stamps import video_metadata, write_stamp_file
    from tokenflow.io.write import write_frames, write_video

    fields = job_fields(config)
    frames = torch.zeros(2, 3, 16, 16)
    if kind == "video":
        write_video(frames, str(path), 8, metadata=video_metadata(fields))
    elif kind == "latents":
        np.save(str(path), np.zeros((2, 4, 2, 2), np.float32))
        write_stamp_file(sidecar_path(str(path)), fields)
    else:
        write_frames(frames, str(path))
        write_stamp_file(os.path.join(str(path), FOLDER_STAMP), fields)
    return path


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("tokenflow: error:")]


# --- names ------------------------------------------------------------------------------------

def test_slugs_are_safe_bounded_and_distinct_for_distinct_prompts():
    assert prompt_slug("a robot wolf") == "a-robot-wolf"   # the words are the prompt: no hash
    prompts = ["a robot wolf", "A robot wolf", "a robot wolf!", "a robot  wolf", "a-robot-wolf", "un loup, très beau",
               "狼", "", "!!!", "x" * 200, "x" * 200 + "y", "prompt", "a robot wolf " + "very " * 20 + "fast",
               "a robot wolf " + "very " * 20 + "slow"]
    slugs = [prompt_slug(p) for p in prompts]
    assert len(set(slugs)) == len(prompts), slugs
    for slug in slugs:
        assert re.fullmatch(r"[a-z0-9_-]+", slug) and len(slug) <= SLUG_WORDS + 9, slug
    assert slugs == [prompt_slug(p) for p in prompts]   # deterministic


def test_default_names_carry_the_prompt(tmp_path):
    one = EditConfig(video="clips/wolf.mp4", prompt="a robot wolf")
    assert default_output(one) == os.path.join("tokenflow-results", "wolf-pnp-a-robot-wolf.mp4")
    assert resolve_output(one.replace(output=f"{tmp_path}/")) == str(tmp_path / "wolf-pnp-a-robot-wolf.mp4")
    assert resolve_output(one.replace(output=str(tmp_path / "mine.mp4"))) == str(tmp_path / "mine.mp4")   # as named
    assert default_output(one.replace(prompt="a cat")) != default_output(one)
    two = EditConfig(video="wolf.mp4", prompt=("a cat", "A cat"))
    names = prompt_outputs(resolve_output(two), two.prompts)
    assert names[0] == os.path.join("tokenflow-results", "wolf-pnp-1-a-cat.mp4")
    assert names[1].startswith(os.path.join("tokenflow-results", "wolf-pnp-2-a-cat_")) and len(set(names)) == 2


# --- the skip rule, at the command line ----------------------------------------------------------

def test_a_second_prompt_writes_a_second_file_and_reruns_skip_only_the_same_job(tmp_path, tiny_model_dir,
                                                                                sample_clip, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    edit = ["edit", sample_clip, "--model", tiny_model_dir, *FAST]
    wolf = ["--prompt", "a robot wolf", "--save-latents", "wolf.npy", "--save-frames", "wolf-frames/"]
    code, _, err = run_cli(capsys, *edit, *wolf)
    assert code == 0, err
    code, _, err = run_cli(capsys, *edit, "--prompt", "a cat")
    assert code == 0, err
    results = tmp_path / "tokenflow-results"
    assert sorted(p.name for p in results.iterdir()) == ["sample-pnp-a-cat.mp4", "sample-pnp-a-robot-wolf.mp4"]
    out = results / "sample-pnp-a-robot-wolf.mp4"
    with av.open(str(out)) as container:   # the settings are in the container, readable by any MP4 tool
        assert json.loads(container.metadata[VIDEO_TAG])["fields"]["prompt"] == ["a robot wolf"]
    assert (tmp_path / "wolf-frames" / FOLDER_STAMP).is_file() and Path(sidecar_path("wolf.npy")).is_file()
    mtime = out.stat().st_mtime_ns

    # the same command again: skipped, exit 0, nothing touched
    code, _, err = run_cli(capsys, *edit, *wolf)
    assert code == 0 and "skipped" in err and "--overwrite" in err, err
    assert out.stat().st_mtime_ns == mtime
    # a speed-only knob is still the same job
    code, _, err = run_cli(capsys, *edit, *wolf, "--nearest-backend", "torch")
    assert code == 0 and "skipped" in err, err

    # another prompt at the same path: refused with one line naming the output, the setting and the fix
    code, _, err = run_cli(capsys, *edit, "--prompt", "a cat", "-o", out)
    lines = error_lines(err)
    assert code == 5 and len(lines) == 1, err
    assert str(out) in lines[0] and "made with other settings" in lines[0]
    assert "the prompt: 'a robot wolf' there, 'a cat' now" in lines[0] and "--overwrite" in lines[0]
    assert out.stat().st_mtime_ns == mtime
    # another setting: named too
    code, _, err = run_cli(capsys, *edit, *wolf, "--seed", "7")
    assert code == 5 and "seed: 1 there, 7 now" in err, err
    # the same job asking for a report too: the edit stays, the message says how to add its report
    code, _, err = run_cli(capsys, *edit, "--prompt", "a cat", "--report", "cat-report/")
    lines = error_lines(err)
    assert code == 5 and len(lines) == 1 and "tokenflow report" in lines[0] and "cat-report" in lines[0], err
    assert not (tmp_path / "cat-report").exists()

    # an output of the job that records nothing (a foreign file in its place): refused, named
    Path(sidecar_path("wolf.npy")).unlink()
    code, _, err = run_cli(capsys, *edit, *wolf)
    assert code == 5 and "latents output 'wolf.npy'" in err and "records none" in err, err

    # --overwrite redoes it, and the output now records the new job
    code, _, err = run_cli(capsys, *edit, "--prompt", "a cat", "-o", out, "--overwrite")
    assert code == 0, err
    assert read_stamp(str(out), "video")["prompt"] == ["a cat"]
    code, _, err = run_cli(capsys, *edit, "--prompt", "a cat", "-o", out)
    assert code == 0 and "skipped" in err, err


def test_a_foreign_file_at_the_output_path_is_refused(tmp_path, tiny_model_dir, sample_clip, capsys):
    out = tmp_path / "edit.mp4"
    out.write_bytes(b"someone else's video")
    for foreign in (b"someone else's video", None):
        if foreign is None:   # a real MP4 without tokenflow's record: the input clip itself, copied
            out.write_bytes(Path(sample_clip).read_bytes())
        before = out.read_bytes()
        code, _, err = run_cli(capsys, "edit", sample_clip, "--model", tiny_model_dir, *FAST, "--prompt", "x",
                               "-o", out)
        lines = error_lines(err)
        assert code == 5 and len(lines) == 1, err
        assert f"output '{out}' exists but was not made by tokenflow" in lines[0] and "--overwrite" in lines[0]
        assert out.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name != "edit.mp4"]


def test_a_job_file_rerun_skips_and_a_changed_job_is_refused(tmp_path, tiny_model_dir, sample_clip, capsys):
    job = tmp_path / "job.yaml"
    fields = {"video": str(sample_clip), "model": str(tiny_model_dir), "output": "out/", "prompt": "glass",
              "inversion_steps": 10, "steps": 5, "size": "64x64", "device": "cpu", "keyframe_spacing": 4, "frames": 4}
    job.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    code, _, err = run_cli(capsys, "run", job, "--log-json")
    assert code == 0, err
    out = tmp_path / "out" / "sample-pnp-glass.mp4"
    assert out.is_file()
    code, stdout, err = run_cli(capsys, "run", job, "--log-json")
    assert code == 0, err
    done = [json.loads(line) for line in stdout.splitlines()][-1]
    assert [j["status"] for j in done["jobs"]] == ["skipped"]
    job.write_text(job.read_text() + "seed: 3\n")
    code, _, err = run_cli(capsys, "run", job)
    assert code == 5 and "made with other settings" in err and "seed: 1 there, 3 now" in err, err


def test_a_frames_folder_with_its_record_is_ours_and_a_damaged_record_is_none(tmp_path):
    from tokenflow.io.outputs import check_frames_target

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "00000.png").write_bytes(b"")
    (folder / FOLDER_STAMP).write_text('{"format": 1, "fingerprint": "0", "fields": {"seed": 1}}')
    check_frames_target(str(folder))   # our frames with their record: --overwrite may replace the folder
    assert read_stamp(str(folder), "frames") is None   # a record whose fingerprint does not verify


def test_the_skip_check_downloads_nothing_and_a_copy_of_the_model_folder_is_the_same_model(
        tmp_path, tiny_model_dir, sample_clip, capsys, monkeypatch):
    """A farm node checks finished work without the model: a Hub id it has not downloaded (offline
    here) and its own copy of a model folder (other modification times) still skip; another
    --device/--dtype as given is another job, but the same "auto" is the same job on any machine."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = EditConfig(video=str(sample_clip), model="stabilityai/stable-diffusion-2-1-base", prompt="glass",
                     output=str(tmp_path / "hub.mp4"))
    made_by(hub, tmp_path / "hub.mp4")
    code, _, err = run_cli(capsys, "edit", sample_clip, "--model", hub.model, "--prompt", "glass",
                           "-o", tmp_path / "hub.mp4")
    assert code == 0 and "skipped" in err, err

    copy = tmp_path / "copy-of-model"
    shutil.copytree(tiny_model_dir, copy)   # new modification times
    for path in copy.rglob("*.safetensors"):
        os.utime(path, (1, 1))
    mine = EditConfig(video=str(sample_clip), model=str(tiny_model_dir), prompt="glass", output=str(tmp_path / "m.mp4"))
    made_by(mine, tmp_path / "m.mp4")
    code, _, err = run_cli(capsys, "edit", sample_clip, "--model", copy, "--prompt", "glass", "-o", tmp_path / "m.mp4")
    assert code == 0 and "skipped" in err, err
    code, _, err = run_cli(capsys, "edit", sample_clip, "--model", copy, "--prompt", "glass", "-o", tmp_path / "m.mp4",
                           "--dtype", "bfloat16")
    assert code == 5 and "dtype" in err, err
