"""Job files: `tokenflow run` validates every job before any work, reports every problem at once,
resolves paths against the job file, runs jobs in order; `tokenflow schema` (generated from the
EditConfig fields) agrees with the validator (EditConfig.errors, through the job-file reader).

Only one test edits for real (tiny model, subprocess); the others replace ``jobs.run_edit`` with a
recorder, so "nothing ran" is checked by the recorder staying empty.
"""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import types
import warnings

import pytest

from tokenflow.app import cli
from tokenflow.app import jobs as runner
from tokenflow.app.jobfile import load as jobfile
from tokenflow.config import PRESETS, EditConfig, field_specs
from tokenflow.errors import ConfigError, InputError, InterruptedWithCheckpoint, LockedError, ModelError

TINY = {"inversion_steps": 10, "steps": 5, "size": "64x64", "device": "cpu", "keyframe_spacing": 4, "frames": 5}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def job_yaml(**fields):
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items())


@pytest.fixture
def folder(tmp_path):
    """A job folder with an (empty) input video, enough for validation."""
    (tmp_path / "clip.mp4").write_bytes(b"")
    return tmp_path


class Calls(list):
    """The configs the fake edit was given, in order; ``fail[k]`` is raised by the k-th call."""

    fail: dict = {}


@pytest.fixture
def calls(monkeypatch):
    """Replace the edit with a recorder."""
    seen = Calls()

    def fake_run_edit(config, reporter, stop=None, inputs=()):
        seen.append(config)
        with reporter.stage("edit", total=1) as stage:
            stage.update()
        failure = seen.fail.get(len(seen))
        if failure is not None:
            raise failure
        return [types.SimpleNamespace(output=config.output)]

    monkeypatch.setattr(runner, "run_edit", fake_run_edit)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)   # the CLI replaces it
    return seen


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def good(stem="a", **extra):
    return job_yaml(**{"video": "clip.mp4", "prompt": "a glass sculpture", "output": f"out/{stem}.mp4",
                       "model": "tiny", **extra})


# --- one real edit ----------------------------------------------------------------------------

