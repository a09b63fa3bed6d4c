"""The denoising loop shared by every family: plan, denoise, guide, step.

Everything one generation remembers between steps lives in its GenerationState; the
modules and the scheduler are only read, so two threads can sample at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from dite.engine.runtime.adaptive import RangeState
from dite.engine.runtime.attention_cache import AttentionCache
from dite.engine.runtime.delta_store import DeltaStore
from dite.engine.errors import ConfigError
from dite.engine.runtime.finite import StepWatch
from dite.engine.runtime.slg import SkipLayerGuidance
from dite.models.denoiser import Conditioning, Denoiser
from dite.models.plan import PLAIN_STEP, StepPlan
from dite.schedulers.base import Scheduler, SchedulerState

if TYPE_CHECKING:  # the executors are imported when a loop runs, not when dite is imported
    from dite.engine.runtime.executors.base import Executor, StepExample


@dataclass
class GenerationState:
    """Per-call state: the scheduler's state, the step being run, the block-range deltas,
    and what each step actually ran (for `out.stats`)."""

    scheduler: SchedulerState
    step_index: int = 0
    deltas: DeltaStore = field(default_factory=DeltaStore)
    attention: AttentionCache = field(default_factory=AttentionCache)
    ranges: RangeState = field(default_factory=RangeState)  # forecasting / adaptive ranges
    steps_run: list[dict[str, Any]] = field(default_factory=list)
    executor: dict[str, Any] = field(default_factory=dict)  # what the executor did (graphs, hits)
    # Parallel generation (engine/parallel): the caches hold this rank's rows only, so the
    # global rows kept at the gate become local ones. None on one device.
    local_rows: Callable[[slice], slice] | None = None

    def keep_rows(self, rows: slice) -> None:
        """Keep only `rows` of every per-call cache that holds one entry per batch row: the
        conditional rows, when a cond-only step (PromptGate) drops the unconditional branch
        for good. The sampling loop and the FLOP count (runtime/accounting.py) both call
        this, so a new per-row cache joins here once."""
        if self.local_rows is not None:
            rows = self.local_rows(rows)
        self.deltas.select_rows(rows)
        self.attention.select_rows(rows)
        self.ranges.select_rows(rows)


def batch_for_cfg(x: torch.Tensor, row_order: str) -> torch.Tensor:
    """The model input of a guided step: the same rows once for each CFG branch."""
    return x if row_order == "none" else torch.cat([x, x])


def apply_guidance(out: torch.Tensor, row_order: str, scale: float, channels: int) -> torch.Tensor:
    """Classifier-free guidance on the first `channels` output channels (the prediction);
    channels beyond them (a learned variance) are taken from the conditional branch."""
    if row_order == "none":
        return out
    first, second = out.chunk(2)
    cond, uncond = (first, second) if row_order == "cond_first" else (second, first)
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
    plan_hook: Callable | None = None,
    executor: Executor | None = None,
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    slg: SkipLayerGuidance | None = None,
) -> torch.Tensor:
    """Run every step of `state.scheduler` from `latents` (already scaled by the scheduler's
    init_noise_sigma) and return the final latents.

    `prediction_channels` is the number of output channels that are the prediction (the
    latent channels); with `pass_model_variance` the channels after them (a learned
    variance) reach the scheduler too. `plan_hook(i, model_in, t, cond, plan, state)`, if
    given, may replace a step's plan right before it runs (DiTFastAttn calibration).
    `executor` runs each step (default: eager); graph executors build and warm every graph
    the plans need before the first step. `after_step(i, x)`, if given, replaces the
    latents after step i (inpainting puts the known region back). `slg`, if given, adds
    skip-layer guidance to the guided steps in its window (runtime/slg.py).
    """
    sched = state.scheduler
    x = latents
    if plans is not None and len(plans) != sched.num_steps:
        raise ConfigError(f"{len(plans)} step plans for {sched.num_steps} steps")
    gated = False
    depth = len(transformer.blocks)
    all_plans = list(plans) if plans is not None else [PLAIN_STEP] * sched.num_steps
    times = sched.timesteps.tolist()  # forecast coordinates, read once (no sync per step)
    watch = StepWatch(sched.num_steps, x.device)  # NaN/inf flags: no host sync per step, one after the loop
    if executor is None:
        from dite.engine.runtime.executors.eager import EagerExecutor

        executor = EagerExecutor()
    run = executor.begin(transformer, all_plans, _examples(x, cond, all_plans, sched))
    for i in tqdm(range(sched.num_steps), disable=not progress, desc="denoise", leave=False):
        state.step_index = i
        plan = plans[i] if plans is not None else PLAIN_STEP
        step_cond = cond
        if plan.cfg_mode == "cond_only" and cond.guided:
            if not gated:
                # The unconditional rows leave the batch for good: every per-row cache
                # keeps only the conditional rows, by the family's declared CFG row order.
                state.keep_rows(cond.cond_rows(2 * x.shape[0]))
                gated = True
            step_cond = cond.conditional_only()
        elif gated:
            raise ConfigError(f"step {i} brings the unconditional branch back after a cond-only step; "
                              "its caches were dropped, so a plan cannot do that")
        model_in = batch_for_cfg(scheduler.scale_model_input(x, i, sched), step_cond.cfg_row_order)
        t = sched.timesteps[i].to(x.device).expand(model_in.shape[0])
        state.ranges.step, state.ranges.time = i, times[i]
        state.ranges.rows_per_sample = 2 if step_cond.guided else 1
        if plan_hook is not None:
            plan = plan_hook(i, model_in, t, step_cond, plan, state)
        out = run.step(model_in, t, step_cond, plan, state)
        blocks = len(plan.computed_blocks(depth))
        ran = {"step": i, "rows": model_in.shape[0], "cfg": step_cond.cfg_row_order != "none", "blocks": blocks}
        if plan.adaptive:  # some rows ran more blocks than `blocks`: count what ran
            ran["block_rows"] = model_in.shape[0] * blocks + state.ranges.block_rows
        state.steps_run.append(ran)
        state.ranges.block_rows = 0
        guided = apply_guidance(out, step_cond.cfg_row_order, guidance_scale, prediction_channels)
        if slg is not None and step_cond.guided and slg.active(i, sched.num_steps):
            guided = slg.guide(transformer, guided, out, model_in, t, step_cond, prediction_channels)
            ran["slg"] = True
        out = guided
        if not pass_model_variance:
            out = out[:, :prediction_channels]
        x = scheduler.step(out, i, x, sched)
        if after_step is not None:
            x = after_step(i, x)
        watch.step(i, out, x)
    state.executor = run.stats()
    watch.check()
    return x


def _examples(x: torch.Tensor, cond: Conditioning, plans: Sequence[StepPlan], sched: SchedulerState):
    """The batch layouts the plans will run, as StepExamples (shapes are what count: the
    latents stand in for the scaled model input). A callable, so eager runs never build it."""
    def build() -> list[StepExample]:
        from dite.engine.runtime.executors.base import StepExample

        t = sched.timesteps[0].to(x.device)
        layouts = [(cond, False)]
        if cond.guided and any(p.cfg_mode == "cond_only" for p in plans):
            layouts.append((cond.conditional_only(), True))
        out = []
        for c, gated in layouts:
            model_in = batch_for_cfg(x, c.cfg_row_order)
            out.append(StepExample(model_in, t.expand(model_in.shape[0]), c, cond_only=gated))
        return out

    return build
