"""Resumable runs: the inversion's and the edit's state, saved atomically between steps.

One checkpoint folder (``--checkpoint-dir``) holds one run's state (docs/checkpoints.md):

    inversion.pt   phase "invert": next step, current latent x, the per-timestep latents saved so
                   far and z0; once complete (step == total) only while the inversion cache does
                   not hold the inversion (``--no-cache`` or an unwritable cache)
    edit.pt        phase "edit": next step, xs [P,N,4,h,w], the keyframe sampler's RNG state, the
                   keyframes drawn so far, the frames per propagation call (and whether they were
                   halved after an out-of-memory)

Every file also holds the settings fingerprint (``fingerprint_fields``) and the chunk sizes the
run used (``PLAN_SIZES``): a resumed run keeps them, so it does exactly the arithmetic of an
uninterrupted one. It also records the ``environment`` that changes only the last bits (torch
threads, torch and diffusers versions, device name): resuming where it differs warns that the
result equals an uninterrupted run only to float rounding, or is refused with ``strict``.
Files are written to a temp file, fsynced and renamed over the previous one: at any moment the
folder holds a complete checkpoint (the previous one until the new one is on disk).
``Checkpointer.between_steps`` is what the loops call between two steps: it saves every
``every`` steps, and when a stop was requested (``interrupt.StopFlag``) it saves and raises
``InterruptedWithCheckpoint`` (or ``Interrupted`` without a folder).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from tokenflow import __version__
from tokenflow.device import device_name
from tokenflow.errors import ConfigError, Interrupted, InterruptedWithCheckpoint, OutputError, one_line
from tokenflow.io.hashing import fingerprint
from tokenflow.io.outputs import STATE_FILES, atomic_file, remove_path, temp_siblings

FORMAT_VERSION = 1
MAGIC = "tokenflow-checkpoint"
PHASE_WORDS = {"invert": "inversion", "edit": "edit"}
PLAN_SIZES = ("chunk_frames", "inversion_frames", "vae_frames")

# EditConfig fields that do not enter the fingerprint (everything else does, new fields included):
NOT_FINGERPRINTED = frozenset({
    # where the input comes from and the outputs go (the input's decoded pixels are hashed instead)
    "video", "output", "save_frames", "save_latents", "report", "clip_model", "fps",
    # how the output files are encoded (the latents and the frames are the same whatever the codec)
    "codec", "crf", "pix_fmt", "frames_format",
    # how the model is found and loaded (its identity, resolved dtype and device type are recorded instead)
    "model", "device", "dtype", "allow_pickle",
    # the inversion cache and run control
    "cache_dir", "use_cache", "overwrite", "checkpoint_dir", "checkpoint_every", "resume", "strict_resume",
    # memory and speed only: the checkpoint carries the chunk sizes in effect and a resumed run keeps them
    "memory_budget", "chunk_frames", "inversion_batch_size", "keyframe_store", "inverted_latents",
})

_DESCRIPTIONS = {"frames_sha256": "the input frames (sha256 of their pixels)", "model_identity": "the model",
                 "dtype": "the dtype", "device_type": "the device type",
                 "tokenflow_version": "the tokenflow version", "checkpoint_format": "the checkpoint format"}


# What changes the last bits of a result but not the settings (docs/checkpoints.md, "Resuming on
# another machine"): recorded at every save, compared on resume; a difference warns (or, with
# strict, refuses). Not in the fingerprint: a checkpoint stays usable on another machine.
ENVIRONMENT_KEYS = ("threads", "torch", "diffusers", "device")
_ENVIRONMENT_WORDS = {"threads": "torch threads", "torch": "torch version", "diffusers": "diffusers version",
                      "device": "device"}


def environment(device=None) -> Dict[str, Any]:
    """This process's ``ENVIRONMENT_KEYS``: ``torch.get_num_threads()``, the torch and diffusers
    versions and the device's name (the GPU's, or the CPU model for ``cpu``)."""
    try:
        diffusers = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        diffusers = None
    device = torch.device(device if device is not None else "cpu")
    name = device_name(device)
    if device.type == "cpu":   # device_name adds "(N CPUs, T torch threads)": threads are compared on their own
        name = name.rsplit(" (", 1)[0]
    return {"threads": torch.get_num_threads(), "torch": str(torch.__version__), "diffusers": diffusers, "device": name}


def environment_differences(saved: Optional[Mapping[str, Any]], now: Mapping[str, Any]) -> List[str]:
    """``"torch threads: checkpoint 2, now 1"`` for each of ``ENVIRONMENT_KEYS`` that differs."""
    saved = saved or {}
    return [f"{_ENVIRONMENT_WORDS[k]}: checkpoint {_short(saved.get(k))}, now {_short(now.get(k))}"
            for k in ENVIRONMENT_KEYS if saved.get(k) != now.get(k)]


def fingerprint_fields(config, *, model_identity: str, dtype: str, device_type: str,
                       frames_sha256: str) -> Dict[str, Any]:
    """What a run's result depends on, as JSON values: the result-affecting EditConfig fields, the
    model identity, dtype, device type, the input frames' pixel hash and the tokenflow version."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in NOT_FINGERPRINTED}
    fields["prompt"] = list(config.prompts)
    fields.update(model_identity=model_identity, dtype=dtype, device_type=device_type, frames_sha256=frames_sha256,
                  tokenflow_version=__version__, checkpoint_format=FORMAT_VERSION)
    return json.loads(json.dumps(fields, sort_keys=True))   # tuples -> lists: what a loaded checkpoint holds


