"""Data safety of paths (tokenflow/app/paths.py, app/outputs.py): no output is, contains or lies
inside an input (same path, symbolic link, hard link, folders around or inside), whatever
--overwrite says; -o names a video file we write or a folder; --output-root / --input-root confine
every job of `tokenflow run` / `tokenflow farm`.

Unit tests work on tmp_path; the CLI tests run the real CLI in-process and stop before any model
is loaded (every refusal here happens before any work).
"""
import os
from pathlib import Path

import pytest

from tokenflow.app import cli
from tokenflow.app import paths as safety
from tokenflow.app.jobfile import load as jobfile
from tokenflow.app.outputs import CODEC_SUFFIXES, resolve_output
from tokenflow.config import EditConfig
from tokenflow.errors import ConfigError, OutputError
from tokenflow.io.aliasing import NEVER_OVER_INPUTS


@pytest.fixture
def clip(tmp_path) -> Path:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"the source video\n")
    return path


def config(video, output, **kw) -> EditConfig:
    return EditConfig(video=str(video), prompt=kw.pop("prompt", "x"), output=str(output), **kw)


def problems(cfg: EditConfig, extra=()):
    return safety.aliasing_problems(safety.job_output_paths(cfg), safety.job_inputs(cfg, extra))


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tokenflow: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- -o: a video name or a folder


def test_output_is_a_folder_only_with_a_trailing_separator_or_when_it_exists(tmp_path, clip):
    assert resolve_output(config(clip, f"{tmp_path}/new/")) == str(tmp_path / "new" / "clip-pnp-x.mp4")
    (tmp_path / "there").mkdir()
    assert resolve_output(config(clip, tmp_path / "there")) == str(tmp_path / "there" / "clip-pnp-x.mp4")
    for name in ("o.mp4", "o.MOV", "o.m4v"):
        assert resolve_output(config(clip, tmp_path / name)) == str(tmp_path / name)
    assert resolve_output(EditConfig(video=str(clip), prompt="x")) == os.path.join("tokenflow-results", "clip-pnp-x.mp4")


@pytest.mark.parametrize("name, got", [("out.txt", "ends in '.txt'"), ("out", "has no file extension"),
                                       ("out.webm", "ends in '.webm'"), ("out.mp4.part", "ends in '.part'")])
def test_an_output_that_is_no_video_name_is_a_config_error_listing_the_containers(tmp_path, clip, name, got):
    with pytest.raises(ConfigError) as caught:
        resolve_output(config(clip, tmp_path / name))
    message = str(caught.value)
    assert caught.value.exit_code == 2 and caught.value.field == "output"
    assert str(tmp_path / name) in message and got in message and "end the path with '/'" in message
    assert all(suffix in message for suffix in CODEC_SUFFIXES["h264"])   # .mkv: --codec ffv1 (test_output_formats)
    assert not (tmp_path / name).exists()


# ----------------------------------------------------------------------------- aliasing


def test_an_output_at_the_input_path_is_refused_naming_both(tmp_path, clip):
    found = problems(config(clip, clip))
    assert found == [("output", f"'{clip}' is the input video '{clip}'; {NEVER_OVER_INPUTS}")]
    with pytest.raises(OutputError) as caught:
        safety.check_no_aliasing(safety.job_output_paths(config(clip, clip)), safety.job_inputs(config(clip, clip)))
    assert caught.value.exit_code == 5 and str(clip) in str(caught.value) and "--overwrite" in str(caught.value)


