"""What the sampling loop asks of an executor.

An Executor belongs to a pipeline and lives as long as it (a compiled executor keeps its
graphs there); `begin()` starts one generation and returns a Run, which holds everything
that call counts, so two calls on one pipeline never share per-call state. The loop calls
`run.step(...)` once per denoising step instead of `run_step`, and puts `run.stats()` into
`out.stats["executor"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from dite.models.denoiser import Conditioning, Denoiser
from dite.engine.errors import ConfigError
from dite.models.plan import ATTENTION_BACKENDS, StepPlan


@dataclass(frozen=True)
class StepExample:
    """One batch layout the schedule will run (the guided batch, PromptGate's cond-only
    batch): the inputs of its first step, from which graphs are built and warmed."""

    x: torch.Tensor
    t: torch.Tensor
    cond: Conditioning
    cond_only: bool = False  # PromptGate's batch: the conditional rows of a guided call

    def runs(self, plan: StepPlan) -> bool:
        """Whether steps of `plan` run this layout (as the sampling loop decides)."""
        gated = plan.cfg_mode == "cond_only"
        return gated if self.cond_only else not (gated and self.cond.guided)


def with_attention_backend(plan: StepPlan, backend: str, depth: int) -> StepPlan:
    """`plan` with every block's full-attention kernel set to `backend` (a plan is data,
    so the kernel reaches compiled frames as part of it, not as global state)."""
    if backend == "sdpa":
        return plan  # the default: the plan stays the very object the eager path always ran
    blocks = tuple(replace(plan.block(i), attention=replace(plan.block(i).attention, backend=backend))
                   for i in range(depth))
    return replace(plan, blocks=blocks)


class Run:
    def step(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, plan: StepPlan, state) -> torch.Tensor:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError


class Executor:
    name = ""

    def __init__(self, attention: str = "sdpa"):
        if attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"unknown attention backend {attention!r}; use one of {', '.join(ATTENTION_BACKENDS)}")
        self.attention = attention

    def begin(self, transformer: Denoiser, plans: Sequence[StepPlan],
              examples: Callable[[], Sequence[StepExample]]) -> Run:
        """Start one generation; `examples()` gives the batch layouts it will run."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attention={self.attention!r})"