def remove_checkpoint(folder: Optional[str]) -> None:
    """Delete a finished run's state files (and leftover temp files); the folder itself stays."""
    if not folder or not Path(folder).is_dir():
        return
    for name in STATE_FILES.values():
        (Path(folder) / name).unlink(missing_ok=True)
    _sweep_temps(Path(folder))


class Checkpointer:
    """Saves and restores one run's state in ``folder``; without a folder it only watches ``stop``.

    fields: ``fingerprint_fields`` of the run. resume: use a matching checkpoint found in the folder
    (one made with other settings raises ConfigError); without it an old checkpoint is replaced.
    strict: refuse (ConfigError) to resume a checkpoint saved in another ``environment`` (or one that
    records none) instead of warning. device: the run's device, for the environment's device name.
    """

    def __init__(self, folder: Optional[str], *, every: int = 5, fields: Optional[Mapping[str, Any]] = None,
                 resume: bool = False, stop=None, reporter=None, strict: bool = False, device=None):
        self.folder = Path(folder) if folder else None
        self.every = max(1, int(every))
        self.fields = dict(fields or {})
        self.fingerprint = fingerprint(self.fields)
        self.resume = resume
        self.strict = strict
        self.device = device
        self._environment: Optional[Dict[str, Any]] = None   # computed once; threads are read at every save
        self.stop = stop
        self.reporter = reporter
        self.plan_sizes: Dict[str, int] = {}      # chunk sizes in effect, saved with every state
        self._restored: Dict[str, dict] = {}
        self._last_step: Dict[str, int] = {}      # per phase: the step of the state on disk
        self._save_failed = False

    # --- opening and restoring -------------------------------------------------------------

    def open(self) -> "Checkpointer":
        """Prepare the folder. With ``resume``: load and verify what it holds (ConfigError if made with
        other settings; an unreadable file is moved aside with a warning). Without: replace an old one."""
        if self.folder is None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"--checkpoint-dir {self.folder} cannot be created ({exc.strerror or exc}); "
                              "pass a writable folder") from None
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise OutputError(f"--checkpoint-dir {self.folder} is not writable; pass a writable folder")
        _sweep_temps(self.folder)
        existing = [p for p in (self.path(phase) for phase in STATE_FILES) if p.exists()]
        if not self.resume:
            if existing:
                warnings.warn(f"replacing the checkpoint in {self.folder} (this run starts over; pass --resume "
                              "to continue a checkpoint instead)")
                for path in existing:
                    path.unlink(missing_ok=True)
            return self
        messages = []
        for phase in STATE_FILES:
            state = self._load(phase, messages)
            if state is not None:
                self._restored[phase] = state
                self._last_step[phase] = int(state["step"])
        if not self._restored:
            self._info(f"--resume: no checkpoint in {self.folder}; starting from scratch")
            return self
        self._check_environment()   # before "resuming ...": a strict refusal resumes nothing
        for message in messages:
            self._info(message)
        return self

    def environment(self) -> Dict[str, Any]:
        """The ``environment`` saved with every state (threads as they are now)."""
        if self._environment is None:
            self._environment = environment(self.device if self.device is not None
                                            else self.fields.get("device_type", "cpu"))
        return {**self._environment, "threads": torch.get_num_threads()}

    def _check_environment(self) -> None:
        """Warn (or, strict, refuse) when a restored state was saved in another environment."""
        now, differ, unknown = self.environment(), [], False
        for state in self._restored.values():
            saved = state.get("environment")
            if not isinstance(saved, dict):
                unknown = True
                continue
            differ += [d for d in environment_differences(saved, now) if d not in differ]
        if not differ and not unknown:
            return
        what = "; ".join(differ + (["no environment recorded (saved by an older tokenflow)"] if unknown else []))
        if self.strict:
            raise ConfigError(
                f"--strict-resume: the checkpoint in {self.folder} was saved elsewhere ({what}), so resuming it "
                "would equal an uninterrupted run only to float rounding; resume it with the same thread count "
                "(OMP_NUM_THREADS, the farm's --cpus-per-job), versions and device, or drop --strict-resume")
        warnings.warn(f"resuming the checkpoint in {self.folder} in another environment ({what}): the result "
                      "equals an uninterrupted run only to float rounding, not bit for bit")

    def path(self, phase: str) -> Path:
        return self.folder / STATE_FILES[phase]

    def restored(self, phase: str) -> Optional[dict]:
        """The state of ``phase`` loaded by ``open`` (tensors on the CPU), or None."""
        return self._restored.get(phase)

    def keep_plan(self, plan):
        """``plan`` with the chunk sizes of the run being resumed (so the arithmetic is the same as
        without the interruption); remembers the sizes in effect to save them with every state."""
        saved = next((s["plan"] for s in (self.restored("edit"), self.restored("invert")) if s is not None), None)
        if saved:
            changed = {k: int(v) for k, v in saved.items() if k in PLAN_SIZES and getattr(plan, k) != v}
            if changed:
                plan = dataclasses.replace(plan, **changed)
                self._info("resuming with the interrupted run's chunk sizes ("
                           + ", ".join(f"{k} {v}" for k, v in changed.items()) + ") so the result is the same")
        self.plan_sizes = {k: int(getattr(plan, k)) for k in PLAN_SIZES}
        return plan

    def _load(self, phase: str, messages: List[str]) -> Optional[dict]:
        path = self.path(phase)
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("magic") != MAGIC:
                raise ValueError("not a tokenflow checkpoint")
            missing = [k for k in ("fingerprint", "fields", "phase", "step", "total", "plan") if k not in state]
            if missing or state["phase"] != phase or not isinstance(state["fields"], dict):
                raise ValueError(f"incomplete state (missing {', '.join(missing) or 'nothing'}, phase "
                                 f"{state.get('phase')!r})")
        except Exception as exc:   # truncated, garbage, foreign: never used, kept aside for inspection
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
                where = f"moved it to {aside.name}"
            except OSError:
                where = "left it in place"
            reason = one_line(exc, 110)
            warnings.warn(f"checkpoint {path} is unreadable ({reason}); {where} and running the "
                          f"{PHASE_WORDS[phase]} from its start")
            return None
        if state["fields"] != self.fields or state["fingerprint"] != self.fingerprint:
            raise ConfigError(self._mismatch(state["fields"]))
        if state["step"] >= state["total"]:
            messages.append(f"checkpoint {path}: the {PHASE_WORDS[phase]} is complete ({state['total']} steps)")
        else:
            messages.append(f"resuming the {PHASE_WORDS[phase]} at step {state['step']} of {state['total']} from {path}")
        return state

    def _mismatch(self, saved: Mapping[str, Any]) -> str:
        keys = sorted(set(saved) | set(self.fields))
        differ = [k for k in keys if saved.get(k, "<absent>") != self.fields.get(k, "<absent>")]
        parts = [f"{k}{' (' + _DESCRIPTIONS[k] + ')' if k in _DESCRIPTIONS else ''}: checkpoint "
                 f"{_short(saved.get(k, '<absent>'))}, now {_short(self.fields.get(k, '<absent>'))}" for k in differ]
        return (f"the checkpoint in {self.folder} was made with other settings ({'; '.join(parts) or 'fingerprint'}); "
                "rerun with the checkpoint's settings to resume it, or drop --resume (or pass another "
                "--checkpoint-dir) to start over")

    # --- saving --------------------------------------------------------------------------------

    def between_steps(self, phase: str, step: int, total: int, state: Callable[[], Dict[str, Any]], *,
                      final: bool = False) -> None:
        """Call between two steps of a loop, ``step`` of ``total`` steps done; ``state()`` gives what
        continuing needs. Saves every ``every`` steps (and at ``final``); on a stop request saves and
        raises InterruptedWithCheckpoint (Interrupted when there is no folder)."""
        stopping = self.stop is not None and self.stop.requested
        if self.folder is not None and self._last_step.get(phase) != step and \
                (stopping or final or (step > 0 and step % self.every == 0)):
            try:
                self.save(phase, step, total, state())
            except OSError as exc:
                if stopping:
                    raise Interrupted(f"stopped by {self.stop.reason} after {PHASE_WORDS[phase]} step {step} of "
                                      f"{total}, but the checkpoint could not be written to {self.folder} "
                                      f"({exc.strerror or exc}); no output was written") from None
                if not self._save_failed:
                    warnings.warn(f"could not write a checkpoint to {self.folder} ({exc.strerror or exc}); "
                                  "continuing without one")
                self._save_failed = True
        self.check_stop(phase, step, total)

    def check_stop(self, phase: str, step: int, total: int) -> None:
        """Raise when a stop was requested (InterruptedWithCheckpoint, naming the step on disk, or
        Interrupted without a folder); saves nothing."""
        if self.stop is None or not self.stop.requested:
            return
        if self.folder is None:
            raise Interrupted(f"stopped by {self.stop.reason} after {PHASE_WORDS[phase]} step {step} of {total}; "
                              "no output was written (pass --checkpoint-dir DIR to make runs resumable)")
        kept = self._last_step.get(phase)
        if kept is None:
            raise Interrupted(f"stopped by {self.stop.reason} after {PHASE_WORDS[phase]} step {step} of {total}, "
                              f"before a checkpoint was written to {self.folder}; no output was written")
        raise InterruptedWithCheckpoint(
            f"stopped by {self.stop.reason} after {PHASE_WORDS[phase]} step {kept} of {total}; the checkpoint is "
            f"in {self.folder}: run the same command with --resume to continue")

    def save(self, phase: str, step: int, total: int, payload: Mapping[str, Any]) -> Path:
        """Write ``phase``'s state atomically (temp file, fsync, rename over the previous one)."""
        state = {"magic": MAGIC, "format": FORMAT_VERSION, "fingerprint": self.fingerprint, "fields": self.fields,
                 "phase": phase, "step": int(step), "total": int(total), "plan": dict(self.plan_sizes),
                 "environment": self.environment(), "saved_at": time.time(),
                 **{k: _to_cpu(v) for k, v in payload.items()}}
        target = self.path(phase)
        with atomic_file(target, "wb", durable=True) as f:
            torch.save(state, f)
        self._last_step[phase] = int(step)
        if self.reporter is not None:
            self.reporter.event("checkpoint", phase=phase, step=int(step), total=int(total), path=str(target))
        return target

    def discard(self, phase: str) -> None:
        """Remove ``phase``'s state (e.g. the inversion once the cache holds it)."""
        if self.folder is not None:
            self.path(phase).unlink(missing_ok=True)
            self._last_step.pop(phase, None)

    def _info(self, message: str) -> None:
        if self.reporter is not None:
            self.reporter.info(message)


def _to_cpu(value):
    """A CPU copy with its own storage (a view would drag its whole base tensor into the file)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).contiguous()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _sweep_temps(folder: Path) -> None:
    """Temp files of a writer killed mid-save (one folder is one run, so none is being written now)."""
    for name in STATE_FILES.values():
        for tmp in temp_siblings(folder / name):
            remove_path(tmp)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, list) or len(value) != 1 else repr(value[0])
    return text if len(text) <= limit else text[:limit - 3] + "..."
