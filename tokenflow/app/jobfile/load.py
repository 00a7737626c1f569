"""Reading job files: YAML as plain data, keys and spellings, paths relative to the job file, and
every problem of every job at once.

The values are judged by ``EditConfig.errors()`` (tokenflow.config), the one validator: this module
only adds what is particular to job files (required keys, ``name`` and ``preset``, unknown or
doubled keys, YAML-level problems, the input existing, clashes between jobs) and turns each
ConfigError into a ``Problem`` under the key the file used.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from tokenflow.app.outputs import VIDEO_SUFFIXES, prompt_outputs, resolve_output
from tokenflow.app.paths import aliasing_problems, job_inputs, job_output_paths, root_problems
from tokenflow.config import CONTROL_BUILTIN, PRESETS, EditConfig, coerce, field_specs, kind_name
from tokenflow.errors import ConfigError, first_line, short_repr

REQUIRED = {   # job keys that must be given, and what they are
    "video": "input video file or folder of numbered images; relative to the job file's folder",
    "prompt": field_specs()["prompt"].rule.description,
    "output": (f"output video ({', '.join(VIDEO_SUFFIXES)}), or a folder ending in '/' (or existing) for the default "
               "file name; relative to the job file's folder"),
}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
EXTRA_KEYS = {   # job keys that are not EditConfig fields: what they accept, and what they are
    "name": ("a name of letters, digits, '.', '_' and '-'",
             "job name in events, summaries and --checkpoint-root folders (default: the file name without .yaml)"),
    "preset": ("one of: " + ", ".join(sorted(PRESETS)), "start from a named preset before applying this file's settings"),
}
# resolved only when they name a path next to the job file
MODEL_FIELDS = ("model", "clip_model", "model_config", "depth_model", "vae")
PATH_FIELDS = tuple(name for name, spec in field_specs().items() if spec.rule.path and name not in MODEL_FIELDS)
# one-or-many "PATH[:SUFFIX]" fields: a local PATH is resolved against the job file's folder
SPEC_FIELDS = ("lora", "embedding", "controlnet", "control")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file: ``path`` is the field path (``steps``, ``prompt``; "" = the file)."""

    path: str
    message: str
    file: str = ""

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.path, self.message) if part)


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
        problem = getattr(exc, "problem", None) or first_line(exc)
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
        return None, [Problem("", f"must be a mapping of settings (key: value), got a {kind_name(data)}", path)]
    return data, []


def _got(value: Any) -> str:
    return "got null" if value is None else f"got {short_repr(value)} ({kind_name(value)})"


def _unknown(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), allowed, n=1, cutoff=0.7)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed keys (dashes may replace underscores): {', '.join(allowed)}"


def _extra_key_problem(key: str, value: Any) -> Optional[str]:
    ok = isinstance(value, str) and (re.search(NAME_PATTERN, value) if key == "name" else value in PRESETS)
    return None if ok else f"must be {EXTRA_KEYS[key][0]}, {_got(value)}"


def _resolve(folder: Path, value: str) -> str:
    """``value`` against the job file's folder; a trailing '/' (a folder output) is kept."""
    p = Path(os.path.expanduser(value))
    path = str(p) if p.is_absolute() else os.path.normpath(folder / p)
    return path + os.sep if value.endswith(("/", os.sep)) and not path.endswith(os.sep) else path


def _resolve_spec(folder: Path, item: str, key: str) -> str:
    """A ``PATH[:SCALE]`` / ``PATH[:TOKEN]`` list item (lora, embedding, controlnet) or a control
    folder, with a local PATH resolved against the job file's folder; Hub ids and the built-in
    controls (canny, depth) stay as they are."""
    if not item.strip() or (key == "control" and item in CONTROL_BUILTIN):
        return item
    if _local_model(folder, item):
        return _resolve(folder, item)
    head, sep, tail = item.rpartition(":")
    if sep and head and tail and _local_model(folder, head):
        return f"{_resolve(folder, head)}:{tail}"
    return item


def _local_model(folder: Path, value: str) -> bool:
    if value.startswith("~") or Path(value).is_absolute():
        return True
    return value.startswith(("./", "../", ".\\", "..\\")) or (folder / value).exists()


