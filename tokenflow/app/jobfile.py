"""Job files: ``tokenflow run JOBS...`` and ``tokenflow schema`` (docs/jobs.md).

A job file is a YAML mapping of EditConfig settings (plus ``name`` and ``preset``), read as data
only. Every job of a run is validated before any work starts, and every problem is reported at
once with its file and field path; then the jobs run in order with one Reporter.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import glob
import json
import math
import os
import re
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from tokenflow.config import DTYPES, METHODS, PLACES, PRESETS, PROPAGATIONS, EditConfig, parse_size
from tokenflow.errors import (
    ConfigError,
    Interrupted,
    InterruptedWithCheckpoint,
    LockedError,
    ResourceError,
    TokenFlowError,
    short_repr,
)
from tokenflow.interrupt import StopFlag, stop_on_signals

REQUIRED = ("video", "prompt", "output")
PATH_FIELDS = ("video", "output", "save_frames", "save_latents", "report", "checkpoint_dir", "cache_dir")
MODEL_FIELDS = ("model", "clip_model")   # resolved only when they name a folder next to the job file
EXTRA_KEYS = ("name", "preset")          # job keys that are not EditConfig fields
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
DEVICE_PATTERN = r"^(cpu|mps|cuda(:[0-9]+)?)$"
NONEMPTY_PATTERN = r"\S"
_PATTERN_TEXT = {NAME_PATTERN: "a name of letters, digits, '.', '_' and '-'", DEVICE_PATTERN: "cpu, mps, cuda or cuda:N",
                 NONEMPTY_PATTERN: "a non-empty string"}

# Limits as JSON Schema keywords; config.validate() enforces the same (tests/test_jobfile.py checks).
LIMITS: Dict[str, Dict[str, float]] = {
    "frames": {"minimum": 0}, "start_frame": {"minimum": 0}, "stride": {"minimum": 1},
    "inversion_steps": {"minimum": 1, "maximum": 1000}, "inversion_batch_size": {"minimum": 1},
    "steps": {"minimum": 1}, "keyframe_spacing": {"minimum": 1}, "chunk_frames": {"minimum": 1},
    "keyframe_window": {"minimum": 1}, "checkpoint_every": {"minimum": 1}, "seed": {"minimum": 0},
    "pnp_attn_t": {"minimum": 0, "maximum": 1}, "pnp_f_t": {"minimum": 0, "maximum": 1},
    "sdedit_start": {"exclusiveMinimum": 0, "maximum": 1}, "guidance_scale": {"minimum": 0},
    "fps": {"exclusiveMinimum": 0},
}

_DESCRIPTIONS = {
    "video": "input video file or folder of numbered images; relative to the job file's folder",
    "output": "output .mp4 (or a folder for the default file name); relative to the job file's folder",
    "frames": "number of frames to edit (default 40; 0 or null = every selected frame)",
    "prompt": "what the video should become; a list gives one edit (and output) per prompt",
    "use_cache": "read and write the inversion cache (default true)",
    "use_ddim_noise": "SDEdit: noise with the inversion's noise (default true) instead of one random draw",
    "name": "job name in events, summaries and --checkpoint-root folders (default: the file name without .yaml)",
    "preset": "start from a named preset before applying this file's settings",
}

_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
_EVEN = "00|08|16|24|32|40|48|56|64|72|80|88|96"   # last two digits of a multiple of 8 after an even digit
_ODD = "04|12|20|28|36|44|52|60|68|76|84|92"       # ... after an odd digit
_SIDE = (f"(?:64|72|80|88|96|[2468](?:{_EVEN})|[13579](?:{_ODD})"
         f"|[1-9][0-9]*(?:[02468](?:{_EVEN})|[13579](?:{_ODD})))")
SIZE_PATTERN = rf"^\s*{_SIDE}\s*[xX×]\s*{_SIDE}\s*$"   # WIDTHxHEIGHT, both multiples of 8 and >= 64
BYTES_PATTERN = r"^\s*[0-9]*\.?[0-9]+(?:e[0-9]+)?\s*(?:[bB]|[kKmMgGtT](?:[iI]?[bB])?)?\s*$"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file: ``path`` is the field path (``steps``, ``prompt[1]``; "" = the file)."""

    path: str
    message: str
    file: str = ""

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.path, self.message) if part)


