"""The scheduler protocol shared by every sampler.

A scheduler object holds only its configuration and the tables derived from it, so one
object can serve many generations at once. Everything a generation accumulates (the step
schedule it asked for, solver history, its random generators) lives in a SchedulerState
created by `start()` for that generation.

Use:
    state = scheduler.start(num_steps, generators=[...])
    x = noise * scheduler.init_noise_sigma(state)
    for i in range(state.num_steps):
        model_in = scheduler.scale_model_input(x, i, state)
        out = model(model_in, state.timesteps[i])
        x = scheduler.step(out, i, x, state)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class SchedulerState:
    """Per-generation scheduler state.

    timesteps: [num_steps] tensor of the values the model is conditioned on, in sampling
    order. generators: one CPU torch.Generator per image row for the noise a stochastic step
    adds (row k of the batch draws from generators[k]), or None for the global RNG.
    history: solver memory (multistep methods). extra: scheduler-specific tables.
    """

    timesteps: torch.Tensor
    generators: list[torch.Generator] | None = None
    history: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def noise_like(self, sample: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like `sample`, drawn on the CPU row by row."""
        if not self.generators:
            return torch.randn(sample.shape, dtype=torch.float32).to(sample.device, sample.dtype)
        if len(self.generators) != sample.shape[0]:
            raise ValueError(f"{len(self.generators)} generators for a batch of {sample.shape[0]} rows")
        rows = [torch.randn(sample.shape[1:], generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(sample.device, sample.dtype)


class Scheduler:
    """Base class. Subclasses set `diffusers_class` and implement the four methods."""

    #: the diffusers class name whose scheduler_config.json maps onto this scheduler
    diffusers_class: ClassVar[str] = ""
    #: short name used in metadata and on the command line
    name: ClassVar[str] = ""
    #: what the model must have been trained to predict: "diffusion" (ε, x0 or v on a ᾱ
    #: noise table, per the config's prediction_type) or "flow" (a flow-matching velocity)
    objective: ClassVar[str] = ""
    #: whether step() takes a model output with learned-variance channels after the prediction
    uses_model_variance: ClassVar[bool] = False

    def start(self, num_steps: int, *, generators: list[torch.Generator] | None = None,
              device: torch.device | str = "cpu") -> SchedulerState:
        raise TypeError(f"{type(self).__name__} must define start()")

    def init_noise_sigma(self, state: SchedulerState) -> float:
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, step_index: int, state: SchedulerState) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor,
             state: SchedulerState) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define step()")

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "Scheduler":
        raise TypeError(f"{cls.__name__} must define from_diffusers_config()")

    def to_diffusers_config(self) -> dict:
        raise TypeError(f"{type(self).__name__} must define to_diffusers_config()")