def test_relative_and_absolute_spellings_of_one_path_alias(tmp_path, clip, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert problems(config("clip.mp4", tmp_path / "sub" / ".." / "clip.mp4"))


def test_a_symlink_to_the_input_is_refused(tmp_path, clip):
    link = tmp_path / "link.mp4"
    link.symlink_to(clip)
    [(label, reason)] = problems(config(clip, link))
    assert label == "output" and "through a symbolic link" in reason and str(clip) in reason and str(link) in reason
    linked_folder = tmp_path / "elsewhere"
    linked_folder.symlink_to(tmp_path, target_is_directory=True)
    assert problems(config(clip, linked_folder / "clip.mp4"))   # a symlinked parent folder


def test_a_hard_link_to_the_input_is_refused(tmp_path, clip):
    hard = tmp_path / "hard.mp4"
    try:
        os.link(clip, hard)
    except OSError as exc:
        pytest.skip(f"no hard links here: {exc}")
    [(label, reason)] = problems(config(clip, hard))
    assert label == "output" and "hard link" in reason and str(hard) in reason and str(clip) in reason


def test_folder_outputs_that_contain_the_input_are_refused(tmp_path, clip):
    out = tmp_path / "o.mp4"
    for field in ("save_frames", "report"):   # replaced as a whole: the input in it would be lost
        found = problems(config(clip, out, **{field: str(tmp_path)}))
        assert found[0][0] == field and "contains the input video" in found[0][1]
    # the checkpoint folder only ever writes and removes its own files: it may hold inputs, not be one
    assert not problems(config(clip, out, checkpoint_dir=str(tmp_path)))
    frames = tmp_path / "frames"
    frames.mkdir()
    [(label, reason)] = problems(config(frames, out, checkpoint_dir=str(frames)))
    assert label == "checkpoint_dir" and "is the input frame folder" in reason
    assert not problems(config(clip, out, save_frames=str(tmp_path / "png"), report=str(tmp_path / "rep"),
                               checkpoint_dir=str(tmp_path / "ck")))


def test_a_checkpoint_folder_whose_own_files_are_inputs_is_refused(tmp_path, clip, capsys):
    """The checkpoint folder may hold inputs, but not inputs named as its own state files: it would
    write over them and delete them when the run ends (an embedding called edit.pt, ...)."""
    for name in ("inversion.pt", "edit.pt"):
        embedding = tmp_path / name
        embedding.write_bytes(b"user's own file")
        [(label, reason)] = problems(config(clip, tmp_path / "o.mp4", checkpoint_dir=str(tmp_path),
                                            embedding=(str(embedding),)))
        assert label == "checkpoint_dir" and f"would write and then delete '{name}'" in reason, reason
        assert str(embedding) in reason
        embedding.unlink()
    (tmp_path / "edit.pt").write_bytes(b"user's own file")
    code, _, err = run_cli(capsys, "edit", clip, "--model", "tiny", "--prompt", "x", "-o", tmp_path / "o.mp4",
                           "--embedding", tmp_path / "edit.pt", "--allow-pickle", "--checkpoint-dir", tmp_path)
    assert code == 5 and "would write and then delete 'edit.pt'" in err, err
    assert (tmp_path / "edit.pt").read_bytes() == b"user's own file" and not (tmp_path / "o.mp4").exists()


def test_outputs_inside_an_input_frame_folder_or_model_folder_are_refused(tmp_path):
    frames, model = tmp_path / "frames", tmp_path / "model"
    frames.mkdir()
    (frames / "00000.png").write_bytes(b"png")
    model.mkdir()
    found = problems(config(frames, frames / "o.mp4"))
    assert found and "lies inside the input frame folder" in found[0][1]
    found = problems(config(frames, tmp_path / "o.mp4", save_latents=str(model / "l.npy"), model=str(model)))
    assert [label for label, _ in found] == ["save_latents"] and "model folder" in found[0][1]
    # the same name as a prefix is not "inside": frames2/ is not in frames/
    assert not problems(config(frames, tmp_path / "frames2" / "o.mp4", model=str(model)))


def test_the_config_file_and_the_job_file_are_inputs(tmp_path, clip):
    settings, job = tmp_path / "c.yaml", tmp_path / "job.yaml"
    settings.write_text("seed: 1\n")
    job.write_text("video: clip.mp4\n")
    cfg = config(clip, tmp_path / "o.mp4", save_latents=str(settings))
    assert problems(cfg) == []
    [(label, reason)] = problems(cfg, [("--config file", str(settings))])
    assert label == "save_latents" and f"the --config file '{settings}'" in reason
    found = problems(config(clip, tmp_path / "o.mp4", report=str(tmp_path)), [("job file", str(job))])
    assert found and found[0][0] == "report"


def test_every_prompts_output_is_checked(tmp_path):
    source = tmp_path / "out-2-marble.mp4"   # the second prompt's output name
    source.write_bytes(b"x")
    cfg = config(source, tmp_path / "out.mp4", prompt=("glass", "marble"))
    assert [path for _, path in safety.job_output_paths(cfg)][:2] == [str(tmp_path / "out-1-glass.mp4"), str(source)]
    [(label, reason)] = problems(cfg)
    assert label == "output" and reason.startswith(f"'{source}' is the input video")


def test_outputs_of_one_job_that_would_destroy_each_other_are_refused(tmp_path, clip):
    folder = tmp_path / "results"
    out = folder / "out.mp4"
    [(label, reason)] = problems(config(clip, out, save_latents=str(out)))
    assert label == "output" and f"is also the save_latents output '{out}'" in reason
    [(label, reason)] = problems(config(clip, out, report=str(folder)))   # the report swap would delete the video
    assert label == "output" and f"lies inside the report folder '{folder}'" in reason
    [(label, reason)] = problems(config(clip, out, save_frames=str(folder / "f"), checkpoint_dir=str(folder / "f" / "c")))
    assert label == "save_frames" and "contains the checkpoint_dir output" in reason
    # a checkpoint folder may hold the outputs (it only ever removes its own files); separate folders are fine
    assert not problems(config(clip, out, checkpoint_dir=str(folder), save_frames=str(folder / "f"),
                               report=str(folder / "r"), save_latents=str(folder / "l.npy")))


def test_edit_refuses_two_outputs_at_one_path(tmp_path, clip, capsys):
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(capsys, "edit", clip, "--prompt", "x", "--model", "tiny", "-o", out, "--save-latents", out)
    assert code == 5 and f"output '{out}' is also the save_latents output" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_missing_inputs_and_hub_models_are_not_aliased(tmp_path):
    assert not problems(config(tmp_path / "missing.mp4", tmp_path / "missing.mp4"))   # the input check says it
    assert not safety.is_local_model("tiny") and not safety.is_local_model("tiny:3")
    assert not safety.is_local_model("2.1") and not safety.is_local_model("someone/some-model")
    assert safety.is_local_model("./sd") and safety.is_local_model(str(tmp_path)) and safety.is_local_model("~/sd")


# ----------------------------------------------------------------------------- roots


def test_a_root_must_be_an_existing_folder(tmp_path, clip):
    assert safety.check_root(None, "--output-root") is None
    assert safety.check_root(str(tmp_path / "a" / ".."), "--output-root") == os.path.realpath(tmp_path)
    for bad, what in ((tmp_path / "nope", "does not exist"), (clip, "is not a folder")):
        with pytest.raises(ConfigError, match=what) as caught:
            safety.check_root(str(bad), "--input-root")
        assert "--input-root" in str(caught.value)


def test_paths_resolve_inside_a_root_or_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    real = os.path.realpath(root)
    assert safety.outside_reason(str(root / "a" / "b.mp4"), real, "--output-root") is None
    escape = safety.outside_reason(str(root / ".." / "outside" / "b.mp4"), real, "--output-root")
    assert escape and "resolves to" in escape and "--output-root" in escape
    (root / "out").symlink_to(outside, target_is_directory=True)   # a symlink inside that points out
    assert "resolves to" in safety.outside_reason(str(root / "out" / "b.mp4"), real, "--output-root")
    (root / "in").symlink_to(root / "a", target_is_directory=True)   # one that stays inside
    assert safety.outside_reason(str(root / "in" / "b.mp4"), real, "--output-root") is None
    assert safety.outside_reason(str(tmp_path / "root2" / "b.mp4"), real, "--output-root")   # a prefix is not inside


def job_problems(tmp_path, fields, **options):
    path = tmp_path / "jobs" / "j.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text("# the mapping is passed as data; the file is there as an input\n")
    return {p.path: p.message for p in jobfile.collect_problems(fields, str(path), **options)}


def test_job_outputs_and_inputs_are_confined_to_the_roots(tmp_path, clip):
    out_root, in_root = tmp_path / "out", tmp_path / "in"
    out_root.mkdir()
    in_root.mkdir()
    (in_root / "clip.mp4").write_bytes(b"x")
    roots = {"output_root": os.path.realpath(out_root), "input_root": os.path.realpath(in_root)}
    good = {"video": "../in/clip.mp4", "prompt": "x", "output": "../out/a.mp4", "model": "tiny"}
    assert job_problems(tmp_path, good, **roots) == {}
    found = job_problems(tmp_path, {**good, "output": "../out/../a.mp4", "save-latents": "/tmp/l.npy",
                                    "checkpoint_dir": "../ck", "cache_dir": "../cache", "video": "../clip.mp4",
                                    "model": "../model"}, **roots)
    assert set(found) == {"output", "save-latents", "checkpoint_dir", "cache_dir", "video", "model"}
    assert all("(job 'j')" in message for message in found.values())
    assert "--output-root" in found["output"] and "--input-root" in found["video"]
    # a checkpoint folder from the command line's --checkpoint-root is the operator's choice
    assert job_problems(tmp_path, good, checkpoint_root=str(tmp_path / "ck"), **roots) == {}
    # a Hub id is not a local path: nothing to confine
    assert job_problems(tmp_path, {**good, "model": "someone/some-model"}, **roots) == {}


def test_a_job_file_cannot_set_or_loosen_a_root(tmp_path, clip):
    found = job_problems(tmp_path, {"video": "../clip.mp4", "prompt": "x", "output": "/elsewhere/a.mp4",
                                    "output_root": "/"}, output_root=os.path.realpath(tmp_path))
    assert "unknown key" in found["output_root"] and "--output-root" in found["output"]


def test_job_files_report_aliasing_and_bad_outputs_under_their_keys(tmp_path, clip):
    base = {"video": "../clip.mp4", "prompt": "x"}
    assert "is the input video" in job_problems(tmp_path, {**base, "output": "../clip.mp4"})["output"]
    assert "the job file" in job_problems(tmp_path, {**base, "output": "o.mp4", "save_frames": "."})["save_frames"]
    assert "ends in '.txt'" in job_problems(tmp_path, {**base, "output": "o.txt"})["output"]
    assert job_problems(tmp_path, {**base, "output": "results/"}) == {}


# ----------------------------------------------------------------------------- through the CLI


def test_edit_refuses_its_input_as_output_even_with_overwrite(tmp_path, clip, capsys):
    before = clip.read_bytes()
    for extra in ([], ["--overwrite"]):
        code, out, err = run_cli(capsys, "edit", clip, "--prompt", "x", "--model", "tiny", "-o", clip, *extra)
        line = one_error_line(err)
        assert code == 5 and out == "" and f"output '{clip}' is the input video '{clip}'" in line
        assert "skipped" not in err and clip.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]   # no lock, no temp file


