"""The skip rule (docs/farm.md): a job whose outputs all exist, made by this same job, is done.

"The same job" is the settings fingerprint each output records (``io.stamps``): ``job_fields``
is what the result depends on, computed without loading the model or decoding the input. It is
the checkpoint's notion (``io.checkpoint.fingerprint_fields``) with these changes for outputs:

- the input is hashed from its bytes (``io.stamps.input_hash``), not its decoded pixels;
- how the files are encoded (``ENCODING``: ``fps``, and the codec settings where this version has
  them) and ``clip_model`` with a report (its scores) count;
- ``backend``, ``attention_backend`` and ``nearest_backend`` do not: they change speed and the
  last bits only, so a job redone with another backend is still the same job;
- the checkpoint format and the tokenflow version do not (outputs do not hold checkpoints, and an
  upgrade does not make finished work foreign);
- the model, device and dtype are compared as asked for, not as resolved on this machine:
  ``models.load.comparable_identity`` (a Hub id or version name by its repository, a local folder
  by its configs and file sizes, never downloading), and ``--device``/``--dtype`` as given ("auto").
  A Ray retry on another kind of node, or a node with its own copy of the model, skips finished work.

Output paths, memory and run-control knobs never count (``NOT_FINGERPRINTED``). One copy of the
rule: ``tokenflow edit``, ``tokenflow run`` and ``tokenflow farm`` all reach it through ``jobs.run_edit``.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from tokenflow.config import CONTROL_BUILTIN, EditConfig
from tokenflow.errors import OutputError
from tokenflow.io.checkpoint import fingerprint_fields
from tokenflow.io.progress import Reporter
from tokenflow.io.stamps import differences, input_hash, read_stamp
from tokenflow.models.adapters import comparable_adapters
from tokenflow.models.controlnet import parse_spec
from tokenflow.models.load import comparable_identity
from tokenflow.models.single_file import file_fingerprint

SPEED_ONLY = ("backend", "attention_backend", "nearest_backend")
# how the output files are made from the result: the checkpoint leaves them out (its latents are the
# same whatever they are), the outputs do not (fields this version lacks are skipped)
ENCODING = ("fps", "codec", "crf", "pix_fmt", "frames_format")
_FIX = "--overwrite replaces it (redoes the job), or choose another output path (-o)"


def job_fields(config: EditConfig, *, input_sha256: Optional[str] = None) -> Dict[str, Any]:
    """What the job's outputs depend on, as JSON values (the module docstring). ``input_sha256``:
    when the caller has it (a read clip), else from the input's bytes. The model is
    ``models.load.comparable_identity`` (no network, no weights read); device and dtype are the
    settings as given ("auto" when not), not what this machine resolves."""
    if input_sha256 is None:
        input_sha256 = input_hash(str(config.video))
    # the settings as asked for, not as this machine resolves them: a job retried on another node
    # (another GPU, a CPU, a copy of the model folder, another snapshot) or after an upgrade is the same job
    fields = fingerprint_fields(config, model_identity=comparable_identity(config.model),
                                dtype=config.dtype or "auto", device_type=config.device or "auto",
                                frames_sha256=input_sha256)
    fields["input_sha256"] = fields.pop("frames_sha256")
    for name in ("checkpoint_format", "tokenflow_version"):
        fields.pop(name, None)
    for name in SPEED_ONLY:
        fields.pop(name, None)
    fields.update({name: getattr(config, name) for name in ENCODING if hasattr(config, name)})
    fields["clip_model"] = config.clip_model if config.report else None
    if config.loras or config.embeddings:   # their files' contents, not only their paths (models.adapters)
        fields["adapters"] = comparable_adapters(list(config.loras), list(config.embeddings))
    contents = conditions_contents(config)
    if contents:   # regenerated depth maps, control images or ControlNet weights at the same path: another job
        fields["condition_inputs"] = contents
    return fields


def conditions_contents(config: EditConfig) -> Dict[str, Any]:
    """Fingerprints of the local files behind --depth-maps, --control DIR and --controlnet (sampled
    content, no modification times: copies on other nodes agree); Hub ids and built-ins as named."""
    found: Dict[str, Any] = {}
    if config.depth_maps:
        found["depth_maps"] = _content(config.depth_maps)
    if config.controls:
        found["control"] = [c if c in CONTROL_BUILTIN else _content(c) for c in config.controls]
    if config.controlnets:
        found["controlnet"] = [_content(parse_spec(text).model) for text in config.controlnets]
    return found


def _content(text: str) -> str:
    """A local file's or folder's sampled content fingerprint, else the text itself (a Hub id)."""
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return file_fingerprint(path, mtimes=False)
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{item.relative_to(path).as_posix()}\0{file_fingerprint(item, mtimes=False)}\0".encode())
        return f"folder:sha256:{digest.hexdigest()}"
    return text


def job_outputs(outputs, latents_out, frames_out, reports_out) -> list:
    """Every output of a job as (path, kind): kind "video", "latents" (files), "frames" or "report" (folders)."""
    return ([(p, "video") for p in outputs] + [(p, "latents") for p in latents_out if p]
            + [(p, "frames") for p in frames_out if p] + [(p, "report") for p in reports_out if p])


def output_exists(path: str, kind: str) -> bool:
    """A finished output: a file; a folder with frames in it; a folder with a report.json."""
    if kind in ("video", "latents"):
        return os.path.isfile(path)
    if kind == "report":
        return os.path.isfile(os.path.join(path, "report.json"))
    try:
        with os.scandir(path) as entries:
            return any(entries)
    except OSError:   # not a folder (yet)
        return False


class Skip:
    """The skip rule for one job; ``fields`` are computed once, and only when every output exists."""

    def __init__(self, targets: list, config: EditConfig):
        self.targets, self.config = targets, config
        self._fields: Optional[Dict[str, Any]] = None

    @property
    def fields(self) -> Dict[str, Any]:
        if self._fields is None:
            self._fields = job_fields(self.config)
        return self._fields

    def __call__(self, reporter: Reporter, final: bool = False) -> bool:
        """Without --overwrite: every output exists and records this job's fields -> True (a
        ``skipped`` event and one line); every output exists but one was made by another job or
        records nothing -> OutputError; some exist but not all -> OutputError once ``final``
        (under the locks)."""
        if self.config.overwrite:
            return False
        existing = [(path, kind) for path, kind in self.targets if output_exists(path, kind)]
        if existing and len(existing) == len(self.targets):
            for path, kind in existing:
                self._check_same_job(path, kind)
            paths = [path for path, _ in existing]
            reporter.event("skipped", reason="outputs exist", outputs=paths)
            if not reporter.quiet and reporter.json_stream is None:
                print(f"tokenflow: skipped: every output already exists, made by this same job "
                      f"({', '.join(paths)}); --overwrite redoes the job", file=sys.stderr)
            return True
        if existing and final:
            have = [path for path, _ in existing]
            absent = [(path, kind) for path, kind in self.targets if path not in have]
            missing = [path for path, _ in absent]
            videos = [path for path, kind in existing if kind == "video"]
            if {kind for _, kind in absent} == {"report"} and videos:   # a finished edit, now asked for a report too
                raise OutputError(f"the edit exists ({', '.join(videos)}) but not its report ({', '.join(missing)}): "
                                  "pass --overwrite to redo the edit with its report; or keep the edit, drop --report "
                                  "and make a report of it with `tokenflow report SOURCE EDITED -o DIR` (with the "
                                  "job's --start/--stride/--crop)")
            raise OutputError(f"some outputs of this job exist and some do not (existing: {', '.join(have)}; "
                              f"missing: {', '.join(missing)}), as after an interrupted run or a changed job: pass "
                              "--overwrite to redo the job and replace them, or remove them")
        return False

    def _check_same_job(self, path: str, kind: str) -> None:
        recorded = read_stamp(path, kind)
        what = {"video": "output", "latents": "latents output"}.get(kind, f"{kind} folder")
        if recorded is None:
            raise OutputError(f"{what} '{path}' exists but was not made by tokenflow with settings it can compare "
                              f"(it records none: another program's file, or an older tokenflow's): {_FIX}")
        changed = differences(recorded, self.fields)
        if changed:
            raise OutputError(f"{what} '{path}' exists but was made with other settings ({'; '.join(changed)}): "
                              f"{_FIX}")