@dataclass(frozen=True)
class Spec:
    """What one job key accepts: JSON types, choices, limits, or a custom check and schema."""

    name: str
    kinds: Tuple[str, ...]
    nullable: bool = False
    default: Any = None
    choices: Optional[Tuple[str, ...]] = None
    limits: Dict[str, float] = field(default_factory=dict)
    pattern: Optional[str] = None
    check: Optional[Callable[[Any, str], Tuple[Any, List[Problem]]]] = None
    schema: Optional[dict] = None
    description: str = ""

    def expect(self) -> str:
        if self.choices:
            text = "one of: " + ", ".join(self.choices)
        elif self.pattern:
            text = _PATTERN_TEXT[self.pattern]
        else:
            text = " or ".join({"integer": "an integer", "number": "a number", "boolean": "true or false",
                                "string": "a string"}[k] for k in self.kinds) or "a value"
            low, high = self.limits.get("minimum"), self.limits.get("maximum")
            if "exclusiveMinimum" in self.limits:
                text += f" > {_num(self.limits['exclusiveMinimum'])}" + (f" and <= {_num(high)}" if high is not None else "")
            elif low is not None and high is not None:
                text += f" in [{_num(low)}, {_num(high)}]"
            elif low is not None:
                text += f" >= {_num(low)}"
        return text + (" (or null)" if self.nullable else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_kind(value: Any, kind: str) -> bool:
    """JSON Schema's types: a boolean is no number, and 64.0 is an integer."""
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return kind == "string" and isinstance(value, str)


def _kind_name(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    return f"got {short_repr(value)} ({_kind_name(value)})"


def _check_generic(spec: Spec, value: Any, path: str) -> Tuple[Any, List[Problem]]:
    if value is None:
        return None, [] if spec.nullable else [Problem(path, f"must be {spec.expect()}, got null")]
    if spec.kinds and not any(_is_kind(value, k) for k in spec.kinds):
        hint = " (quote it in YAML)" if spec.kinds == ("string",) and isinstance(value, (bool, int, float)) else ""
        return None, [Problem(path, f"must be {spec.expect()}, {_got(value)}{hint}")]
    if isinstance(value, float) and value.is_integer() and "integer" in spec.kinds and "number" not in spec.kinds:
        value = int(value)
    low, high, above = (spec.limits.get(k) for k in ("minimum", "maximum", "exclusiveMinimum"))
    bad = (spec.choices is not None and value not in spec.choices) \
        or (spec.pattern is not None and not re.search(spec.pattern, value)) \
        or (low is not None and value < low) or (high is not None and value > high) \
        or (above is not None and value <= above)
    if bad:
        return None, [Problem(path, f"must be {spec.expect()}, {_got(value)}")]
    return value, []


def _check_size(value: Any, path: str) -> Tuple[Any, List[Problem]]:
    expect = "'WIDTHxHEIGHT' or [width, height], multiples of 8 and at least 64 (e.g. 512x512), or null"
    if value is None:
        return None, []
    if isinstance(value, str):
        try:
            pair = parse_size(value)
        except ConfigError:
            return None, [Problem(path, f"must be {expect}, {_got(value)}")]
        items = [(path, v) for v in pair]
    elif isinstance(value, list) and len(value) == 2:
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        pair = tuple(int(v) if _is_kind(v, "integer") else v for v in value)
    else:
        return None, [Problem(path, f"must be {expect}, {_got(value)}")]
    problems = [Problem(p, f"must be an integer multiple of 8, at least 64, {_got(v)}") for p, v in items
                if not _is_kind(v, "integer") or v < 64 or v % 8]
    return (None, problems) if problems else (pair, [])


def _check_prompt(value: Any, path: str) -> Tuple[Any, List[Problem]]:
    if isinstance(value, str):
        return (value, []) if value.strip() else (None, [Problem(path, "is empty: say what the video should become")])
    if not isinstance(value, list) or not value:
        return None, [Problem(path, f"must be a non-empty string or a non-empty list of strings, {_got(value)}")]
    problems = [Problem(f"{path}[{i}]", f"must be a non-empty string, {_got(p)}") for i, p in enumerate(value)
                if not isinstance(p, str) or not p.strip()]
    return (None, problems) if problems else (value[0] if len(value) == 1 else tuple(value), [])


def _check_bytes(value: Any, path: str) -> Tuple[Any, List[Problem]]:
    from tokenflow.config import parse_bytes

    if value is None:
        return None, []
    value = int(value) if _is_kind(value, "integer") else value
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError("not a size")
        parse_bytes(value, path)
    except ConfigError:
        return None, [Problem(path, f"must be a size like '12GB', '16GiB' or '800MB', or a positive number of "
                                    f"bytes, {_got(value)}")]
    return value, []


_SPECIAL = {
    "size": (_check_size, {"anyOf": [
        {"type": "string", "pattern": SIZE_PATTERN},
        {"type": "array", "items": {"type": "integer", "minimum": 64, "multipleOf": 8}, "minItems": 2, "maxItems": 2},
        {"type": "null"}]}),
    "prompt": (_check_prompt, {"anyOf": [
        {"type": "string", "pattern": NONEMPTY_PATTERN},
        {"type": "array", "items": {"type": "string", "pattern": NONEMPTY_PATTERN}, "minItems": 1}]}),
    "memory_budget": (_check_bytes, {"anyOf": [
        {"type": "integer", "minimum": 1}, {"type": "string", "pattern": BYTES_PATTERN}, {"type": "null"}]}),
}


def choices() -> Dict[str, Tuple[str, ...]]:
    """The allowed values of every choice field, from the same constants config.validate() uses."""
    from tokenflow.engine.backends import NAMES
    from tokenflow.kernels.dispatch import AUTO, backend_names

    return {"method": METHODS, "propagation": PROPAGATIONS, "backend": NAMES, "keyframe_store": PLACES,
            "inverted_latents": PLACES + ("disk",), "dtype": DTYPES,
            "attention_backend": (AUTO, *backend_names("keyframe_attention")),
            "nearest_backend": (AUTO, *backend_names("cosine_nearest")), "preset": tuple(sorted(PRESETS))}


@functools.lru_cache(maxsize=None)
def specs() -> Dict[str, Spec]:
    """One Spec per job key: every EditConfig field (types from its annotations), then name and preset."""
    hints, allowed, help_text = typing.get_type_hints(EditConfig), choices(), _cli_help()
    out: Dict[str, Spec] = {}
    for f in dataclasses.fields(EditConfig):
        hint = hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        check, schema = _SPECIAL.get(f.name, (None, None))
        pattern = DEVICE_PATTERN if f.name == "device" else NONEMPTY_PATTERN if f.name in REQUIRED else None
        out[f.name] = Spec(f.name, tuple(_JSON_TYPES[a] for a in args if a in _JSON_TYPES),
                           type(None) in args and f.name not in REQUIRED, default, allowed.get(f.name),
                           LIMITS.get(f.name, {}), pattern, check, schema,
                           _DESCRIPTIONS.get(f.name) or help_text.get(f.name) or f.name.replace("_", " "))
    out["name"] = Spec("name", ("string",), pattern=NAME_PATTERN, description=_DESCRIPTIONS["name"])
    out["preset"] = Spec("preset", ("string",), choices=allowed["preset"], description=_DESCRIPTIONS["preset"])
    return out


def _cli_help() -> Dict[str, str]:
    from tokenflow.app.cli import _RENAMES, _add_common

    parser = argparse.ArgumentParser(add_help=False)
    _add_common(parser, edit=True)
    return {_RENAMES.get(a.dest, a.dest): " ".join(a.help.split()) for a in parser._actions
            if a.help and a.help != argparse.SUPPRESS and not a.dest.startswith("no_")}


# --- the JSON Schema ------------------------------------------------------------------------

def job_schema() -> dict:
    """JSON Schema (draft 2020-12) of one job file; dashed spellings are aliases of the fields."""
    properties, aliases = {}, {}
    for name, spec in specs().items():
        if spec.schema is not None:
            prop = dict(spec.schema)
        elif spec.choices:
            prop = {"enum": list(spec.choices) + ([None] if spec.nullable else [])}
        else:
            kinds = list(spec.kinds) + (["null"] if spec.nullable else [])
            prop = {"type": kinds[0] if len(kinds) == 1 else kinds} if spec.kinds else {}
            prop.update(spec.limits)
            if spec.pattern:
                prop["pattern"] = spec.pattern
        prop["description"] = spec.description
        if name not in EXTRA_KEYS + REQUIRED:
            prop["default"] = spec.default
        properties[name] = prop
        if "_" in name:
            aliases[name.replace("_", "-")] = name
    for alias, name in aliases.items():
        properties[alias] = {"$ref": f"#/properties/{name}"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "tokenflow job",
        "description": "One `tokenflow run` job: an input video, an output and edit settings (docs/jobs.md). "
                       "Relative paths resolve against the job file's folder. Not expressible here, checked by "
                       "`tokenflow run --check`: steps <= inversion_steps, resume needs checkpoint_dir, files exist.",
        "type": "object",
        "properties": properties,
        "required": list(REQUIRED),
        "additionalProperties": False,
        "dependentSchemas": {alias: {"not": {"required": [name]}} for alias, name in aliases.items()},
    }


# --- reading and checking job files -----------------------------------------------------------

@dataclass
class Job:
    """One job file: its config when valid, else the problems found."""

    file: str
    name: str
    config: Optional[EditConfig]
    problems: List[Problem]


class _JobLoader(yaml.SafeLoader):
    """The loader of ``yaml.safe_load`` (plain data, no Python tags) that also refuses a key given twice."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<" and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_job_file(path: str) -> Tuple[Any, List[Problem]]:
    """The parsed YAML of a job file, or one problem saying why it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None, [Problem("", "is not UTF-8 text", path)]
    except OSError as exc:
        return None, [Problem("", f"cannot be read ({exc.strerror or exc})", path)]
    try:
        data = yaml.load(text, Loader=_JobLoader)   # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        tag = re.search(r"constructor for the tag '([^']+)'", problem)
        if tag:
            name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            return None, [Problem("", f"{where}YAML tag {name!r} is refused: job files are plain data "
                                      "(mappings, lists, strings, numbers, booleans), nothing is executed", path)]
        return None, [Problem("", f"is not valid YAML ({where}{problem})", path)]
    except RecursionError:
        return None, [Problem("", "is nested too deeply to be a job file (lists or mappings hundreds of levels deep)",
                              path)]
    if data is None:
        return None, [Problem("", "is empty: a job needs at least video, prompt and output", path)]
    if not isinstance(data, dict):
        return None, [Problem("", f"must be a mapping of settings (key: value), got a {_kind_name(data)}", path)]
    return data, []


def _unknown(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), allowed, n=1, cutoff=0.7)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed keys (dashes may replace underscores): {', '.join(allowed)}"


def _resolve(folder: Path, value: str) -> str:
    p = Path(os.path.expanduser(value))
    return str(p) if p.is_absolute() else os.path.normpath(folder / p)


def _local_model(folder: Path, value: str) -> bool:
    if value.startswith("~") or Path(value).is_absolute():
        return True
    return value.startswith(("./", "../", ".\\", "..\\")) or (folder / value).exists()


def parse_job(mapping: Any, job_path: str, *, overrides: Optional[Dict[str, Any]] = None,
              checkpoint_root: Optional[str] = None, check_files: bool = False) -> Job:
    """Check every key of one job (all problems, not the first) and build its EditConfig.

    overrides: fields set on the command line (they win over the file); checkpoint_root: the
    checkpoint folder of a job without one is ``checkpoint_root/<name>``; check_files: the input
    video must exist here.
    """
    name = Path(job_path).stem
    if not isinstance(mapping, dict):
        return Job(job_path, name, None, [Problem("", f"must be a mapping of settings (key: value), {_got(mapping)}",
                                                  job_path)])
    spec_map, given, changes, problems = specs(), {}, {}, []
    for key, value in mapping.items():
        canon = key.replace("-", "_") if isinstance(key, str) else None
        if canon not in spec_map:
            problems.append(Problem(str(key), _unknown(str(key), sorted(spec_map))))
            continue
        if canon in given:
            problems.append(Problem(key, f"is given twice (also as {given[canon]!r})"))
            continue
        given[canon] = key
        spec = spec_map[canon]
        value, found = spec.check(value, key) if spec.check else _check_generic(spec, value, key)
        problems += found
        if not found:
            changes[canon] = value
    for key in REQUIRED:
        if key not in given:
            problems.append(Problem(key, f"is required: {spec_map[key].description}"))
    name = changes.pop("name", name)
    preset = changes.pop("preset", None)
    if changes.get("frames") == 0:
        changes["frames"] = None
    folder = Path(os.path.abspath(job_path)).parent
    for key in PATH_FIELDS:
        if changes.get(key):
            changes[key] = _resolve(folder, changes[key])
    for key in MODEL_FIELDS:
        if changes.get(key) and _local_model(folder, changes[key]):
            changes[key] = _resolve(folder, changes[key])
    changes.update(overrides or {})
    config = dataclasses.replace(PRESETS[preset] if preset else EditConfig(), **changes)
    if checkpoint_root and not config.checkpoint_dir:
        config = config.replace(checkpoint_dir=os.path.join(os.path.abspath(checkpoint_root), name))
    bad = {p.path.split("[")[0].replace("-", "_") for p in problems}
    if not bad & {"steps", "inversion_steps"} and config.steps > config.inversion_steps:
        problems.append(Problem(given.get("steps", "steps"), f"{config.steps} exceeds inversion_steps="
                                f"{config.inversion_steps}: every edit timestep must be an inversion timestep; "
                                "raise inversion_steps or lower steps"))
    if config.resume and not config.checkpoint_dir and "checkpoint_dir" not in bad:
        problems.append(Problem(given.get("resume", "resume"), "needs checkpoint_dir (the folder the interrupted "
                                "run used), or run with --checkpoint-root DIR"))
    if check_files and "video" in changes and not Path(changes["video"]).exists():
        problems.append(Problem(given["video"], f"no such file or folder: {changes['video']}"))
    if not problems:
        try:
            config.validate()
        except ConfigError as exc:
            problems.append(Problem("", str(exc)))
    problems = [dataclasses.replace(p, file=job_path) for p in problems]
    return Job(job_path, name, None if problems else config, problems)


def collect_problems(mapping: Any, job_path: str, **options: Any) -> List[Problem]:
    """Every problem of one job mapping (read from ``job_path``); empty when it would run."""
    return parse_job(mapping, job_path, **options).problems


def load_job(path: str, **options: Any) -> Job:
    data, problems = read_job_file(path)
    if problems:
        return Job(path, Path(path).stem, None, problems)
    return parse_job(data, path, **options)


def expand(patterns: Sequence[str]) -> Tuple[List[str], List[Problem]]:
    """Job files from files, folders (their *.yaml and *.yml, sorted) and globs (sorted), without repeats."""
    files, problems, seen = [], [], set()
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            found = [f for m in sorted(glob.glob(pattern, recursive=True)) for f in (_folder(m) if os.path.isdir(m) else [m])]
            problems += [] if found else [Problem("", "matches no job files", pattern)]
        elif os.path.isdir(pattern):
            found = _folder(pattern)
            problems += [] if found else [Problem("", "folder has no .yaml or .yml job files", pattern)]
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found, problems = [], problems + [Problem("", "no such job file, folder or glob", pattern)]
        for f in found:
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                files.append(f)
    return files, problems


def _folder(path: str) -> List[str]:
    return sorted(str(p) for p in Path(path).iterdir()
                  if p.is_file() and p.suffix.lower() in (".yaml", ".yml") and not p.name.startswith("."))


def load_jobs(patterns: Sequence[str], **options: Any) -> Tuple[List[Job], List[Problem]]:
    """Every job of a run and every problem of any of them, including clashes between jobs."""
    files, problems = expand(patterns)
    jobs = [load_job(f, **options) for f in files]
    problems += [p for job in jobs for p in job.problems]
    owners: Dict[Tuple[str, str], Job] = {}
    for job in jobs:
        claims = [("name", job.name)]
        if job.config is not None:
            from tokenflow.app.jobs import prompt_outputs, resolve_output

            claims += [("output", p) for p in prompt_outputs(resolve_output(job.config), job.config.prompts)]
            claims += [("checkpoint_dir", job.config.checkpoint_dir)] if job.config.checkpoint_dir else []
        for what, value in claims:
            other = owners.setdefault((what, value), job)
            if other is not job:
                problems.append(Problem(what, f"{value!r} is also used by job {other.name!r} ({other.file})"
                                        + ("; set `name:`" if what == "name" else ""), job.file))
    return jobs, problems


# --- running -------------------------------------------------------------------------------

def add_parsers(sub) -> None:
    run = sub.add_parser("run", help="validate job files (YAML), then run them in order: one edit each",
                         description="Run job files: every job is validated first (all problems at once, "
                         "nothing runs if any job is bad), then they run in order. See docs/jobs.md.")
    run.add_argument("jobs", nargs="+", metavar="JOB", help="job files, folders of them (*.yaml, *.yml) or quoted globs")
    run.add_argument("--check", action="store_true", help="only validate: exit 0 if every job is valid, 2 if not")
    run.add_argument("--keep-going", action="store_true", help="run the remaining jobs after a failure "
                     "(default: stop at the first failing job); the exit code is still the first failure's")
    run.add_argument("--overwrite", action="store_true", default=None, help="replace existing outputs in every job")
    run.add_argument("--resume", action="store_true", default=None,
                     help="continue every job from the checkpoint in its checkpoint_dir")
    run.add_argument("--checkpoint-root", metavar="DIR", help="checkpoint_dir = DIR/<job name> for jobs without one")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    run.add_argument("--log-json", action="store_true", help="JSON-lines events on stdout, each with its \"job\"")
    sub.add_parser("schema", help="print the JSON Schema of a job file",
                   description="Print the JSON Schema (draft 2020-12) of one job file, for validating jobs "
                   "before submitting them. Cross-field rules are checked by `tokenflow run --check`.")


def main(args: argparse.Namespace) -> int:
    if args.command == "schema":
        print(json.dumps(job_schema(), indent=2))
        return 0
    from tokenflow.io.progress import Reporter

    class RunReporter(Reporter):
        """The run's one Reporter: every event names its job; notices a skipped job."""

        job: Optional[str] = None
        skipped: Optional[list] = None   # the outputs of a job skipped because they exist

        def event(self, kind: str, **fields) -> None:
            if kind == "skipped":
                self.skipped = list(fields.get("outputs") or [])
            super().event(kind, **({"job": self.job, **fields} if self.job is not None else fields))

    reporter = RunReporter(quiet=args.quiet, json_stream=sys.stdout if args.log_json else None)
    from tokenflow.app.cli import _one_line_warnings, _start_event

    _one_line_warnings(reporter)
    _start_event(reporter, "run", None)
    try:
        return run_jobs(args, reporter)
    except KeyboardInterrupt:
        return _error(reporter, "interrupted; the run stopped", Interrupted.exit_code)


def _error(reporter, message: str, code: int) -> int:
    from tokenflow.errors import EXIT_NAMES

    reporter.event("error", code=EXIT_NAMES.get(code, "internal_error"), exit_code=code, message=message)
    print(f"tokenflow: error: {message}", file=sys.stderr)
    return code


def run_jobs(args: argparse.Namespace, reporter) -> int:
    """Validate every job, then run them in order. Exit code: an interrupt's, else the first failed
    job's, else 7 if a job was locked by another worker, else 0."""
    overrides = {k: True for k in ("overwrite", "resume") if getattr(args, k)}
    jobs, problems = load_jobs(args.jobs, overrides=overrides, checkpoint_root=args.checkpoint_root, check_files=True)
    if problems:
        for p in problems:
            print(f"tokenflow: error: {p}", file=sys.stderr)
        reporter.event("error", code="config_error", exit_code=ConfigError.exit_code,
                       message=f"{len(problems)} problem(s) in the job files; nothing was run",
                       problems=[{"file": p.file, "path": p.path, "message": p.message} for p in problems])
        return ConfigError.exit_code
    if args.check:
        reporter.event("checked", jobs=[{"job": j.name, "file": j.file} for j in jobs])
        if not args.quiet:
            print(f"{len(jobs)} job(s) valid: {', '.join(j.name for j in jobs)}", file=sys.stderr)
        return 0
    from tokenflow.app import jobs as runner

    with stop_on_signals() as stop:   # one stop request for the whole run: no job starts after it
        records = _run_in_order(jobs, runner, reporter, stop, keep_going=args.keep_going)
    reporter.job = None
    left = jobs[len(records):]
    records += [{"job": j.name, "file": j.file, "status": "not run", "exit_code": None, "seconds": 0.0,
                 "outputs": [], "message": ""} for j in left]
    first = {status: next((r for r in records if r["status"] == status), None)
             for status in ("interrupted", "failed", "locked")}
    code = next((r["exit_code"] for r in first.values() if r is not None), 0)
    if stop.requested and code == 0 and left:
        code = Interrupted.exit_code   # stopped between jobs: the rest did not run; rerunning skips the done ones
        _error(reporter, f"stopped by {stop.reason}: {len(left)} job(s) not run; run the same command again to "
                         "do them (finished outputs are skipped)", code)
    reporter.event("run_done", exit_code=code, jobs=records)
    if not args.quiet:
        print(format_run_summary(records), file=sys.stderr)
    return code


def _run_in_order(jobs: List[Job], runner, reporter, stop: StopFlag, keep_going: bool) -> List[Dict[str, Any]]:
    """Run jobs in order until one is interrupted, one fails (unless ``keep_going``) or a stop was
    requested; the records of those that ran."""
    records: List[Dict[str, Any]] = []
    for index, job in enumerate(jobs, 1):
        if stop.requested:
            break
        reporter.job, reporter.skipped, reporter.timings = job.name, None, {}
        reporter.event("job_start", file=job.file, index=index, total=len(jobs))
        if reporter.bars:
            print(f"tokenflow run: [{index}/{len(jobs)}] {job.name} ({job.file})", file=sys.stderr)
        record = _run_one(job, runner, reporter, stop)
        records.append(record)
        reporter.event("job_end", **{k: v for k, v in record.items() if k != "job"})
        if record["status"] in ("failed", "interrupted", "locked"):
            _error(reporter, f"{job.file}: {record['message']}", record["exit_code"])
            if record["status"] == "interrupted" or (record["status"] == "failed" and not keep_going):
                break
        elif reporter.json_stream is None and record["status"] == "done":   # stdout: the written paths
            for output in record["outputs"]:
                print(output)
    return records


def _run_one(job: Job, runner, reporter, stop: StopFlag) -> Dict[str, Any]:
    """Run one valid job; its status, exit code, outputs and seconds (never raises for a job's failure)."""
    start, outputs, message = time.perf_counter(), [], ""
    try:
        results = runner.run_edit(job.config, reporter, stop)
        outputs = [str(r.output) for r in results or []]
        status, code = "done", 0
        if reporter.skipped is not None:
            status, outputs = "skipped", reporter.skipped
    except (InterruptedWithCheckpoint, Interrupted) as exc:
        status, code, message = "interrupted", exc.exit_code, str(exc)
    except KeyboardInterrupt:
        status, code, message = "interrupted", Interrupted.exit_code, "interrupted; no output was written"
    except LockedError as exc:   # another worker is on it: not this run's failure, go on
        status, code, message = "locked", exc.exit_code, str(exc)
    except TokenFlowError as exc:
        status, code, message = "failed", exc.exit_code, str(exc)
    except MemoryError:
        status, code = "failed", ResourceError.exit_code
        message = "out of host memory: use fewer frames or a smaller size"
    except Exception as exc:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("TOKENFLOW_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        status, code = "failed", 1
        message = f"internal error: {type(exc).__name__}: {first} (set TOKENFLOW_DEBUG=1 for a traceback)"
    return {"job": job.name, "file": job.file, "status": status, "exit_code": code,
            "seconds": round(time.perf_counter() - start, 3), "outputs": outputs, "message": message}


def format_run_summary(records: List[Dict[str, Any]]) -> str:
    counts: Dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    width = max(len(r["job"]) for r in records)
    lines = [f"run: {len(records)} job(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    for r in records:
        detail = ", ".join(r["outputs"]) if r["status"] in ("done", "skipped") else \
            f"exit {r['exit_code']}: {r['message']}" if r["exit_code"] else ""
        seconds = f"{r['seconds']:7.1f} s" if r["status"] != "not run" else " " * 9
        lines.append(f"  {r['status']:<11} {r['job']:<{width}}  {seconds}  {detail}".rstrip())
    return "\n".join(lines)
