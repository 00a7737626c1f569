"""TokenFlow's denoising loop: per step, a keyframe pass then propagation passes in chunks.

Shapes: N frames, P prompts, B = 1 + 2P branches [source, uncond_1, cond_1, ...], K keyframes
(one per group of ``keyframe_spacing`` frames), latents [4, h, w].

    xs [P, N, 4, h, w] float32 (one edit per prompt, all starting from the same noise)
    per step t:
        keyframes = one random frame per group
        keyframe pass: per keyframe window (all K by default), one UNet call over B branches;
                       the processors write the keyframes' features into the KeyframeStore
        propagation:   per chunk of frames (any size; the plan's), one UNet call over B branches
                       reading the store; guidance and the DDIM step per prompt
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from tokenflow.engine import KeyframeStore, UNetRunner
from tokenflow.engine.memory import attention_layer_shapes, gib
from tokenflow.engine.planner import MemoryPlan
from tokenflow.engine.state import PassKind, StepState
from tokenflow.engine.store import staging_slots
from tokenflow.errors import ConfigError, ResourceError
from tokenflow.io.progress import Reporter
from tokenflow.kernels import KernelChoice
from tokenflow.method import schedule
from tokenflow.method.ddpm import DDIMStepper
from tokenflow.method.keyframes import KeyframeSampler, groups, keyframe_windows, original_plan, paper_plan, plan_rows
from tokenflow.models.load import is_out_of_memory, release_device_memory


class Denoiser:
    """Runs the edit's denoising steps for every prompt at once (one shared source branch)."""

    def __init__(self, runner: UNetRunner, reporter: Reporter, plan: MemoryPlan, kernels: KernelChoice,
                 synchronize=None):
        self.runner, self.reporter, self.plan, self.kernels = runner, reporter, plan, kernels
        self.synchronize = synchronize
        self.frames_per_call = plan.chunk_frames
        self.halved = False   # frames per call are halved once on out-of-memory, for the rest of the edit

    @torch.no_grad()
    def run(self, x0: torch.Tensor, source: Mapping, texts: torch.Tensor, config, scheduler,
            timesteps: List[int], record_correspondences: bool = False, *, start: Optional[Mapping] = None,
            checkpoint=None, stepper=None) -> Tuple[torch.Tensor, dict]:
        """x0: [N,4,h,w] start latents; source: {t: [N,4,h,w]} with ``rows(t, index, device)``;
        texts: [B,77,D]. Returns (xs [P,N,4,h,w], record of keyframes / correspondences).

        stepper: how the guided noise moves the latents a step (``method.ddpm``: DDIM's step, the
        default, or the DDPM one with the inversion's noise maps);

        start: a checkpointed state (what ``resume_state`` gives) to continue from instead of x0,
        bit-identically;
        checkpoint: a ``checkpoint.Checkpointer`` told about every step boundary (it saves every few
        steps and after the last, and saves and raises when a stop was requested)."""
        n, device = x0.shape[0], x0.device
        stepper = stepper or DDIMStepper(scheduler)
        n_prompts = (texts.shape[0] - 1) // 2
        all_timesteps = [int(t) for t in scheduler.timesteps]
        pnp = config.method == "pnp"
        qk_ts = schedule.injection_timesteps(all_timesteps, config.steps, config.pnp_attn_t) if pnp else set()
        conv_ts = schedule.injection_timesteps(all_timesteps, config.steps, config.pnp_f_t) if pnp else set()
        spacing = min(config.keyframe_spacing, n)
        n_groups = len(groups(n, spacing))
        chunks = groups(n, self.frames_per_call)
        sampler = KeyframeSampler(n, spacing, config.seed)
        match_on = "input" if config.propagation == "original" else "output"
        latent_hw = tuple(x0.shape[-2:])
        store = KeyframeStore(attention_layer_shapes(self.runner.unet, *latent_hw), n_groups, texts.shape[0],
                              dtype=self.runner.dtype, device=device, on_host=self.plan.store_on == "host",
                              staging_slots=staging_slots(self.frames_per_call, spacing, n_groups))
        xs = x0[None].repeat(n_prompts, 1, 1, 1, 1)
        record: dict = {"timesteps": timesteps, "keyframes": []}
        if record_correspondences:
            record["correspondences"] = []
        first = 0
        if start is not None:
            if tuple(start["xs"].shape) != tuple(xs.shape) or list(start["timesteps"]) != list(timesteps):
                raise ConfigError("the edit checkpoint does not fit this run (latents of another shape or other "
                                  "timesteps); start over without --resume")
            first = int(start["step"])
            xs = start["xs"].to(device)
            sampler.generator.set_state(start["rng"])
            record["keyframes"] = [list(k) for k in start["keyframes"]]
            if record_correspondences:
                record["correspondences"] = list(start.get("correspondences") or [])
            # chunks (the plan's grid) stay; calls within them keep a halving that happened before the stop
            self.frames_per_call, self.halved = int(start["frames_per_call"]), bool(start["halved"])
        common = dict(n_branches=texts.shape[0], match_on=match_on, kernels=self.kernels)

        def resume_state() -> dict:   # what continuing at the next step needs
            return {"xs": xs, "rng": sampler.generator.get_state(), "keyframes": record["keyframes"],
                    "correspondences": record.get("correspondences"), "frames_per_call": self.frames_per_call,
                    "halved": self.halved, "timesteps": list(timesteps)}

        # progress counts steps (a resumed edit starts at `first` of them); each pass moves the ETA
        passes = 1 + len(chunks)
        with self.reporter.stage("edit", total=len(timesteps), done_before=first) as stage:
            for step in range(first, len(timesteps)):
                if checkpoint is not None:
                    checkpoint.between_steps("edit", step, len(timesteps), resume_state)
                t = timesteps[step]
                keyframes = sampler.next()
                record["keyframes"].append(keyframes.tolist())
                kf_idx = keyframes.to(device)
                with self.reporter.timed("keyframes", self.synchronize):
                    for a, b in keyframe_windows(n_groups, config.keyframe_window, step):
                        idx = kf_idx[a:b]
                        state = StepState(PassKind.KEYFRAMES, t, b - a, store, keyframe_offset=a,
                                          inject_qk=t in qk_ts, inject_conv=t in conv_ts, **common)
                        # frames: the host index (per-frame conditions are indexed without a device sync)
                        self.runner.branches(source.rows(t, idx, device), xs[:, idx], t, texts, state,
                                             frames=keyframes[a:b])
                stage.update(0, partial=1 / passes, step=step, pass_="keyframes")
                plans = [original_plan(g, n, spacing) if match_on == "input" else
                         paper_plan(g, n, spacing, keyframes) for g in range(n_groups)]
                new_xs = torch.empty_like(xs)
                on_nn = (functools.partial(_record, record["correspondences"], step)
                         if record_correspondences else None)
                call = functools.partial(self._propagate, xs=xs, new_xs=new_xs, source=source, texts=texts,
                                         t=t, plans=plans, store=store, stepper=stepper,
                                         guidance=config.guidance_scale, on_nn=on_nn,
                                         state_args=dict(inject_conv=t in conv_ts, **common))
                with self.reporter.timed("propagate", self.synchronize):
                    for c, (a, b) in enumerate(chunks):
                        call(c, a, b)
                        last = c == len(chunks) - 1
                        stage.update(int(last), partial=0.0 if last else (c + 2) / passes, step=step,
                                     pass_="chunk", chunk=c)
                xs = new_xs
            if checkpoint is not None:
                checkpoint.between_steps("edit", len(timesteps), len(timesteps), resume_state, final=True)
        return xs, record

    def _propagate(self, c: int, a: int, b: int, *, xs, new_xs, source, texts, t, plans, store, stepper,
                   guidance: float, on_nn, state_args: Dict) -> None:
        """new_xs[:, a:b]. The first out-of-memory halves the frames per call for the rest of the edit
        (results do not depend on chunking); a second one is raised."""
        if b - a > self.frames_per_call:
            for s in range(a, b, self.frames_per_call):
                self._propagate(c, s, min(s + self.frames_per_call, b), xs=xs, new_xs=new_xs, source=source,
                                texts=texts, t=t, plans=plans, store=store, stepper=stepper,
                                guidance=guidance, on_nn=on_nn, state_args=state_args)
            return
        device = xs.device
        pairs, weights = (v.to(device) for v in plan_rows(plans, a, b))
        view, local_pairs = store.staged(pairs)
        state = StepState(PassKind.PROPAGATE, t, b - a, view, pairs=local_pairs, weights=weights,
                          on_correspondences=None if on_nn is None else functools.partial(on_nn, c),
                          **state_args)
        eps = None
        try:
            eps = self.runner.branches(source.rows(t, slice(a, b), device), xs[:, a:b], t, texts, state,
                                       pad_to=self.frames_per_call, frames=slice(a, b))
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            if self.halved or b - a == 1:
                raise ResourceError(
                    f"out of memory with {b - a} frames per propagation call after halving once; the plan "
                    f"assumed a budget of {gib(self.plan.budget)} ({self.plan.budget_source}). Set --memory-budget "
                    f"to what the device really has free, e.g. --memory-budget "
                    f"{max(0.1, round(0.75 * self.plan.budget / 2**30, 1))}GiB, or --chunk-frames "
                    f"{max(1, (b - a) // 2)}") from None
        if eps is None:  # retried outside the except block, so the failed call's memory is freed
            release_device_memory(device)
            self.frames_per_call, self.halved = (b - a) // 2, True
            warnings.warn(f"out of memory with {b - a} frames per UNet call; retrying with "
                          f"{self.frames_per_call} for the rest of the edit (set --chunk-frames "
                          f"{self.frames_per_call} or a --memory-budget below the device's free memory)")
            self._propagate(c, a, b, xs=xs, new_xs=new_xs, source=source, texts=texts, t=t, plans=plans,
                            store=store, stepper=stepper, guidance=guidance, on_nn=on_nn,
                            state_args=state_args)
            return
        uncond, cond = eps[1::2], eps[2::2]                    # [P, m, 4, h, w] each
        guided = uncond + guidance * (cond - uncond)
        m = b - a
        prev = stepper.step(guided.flatten(0, 1), t, xs[:, a:b].flatten(0, 1), slice(a, b))
        new_xs[:, a:b] = prev.view(-1, m, *prev.shape[1:])


def _record(sink: list, step: int, chunk: int, layer: str, idx: torch.Tensor) -> None:
    sink.append((step, chunk, layer, idx.cpu()))


def text_branches(inversion_prompt: torch.Tensor, negative: torch.Tensor, prompts: List[torch.Tensor]) -> torch.Tensor:
    """[B, 77, D] = [inversion prompt, negative, prompt_1, negative, prompt_2, ...]."""
    return torch.cat([inversion_prompt] + [t for p in prompts for t in (negative, p)])