def test_edit_refuses_to_write_over_its_config_file(tmp_path, clip, capsys):
    settings = tmp_path / "c.yaml"
    settings.write_text("seed: 1\n")
    code, _, err = run_cli(capsys, "edit", clip, "--prompt", "x", "--model", "tiny", "--config", settings,
                           "-o", tmp_path / "o.mp4", "--save-latents", settings, "--overwrite")
    line = one_error_line(err)
    assert code == 5 and f"save_latents '{settings}' is the --config file '{settings}'" in line
    assert settings.read_text() == "seed: 1\n" and not (tmp_path / "o.mp4").exists()


def test_edit_refuses_an_output_that_is_no_video_name(tmp_path, clip, capsys):
    code, _, err = run_cli(capsys, "edit", clip, "--prompt", "x", "--model", "tiny", "-o", tmp_path / "out.txt")
    assert code == 2 and "out.txt" in one_error_line(err) and not (tmp_path / "out.txt").exists()


def write_job(path: Path, **fields) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}: '{v}'\n" for k, v in fields.items()))
    return path


def test_run_refuses_the_whole_job_file_before_any_job_runs(tmp_path, clip, capsys):
    first = write_job(tmp_path / "jobs" / "a.yaml", video=clip, prompt="x", output=tmp_path / "a.mp4", model="tiny")
    second = write_job(tmp_path / "jobs" / "b.yaml", video=clip, prompt="x", output=clip, model="tiny")
    code, out, err = run_cli(capsys, "run", first, second, "--overwrite")
    assert code == 2 and out == "" and f"{second}: output: '{clip}' is the input video" in one_error_line(err)
    assert not (tmp_path / "a.mp4").exists() and clip.read_bytes() == b"the source video\n"


