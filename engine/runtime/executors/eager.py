"""The eager executor: every step through engine/runtime/step.py's run_step, as always."""

from __future__ import annotations

from typing import Callable, Sequence

from dite.engine.runtime.executors.base import Executor, Run, StepExample, with_attention_backend
from dite.engine.runtime.step import run_step
from dite.models.denoiser import Denoiser
from dite.models.plan import StepPlan


class EagerRun(Run):
    def __init__(self, transformer: Denoiser, attention: str):
        self.transformer, self.attention = transformer, attention
        self._plans: dict[StepPlan, StepPlan] = {}

    def step(self, x, t, cond, plan, state):
        if plan not in self._plans:
            self._plans[plan] = with_attention_backend(plan, self.attention, len(self.transformer.blocks))
        return run_step(self.transformer, x, t, cond, self._plans[plan], state.deltas, state.attention, state.ranges)

    def stats(self):
        return {"name": "eager", "attention": self.attention}


class EagerExecutor(Executor):
    name = "eager"

    def begin(self, transformer: Denoiser, plans: Sequence[StepPlan],
              examples: Callable[[], Sequence[StepExample]]) -> EagerRun:
        return EagerRun(transformer, self.attention)
