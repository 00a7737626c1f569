"""Config defaults, validation, numeric ranges (and their docs) and the original repository's YAML keys."""
import argparse
import json
import math
import re
from pathlib import Path

import pytest

from tokenflow.app.flags import add_config_flags, config_from_args, flag_names, options_table
from tokenflow.config import EditConfig, default_size, field_specs, from_mapping, load_yaml, parse_bytes, parse_size
from tokenflow.errors import ConfigError

ORIGINAL_PNP_YAML = """# general
seed: 1
device: 'cuda'
output_path: 'tokenflow-results'
data_path: 'data/woman-running'
latents_path: 'latents'
n_inversion_steps: 500
n_frames: 40
sd_version: '2.1'
guidance_scale: 7.5
n_timesteps: 50
prompt: "a marble sculpture of a woman running, Venus de Milo"
negative_prompt: "ugly, blurry, low res, unrealistic, unaesthetic"
batch_size: 8
pnp_attn_t: 0.5
pnp_f_t: 0.8
"""


def test_defaults_are_the_originals():
    c = EditConfig()
    assert (c.model, c.inversion_steps, c.steps, c.keyframe_spacing, c.guidance_scale, c.pnp_attn_t, c.pnp_f_t,
            c.frames, c.seed) == ("stabilityai/stable-diffusion-2-1-base", 500, 50, 8, 7.5, 0.5, 0.8, 40, 1)
    assert c.negative_prompt == "ugly, blurry, low res, unrealistic, unaesthetic"
    assert default_size(1920, 1080) == (672, 384) and default_size(1080, 1920) == (384, 672)
    assert default_size(720, 720) == (512, 512)


def test_original_pnp_config_keys(tmp_path):
    p = tmp_path / "config_pnp.yaml"
    p.write_text(ORIGINAL_PNP_YAML)
    c = load_yaml(str(p))
    assert (c.video, c.inversion_steps, c.steps, c.keyframe_spacing, c.cache_dir, c.device, c.method) == \
        ("data/woman-running", 500, 50, 8, "latents", "cuda", "pnp")
    assert c.model == "stabilityai/stable-diffusion-2-1-base" and c.prompt.startswith("a marble")


def test_original_sdedit_config_selects_sdedit():
    c = from_mapping({"start": 0.9, "use_ddim_noise": True, "n_inversion_steps": 100, "sd_version": "1.5"})
    assert c.method == "sdedit" and c.sdedit_start == 0.9 and c.inversion_steps == 100


def test_preprocess_flags_H_W():
    assert from_mapping({"H": 384, "W": 672}).size == (672, 384)


@pytest.mark.parametrize("data,match", [({"bogus": 1}, "unknown key 'bogus'"), ({"sd_version": "ControlNet"}, "sd_version")])
def test_bad_keys(data, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(data)


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("change,match", [
    ({"steps": -1}, "steps"), ({"inversion_steps": 0}, "inversion_steps"), ({"pnp_attn_t": 1.5}, "pnp_attn_t"),
    ({"pnp_f_t": -0.1}, "pnp_f_t"), ({"keyframe_spacing": 0}, "keyframe_spacing"), ({"sdedit_start": 0}, "sdedit_start"),
    ({"size": (100, 100)}, "multiple of 8"), ({"prompt": "  "}, "prompt is empty"), ({"method": "ddim"}, "method"),
    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"steps": 60, "inversion_steps": 50}, "exceeds"),
    ({"dtype": "float64"}, "dtype"), ({"frames": 0}, "frames"), ({"stride": 0}, "stride"),
])
def test_validation_names_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        EditConfig(prompt="x").replace(**change).validate()


def test_parse_size():
    assert parse_size("672x384") == (672, 384)
    with pytest.raises(ConfigError):
        parse_size("big")


# --- precedence on the command line: flags > --preset > --config YAML > defaults --------------

def _cli_config(*argv):
    from tokenflow.app.cli import build_parser  # noqa: PLC0415

    return config_from_args(build_parser().parse_args(["edit", *map(str, argv)]))


def test_preset_beats_the_yaml_and_flags_beat_the_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sd_version: '1.5'\nn_timesteps: 20\nn_inversion_steps: 100\nprompt: a wolf\nbatch_size: 4\n")
    assert _cli_config("--config", p).model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    tiny = _cli_config("--config", p, "--preset", "tiny")
    assert (tiny.model, tiny.steps, tiny.inversion_steps, tiny.size, tiny.frames) == ("tiny", 10, 50, (128, 128), 16)
    assert (tiny.prompt, tiny.keyframe_spacing) == ("a wolf", 4)   # what the preset does not set stays the YAML's
    fast = _cli_config("--config", p, "--preset", "fast", "--steps", "5", "--model", "2.0")
    assert (fast.model, fast.steps, fast.inversion_steps) == ("2.0", 5, 50)
    original = _cli_config("--config", p, "--preset", "original")   # the defaults: sets nothing
    assert (original.steps, original.inversion_steps) == (20, 100)


