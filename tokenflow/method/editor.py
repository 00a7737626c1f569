"""The TokenFlow method: invert a video, then edit it with keyframe + propagation passes.

Data flow (tensor shapes for N frames of HxW, latents of h=H/8, w=W/8):
    frames [N,3,H,W] -> VAE mean * scale -> z0 [N,4,h,w] -> DDIM inversion -> {t: [N,4,h,w]}
    x = add_noise(z0, eps, t0); per step t (``denoise.Denoiser``): keyframe pass, propagation chunks
    -> final latents [N,4,h,w] per prompt -> VAE decode -> frames [N,3,H,W] in [0,1]
Chunk sizes (VAE, inversion, propagation) and where the keyframe store and the inverted latents
live come from the memory plan (``engine.planner``); they change memory and speed, not results.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from tokenflow.config import DEFAULT_MODEL, EditConfig, parse_bytes
from tokenflow.device import resolve_device, resolve_dtype, synchronizer
from tokenflow.engine import UNetRunner
from tokenflow.engine.backends import make_backend
from tokenflow.engine.latents import DiskLatents, InvertedLatents
from tokenflow.engine.memory import calibrate, default_budget
from tokenflow.engine.planner import Controls, MemoryPlan, make_plan
from tokenflow.engine.processors import TokenFlowUNet
from tokenflow.errors import ConfigError, ResourceError, one_line
from tokenflow.interrupt import StopFlag
from tokenflow.io.cache import InversionCache, InversionKey
from tokenflow.io.checkpoint import Checkpointer, fingerprint_fields
from tokenflow.io.progress import Reporter
from tokenflow.io.read import Clip, FrameCheck, read_video
from tokenflow.kernels import KernelChoice, check_backends
from tokenflow.method import schedule
from tokenflow.method.conditions import EditConditions, build_conditions
from tokenflow.method.ddpm import DDIMStepper, DDPMSchedule, DDPMStepper, ddpm_invert, noisy_latents, row_groups
from tokenflow.method.denoise import Denoiser, text_branches
from tokenflow.method.inversion import (
    EDIT_FIELDS,
    Inversion,
    ddim_invert,
    edit_config_for,
    edit_timesteps,
    noise_from_inversion,
    refuse_clip_keywords,
)
from tokenflow.models.architectures import controlnet_stand_ins
from tokenflow.models.load import SDModel, encode_prompt, is_out_of_memory, load_model


@dataclass
class EditResult:
    """frames: [N,3,H,W] float32 in [0,1] (CPU); latents: [N,4,h,w] float32 final latents (CPU)."""

    frames: torch.Tensor
    latents: torch.Tensor
    clip: Clip
    timesteps: List[int]
    keyframes: List[List[int]]
    timings: Dict[str, float]
    model_is_tiny: bool
    correspondences: Optional[list] = None   # [(step, chunk, layer, idx [m,P,S])] if recorded
    output: Optional[str] = None
    prompt: str = ""
    plan: Optional[MemoryPlan] = None


def read_clip(video: str, config: EditConfig, reporter: Reporter, on_frame: Optional[FrameCheck] = None,
              family: str = "sd") -> Clip:
    """Decode the frames ``config`` selects from a video file or image folder (``on_frame``: see
    ``io.read.read_video``; the CLI checks host memory there; ``family``: the model's, for the
    default size)."""
    with reporter.stage("read"):
        return read_video(video, frames=config.frames, start=config.start_frame, stride=config.stride,
                          size=config.size, crop=config.crop, on_frame=on_frame, family=family)


def _oom_as_resource_error(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; CPU/MPS OOM are plain ones
            if not is_out_of_memory(exc):
                raise
            raise ResourceError(
                f"out of memory on the device ({one_line(exc, 120)}): set a --memory-budget below "
                "what the device has free (see --plan), or use fewer frames (--frames), a smaller --size, "
                "--dtype float16 or a --keyframe-window") from None
    return wrapper


class Editor:
    """TokenFlow video editor around one loaded Stable Diffusion model.

    >>> editor = Editor.from_pretrained("stabilityai/stable-diffusion-2-1-base", device="cuda", dtype="float16")
    >>> result = editor.edit("wolf.mp4", "a shiny silver robotic wolf", inversion_prompt="a wolf")
    >>> robot, marble = editor.edit_many("wolf.mp4", ["a robotic wolf", "a marble wolf"], inversion_prompt="a wolf")
    >>> inv = editor.invert("wolf.mp4", inversion_prompt="a wolf", inversion_steps=50, steps=10)
    >>> result = editor.edit(inv, "a marble wolf")   # 10 steps: the edit inv was made for

    Settings are ``EditConfig`` fields, given as ``config=`` and/or keywords (keywords win).
    ``inversion_steps`` is the number of DDIM inversion steps (default 500), ``steps`` the number
    of edit (denoising) steps (default 50), in ``invert`` as in ``edit``.
    """

    def __init__(self, model: SDModel, *, cache: Optional[InversionCache] = None,
                 reporter: Optional[Reporter] = None):
        self.model = model
        self.cache = cache if cache is not None else InversionCache()
        self.reporter = (reporter or Reporter(quiet=True)).use_device(model.device)   # stage timings synchronise
        self.tokenflow = TokenFlowUNet(model.unet)
        self.runner = UNetRunner(model.unet, self.tokenflow)
        self._backends: Dict[tuple, object] = {}   # compiled graphs / sessions, reused across calls
        self.controlnets: Dict[tuple, tuple] = {}   # (model, dtype, device) -> (ControlNet, identity): method.control

    def use_backend(self, config: EditConfig, plan: Optional[MemoryPlan] = None) -> str:
        """Run the UNet through ``config.backend`` (built once per backend and kernel choice); a
        backend with fixed shape ranges (TensorRT profiles) is told the plan's call sizes."""
        if config.backend == "eager":
            self.runner.backend = None
            return "eager"
        key = (config.backend, config.attention_backend, config.nearest_backend)
        if key not in self._backends:
            kernels = KernelChoice(config.attention_backend, config.nearest_backend)
            self._backends[key] = make_backend(config.backend, self.tokenflow, kernels,
                                               model_identity=self.model.identity,
                                               cache_root=config.cache_dir or str(self.cache.root))
            if hasattr(self._backends[key], "log"):   # builds that take minutes say so
                self._backends[key].log = self.reporter.info
            self.reporter.info(f"UNet backend: {self._backends[key].describe()}")
        self.runner.backend = self._backends[key]
        if plan is not None and hasattr(self.runner.backend, "use_plan"):
            self.runner.backend.use_plan(plan)
        return config.backend

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, *, device: Union[str, torch.device, None] = None,
                        dtype: Union[str, torch.dtype, None] = None, cache_dir: Optional[str] = None,
                        use_cache: bool = True, reporter: Optional[Reporter] = None,
                        allow_pickle: bool = False, model_config: Optional[str] = None, loras: Sequence[str] = (),
                        embeddings: Sequence[str] = (), vae: Optional[str] = None) -> "Editor":
        """Load a Hub id, a local diffusers folder, a single-file checkpoint (``model_config``: its
        --model-config), an SD version ('1.5', '2.0', '2.1', '2-depth') or 'tiny' (safetensors weights
        only unless ``allow_pickle``), with ``loras`` ("PATH_OR_ID[:SCALE]", fused into the weights)
        and textual-inversion ``embeddings`` ("PATH[:TOKEN]"); ``vae``: another VAE (folder or Hub id)."""
        dev = resolve_device(None if device is None else str(device))
        dt = resolve_dtype(dtype, dev)
        reporter = reporter or Reporter(quiet=True)
        with reporter.stage("load"):
            sd = load_model(model, dev, dt, allow_pickle=allow_pickle, model_config=model_config, loras=loras,
                            embeddings=embeddings, vae=vae)
        cache = InversionCache(Path(cache_dir) if cache_dir else None, enabled=use_cache)
        return cls(sd, cache=cache, reporter=reporter)

    # --- planning --------------------------------------------------------------------------

    def plan(self, video: Union[str, Clip], config: Optional[EditConfig] = None, **overrides) -> MemoryPlan:
        """The memory plan of editing ``video`` with ``config`` on this model's device (no edit runs)."""
        config = (config or EditConfig()).replace(**overrides)
        return self._plan(self.load_clip(video, config), config)

    def _plan(self, clip: Clip, config: EditConfig, conditions: Optional[EditConditions] = None) -> MemoryPlan:
        """The plan; ``conditions``: the edit's (its ControlNets are counted), else (``plan``, ``--plan``)
        ``config.controlnet``'s counted by their shapes without loading them."""
        n, _, height, width = clip.frames.shape
        scale = self.model.vae_scale_factor
        spacing = min(config.keyframe_spacing, n)
        batched_rows = None
        if config.inversion == "ddpm":   # noisy latents and noise maps of every edit timestep
            saved = [*self._edit_timesteps(config)] * 2
            if _ddpm_across_timesteps(config, conditions):   # calls batch (timestep, frame) rows: _invert_ddpm
                batched_rows = n * len(saved) // 2
        else:
            inv_ts = schedule.timesteps_of(self.model.scheduler_config, config.inversion_steps)
            saved = schedule.inversion_save_timesteps(inv_ts, self._edit_timesteps(config)) | {max(inv_ts)}
        if config.memory_budget is not None:
            budget, source = parse_bytes(config.memory_budget), "--memory-budget"
        else:
            budget, source = default_budget(self.model.device)
        cache_root = Path(config.cache_dir) if config.cache_dir else None
        if conditions is not None:
            units = conditions.edit.controls
            controls = Controls(nets=tuple(u.net for u in units), source=conditions.edit.control_source,
                                inversion=bool(conditions.inversion.controls),
                                note=", ".join(u.name for u in units))
        elif config.controlnets:
            nets, note = controlnet_stand_ins(config.controlnets, self.model.unet, self.model.dtype)
            controls = Controls(nets=tuple(nets), source=config.control_during_inversion,
                                inversion=config.control_during_inversion, note=note)
        else:
            controls = Controls()
        with self.reporter.stage("plan"):
            calibration = calibrate(self.model, cache_root)  # its own small cache, also with --no-cache
            plan = make_plan(self.model, frames=n, latent_size=(height // scale, width // scale),
                             branches=1 + 2 * max(1, len(config.prompts)), keyframes=math.ceil(n / spacing),
                             window=config.keyframe_window or 0, steps=len(saved), budget=budget,
                             budget_source=source, calibration=calibration, chunk_frames=config.chunk_frames,
                             inversion_frames=config.inversion_batch_size, keyframe_store=config.keyframe_store,
                             inverted_latents="host" if config.inverted_latents == "disk" else config.inverted_latents,
                             use_cache=config.use_cache, backend=config.backend,
                             nearest_backend=config.nearest_backend, controls=controls,
                             inversion_rows=batched_rows)
        if config.inversion == "ddpm":
            plan = dataclasses.replace(plan, latents_note=f"DDPM inversion: {len(saved) // 2} noisy latents and "
                                                          f"{len(saved) // 2} noise maps")
        return plan

    # --- frames <-> latents ----------------------------------------------------------------

    def frame_size(self, latents: torch.Tensor) -> tuple:
        """(width, height) in pixels of frames with ``latents`` [..., h, w] (SDXL's time ids)."""
        return (latents.shape[-1] * self.model.vae_scale_factor, latents.shape[-2] * self.model.vae_scale_factor)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, frames_per_call: int = 8) -> torch.Tensor:
        """[N,3,H,W] in [0,1] -> VAE posterior mean * scaling factor, [N,4,h,w] float32."""
        vae, out = self.model.vae, []
        for i in range(0, len(frames), frames_per_call):
            batch = (2 * frames[i:i + frames_per_call] - 1).to(self.model.device, vae.dtype)
            out.append(vae.encode(batch).latent_dist.mean.float() * self.model.scaling_factor)
        # contiguous, not the VAE's channels-last strides: conv kernels (and so the last bits of the
        # result) depend on the memory format, and cached latents load contiguous
        return torch.cat(out).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frames_per_call: int = 8) -> torch.Tensor:
        """[N,4,h,w] -> frames [N,3,H,W] float32 in [0,1] on CPU: (x/2 + 0.5).clamp(0, 1)."""
        vae, out = self.model.vae, []
        for i in range(0, len(latents), frames_per_call):
            z = (latents[i:i + frames_per_call] / self.model.scaling_factor).to(self.model.device, vae.dtype)
            out.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1).cpu())
        return torch.cat(out)

    # --- inversion -------------------------------------------------------------------------

    def load_clip(self, video: Union[str, Clip], config: EditConfig) -> Clip:
        return video if isinstance(video, Clip) else read_clip(str(video), config, self.reporter,
                                                               family=self.model.family)

    @_oom_as_resource_error
    @torch.no_grad()
    def invert(self, video: Union[str, Clip], *, config: Optional[EditConfig] = None, **overrides) -> Inversion:
        """Invert a clip for one edit (DDIM, or the DDPM inversion with ``inversion="ddpm"``), or
        reuse the cached inversion.

        The inversion runs ``inversion_steps`` DDIM steps (default 500) with ``inversion_prompt``
        and keeps the latents of the timesteps the edit given by ``steps`` (edit steps, default
        50), ``method`` and ``sdedit_start`` needs, plus the noisiest. The returned Inversion
        carries those settings: ``edit(inversion, prompt)`` runs that edit. Frame selection
        (``frames``, ``size``, ...) comes from the same config; other fields are ignored."""
        config = (config or EditConfig()).replace(**overrides).validate(need_prompt=False)
        clip = self.load_clip(video, config)
        conditions = self.conditions(clip, config)
        return self._invert(clip, config, self._plan(clip, config, conditions), conditions=conditions)

    def conditions(self, clip: Clip, config: EditConfig) -> EditConditions:
        """The depth maps and ControlNets of editing ``clip`` with ``config`` (``method.conditions``)."""
        if not (config.controlnets or config.depth_maps or self.model.unet.config.in_channels != 4):
            return EditConditions()
        with self.reporter.stage("conditions"):
            found = build_conditions(self, clip, config, self._edit_timesteps(config))
        for line in found.lines:
            self.reporter.info(line)
        return found

    def _cache(self, config: EditConfig) -> InversionCache:
        """The inversion cache for this call: the editor's, off when it or ``config.use_cache`` says so."""
        return self.cache if config.use_cache or not self.cache.enabled else InversionCache(self.cache.root,
                                                                                             enabled=False)

    def _invert(self, clip: Clip, config: EditConfig, plan: MemoryPlan,
                checkpoint: Optional[Checkpointer] = None, *, conditions: EditConditions) -> Inversion:
        """The inversion from the cache, else computed (continuing a checkpointed one when
        ``checkpoint`` restored one) and stored in the cache, or in the checkpoint folder when the
        cache cannot hold it, so a resumed edit does not invert again."""
        with self.reporter.stage("encode"):
            z0 = self.encode(clip.frames, plan.vae_frames)
        if config.inversion == "ddpm":
            return self._invert_ddpm(clip, config, plan, checkpoint, conditions, z0)
        sched_cfg = self.model.scheduler_config
        inv_ts = schedule.timesteps_of(sched_cfg, config.inversion_steps)
        needed = schedule.inversion_save_timesteps(inv_ts, self._edit_timesteps(config))
        key = InversionKey(_pixels_sha256(clip.frames), tuple(clip.frames.shape[-1:-3:-1]), self.model.identity,
                           config.inversion_prompt, config.inversion_steps,
                           str(self.model.dtype).replace("torch.", ""), self.model.device.type,
                           conditions=conditions.key)
        cache = self._cache(config)
        cached = cache.load(key, needed)
        if cached is not None:
            self.reporter.info(f"inversion: reusing cached latents ({len(cached)} timesteps)")
            latents = InvertedLatents.stack(cached, z0.device, plan.latents_on)
            return self._inversion(clip, z0, latents, config, conditions, from_cache=True)
        start = checkpoint.restored("invert") if checkpoint is not None else None
        if start is not None:   # the interrupted run's z0: the same start, whatever this encode gave
            z0 = start["z0"].to(z0.device)
        if start is not None and start["step"] >= start["total"]:
            latents = InvertedLatents.stack(start["latents"], z0.device, plan.latents_on)
        else:
            if checkpoint is not None and checkpoint.restored("edit") is not None:
                self.reporter.info("inversion: neither the cache nor the checkpoint holds it; inverting again")
            cond = encode_prompt(self.model, config.inversion_prompt, self.frame_size(z0))
            scheduler = schedule.make_scheduler(sched_cfg, config.inversion_steps)
            self.use_backend(config, plan)

            def eps_fn(x: torch.Tensor, t: int, frames: slice) -> torch.Tensor:
                return self.runner.eps(x, t, cond.expand(x.shape[0], -1, -1), pad_to=plan.inversion_frames,
                                       frames=frames)

            first = int(start["step"]) if start is not None else 0
            with self.reporter.stage("invert", total=len(inv_ts), done_before=first) as stage, \
                    self.runner.conditioned(conditions.inversion):
                latents = ddim_invert(eps_fn, z0, scheduler, needed, plan.inversion_frames,
                                      on_step=lambda i: stage.update(step=i), place=plan.latents_on,
                                      start=start, checkpoint=checkpoint)
        stored = cache.save(key, latents)
        if checkpoint is not None and checkpoint.folder is not None:
            if stored is None:   # --no-cache (or an unwritable cache): the checkpoint keeps the inversion
                if start is None or start["step"] < start["total"]:
                    checkpoint.save("invert", len(inv_ts), len(inv_ts), {"z0": z0, "latents": dict(latents)})
            else:
                checkpoint.discard("invert")
        return self._inversion(clip, z0, latents, config, conditions)

    def _invert_ddpm(self, clip: Clip, config: EditConfig, plan: MemoryPlan, checkpoint: Optional[Checkpointer],
                     conditions: EditConditions, z0: torch.Tensor) -> Inversion:
        """``_invert`` for ``--inversion ddpm`` (``method.ddpm``): the noisy latents and noise maps of
        the edit's timesteps, from the cache (two entries: latents, noise maps) or computed, with the
        UNet calls batched across frames and timesteps."""
        sched_cfg = self.model.scheduler_config
        timesteps = self._edit_timesteps(config)
        ddpm = DDPMSchedule.of(schedule.make_scheduler(sched_cfg, config.steps),
                               edit_timesteps(sched_cfg, config.steps, config.method, config.sdedit_start), config.eta)
        key = InversionKey(_pixels_sha256(clip.frames), tuple(clip.frames.shape[-1:-3:-1]), self.model.identity,
                           config.inversion_prompt, config.steps, str(self.model.dtype).replace("torch.", ""),
                           self.model.device.type, conditions=conditions.key,
                           inversion=f"ddpm:eta={float(config.eta)!r}:seed={config.seed}")   # eta 1 is 1.0
        noise_key = dataclasses.replace(key, inversion=key.inversion + ":noise")
        cache = self._cache(config)
        cached = cache.load(key, timesteps)
        cached_noise = cache.load(noise_key, timesteps) if cached is not None else None
        if cached_noise is not None:
            self.reporter.info(f"inversion: reusing cached DDPM latents and noise maps ({len(timesteps)} timesteps)")
            latents = InvertedLatents.stack({t: cached[t] for t in timesteps}, z0.device, plan.latents_on)
            noise = InvertedLatents.stack({t: cached_noise[t] for t in timesteps}, z0.device, plan.latents_on)
            return self._inversion(clip, z0, latents, config, conditions, from_cache=True, noise=noise)
        start = checkpoint.restored("invert") if checkpoint is not None else None
        if start is not None:   # the interrupted run's z0: the same start, whatever this encode gave
            z0 = start["z0"].to(z0.device)
        across = _ddpm_across_timesteps(config, conditions)
        rows = plan.inversion_frames
        calls = len(row_groups(timesteps, z0.shape[0], rows, across))
        if start is not None and start["step"] >= start["total"]:
            latents = noisy_latents(z0, ddpm, timesteps, config.seed, plan.latents_on)
            noise = InvertedLatents.stack(start["noise"], z0.device, plan.latents_on)
        else:
            cond = encode_prompt(self.model, config.inversion_prompt, self.frame_size(z0))
            self.use_backend(config, plan)
            how = "frames and timesteps together" if across else (
                "one timestep per call: " + ("the ControlNets' residuals" if self.runner.backend is None
                                             else f"backend {self.runner.backend.name}'s graphs take one timestep"))
            self.reporter.info(f"inversion: edit-friendly DDPM (not the original's DDIM) at {len(timesteps)} "
                               f"timesteps, eta {config.eta}, noise seed {config.seed}: {calls} UNet "
                               f"call{'s' if calls != 1 else ''} of up to {rows} rows, batching {how}")

            def eps_fn(x: torch.Tensor, t, frames: torch.Tensor) -> torch.Tensor:
                return self.runner.eps(x, t, cond.expand(x.shape[0], -1, -1), pad_to=rows, frames=frames)

            first = int(start["step"]) if start is not None else 0
            with self.reporter.stage("invert", total=calls, done_before=first) as stage, \
                    self.runner.conditioned(conditions.inversion):
                latents, noise = ddpm_invert(eps_fn, z0, ddpm, timesteps, config.seed, rows, across_timesteps=across,
                                             place=plan.latents_on, on_call=lambda i, n: stage.update(step=i),
                                             start=start, checkpoint=checkpoint)
        stored = cache.save(key, latents) is not None and cache.save(noise_key, noise) is not None
        if checkpoint is not None and checkpoint.folder is not None:
            if not stored:   # --no-cache (or an unwritable cache): the checkpoint keeps the noise maps
                if start is None or start["step"] < start["total"]:
                    checkpoint.save("invert", calls, calls, {"z0": z0, "noise": dict(noise)})
            else:
                checkpoint.discard("invert")
        return self._inversion(clip, z0, latents, config, conditions, noise=noise)

    def _inversion(self, clip: Clip, z0: torch.Tensor, latents: Mapping[int, torch.Tensor], config: EditConfig,
                   conditions: EditConditions, from_cache: bool = False,
                   noise: Optional[Mapping[int, torch.Tensor]] = None) -> Inversion:
        return Inversion(clip, z0, latents, inversion_prompt=config.inversion_prompt,
                         inversion_steps=config.inversion_steps, steps=config.steps, method=config.method,
                         sdedit_start=config.sdedit_start, model=self.model.identity, from_cache=from_cache,
                         conditions=conditions.key, inversion=config.inversion, noise=noise, eta=config.eta,
                         seed=config.seed, skip=config.skip)

    def _edit_timesteps(self, config: EditConfig) -> List[int]:
        timesteps = edit_timesteps(self.model.scheduler_config, config.steps, config.method, config.sdedit_start,
                                   config.skip)
        if not timesteps:   # SDEdit's truncated schedule is shorter than --steps (validate checks skip < steps)
            raise ConfigError.of_field("skip", f"{config.skip} skips every timestep this {config.method} edit "
                                               f"denoises at; use a smaller skip")
        return timesteps

    # --- editing ---------------------------------------------------------------------------

    def edit(self, video: Union[str, Clip, Inversion], prompt: Optional[str] = None, *,
             config: Optional[EditConfig] = None, record_correspondences: bool = False,
             interrupt: Optional[StopFlag] = None, **overrides) -> EditResult:
        """Edit a video (path, Clip or an ``Inversion``) towards ``prompt``. Returns frames and latents.

        See ``edit_many`` (one prompt here), which says what an Inversion brings."""
        if prompt is not None:
            overrides["prompt"] = prompt
        prompts = (config or EditConfig()).replace(**overrides).prompts
        if len(prompts) > 1:
            raise ConfigError(f"{len(prompts)} prompts given to Editor.edit: use Editor.edit_many, "
                              "which returns one result per prompt")
        return self.edit_many(video, config=config, record_correspondences=record_correspondences,
                              interrupt=interrupt, **overrides)[0]

    @_oom_as_resource_error
    @torch.no_grad()
    def edit_many(self, video: Union[str, Clip, Inversion], prompts: Optional[List[str]] = None, *,
                  config: Optional[EditConfig] = None, record_correspondences: bool = False,
                  interrupt: Optional[StopFlag] = None, **overrides) -> List[EditResult]:
        """Edit one video towards each prompt, sharing the inversion and the source branch of every
        UNet call (B = 1 + 2 * prompts branches). Returns one EditResult per prompt, in order.

        ``video`` may be an ``Inversion`` (``invert``): its clip, inversion_prompt and
        inversion_steps are used, and so are the steps, method and sdedit_start it was made for,
        unless the call names them (as keywords, or in ``config=``, whose values all count as
        named). Named values must be an edit whose timesteps the inversion holds (fewer steps
        often are: a 50-step inversion serves 25, 10, 5, 2 and 1); otherwise ConfigError says
        which step counts it serves. A keyword inversion_prompt or inversion_steps other than
        the inversion's is refused.

        ``config.checkpoint_dir``: save resumable state every ``checkpoint_every`` steps (and
        continue from it with ``resume``; docs/checkpoints.md); the caller removes it once the
        results are stored (``checkpoint.remove_checkpoint``). ``interrupt``: a
        ``interrupt.StopFlag``; once it is set the edit stops after the current step, saves a
        checkpoint when it has a folder and raises InterruptedWithCheckpoint (else Interrupted)."""
        named = set(overrides) | (set(EDIT_FIELDS) if config is not None else set())
        config = (config or EditConfig()).replace(**overrides)
        if prompts is not None:
            config = config.replace(prompt=tuple(prompts))
        if isinstance(video, Inversion):   # checked (clip fields, timesteps held) before any work
            refuse_clip_keywords(video, set(overrides))
            config = edit_config_for(video, config, named, self.model.scheduler_config, self.model.identity)
        config.validate()
        choice = check_backends(self.model.device, self.model.dtype, config.attention_backend, config.nearest_backend)
        clip = video.clip if isinstance(video, Inversion) else self.load_clip(video, config)
        conditions = self.conditions(clip, config)
        if isinstance(video, Inversion) and video.conditions != conditions.key:
            raise ConfigError("the given Inversion was made with other depth maps or controls than this edit's "
                              "(--depth-maps, --depth-normalize, --control-during-inversion): invert the video "
                              "with this edit's settings")
        plan = self._plan(clip, config, conditions)
        checkpoint = self._checkpointer(clip, config, interrupt, conditions)   # a mismatching checkpoint fails here
        if checkpoint is not None:
            plan = checkpoint.keep_plan(plan)
        self.reporter.event("plan", **plan.as_dict())
        self.use_backend(config, plan)   # an unavailable --backend fails here, before any inversion
        if isinstance(video, Inversion):
            inversion = video
        else:
            inversion = self._invert(clip, config, plan, checkpoint, conditions=conditions)
        with self.runner.conditioned(conditions.edit):
            xs, record = self._denoise(inversion, config, plan, record_correspondences, choice, checkpoint)
        results = []
        for prompt, latents in zip(config.prompts, xs):
            with self.reporter.stage("decode"):
                frames = self.decode(latents, plan.vae_frames)
            results.append(EditResult(frames=frames, latents=latents.cpu(), clip=inversion.clip,
                                      timesteps=record["timesteps"], keyframes=record["keyframes"],
                                      timings=dict(self.reporter.timings), model_is_tiny=self.model.is_tiny,
                                      correspondences=record.get("correspondences"), prompt=prompt, plan=plan))
        if checkpoint is not None:   # stopped while decoding: the checkpoint after the last step stays
            checkpoint.check_stop("edit", len(record["timesteps"]), len(record["timesteps"]))
        return results

    def _checkpointer(self, clip: Clip, config: EditConfig, interrupt: Optional[StopFlag],
                      conditions: Optional[EditConditions] = None) -> Optional[Checkpointer]:
        """The edit's Checkpointer (opened: with ``resume``, a checkpoint made with other settings
        raises ConfigError here), or None without a checkpoint folder and a stop flag."""
        if not config.checkpoint_dir:
            return None if interrupt is None else Checkpointer(None, stop=interrupt, reporter=self.reporter)
        fields = fingerprint_fields(config, model_identity=self.model.identity,
                                    dtype=str(self.model.dtype).replace("torch.", ""),
                                    device_type=self.model.device.type, frames_sha256=_pixels_sha256(clip.frames))
        if conditions is not None and conditions.edit.controls:   # other ControlNet weights or images: another run
            fields["controls"] = [unit.key for unit in conditions.edit.controls]
        if conditions is not None and conditions.key:   # other depth maps (or controlled inversion): another run
            fields["conditions"] = conditions.key
        return Checkpointer(config.checkpoint_dir, every=config.checkpoint_every, fields=fields, resume=config.resume,
                            stop=interrupt, reporter=self.reporter, strict=config.strict_resume,
                            device=self.model.device).open()

    def _denoise(self, inversion: Inversion, config: EditConfig, plan: MemoryPlan, record_correspondences: bool,
                 choice: KernelChoice, checkpoint: Optional[Checkpointer] = None):
        """-> (final latents [P,N,4,h,w] float32, record of keyframes and correspondences)."""
        scheduler = schedule.make_scheduler(self.model.scheduler_config, config.steps)
        timesteps = self._edit_timesteps(config)
        embed = functools.partial(encode_prompt, self.model, size=self.frame_size(inversion.z0))
        texts = text_branches(embed(config.inversion_prompt), embed(config.negative_prompt, negative=True),
                              [embed(p) for p in config.prompts])
        if inversion.inversion == "ddpm":   # every prompt starts at the stored noisy latent, steps with its noise maps
            x0 = inversion.latents[timesteps[0]].to(inversion.z0.device)
            stepper = DDPMStepper(DDPMSchedule.of(scheduler, edit_timesteps(
                self.model.scheduler_config, config.steps, config.method, config.sdedit_start), config.eta),
                inversion.noise)
        else:
            x0 = self._initial_latents(inversion, timesteps[0], config, scheduler)
            stepper = DDIMStepper(scheduler)
        source = inversion.latents
        if config.inverted_latents == "disk":
            source = DiskLatents(source)
        elif not isinstance(source, InvertedLatents):
            source = InvertedLatents.stack(source, x0.device, plan.latents_on)
        try:   # edit_many chose the backend (use_backend) before inverting
            denoiser = Denoiser(self.runner, self.reporter, plan, choice, synchronizer(x0.device))
            start = checkpoint.restored("edit") if checkpoint is not None else None
            return denoiser.run(x0, source, texts, config, scheduler, timesteps, record_correspondences,
                                start=start, checkpoint=checkpoint, stepper=stepper)
        finally:
            if isinstance(source, DiskLatents):
                source.close()

    def _initial_latents(self, inversion: Inversion, t0: int, config: EditConfig,
                         scheduler) -> torch.Tensor:
        """x = add_noise(z0, eps, t0) with eps recovered from the noisiest inverted latent."""
        noisiest = max(inversion.latents)
        z0 = inversion.z0
        eps = noise_from_inversion(z0, inversion.latents[noisiest].to(z0.device), scheduler.alphas_cumprod[noisiest])
        if config.method == "sdedit" and not config.use_ddim_noise:
            generator = torch.Generator(device="cpu").manual_seed(config.seed)
            shared = torch.randn(z0[:1].shape, generator=generator).to(eps.device)
            eps = shared.expand_as(z0)
        return scheduler.add_noise(z0, eps, torch.tensor(t0))


def _ddpm_across_timesteps(config: EditConfig, conditions: Optional[EditConditions]) -> bool:
    """Whether the DDPM inversion's UNet calls may mix timesteps: eager only (graph backends take one
    timestep per call), and not with ControlNets on the inversion (their residuals are per timestep)."""
    if conditions is not None and conditions.inversion is not None:
        controlled = bool(conditions.inversion.controls)
    else:   # a plan without loaded conditions: from the settings
        controlled = bool(config.controlnets) and config.control_during_inversion
    return config.backend == "eager" and not controlled


def _pixels_sha256(frames: torch.Tensor) -> str:
    """sha256 of the frames as 8-bit pixels ([N,3,H,W] in [0,1], which are k/255 exactly)."""
    pixels = (frames.detach().cpu() * 255).round().to(torch.uint8).contiguous()
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
