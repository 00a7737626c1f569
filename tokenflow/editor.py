"""The TokenFlow method: invert a video, then edit it with keyframe + propagation passes.

Data flow (tensor shapes for N frames of HxW, latents of h=H/8, w=W/8):
    frames [N,3,H,W] -> VAE mean * scale -> z0 [N,4,h,w] -> DDIM inversion -> {t: [N,4,h,w]}
    x = add_noise(z0, eps, t0); per step t: keyframe pass, then one propagation pass per group
    -> final latents [N,4,h,w] -> VAE decode -> frames [N,3,H,W] in [0,1]
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import schedule
from .cache import InversionCache, InversionKey
from .config import DEFAULT_MODEL, EditConfig
from .device import resolve_device, resolve_dtype
from .engine import KeyframeStore, UNetRunner
from .errors import ConfigError, ResourceError
from .inversion import ddim_invert, noise_from_inversion
from .keyframes import KeyframeSampler, groups, original_plan, paper_plan, plan_rows
from .models import SDModel, encode_prompt, is_out_of_memory, load_model, release_device_memory
from .kernels import KernelChoice, check_backends
from .processors import PassKind, StepState, TokenFlowUNet
from .progress import Reporter
from .video import Clip, read_video

VAE_BATCH_SIZE = 10  # as the original


@dataclass
class Inversion:
    """A DDIM-inverted clip. latents: {t: [N,4,h,w] float32}; z0: [N,4,h,w] float32."""

    clip: Clip
    z0: torch.Tensor
    latents: Dict[int, torch.Tensor]
    prompt: str
    steps: int
    from_cache: bool = False


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
    correspondences: Optional[list] = None   # [(step, group, layer, idx [m,P,S])] if recorded
    output: Optional[str] = None


def read_clip(video: str, config: EditConfig, reporter: Reporter) -> Clip:
    """Decode the frames ``config`` selects from a video file or image folder."""
    with reporter.stage("read"):
        return read_video(video, frames=config.frames, start=config.start_frame, stride=config.stride,
                          size=config.size, crop=config.crop)


def _oom_as_resource_error(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; CPU/MPS OOM are plain ones
            if not is_out_of_memory(exc):
                raise
            raise ResourceError(
                f"out of memory on the device ({str(exc).splitlines()[0][:120]}): use fewer frames (--frames), "
                "a smaller size (--size), --dtype float16, fewer frames per call (--chunk-frames) or a smaller "
                "--keyframe-spacing") from None
    return wrapper


class Editor:
    """TokenFlow video editor around one loaded Stable Diffusion model.

    >>> editor = Editor.from_pretrained("stabilityai/stable-diffusion-2-1-base", device="cuda", dtype="float16")
    >>> result = editor.edit("wolf.mp4", "a shiny silver robotic wolf", inversion_prompt="a wolf")
    """

    def __init__(self, model: SDModel, *, cache: Optional[InversionCache] = None,
                 reporter: Optional[Reporter] = None):
        self.model = model
        self.cache = cache if cache is not None else InversionCache()
        self.reporter = reporter or Reporter(quiet=True)
        self.tokenflow = TokenFlowUNet(model.unet)
        self.runner = UNetRunner(model.unet, self.tokenflow)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, *, device: Union[str, torch.device, None] = None,
                        dtype: Union[str, torch.dtype, None] = None, cache_dir: Optional[str] = None,
                        use_cache: bool = True, reporter: Optional[Reporter] = None) -> "Editor":
        """Load a Hub id, a local diffusers folder, an SD version ('1.5', '2.0', '2.1') or 'tiny'."""
        dev = resolve_device(None if device is None else str(device))
        dt = resolve_dtype(dtype, dev)
        reporter = reporter or Reporter(quiet=True)
        with reporter.stage("load"):
            sd = load_model(model, dev, dt)
        cache = InversionCache(Path(cache_dir) if cache_dir else None, enabled=use_cache)
        return cls(sd, cache=cache, reporter=reporter)

    # --- frames <-> latents ----------------------------------------------------------------

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [0,1] -> VAE posterior mean * scaling factor, [N,4,h,w] float32."""
        vae, out = self.model.vae, []
        for i in range(0, len(frames), VAE_BATCH_SIZE):
            batch = (2 * frames[i:i + VAE_BATCH_SIZE] - 1).to(self.model.device, vae.dtype)
            out.append(vae.encode(batch).latent_dist.mean.float() * self.model.scaling_factor)
        # contiguous, not the VAE's channels-last strides: conv kernels (and so the last bits of the
        # result) depend on the memory format, and cached latents load contiguous
        return torch.cat(out).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[N,4,h,w] -> frames [N,3,H,W] float32 in [0,1] on CPU: (x/2 + 0.5).clamp(0, 1)."""
        vae, out = self.model.vae, []
        for i in range(0, len(latents), VAE_BATCH_SIZE):
            z = (latents[i:i + VAE_BATCH_SIZE] / self.model.scaling_factor).to(self.model.device, vae.dtype)
            out.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1).cpu())
        return torch.cat(out)

    # --- inversion -------------------------------------------------------------------------

    def load_clip(self, video: Union[str, Clip], config: EditConfig) -> Clip:
        return video if isinstance(video, Clip) else read_clip(str(video), config, self.reporter)

    @_oom_as_resource_error
    @torch.no_grad()
    def invert(self, video: Union[str, Clip], *, config: Optional[EditConfig] = None, **overrides) -> Inversion:
        """DDIM-invert a clip, saving the latents an edit with ``config.steps`` steps needs (cached)."""
        config = (config or EditConfig()).replace(**overrides).validate(need_prompt=False)
        clip = self.load_clip(video, config)
        return self._invert(clip, config)

    def _invert(self, clip: Clip, config: EditConfig) -> Inversion:
        sched_cfg = self.model.scheduler_config
        inv_ts = schedule.timesteps_of(sched_cfg, config.inversion_steps)
        needed = schedule.inversion_save_timesteps(inv_ts, self._edit_timesteps(config))
        with self.reporter.stage("encode"):
            z0 = self.encode(clip.frames)
        key = InversionKey(_pixels_sha256(clip.frames), tuple(clip.frames.shape[-1:-3:-1]), self.model.identity,
                           config.inversion_prompt, config.inversion_steps,
                           str(self.model.dtype).replace("torch.", ""), self.model.device.type)
        cached = self.cache.load(key, needed)
        if cached is not None:
            self.reporter.info(f"inversion: reusing cached latents ({len(cached)} timesteps)")
            latents = {t: v.to(z0.device) for t, v in cached.items()}
            return Inversion(clip, z0, latents, config.inversion_prompt, config.inversion_steps, from_cache=True)
        cond = encode_prompt(self.model, config.inversion_prompt)
        scheduler = schedule.make_scheduler(sched_cfg, config.inversion_steps)

        def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
            return self.runner.eps(x, t, cond.expand(x.shape[0], -1, -1))

        with self.reporter.stage("invert", total=len(inv_ts)) as stage:
            latents = ddim_invert(eps_fn, z0, scheduler, needed, config.inversion_batch_size,
                                  on_step=lambda i: stage.update())
        self.cache.save(key, latents)
        return Inversion(clip, z0, latents, config.inversion_prompt, config.inversion_steps)

    def _edit_timesteps(self, config: EditConfig) -> List[int]:
        timesteps = schedule.timesteps_of(self.model.scheduler_config, config.steps)
        if config.method == "sdedit":
            timesteps = schedule.sdedit_timesteps(timesteps, config.sdedit_start)
        return timesteps

    # --- editing ---------------------------------------------------------------------------

    @_oom_as_resource_error
    @torch.no_grad()
    def edit(self, video: Union[str, Clip, Inversion], prompt: Optional[str] = None, *,
             config: Optional[EditConfig] = None, record_correspondences: bool = False,
             **overrides) -> EditResult:
        """Edit a video (path, Clip or a previous Inversion) towards ``prompt``. Returns frames and latents."""
        config = (config or EditConfig()).replace(**overrides)
        if prompt is not None:
            config = config.replace(prompt=prompt)
        if isinstance(video, Inversion):  # its prompt and steps are what the source branch uses
            config = config.replace(inversion_prompt=video.prompt, inversion_steps=video.steps)
        config.validate()
        choice = check_backends(self.model.device, self.model.dtype, config.attention_backend, config.nearest_backend)
        if isinstance(video, Inversion):
            inversion = video
            missing = set(self._edit_timesteps(config)) - set(inversion.latents)
            if missing:
                raise ConfigError(f"the given Inversion lacks the latents of timesteps {sorted(missing)[:5]}; "
                                  f"invert with steps={config.steps} (the edit's step count)")
        else:
            inversion = self._invert(self.load_clip(video, config), config)
        latents, record = self._denoise(inversion, config, record_correspondences, choice)
        with self.reporter.stage("decode"):
            frames = self.decode(latents)
        return EditResult(frames=frames, latents=latents.cpu(), clip=inversion.clip,
                          timesteps=record["timesteps"], keyframes=record["keyframes"],
                          timings=dict(self.reporter.timings), model_is_tiny=self.model.is_tiny,
                          correspondences=record.get("correspondences"))

    def _text_embeddings(self, config: EditConfig) -> torch.Tensor:
        """[3, 77, D]: [inversion prompt (source branch), negative prompt (uncond), prompt (cond)]."""
        texts = [config.inversion_prompt, config.negative_prompt, config.prompt]
        return torch.cat([encode_prompt(self.model, text) for text in texts])

    def _initial_latents(self, inversion: Inversion, t0: int, config: EditConfig,
                         scheduler) -> torch.Tensor:
        """x = add_noise(z0, eps, t0) with eps recovered from the noisiest inverted latent."""
        noisiest = max(inversion.latents)
        eps = noise_from_inversion(inversion.z0, inversion.latents[noisiest], scheduler.alphas_cumprod[noisiest])
        if config.method == "sdedit" and not config.use_ddim_noise:
            generator = torch.Generator(device="cpu").manual_seed(config.seed)
            shared = torch.randn(inversion.z0[:1].shape, generator=generator).to(eps.device)
            eps = shared.expand_as(inversion.z0)
        return scheduler.add_noise(inversion.z0, eps, torch.tensor(t0))

    def _denoise(self, inversion: Inversion, config: EditConfig, record_correspondences: bool,
                 choice: KernelChoice) -> Tuple[torch.Tensor, dict]:
        scheduler = schedule.make_scheduler(self.model.scheduler_config, config.steps)
        timesteps = self._edit_timesteps(config)
        all_timesteps = [int(t) for t in scheduler.timesteps]
        pnp = config.method == "pnp"
        qk_ts = schedule.injection_timesteps(all_timesteps, config.steps, config.pnp_attn_t) if pnp else set()
        conv_ts = schedule.injection_timesteps(all_timesteps, config.steps, config.pnp_f_t) if pnp else set()
        texts = self._text_embeddings(config)
        n = inversion.z0.shape[0]
        spacing = min(config.keyframe_spacing, n)
        frame_groups = groups(n, spacing)
        # propagation chunks: frames per UNet call, independent of the groups (a resource choice)
        chunks = groups(n, config.chunk_frames or spacing)
        limit = {"frames": config.chunk_frames or spacing, "halved": False}  # lowered once on out-of-memory
        sampler = KeyframeSampler(n, spacing, config.seed)
        match_on = "input" if config.propagation == "original" else "output"
        store = KeyframeStore()
        x = self._initial_latents(inversion, timesteps[0], config, scheduler)
        record: dict = {"timesteps": timesteps, "keyframes": []}
        if record_correspondences:
            record["correspondences"] = []
        with self.reporter.stage("edit", total=len(timesteps) * (1 + len(chunks))) as stage:
            for step, t in enumerate(timesteps):
                keyframes = sampler.next()
                record["keyframes"].append(keyframes.tolist())
                source = inversion.latents[t]
                kf_idx = keyframes.to(x.device)
                store.clear()
                kf_state = StepState(PassKind.KEYFRAMES, t, len(keyframes), store, inject_qk=t in qk_ts,
                                     inject_conv=t in conv_ts, match_on=match_on, kernels=choice)
                self.runner.three_branch(source[kf_idx], x[kf_idx], t, texts, kf_state)  # result unused
                stage.update(step=step, pass_="keyframes")
                plans = [original_plan(g, n, spacing) if match_on == "input" else
                         paper_plan(g, n, spacing, keyframes) for g in range(len(frame_groups))]
                new_x = torch.empty_like(x)

                def propagate(c: int, a: int, b: int) -> None:
                    """new_x[a:b]. The first out-of-memory halves the frames per call for the rest of the
                    edit (results do not depend on chunking); a second one is raised."""
                    if b - a > limit["frames"]:
                        for s in range(a, b, limit["frames"]):
                            propagate(c, s, min(s + limit["frames"], b))
                        return
                    pairs, weights = (t.to(x.device) for t in plan_rows(plans, a, b))
                    on_nn = None
                    if record_correspondences:
                        on_nn = functools.partial(_record, record["correspondences"], step, c)
                    state = StepState(PassKind.PROPAGATE, t, b - a, store, inject_conv=t in conv_ts,
                                      pairs=pairs, weights=weights, match_on=match_on,
                                      on_correspondences=on_nn, kernels=choice)
                    eps = None
                    try:
                        eps = self.runner.three_branch(source[a:b], x[a:b], t, texts, state)
                    except RuntimeError as exc:
                        if limit["halved"] or b - a == 1 or not is_out_of_memory(exc):
                            raise
                    if eps is None:  # retried outside the except block, so the failed call's memory is freed
                        release_device_memory(x.device)
                        limit.update(frames=(b - a) // 2, halved=True)
                        warnings.warn(f"out of memory with {b - a} frames per UNet call; retrying with "
                                      f"{limit['frames']} for the rest of the edit (set --chunk-frames {limit['frames']} to start there)")
                        propagate(c, a, b)
                        return
                    guided = eps[1] + config.guidance_scale * (eps[2] - eps[1])
                    new_x[a:b] = scheduler.step(guided, t, x[a:b]).prev_sample

                for c, (a, b) in enumerate(chunks):
                    propagate(c, a, b)
                    stage.update(step=step, pass_="chunk", chunk=c)
                x = new_x
        store.clear()
        return x, record


def _pixels_sha256(frames: torch.Tensor) -> str:
    """sha256 of the frames as 8-bit pixels ([N,3,H,W] in [0,1], which are k/255 exactly)."""
    pixels = (frames.detach().cpu() * 255).round().to(torch.uint8).contiguous()
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest()


def _record(sink: list, step: int, group: int, layer: str, idx: torch.Tensor) -> None:
    sink.append((step, group, layer, idx.cpu()))