# --- silent changes are warned about, before any work where they can be ---------------------

def _events(capsys, *argv):
    from tokenflow.app.cli import main  # noqa: PLC0415

    code = main(["edit", *map(str, argv), "--log-json"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_more_frames_than_the_clip_has_is_one_warning_at_read_time(sample_clip, tiny_model_dir, capsys):
    plan = ["--plan", "--model", tiny_model_dir, "--device", "cpu", "--size", "64x64"]
    code, events, err = _events(capsys, sample_clip, "--frames", "100", *plan)
    assert code == 0, err
    warned = [e["message"] for e in events if e["event"] == "warning"]
    assert warned == [f"'{sample_clip}' has 12 frames; editing 12 (--frames 100 asks for more)"]
    kinds = [(e["event"], e.get("stage")) for e in events]
    assert kinds.index(("stage_start", "read")) < [e["event"] for e in events].index("warning") \
        < kinds.index(("stage_end", "read"))
    code, events, err = _events(capsys, sample_clip, *plan)   # the default 40 is a cap: no warning
    assert code == 0 and not [e for e in events if e["event"] == "warning"], err


def test_a_frame_folder_short_of_frames_says_what_is_edited(tmp_path):
    from PIL import Image  # noqa: PLC0415

    from tokenflow.io.read import read_video  # noqa: PLC0415

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (64, 64), (i * 20, 0, 0)).save(folder / f"{i:05d}.jpg")
    with pytest.warns(UserWarning, match=r"has 10 frames, 3 of them from --start 1 --stride 3; editing 3 "
                                         r"\(--frames 30 asks for more\)"):
        assert read_video(folder, frames=30, start=1, stride=3).indices == [1, 4, 7]


@pytest.mark.parametrize("flags,fix", [
    (["--inversion-steps", "50", "--steps", "7"], "use --steps 5 or 10 .* or --inversion-steps 427"),
    (["--preset", "fast", "--steps", "7"], "use --steps 5 or 10"),
    (["--inversion-steps", "100", "--steps", "30", "--method", "sdedit"], "use --steps 25 or 33"),
])
def test_steps_no_inversion_holds_are_refused_before_anything_loads(flags, fix, sample_clip, tiny_model_dir, capsys):
    code, events, err = _events(capsys, sample_clip, "--prompt", "x", "--model", tiny_model_dir, *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("tokenflow: error: steps: ") and "are not inversion timesteps" in err
    assert re.search(fix, err), err
    assert [e["event"] for e in events] == ["start", "error"]   # nothing read, nothing loaded


def test_steps_checked_against_a_guessed_scheduler_only_warn(sample_clip, tmp_path, monkeypatch):
    """A Hub model not downloaded yet: its scheduler is only guessed (Stable Diffusion's), so a misfit
    is a warning before the load (which checks the real one), not a refusal; a named version's
    scheduler is known, so there it is an error."""
    from tokenflow.app.jobs import check_model_and_steps

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    odd = EditConfig(video=str(sample_clip), prompt="x", inversion_steps=50, steps=7)
    with pytest.warns(UserWarning, match=r"checked against Stable Diffusion's scheduler: someone/custom-sd"):
        check_model_and_steps(odd.replace(model="someone/custom-sd"))
    with pytest.raises(ConfigError, match="are not inversion timesteps"):
        check_model_and_steps(odd.replace(model="2.1"))


# --- numeric ranges: every numeric field has both bounds, checked by the one validator ---------

def _numeric_fields(kind=None):
    return [name for name, spec in field_specs().items() if spec.numeric and (kind is None or kind in spec.kinds)]


def _value(name, number):
    """A field's value with ``number`` in it (size: as the width, then as the height)."""
    return [(number, 512), (512, number)] if name == "size" else [number]


def _just_outside(name):
    """Values one step past each bound: ints by 1 (sizes by 8, so that only the range is wrong),
    floats by one ulp; an exclusive minimum itself."""
    spec = field_specs()[name]
    low, high, excluded = spec.bounds()
    step = 8 if spec.rule.multiple_of else 1
    integer = "integer" in spec.kinds or spec.items == "integer"
    below = low if excluded else (low - step if integer else math.nextafter(low, -math.inf))
    above = high + step if integer else math.nextafter(high, math.inf)
    return [v for number in (below, above) for v in _value(name, number)]


def _bounds(name):
    low, high, excluded = field_specs()[name].bounds()
    low = math.nextafter(low, math.inf) if excluded else low
    return [v for number in (low, high) for v in _value(name, number)]


BASE = EditConfig(prompt="x", steps=1, inversion_steps=1000)   # every steps and inversion_steps bound is valid
# fields that apply only with another field's value: the base where each of their bounds is valid
CONTEXT = {"eta": dict(inversion="ddpm"), "skip": dict(inversion="ddpm", steps=1000)}


def _base(name):
    return BASE.replace(**CONTEXT.get(name, {}))


def test_every_numeric_field_has_a_minimum_and_a_maximum():
    names = _numeric_fields()
    assert {"seed", "frames", "size", "steps", "guidance_scale", "memory_budget", "fps"} <= set(names)
    for name in names:
        low, high, _ = field_specs()[name].bounds()
        assert low is not None and high is not None, name


@pytest.mark.parametrize("name", _numeric_fields())
def test_a_value_just_outside_each_bound_is_refused_naming_the_field(name):
    for value in _just_outside(name):
        found = _base(name).replace(**{name: value}).errors()
        assert len(found) == 1 and found[0].field == name, (value, found)
        text = str(found[0])
        assert "\n" not in text and text.startswith(f"{name}: must be "), text


@pytest.mark.parametrize("name", _numeric_fields())
def test_the_bounds_themselves_are_accepted(name):
    for value in _bounds(name):
        assert _base(name).replace(**{name: value}).errors() == [], (name, value)


@pytest.mark.parametrize("name", _numeric_fields("number"))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(name, value):
    found = BASE.replace(**{name: value}).errors()
    assert [e.field for e in found] == [name] and "not a finite number" in str(found[0])


def test_huge_and_non_finite_byte_sizes_are_config_errors():
    for text in ("1e999", "2000TB", "99999999999999999999999", "1.5PiB", "2PB"):
        with pytest.raises(ConfigError, match="too large"):
            parse_bytes(text)
        assert [e.field for e in BASE.replace(memory_budget=text).errors()] == ["memory_budget"]
    assert parse_bytes("1TiB") == 2**40
    assert parse_bytes("1PiB") == 2**50 and parse_bytes("1PB") == 10**15   # the documented bound, in its own unit
    assert not BASE.replace(memory_budget="1PiB").errors()   # the job-file schema's pattern takes it too


def _flag_cases():
    """(flag, text just outside a bound, field) for every numeric flag of `tokenflow edit`."""
    flags = flag_names()
    for name in _numeric_fields():
        if name not in flags:
            continue
        for value in _just_outside(name):
            text = "x".join(map(str, value)) if isinstance(value, tuple) else repr(value)
            if (flags[name], text) not in (("--frames", "0"), ("--start", "-1")):   # 0: every frame; --start -1: its own message
                yield flags[name], text, name


@pytest.mark.parametrize("flag, text, name", list(_flag_cases()))
def test_every_numeric_flag_outside_its_range_is_one_config_error(flag, text, name):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, edit=True)
    args = parser.parse_args(["clip.mp4", "--prompt", "x", "--steps", "1", "--inversion-steps", "1000", f"{flag}={text}"])
    found = config_from_args(args).errors()
    assert [e.field for e in found] == [name] and "\n" not in str(found[0]), found


def test_help_shows_every_numeric_range():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, edit=True)
    text = " ".join(parser.format_help().split())
    for name, flag in flag_names().items():
        if field_specs()[name].numeric:
            assert f"[range: {field_specs()[name].range_text()}]" in text, flag


OPTIONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"
TABLE_START, TABLE_END = "<!-- ranges:start -->", "<!-- ranges:end -->"


OTHER_START, OTHER_END = "<!-- other-ranges:start -->", "<!-- other-ranges:end -->"


def _tables():
    """(start marker, end marker, generated table) of docs/options.md: the EditConfig flags, then the
    other commands' numeric flags and environment variables (tests/test_flag_ranges.py)."""
    from tests.test_flag_ranges import other_options_table  # noqa: PLC0415 (walks every parser: imports torch)

    return [(TABLE_START, TABLE_END, options_table()), (OTHER_START, OTHER_END, other_options_table())]


def test_docs_list_every_range():
    text = OPTIONS_DOC.read_text()
    for start, end, generated in _tables():
        table = text.split(start, 1)[1].split(end, 1)[0].strip()
        assert table == generated.strip(), f"{OPTIONS_DOC} is out of date: run `python -m tests.test_config --write`"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        text = OPTIONS_DOC.read_text()
        for start, end, generated in _tables():
            head, rest = text.split(start, 1)
            text = f"{head}{start}\n{generated}{end}{rest.split(end, 1)[1]}"
        OPTIONS_DOC.write_text(text)
    else:
        print("".join(generated + "\n" for _, _, generated in _tables()), end="")
