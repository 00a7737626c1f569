"""Every numeric flag of every subcommand has a range, shown in --help, and a value outside it is
one line ``tokenflow: error: <flag>: must be ..., got ...`` and exit 2.

The flags are found by walking the real parsers (``tokenflow.app.cli.build_parser`` and the kernel
benchmarks' ``kernel_parser``), so a new ``type=int``/``type=float`` flag without a range fails here.
The flags of `tokenflow edit`/`invert` are EditConfig fields, checked by ``EditConfig.errors()``
(tests/test_config.py); every other numeric flag's ``type=`` is a ``config.Ranged``.
``other_options_table()`` is the second table of docs/options.md (``python -m tests.test_config --write``).
"""
import argparse
import math

import pytest

from tokenflow.app import cli
from tokenflow.app.farm import cli as farm_cli
from tokenflow.app.farm import status as farm_status
from tokenflow.app.flags import FLAG_FIELDS
from tokenflow.config import Ranged, field_specs
from tokenflow.errors import ConfigError

KERNEL_SCRIPTS = "bench/bench_*.py"   # the kernel benchmarks' shared flags (benchmark.measure.kernel_parser)
ENVIRONMENT = (farm_status.GRACE,)       # environment variables read as numbers, checked by a Ranged


def parsers():
    """(command, parser) of every `tokenflow` subcommand (bench's flags added), and the kernel benchmarks'."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        if getattr(p, "_configure", None):   # bench adds its flags when first used
            p.parse_known_args([])
        yield name, p
    from tokenflow.benchmark.measure import kernel_parser  # noqa: PLC0415 (imports torch)

    yield KERNEL_SCRIPTS, kernel_parser("kernel benchmark", "x")


def _flag(action) -> str:
    return max(action.option_strings, key=len)


def numeric_flags():
    """(command, flag, Ranged) of every numeric flag that is no EditConfig field."""
    return [(name, _flag(a), a.type) for name, p in parsers() for a in p._actions if isinstance(a.type, Ranged)]


ALL = numeric_flags()
IDS = [f"{c.split()[0]} {f}" for c, f, _ in ALL]


def _required(command: str) -> list:
    """The arguments the command needs besides the flag under test (positionals, required options)."""
    p = dict(parsers())[command]
    args = []
    for a in p._actions:
        if not a.option_strings and a.nargs not in ("?", "*"):
            args.append("x")
        elif a.option_strings and a.required:
            args += [a.option_strings[0], "x"]
    return args


def _outside(ranged: Ranged) -> list:
    """Texts just past each bound (ints by 1, floats by one ulp; an exclusive minimum itself), and the
    values no range holds: nan/inf for floats, +-10**30 for ints."""
    low, high, excluded = ranged.spec.bounds()
    if ranged.kind is int:
        return [str(low - 1), str(high + 1), str(10**30), str(-10**30)]
    below = low if excluded else math.nextafter(low, -math.inf)
    return [repr(float(below)), repr(math.nextafter(high, math.inf)), "nan", "inf", "-inf", "1e999"]


def _inside(ranged: Ranged) -> list:
    low, high, excluded = ranged.spec.bounds()
    if ranged.kind is int:
        return [low, high, (low + high) // 2]
    return [math.nextafter(low, math.inf) if excluded else float(low), float(high), (low + high) / 2]


def test_every_numeric_flag_has_a_range():
    """A flag parsed as a bare int/float must be an EditConfig field of edit/invert (checked by
    EditConfig.errors(), its range in --help by flags.py); anything else needs a Ranged type."""
    bare = []
    for name, p in parsers():
        for a in p._actions:
            if a.type in (int, float):
                spec = field_specs().get(FLAG_FIELDS.get(a.dest, a.dest))
                if name not in ("edit", "invert") or spec is None or not spec.numeric:
                    bare.append(f"{name} {_flag(a)}")
    assert not bare, f"numeric flags without a range (use config.Ranged): {bare}"
    commands = {c for c, _, _ in ALL}
    assert {"metrics", "report", "export", "farm", "bench", KERNEL_SCRIPTS} <= commands
    assert len(ALL) >= 18


@pytest.mark.parametrize("command, flag, ranged", ALL, ids=IDS)
def test_a_flag_that_means_a_field_has_the_fields_range(command, flag, ranged):
    low, high, _ = ranged.spec.bounds()
    assert low is not None and high is not None, flag
    dest = flag.lstrip("-").replace("-", "_")
    field = FLAG_FIELDS.get(dest, dest)
    if field in field_specs() and field_specs()[field].numeric:   # bench --frames, metrics --start, ...
        assert ranged.field == field and ranged.range_text() == field_specs()[field].range_text()


@pytest.mark.parametrize("command, flag, ranged", ALL, ids=IDS)
def test_help_shows_the_range(command, flag, ranged):
    p = dict(parsers())[command]
    action = next(a for a in p._actions if flag in a.option_strings)
    assert action.help.endswith(f"[range: {ranged.range_text()}]")
    assert f"[range: {ranged.range_text()}]" in " ".join(p.format_help().split())


@pytest.mark.parametrize("command, flag, ranged", [c for c in ALL if c[0] != KERNEL_SCRIPTS],
                         ids=[i for c, i in zip(ALL, IDS) if c[0] != KERNEL_SCRIPTS])
def test_outside_the_range_is_one_line_and_exit_2(command, flag, ranged, capsys, monkeypatch):
    monkeypatch.setattr(cli, "run_command", lambda *a, **k: pytest.fail("the flags parsed: the command would run"))
    for text in _outside(ranged):
        assert cli.main([command, *_required(command), f"{flag}={text}"]) == 2, text
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"tokenflow: error: {flag}: must be "), err
        kind = "an integer" if ranged.kind is int else "a number"
        assert f"must be {kind} in [" in err and "got " in err, err


@pytest.mark.parametrize("command, flag, ranged", ALL, ids=IDS)
def test_inside_the_range_parses(command, flag, ranged):
    p = dict(parsers())[command]
    dest = next(a.dest for a in p._actions if flag in a.option_strings)
    for value in _inside(ranged):
        args = p.parse_args([*_required(command), f"{flag}={value}"])
        assert getattr(args, dest) == value and type(getattr(args, dest)) is ranged.kind


def test_the_kernel_benchmarks_reps_is_one_line(capsys):
    from tokenflow.benchmark.measure import kernel_parser  # noqa: PLC0415 (imports torch)

    for text in ("0", "10001", str(10**30), "x"):
        with pytest.raises(SystemExit) as exit_info:
            kernel_parser("kernel benchmark", "x").parse_args(["--reps", text])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "error: --reps: must be " in err, err


def test_misspelt_numbers_say_what_the_flag_accepts(capsys, monkeypatch):
    monkeypatch.setattr(cli, "run_command", lambda *a, **k: pytest.fail("the flags parsed"))
    assert cli.main(["bench", "--threads", "1e3"]) == 2
    assert capsys.readouterr().err == ("tokenflow: error: --threads: must be an integer in [1, 4096], "
                                       "got '1e3' (string)\n")


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "86401", "ten", "1e999"])
def test_farm_grace_environment_outside_its_range_is_refused_before_submitting(text, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(farm_status.GRACE_ENV, text)
    monkeypatch.setattr(farm_cli, "validate_jobs", lambda *a, **k: pytest.fail("jobs validated"))
    assert cli.main(["farm", str(tmp_path / "job.yaml"), "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"tokenflow: error: {farm_status.GRACE_ENV}: must be "), err
    assert "unset it for the default" in err


@pytest.mark.parametrize("text, seconds", [("", farm_status.DEFAULT_GRACE_S), ("  ", farm_status.DEFAULT_GRACE_S),
                                           ("0", 0.0), ("2.5", 2.5), ("86400", 86400.0)])
def test_farm_grace_environment_inside_its_range(text, seconds, monkeypatch):
    monkeypatch.setenv(farm_status.GRACE_ENV, text)
    assert farm_status.grace_seconds() == seconds


def test_ranged_is_the_fields_check():
    """A Ranged that means a field refuses exactly what EditConfig refuses, in the same words."""
    steps = Ranged("--steps", field="steps")
    assert steps("1000") == 1000
    with pytest.raises(ConfigError) as info:
        steps("5000")
    assert str(info.value) == "--steps: " + field_specs()["steps"].problem(5000)


def other_options_table() -> str:
    """docs/options.md's second table: every numeric flag outside EditConfig, and the environment."""
    rows = ["| command | flag | range | same range as |", "| --- | --- | --- | --- |"]
    for command, flag, ranged in ALL:
        where = command if command == KERNEL_SCRIPTS else f"tokenflow {command}"
        same = f"`{ranged.field}`" if ranged.field else ""
        rows.append(f"| `{where}` | `{flag}` | {ranged.range_text()} | {same} |")
    for ranged in ENVIRONMENT:
        rows.append(f"| environment | `{ranged.flag}` | {ranged.range_text()} |  |")
    return "\n".join(rows) + "\n"