def parse_job(mapping: Any, job_path: str, *, overrides: Optional[Dict[str, Any]] = None,
              checkpoint_root: Optional[str] = None, check_files: bool = False,
              output_root: Optional[str] = None, input_root: Optional[str] = None) -> Job:
    """Check every key of one job (all problems, not the first) and build its EditConfig.

    overrides: fields set on the command line (they win over the file); checkpoint_root: the
    checkpoint folder of a job without one is ``checkpoint_root/<name>``; check_files: the input
    video must exist here; output_root / input_root (real paths, ``paths.check_root``): every path
    the job file gives for an output / an input must resolve inside them.
    Always: -o names a video file or a folder, and no output is, contains or lies inside an input
    (the video, local model folders, the job file itself).
    """
    name = Path(job_path).stem
    if not isinstance(mapping, dict):
        return Job(job_path, name, None, [Problem("", f"must be a mapping of settings (key: value), {_got(mapping)}",
                                                  job_path)])
    fields = field_specs()
    allowed = sorted([*fields, *EXTRA_KEYS])
    given: Dict[str, Any] = {}           # field -> the key the file used for it
    changes: Dict[str, Any] = {}
    problems: List[Problem] = []
    for key, value in mapping.items():
        canon = key.replace("-", "_") if isinstance(key, str) else None
        if canon not in fields and canon not in EXTRA_KEYS:
            problems.append(Problem(str(key), _unknown(str(key), allowed)))
        elif canon in given:
            problems.append(Problem(key, f"is given twice (also as {given[canon]!r})"))
        elif canon in EXTRA_KEYS:
            given[canon] = key
            problem = _extra_key_problem(canon, value)
            problems += [Problem(key, problem)] if problem else []
            changes[canon] = value if problem is None else None
        else:
            given[canon] = key
            changes[canon] = coerce(canon, value)
    name = changes.pop("name", None) or name
    preset = changes.pop("preset", None)
    if changes.get("frames") == 0:   # job files spell "every frame" as 0, like --frames 0
        changes["frames"] = None
    folder = Path(os.path.abspath(job_path)).parent
    for key in PATH_FIELDS + MODEL_FIELDS:
        value = changes.get(key)
        if isinstance(value, str) and value and (key in PATH_FIELDS or _local_model(folder, value)):
            changes[key] = _resolve(folder, value)
    for key in SPEC_FIELDS:
        value = changes.get(key)
        if isinstance(value, (str, tuple)):
            items = (value,) if isinstance(value, str) else value
            resolved = tuple(_resolve_spec(folder, item, key) if isinstance(item, str) else item for item in items)
            changes[key] = resolved[0] if isinstance(value, str) else resolved
    changes.update(overrides or {})
    config = own = dataclasses.replace(PRESETS[preset] if preset else EditConfig(), **changes)
    if checkpoint_root and not config.checkpoint_dir:   # the command line's choice: not confined by the roots
        config = config.replace(checkpoint_dir=os.path.join(os.path.abspath(checkpoint_root), name))
    for error in config.errors():   # the one validator: every field and every rule between fields
        if error.field in REQUIRED and error.field not in given:
            continue                 # EditConfig's default ("" prompt) of a missing key: "is required" below
        problems.append(Problem(given.get(error.field, error.field or ""), error.reason or str(error)))
    for key in REQUIRED:
        if key not in given:
            problems.append(Problem(key, f"is required: {REQUIRED[key]}"))
        elif key != "prompt" and (changes[key] is None or (isinstance(changes[key], str) and not changes[key].strip())):
            problems.append(Problem(given[key], f"is required: {REQUIRED[key]}; {_got(changes[key])}"))
    if check_files and isinstance(config.video, str) and "video" in given and not Path(config.video).exists():
        problems.append(Problem(given["video"], f"no such file or folder: {config.video}"))
    if "output" in given and _paths_usable(config):
        for field, message in _path_problems(own, config, job_path, name, output_root, input_root):
            problems.append(Problem(given.get(field, field), message))
    problems = [dataclasses.replace(p, file=job_path) for p in problems]
    return Job(job_path, name, None if problems else config, problems)


def _paths_usable(config: EditConfig) -> bool:
    """The output and path fields are strings (or unset) and the prompts are strings: the path
    checks can run (other problems of these keys are reported by the validator)."""
    path_fields = ("video", "output", "save_frames", "save_latents", "report", "checkpoint_dir", "cache_dir",
                   *MODEL_FIELDS)
    return (isinstance(config.output, str) and bool(config.output.strip())
            and all(getattr(config, f) is None or isinstance(getattr(config, f), str) for f in path_fields)
            and isinstance(config.prompt, (str, tuple)) and all(isinstance(p, str) for p in config.prompts))


def _path_problems(own: EditConfig, config: EditConfig, job_path: str, name: str, output_root: Optional[str],
                   input_root: Optional[str]) -> List[Tuple[str, str]]:
    """(field, message): -o's extension, outputs aliasing inputs (``config``, with the checkpoint
    folder from --checkpoint-root), and paths of the job file (``own``) outside the roots."""
    try:
        videos = prompt_outputs(resolve_output(config), config.prompts or ("",))
    except ConfigError as exc:
        return [("output", exc.reason or str(exc))]
    found = aliasing_problems(job_output_paths(config, videos), job_inputs(config, [("job file", job_path)]))
    cache = [("cache_dir", own.cache_dir)] if own.cache_dir else []   # written, so confined like the outputs
    found += [(field, f"{reason} (job {name!r})") for field, reason in
              root_problems(own, output_root=output_root, input_root=input_root, video_outputs=videos,
                            extra_outputs=cache)]
    return found


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
            claims += [("output", p) for p in prompt_outputs(resolve_output(job.config), job.config.prompts)]
            claims += [("checkpoint_dir", job.config.checkpoint_dir)] if job.config.checkpoint_dir else []
        for what, value in claims:
            other = owners.setdefault((what, value), job)
            if other is not job:
                problems.append(Problem(what, f"{value!r} is also used by job {other.name!r} ({other.file})"
                                        + ("; set `name:`" if what == "name" else ""), job.file))
    return jobs, problems
