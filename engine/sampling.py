"""The denoising loop shared by every family: plan, denoise, guide, step.

Everything one generation remembers between steps lives in its GenerationState; the
modules and the scheduler are only read, so two threads can sample at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from dite.models.denoiser import Conditioning, Denoiser
from dite.models.plan import PLAIN_STEP, StepPlan
from dite.schedulers.base import Scheduler, SchedulerState


@dataclass
class GenerationState:
    """Per-call state: the scheduler's state, the step being run, and caches by key."""

    scheduler: SchedulerState
    step_index: int = 0
    caches: dict[Any, Any] = field(default_factory=dict)


def batch_for_cfg(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The model input of a guided step: the same rows once for each CFG branch."""
    return x if layout == "none" else torch.cat([x, x])


def apply_guidance(out: torch.Tensor, layout: str, scale: float, channels: int) -> torch.Tensor:
    """Classifier-free guidance on the first `channels` output channels (the prediction);
    channels beyond them (a learned variance) are taken from the conditional branch."""
    if layout == "none":
        return out
    first, second = out.chunk(2)
    cond, uncond = (first, second) if layout == "cond_first" else (second, first)
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    if out.shape[1] == channels:
        return guided
    return torch.cat([guided, cond[:, channels:]], dim=1)


def denoise(
    transformer: Denoiser,
    scheduler: Scheduler,
    latents: torch.Tensor,
    cond: Conditioning,
    state: GenerationState,
    *,
    guidance_scale: float,
    prediction_channels: int,
    pass_model_variance: bool = False,
    plans: Sequence[StepPlan] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run every step of `state.scheduler` from `latents` (already scaled by the scheduler's
    init_noise_sigma) and return the final latents.

    `prediction_channels` is the number of output channels that are the prediction (the
    latent channels); with `pass_model_variance` the channels after them (a learned
    variance) reach the scheduler too.
    """
    sched = state.scheduler
    x = latents
    rows = x.shape[0] * (1 if cond.cfg_layout == "none" else 2)
    for i in tqdm(range(sched.num_steps), disable=not progress, desc="denoise", leave=False):
        state.step_index = i
        plan = plans[i] if plans is not None else PLAIN_STEP
        model_in = batch_for_cfg(scheduler.scale_model_input(x, i, sched), cond.cfg_layout)
        t = sched.timesteps[i].to(x.device).expand(rows)
        out = transformer(model_in, t, cond, plan)
        out = apply_guidance(out, cond.cfg_layout, guidance_scale, prediction_channels)
        if not pass_model_variance:
            out = out[:, :prediction_channels]
        x = scheduler.step(out, i, x, sched)
    return x