def test_run_and_farm_confine_jobs_to_the_output_root(tmp_path, clip, capsys):
    root = tmp_path / "root"
    root.mkdir()
    job = write_job(tmp_path / "jobs" / "j.yaml", video=clip, prompt="x", output=root / ".." / "escaped.mp4",
                    model="tiny")
    code, _, err = run_cli(capsys, "run", job, "--output-root", root)
    line = one_error_line(err)
    assert code == 2 and f"{job}: output: '{root / '..' / 'escaped.mp4'}'" in line and "(job 'j')" in line
    report = tmp_path / "farm.json"
    code, _, err = run_cli(capsys, "farm", job, "--ray", "local", "--output-root", root, "--report", report)
    assert code == 2 and "--output-root" in err and "nothing was submitted" in err and not report.exists()
    code, _, err = run_cli(capsys, "run", job, "--output-root", tmp_path / "nope", "--check")
    assert code == 2 and "--output-root" in one_error_line(err) and "does not exist" in err
    code, _, err = run_cli(capsys, "run", job, "--output-root", tmp_path, "--input-root", tmp_path, "--check")
    assert code == 0, err


def test_a_failed_edit_removes_the_folders_it_made_and_no_others(tmp_path, clip, capsys):
    """The output checks create missing folders (to probe that they can be written); an edit that
    then fails (here: the 'video' is text, exit 3) removes them again, but not a folder that was there."""
    (tmp_path / "there").mkdir()
    code, _, err = run_cli(capsys, "edit", clip, "--prompt", "x", "--model", "tiny", "-o", tmp_path / "new" / "deeper" / "o.mp4",
                           "--save-latents", tmp_path / "there" / "l.npy", "--save-frames", tmp_path / "png" / "f")
    assert code == 3, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "there"] and not any((tmp_path / "there").iterdir())


def test_the_latents_job_record_beside_them_is_an_output_too(tmp_path, clip, capsys):
    """--save-latents X.npy also writes X.npy.tokenflow-job.json (the skip rule's record): that path
    may not be an input either, whatever --overwrite says."""
    record = tmp_path / "lat.npy.tokenflow-job.json"
    record.write_text("seed: 1\n")   # the user's --config file happens to have that name
    before = record.read_bytes()
    [(label, reason)] = problems(config(clip, tmp_path / "o.mp4", save_latents=str(tmp_path / "lat.npy")),
                                 [("--config file", str(record))])
    assert label == "save_latents record" and str(record) in reason
    code, _, err = run_cli(capsys, "edit", "--config", record, clip, "--prompt", "x", "--model", "tiny",
                           "-o", tmp_path / "o.mp4", "--save-latents", tmp_path / "lat.npy", "--overwrite")
    assert code == 5 and "save_latents record" in one_error_line(err)
    assert record.read_bytes() == before