def test_good_job_runs_with_paths_relative_to_the_job_file(tmp_path, tiny_model_dir, sample_clip):
    jobs_dir, elsewhere = tmp_path / "jobs", tmp_path / "elsewhere"
    elsewhere.mkdir()
    jobs_dir.mkdir()
    shutil.copy(sample_clip, jobs_dir / "clip.mp4")
    (jobs_dir / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    write(jobs_dir / "edit.yaml", job_yaml(name="wolf", video="clip.mp4", model="./tiny", prompt="glass",
                                           output="out/edit.mp4", **{"save-latents": "out/edit.npy"}, **TINY))
    run = subprocess.run([sys.executable, "-m", "tokenflow", "run", "../jobs", "--log-json"], cwd=elsewhere,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert (jobs_dir / "out" / "edit.mp4").stat().st_size > 0 and (jobs_dir / "out" / "edit.npy").is_file()
    assert not (elsewhere / "out").exists()
    events = [json.loads(line) for line in run.stdout.splitlines()]
    started = [i for i, e in enumerate(events) if e["event"] == "job_start"][0]
    assert all(e.get("job") == "wolf" for e in events[started:-1])
    done = [e for e in events if e["event"] == "done"][0]
    assert done["outputs"] == [str(jobs_dir / "out" / "edit.mp4")] and done["frames"] == 5
    assert events[-1]["event"] == "run_done" and events[-1]["exit_code"] == 0
    assert [(j["job"], j["status"]) for j in events[-1]["jobs"]] == [("wolf", "done")]
    assert "wolf" in run.stderr and "done" in run.stderr   # the summary


# --- validation: everything, before anything runs ---------------------------------------------

def test_every_problem_of_a_file_is_reported_at_once(folder, calls, capsys):
    path = write(folder / "jobs" / "bad.yaml", job_yaml(video="../clip.mp4", prompt="x", steps="ten", stpes=5,
                                                        guidance_scale=-1))
    code, out, err = run_cli(capsys, "run", path)
    lines = err.splitlines()
    assert code == 2 and out == "" and calls == []
    assert len(lines) == 4, err
    assert all(line.startswith(f"tokenflow: error: {path}: ") for line in lines)
    fields = [line[len(f"tokenflow: error: {path}: "):].split(":")[0] for line in lines]
    assert sorted(fields) == ["guidance_scale", "output", "steps", "stpes"]
    assert "did you mean 'steps'" in err and "allowed keys" in err and "'ten'" in err
    assert "guidance_scale: must be a number" in err and "got -1" in err
    assert not (folder / "jobs" / "out").exists()


def test_a_bad_second_job_means_no_job_runs(folder, calls, capsys):
    first = write(folder / "a.yaml", good("a"))
    second = write(folder / "b.yaml", good("b", method="pnpp", prompt=["ok", ""]))
    code, _, err = run_cli(capsys, "run", first, second)
    assert code == 2 and calls == []
    assert f"{second}: method: must be one of: pnp, sdedit" in err and f"{second}: prompt: prompt 2 of 2 is empty" in err
    assert str(first) not in err


@pytest.mark.parametrize("text, message", [
    ("video: !!python/object/apply:os.system ['touch PWNED']\n", "YAML tag '!!python/object/apply:os.system' is refused"),
    ("video: [a,\n", "is not valid YAML (line 2"),
    ("", "is empty"),
    ("- video: a.mp4\n", "must be a mapping of settings (key: value), got a list"),
    ("steps: 5\nsteps: 6\n", "key 'steps' is given twice"),
    ("steps: 5\nsteps-x: 6\n", None),
])
def test_unusable_files_give_one_clear_line_and_execute_nothing(folder, calls, capsys, monkeypatch, text, message):
    monkeypatch.chdir(folder)
    path = write(folder / "job.yaml", text)
    code, _, err = run_cli(capsys, "run", path)
    assert code == 2 and calls == [] and not (folder / "PWNED").exists()
    if message is not None:
        assert err.splitlines() == [f"tokenflow: error: {path}: " + err.split(f"{path}: ", 1)[1].strip()]
        assert message in err, err


def test_required_fields_aliases_and_types(folder):
    problems = jobfile.collect_problems({"video": None, "prompt": [], "inversion-steps": 10, "inversion_steps": 20,
                                         "size": [64, 60], "device": "gpu", "model": 2.1, "name": "../x"},
                                        str(folder / "j.yaml"))
    by_path = {p.path: p.message for p in problems}
    assert set(by_path) == {"video", "prompt", "inversion_steps", "size", "device", "model", "name", "output",
                            "steps"}   # steps: the default 50 exceeds the inversion-steps given first (10)
    assert "also as 'inversion-steps'" in by_path["inversion_steps"] and "quote it" in by_path["model"]
    assert "got 64x60" in by_path["size"] and "multiple of 8" in by_path["size"]
    assert not jobfile.collect_problems({"video": "clip.mp4", "prompt": ["a", "b"], "output": "o.mp4",
                                         "inversion-steps": 10, "steps": 10, "size": "64x128", "frames": 0},
                                        str(folder / "j.yaml"))


def test_cross_field_rules_and_every_config_error(folder, monkeypatch):
    path = str(folder / "j.yaml")
    base = {"video": "clip.mp4", "prompt": "x", "output": "o.mp4"}
    assert [p.path for p in jobfile.collect_problems({**base, "steps": 60, "inversion_steps": 50}, path)] == ["steps"]
    assert [p.path for p in jobfile.collect_problems({**base, "resume": True}, path)] == ["resume"]
    assert not jobfile.collect_problems({**base, "resume": True}, path, checkpoint_root=str(folder))
    # EditConfig.errors is the validator: each of its problems is reported, under the key the file used
    monkeypatch.setattr(EditConfig, "errors", lambda self, **kw: [
        ConfigError("seed=1 is unlucky"), ConfigError.of_field("inversion_steps", "is odd")])
    assert [str(p) for p in jobfile.collect_problems({**base, "inversion-steps": 5}, path)] == [
        f"{path}: seed=1 is unlucky", f"{path}: inversion-steps: is odd"]


def test_relative_paths_resolve_against_the_job_folder(folder, monkeypatch):
    (folder / "jobs" / "models" / "sd").mkdir(parents=True)
    monkeypatch.chdir(folder)
    job = jobfile.parse_job({"video": "../clip.mp4", "prompt": "x", "output": "out/", "model": "models/sd",
                             "clip_model": "openai/clip-vit-base-patch32", "cache-dir": "~/c",
                             "save_frames": str(folder / "abs")}, "jobs/j.yaml")
    assert not job.problems
    c = job.config
    assert (c.video, c.output, c.model) == (str(folder / "clip.mp4"), str(folder / "jobs" / "out") + os.sep,
                                           str(folder / "jobs" / "models" / "sd"))   # "out/": still a folder
    assert c.clip_model == "openai/clip-vit-base-patch32" and c.cache_dir == os.path.expanduser("~/c")
    assert c.save_frames == str(folder / "abs") and job.name == "j"


def test_adapter_and_control_paths_resolve_against_the_job_folder(folder, monkeypatch):
    """lora / embedding / controlnet / control items: a local PATH (with its :SCALE or :TOKEN) is
    resolved against the job file's folder; Hub ids and the built-in controls stay; and they are
    inputs, so an output over one of them is refused."""
    jobs = folder / "jobs"
    for name in ("styles/ink.safetensors", "emb/cat.pt"):
        (jobs / name).parent.mkdir(parents=True, exist_ok=True)
        (jobs / name).write_bytes(b"x")
    (jobs / "poses").mkdir()
    monkeypatch.chdir(folder)
    base = {"video": "../clip.mp4", "prompt": "x", "output": "out/",
            "lora": ["styles/ink.safetensors:0.7", "someone/hub-lora"], "embedding": "emb/cat.pt:<cat>",
            "controlnet": ["lllyasviel/sd-controlnet-canny", "nets/pose:0.5"], "control": ["canny", "poses"]}
    job = jobfile.parse_job(base, "jobs/j.yaml")
    assert not job.problems, job.problems
    c = job.config
    assert c.loras == (f"{jobs / 'styles' / 'ink.safetensors'}:0.7", "someone/hub-lora")
    assert c.embeddings == (f"{jobs / 'emb' / 'cat.pt'}:<cat>",)
    assert c.controlnets == ("lllyasviel/sd-controlnet-canny", "nets/pose:0.5")   # no such folder: left as given
    assert c.controls == ("canny", str(jobs / "poses"))
    job = jobfile.parse_job({**base, "save_frames": "poses"}, "jobs/j.yaml")
    assert any("control image folder" in p.message for p in job.problems), job.problems
    job = jobfile.parse_job({**base, "save_latents": "styles/ink.safetensors"}, "jobs/j.yaml")
    assert any("LoRA weights" in p.message for p in job.problems), job.problems


def test_folders_and_globs_expand_to_sorted_job_lists(tmp_path):
    for name in ("b.yaml", "a.yml", "c.yaml", "notes.txt", ".hidden.yaml"):
        write(tmp_path / "jobs" / name, "x: 1\n")
    (tmp_path / "empty").mkdir()
    d = tmp_path / "jobs"
    files, problems = jobfile.expand([str(d)])
    assert files == [str(d / n) for n in ("a.yml", "b.yaml", "c.yaml")] and problems == []
    files, _ = jobfile.expand([str(d / "*.yaml"), str(d / "b.yaml"), str(d / "a.yml")])
    assert files == [str(d / "b.yaml"), str(d / "c.yaml"), str(d / "a.yml")]
    _, problems = jobfile.expand([str(tmp_path / "empty"), str(d / "*.json"), str(tmp_path / "nope.yaml")])
    assert [p.message for p in problems] == ["folder has no .yaml or .yml job files", "matches no job files",
                                             "no such job file, folder or glob"]


def test_jobs_may_not_share_names_or_outputs(folder, calls, capsys):
    write(folder / "one" / "a.yaml", good("x", video="../clip.mp4"))
    write(folder / "two" / "a.yaml", good("x", video="../clip.mp4", output="../one/out/x.mp4"))
    code, _, err = run_cli(capsys, "run", folder / "one", folder / "two")
    assert code == 2 and calls == []
    assert "name: 'a' is also used by job 'a'" in err and "output: " in err


# --- running ----------------------------------------------------------------------------------

def test_jobs_run_in_order_with_events_summary_and_first_failure_exit_code(folder, calls, capsys):
    for name in "abc":
        write(folder / f"{name}.yaml", good(name))
    calls.fail = {2: InputError("clip is corrupt")}
    code, out, err = run_cli(capsys, "run", folder, "--log-json")
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 3 and [c.output for c in calls] == [str(folder / "out" / "a.mp4"), str(folder / "out" / "b.mp4")]
    assert {e["job"] for e in events if e["event"] == "progress"} == {"a", "b"}
    error = [e for e in events if e["event"] == "error"][0]
    assert error["job"] == "b" and error["exit_code"] == 3 and "clip is corrupt" in error["message"]
    done = events[-1]
    assert done["event"] == "run_done" and done["exit_code"] == 3 and "job" not in done
    assert [(j["job"], j["status"], j["exit_code"]) for j in done["jobs"]] == [
        ("a", "done", 0), ("b", "failed", 3), ("c", "not run", None)]
    assert f"tokenflow: error: {folder / 'b.yaml'}: clip is corrupt" in err
    assert re.search(r"run: 3 job\(s\): 1 done, 1 failed, 1 not run", err)

    calls.clear()
    calls.fail = {1: ModelError("no model"), 2: InputError("bad clip")}
    code, out, err = run_cli(capsys, "run", folder, "--keep-going")
    assert code == 4 and len(calls) == 3
    assert out.splitlines() == [str(folder / "out" / "c.mp4")]   # stdout: what was written


def test_an_interrupt_stops_the_run_even_with_keep_going(folder, calls, capsys):
    for name in "ab":
        write(folder / f"{name}.yaml", good(name))
    calls.fail = {1: InterruptedWithCheckpoint("stopped after step 3; run again with --resume")}
    code, _, err = run_cli(capsys, "run", folder, "--keep-going")
    assert code == 75 and len(calls) == 1 and "interrupted" in err
    calls.clear()
    calls.fail = {1: KeyboardInterrupt()}
    assert run_cli(capsys, "run", folder, "--keep-going", "-q")[0] == 130 and len(calls) == 1


def test_a_stop_after_a_job_finished_keeps_its_outputs_and_starts_no_other(folder, calls, capsys, monkeypatch):
    """SIGTERM while job a wrote its outputs: a is done, b is not started, the exit code says to rerun."""
    for name in "ab":
        write(folder / f"{name}.yaml", good(name))

    def stopped_while_writing(config, reporter, stop=None, inputs=()):
        calls.append(config)
        stop.request("SIGTERM")   # what the run's signal handler does
        return [types.SimpleNamespace(output=config.output)]

    monkeypatch.setattr(runner, "run_edit", stopped_while_writing)
    code, out, err = run_cli(capsys, "run", folder, "--log-json")
    events = [json.loads(line) for line in out.splitlines()]
    done = events[-1]
    assert code == 130 and len(calls) == 1
    assert done["event"] == "run_done" and done["exit_code"] == 130
    assert [(j["job"], j["status"]) for j in done["jobs"]] == [("a", "done"), ("b", "not run")]
    error = next(e for e in events if e["event"] == "error")
    assert "stopped by SIGTERM: 1 job(s) not run" in error["message"] and "again" in error["message"]


def test_a_job_locked_by_another_worker_does_not_stop_the_run(folder, calls, capsys):
    for name in "ab":
        write(folder / f"{name}.yaml", good(name))
    calls.fail = {1: LockedError("out/a.mp4 is locked by pid 7 on node-1")}
    code, out, err = run_cli(capsys, "run", folder, "--log-json")
    assert code == 7 and len(calls) == 2
    done = [json.loads(line) for line in out.splitlines()][-1]
    assert [(j["job"], j["status"]) for j in done["jobs"]] == [("a", "locked"), ("b", "done")]


def test_command_line_overrides_and_checkpoint_root(folder, calls, capsys):
    write(folder / "a.yaml", good("a"))
    write(folder / "b.yaml", good("b", checkpoint_dir="ckpt-b", name="bee"))
    code, _, err = run_cli(capsys, "run", folder, "--resume", "--overwrite", "--checkpoint-root", folder / "root")
    assert code == 0, err
    assert [(c.resume, c.overwrite) for c in calls] == [(True, True)] * 2
    assert [c.checkpoint_dir for c in calls] == [str(folder / "root" / "a"), str(folder / "ckpt-b")]
    calls.clear()
    code, _, err = run_cli(capsys, "run", folder / "a.yaml", "--resume")
    assert code == 2 and calls == [] and "a.yaml: resume: needs checkpoint_dir" in err


def test_check_only_validates(folder, calls, capsys):
    write(folder / "a.yaml", good("a"))
    code, _, err = run_cli(capsys, "run", folder, "--check")
    assert code == 0 and calls == [] and "1 job(s) valid: a" in err


# --- the schema -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def schema():
    out = subprocess.run([sys.executable, "-m", "tokenflow", "schema"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def canonical(schema):
    return {k: v for k, v in schema["properties"].items() if "$ref" not in v}


def test_schema_lists_every_field_with_the_validators_choices(schema):
    fields = {f.name for f in dataclasses.fields(EditConfig)}
    props = canonical(schema)
    assert set(props) == fields | {"name", "preset"}
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False and schema["required"] == ["video", "prompt", "output"]
    choices = {name: spec.choices for name, spec in field_specs().items() if spec.choices}
    assert {"method", "backend", "attention_backend", "nearest_backend", "dtype"} <= set(choices)
    for name, allowed in {**choices, "preset": tuple(sorted(PRESETS))}.items():
        assert [v for v in props[name]["enum"] if v is not None] == list(allowed), name
    for alias, prop in schema["properties"].items():
        if "$ref" in prop:
            assert prop["$ref"] == f"#/properties/{alias.replace('-', '_')}"
    for name, prop in props.items():
        assert prop["description"] and ({"type", "enum", "anyOf"} & set(prop)), name
        if name in fields and name not in schema["required"]:
            assert prop["default"] == json.loads(json.dumps(getattr(EditConfig(), name))), name
    assert props["inversion_steps"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 500,
                                        "description": props["inversion_steps"]["description"]}


def boundary_values(prop):
    """(value, valid) pairs probing one schema property's enum, limits and type."""
    if "enum" in prop:
        return [(v, True) for v in prop["enum"]] + [("no-such-choice", False)]
    out = []
    types_ = prop.get("type") if isinstance(prop.get("type"), list) else [prop.get("type")]
    if "integer" in types_:
        out += [(7.5, False)]
    if "minimum" in prop:
        step = 1 if "integer" in types_ else 0.01
        out += [(prop["minimum"], True), (prop["minimum"] - step, False)]
    if "maximum" in prop:
        out += [(prop["maximum"], True), (prop["maximum"] + 1, False)]
    if "exclusiveMinimum" in prop:
        out += [(prop["exclusiveMinimum"], False), (prop["exclusiveMinimum"] + 0.5, True)]
    if {"integer", "number"} & set(types_):   # a limit missing from the schema shows up here
        out += [(10**30, False)]   # every numeric field has a maximum (a missing one shows up here)
        if "minimum" not in prop and "exclusiveMinimum" not in prop:
            out += [(-1, True)]
    if types_ == ["boolean"]:
        out += [(True, True), ("yes", False)]
    return out


DOCS = [  # (job, valid) for the validator and the schema alike
    ({"size": "512x512", "prompt": ["a", "b"], "memory_budget": "12GiB", "device": "cuda:1"}, True),
    ({"size": [64, 128], "inversion-steps": 50, "frames": None, "name": "job-1.v2", "preset": "fast"}, True),
    ({"guidance_scale": 7, "fps": 23.976, "dtype": None, "use_cache": False, "memory_budget": 10**9}, True),
    ({"size": [64.0, 128], "steps": 5.0}, True),   # JSON (and its schema) does not tell 64.0 from 64
    ({"size": "big"}, False), ({"size": [64]}, False), ({"size": [64, 64.5]}, False), ({"size": [100, 64]}, False),
    ({"prompt": []}, False), ({"prompt": " "}, False), ({"prompt": ["a", 3]}, False),
    ({"inversion-steps": 50, "inversion_steps": 50}, False), ({"stpes": 5}, False),
    ({"device": "gpu"}, False), ({"name": "../x"}, False), ({"memory_budget": "12XB"}, False),
    ({"steps": True}, False), ({"output": None}, False), ({"video": ""}, False), ({"model": 2.1}, False),
    ({"output": "results/"}, True), ({"output": "o.MOV"}, True), ({"output": "o.m4v"}, True),
]


# what the schema cannot express (docs/jobs.md): only `tokenflow run --check` refuses these
NOT_IN_SCHEMA = [({"size": "100x100"}, False), ({"steps": 60, "inversion_steps": 50}, False),
                 ({"output": "o.txt"}, False), ({"output": "results"}, False),   # a video name or a folder ('/')
                 ({"output": "clip.mp4"}, False), ({"save_frames": "."}, False),   # an output aliasing an input
                 ({"codec": "ffv1", "output": "o.mp4"}, False),   # the container of the codec (.mkv)
                 ({"skip": 2}, False), ({"inversion": "ddpm", "skip": 50, "steps": 50}, False)]   # DDPM only, below steps


@pytest.mark.parametrize("extra, valid", DOCS + NOT_IN_SCHEMA)
def test_validator_agrees_with_the_documented_cases(extra, valid, folder):
    doc = {"video": "clip.mp4", "prompt": "x", "output": "o.mp4", **extra}
    assert (not jobfile.collect_problems(doc, str(folder / "j.yaml"))) == valid


def test_schema_agrees_with_the_validator_under_jsonschema(schema, folder):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for extra, valid in DOCS + [({}, True)]:
        doc = {"video": "clip.mp4", "prompt": "x", "output": "o.mp4", **extra}
        assert validator.is_valid(doc) == valid, extra
    for extra, _ in NOT_IN_SCHEMA:
        assert validator.is_valid({"video": "clip.mp4", "prompt": "x", "output": "o.mp4", **extra}), extra
    checked = 0
    for name, prop in canonical(schema).items():
        for value, valid in boundary_values(prop):
            doc = {"video": "clip.mp4", "prompt": "x", "output": "o/", "steps": 1, "inversion_steps": 1000,
                   "checkpoint_dir": "ck", name: value}   # steps <= inversion_steps (a cross-field rule) holds; o/: any codec
            if name in ("eta", "skip"):   # cross-field rules: DDPM-inversion settings, a skip below the steps
                doc.update(inversion="ddpm", steps=1000)
            assert validator.is_valid(doc) == valid, (name, value)
            assert (not jobfile.collect_problems(doc, str(folder / "j.yaml"))) == valid, (name, value)
            checked += 1
    assert checked > 50
    assert not validator.is_valid({"prompt": "x", "output": "o.mp4"})
