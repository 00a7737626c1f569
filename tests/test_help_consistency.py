"""The CLI's help, the README and the code agree. Truth comes from the code: the argparse parsers of
every subcommand (``tokenflow.app.cli.build_parser``), the kernel backend registry
(``tokenflow.kernels.dispatch``) and the UNet backends (``tokenflow.engine.backends``)."""
import argparse
import fnmatch
import math
import re
from pathlib import Path

import pytest

from tokenflow.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
OPTIONS = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
DOCS = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
# flags the README shows for commands other than tokenflow's, with the command
EXTERNAL_FLAGS = {"--local-dir": "hf download / huggingface-cli download (the model download hint)"}
KERNEL_FLAGS = {"--attention-backend": "keyframe_attention", "--nearest-backend": "cosine_nearest"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9*-]*[a-z0-9*]")


def subcommands(parser=None, path=("tokenflow",)):
    """(command words, parser) of every (sub)command; flags that are added on first use (bench) are added."""
    parser = parser or build_parser()
    configure = getattr(parser, "_configure", None)
    if configure is not None:
        parser._configure = None
        configure(parser)
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subcommands(child, path + (name,))


COMMANDS = dict(subcommands())


def shown(action) -> bool:
    return action.help != argparse.SUPPRESS


def help_of(parser, flag: str) -> str:
    for action in parser._actions:
        if flag in action.option_strings:
            return " ".join((action.help or "").split())
    raise KeyError(flag)


def names_in(text: str, names) -> list:
    return [n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_duplicate_section_titles(command):
    parser = COMMANDS[command]
    titles = [g.title for g in parser._action_groups if any(shown(a) for a in g._group_actions)]
    assert len(titles) == len(set(titles)), f"`{command} --help` repeats a section: {titles}"


def test_kernel_flags_name_every_registered_backend():
    from tokenflow.kernels import backend_names

    found = 0
    for command, parser in COMMANDS.items():
        for flag, op in KERNEL_FLAGS.items():
            if flag not in parser._option_string_actions:
                continue
            found += 1
            text = help_of(parser, flag)
            missing = set(backend_names(op)) - set(names_in(text, backend_names(op)))
            assert not missing, f"`{command} {flag}` help omits {sorted(missing)}: {text}"
    assert found >= 4, "the kernel flags of `tokenflow edit` and `tokenflow bench` were not found"


@pytest.mark.parametrize("flag", sorted(KERNEL_FLAGS))
def test_auto_is_described_in_priority_order(flag):
    """``auto (default: ...)`` names the backends auto may pick in the dispatcher's order."""
    from tokenflow.kernels import backend_names

    text = help_of(COMMANDS["tokenflow edit"], flag)
    auto = re.search(r"auto \(default: ([^)]*(?:\([^)]*\)[^)]*)*)\)", text)
    assert auto, f"`tokenflow edit {flag}` does not say what auto picks: {text}"
    order = backend_names(KERNEL_FLAGS[flag])   # highest priority first
    mentioned = sorted(names_in(auto.group(1), order), key=auto.group(1).index)
    assert len(mentioned) >= 2 and mentioned == [n for n in order if n in mentioned], \
        f"`{flag}` auto: {mentioned}, but the dispatcher tries {order}"


def test_nearest_auto_threshold_is_the_dispatchers():
    from tokenflow.kernels.nearest import AUTO_MIN_ENTRIES

    assert f"2^{int(math.log2(AUTO_MIN_ENTRIES))} similarities" in help_of(COMMANDS["tokenflow edit"], "--nearest-backend")


def test_unet_backends_are_named_by_backend_and_bench_compare():
    from tokenflow.benchmark.config import UNET_BACKENDS, variant_overrides
    from tokenflow.engine.backends import NAMES, VERIFIED

    names = list(NAMES)
    assert set(VERIFIED) == set(names) == set(UNET_BACKENDS)
    assert all(variant_overrides(n) == {"backend": n} for n in names)
    edit = COMMANDS["tokenflow edit"]
    assert set(edit._option_string_actions["--backend"].choices) == set(names)
    for command, flag in (("tokenflow edit", "--backend"), ("tokenflow bench", "--compare")):
        missing = set(names) - set(names_in(help_of(COMMANDS[command], flag), names))
        assert not missing, f"`{command} {flag}` help omits the UNet backends {sorted(missing)}"
    missing = set(names) - set(names_in(COMMANDS["tokenflow bench"].epilog, names))
    assert not missing, f"`tokenflow bench --help`'s variant list omits {sorted(missing)}"


def test_docs_tables_of_backend_flags_name_every_backend():
    """A table row documenting a backend flag (README.md, docs/*.md) lists all its backends."""
    from tokenflow.engine.backends import NAMES
    from tokenflow.kernels import backend_names

    choices = {"--backend": list(NAMES), **{f: backend_names(op) for f, op in KERNEL_FLAGS.items()}}
    for flag, names in choices.items():
        rows = [(doc, line) for doc, text in DOCS.items() for line in text.splitlines()
                if re.match(rf"\|\s*`{re.escape(flag)}`", line)]
        assert rows, f"no table row documents `{flag}` in README.md or docs/"
        for doc, line in rows:
            missing = [n for n in names if f"`{n}`" not in line]
            assert not missing, f"{doc}: the `{flag}` row omits {missing}: {line}"


def test_every_edit_flag_is_documented():
    parser = COMMANDS["tokenflow edit"]
    flags = [o for a in parser._actions if shown(a) for o in a.option_strings if o.startswith("--") and o != "--help"]
    undocumented = [f for f in flags if not re.search(rf"{re.escape(f)}(?![\w-])", README + OPTIONS)]
    assert not undocumented, f"flags of `tokenflow edit` in neither README.md nor docs/options.md: {undocumented}"


def test_every_flag_in_the_readme_exists():
    known = {o for parser in COMMANDS.values() for a in parser._actions for o in a.option_strings}
    stale = sorted({flag for flag in FLAG.findall(README)
                    if flag not in EXTERNAL_FLAGS and not fnmatch.filter(known, flag)})
    assert not stale, f"README.md mentions flags no `tokenflow` subcommand has: {stale}"
    unused = [flag for flag in EXTERNAL_FLAGS if flag not in FLAG.findall(README)]
    assert not unused, f"EXTERNAL_FLAGS lists {unused}, which README.md no longer mentions"


def test_the_flag_finder():
    text = "use `--pnp-*-t`, --steps 5, a-b--c, ---x and `--backend`."
    assert FLAG.findall(text) == ["--pnp-*-t", "--steps", "--backend"]
