"""Flow-matching Euler (rectified flow; SD3, SD3.5), matching diffusers'
FlowMatchEulerDiscreteScheduler.

The model predicts a velocity v = noise − x0 along x_σ = (1 − σ)·x0 + σ·noise; one Euler
step is x ← x + (σ_next − σ)·v, and the model is conditioned on t = 1000·σ (a float).

The schedule repeats diffusers' arithmetic, including its oddities, because parity is the
contract:
- the training table is σ_k = k/T (k = 1..T), shifted in float32 at construction; the
  inference schedule linspaces (float64) between T·σ_max and T·σ_min of that *shifted*
  table, divides by T and shifts again, so a static shift is applied twice;
- with dynamic shifting the table is left unshifted and the schedule goes through the
  resolution-dependent time shift with `mu` instead;
- the σ table is cast to float32 before timesteps = T·σ, and a 0 is appended (1 when
  inverted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from dite.engine.errors import ConfigError, InputError
from dite.schedulers.base import Scheduler, SchedulerState, config_from_dict, config_to_dict

TIME_SHIFT_TYPES = ("exponential", "linear")


@dataclass(frozen=True)
class FlowMatchEulerConfig:
    """diffusers FlowMatchEulerDiscreteScheduler's config, same names and defaults."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps must be positive, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ConfigError(f"shift must be positive, got {self.shift}")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ConfigError(f"unknown time_shift_type {self.time_shift_type!r}; "
                              f"expected one of {', '.join(TIME_SHIFT_TYPES)}")
        if self.use_karras_sigmas + self.use_exponential_sigmas + self.use_beta_sigmas > 1:
            raise ConfigError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
        if self.use_beta_sigmas:  # needs scipy's beta ppf, which is not a runtime dependency
            raise ConfigError("use_beta_sigmas is not supported by dite; use use_karras_sigmas, "
                              "use_exponential_sigmas or neither")
        if self.shift_terminal and not 0 <= self.shift_terminal < 1:
            raise ConfigError(f"shift_terminal must be in [0, 1), got {self.shift_terminal}")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for dynamic shifting: linear in the number of image tokens, base_shift at
    base_seq_len and max_shift at max_seq_len (diffusers' SD3/Flux `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclass
class FlowMatchState(SchedulerState):
    """SchedulerState plus `sigmas`: [num_steps + 1] float32, the noise level at each step
    and after the last (0, or 1 when inverted). Pipelines and caches read them."""

    sigmas: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


def _as_dtype_of(t: torch.Tensor):
    """Round a float32 scalar to t's dtype first. diffusers multiplies a bf16/fp16 model output
    by a 0-d float32 tensor, which torch casts to the output's dtype; a Python float would be
    applied in fp32 instead and give different bits."""
    if t.dtype in (torch.float32, torch.float64):
        return lambda x: x
    return lambda x: torch.tensor(x, dtype=torch.float32).to(t.dtype).item()


class FlowMatchEulerScheduler(Scheduler):
    """Euler on the flow-matching ODE (or its stochastic variant, re-noising x0 at each step)."""

    diffusers_class = "FlowMatchEulerDiscreteScheduler"
    name = "flow_euler"
    objective = "flow"
    config_class = FlowMatchEulerConfig

    def __init__(self, config: FlowMatchEulerConfig | None = None) -> None:
        self.config = cfg = config or FlowMatchEulerConfig()
        T = cfg.num_train_timesteps
        train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
        if not cfg.use_dynamic_shifting:
            train = cfg.shift * train / (1 + (cfg.shift - 1) * train)
        #: the training σ table, highest first (float32, like diffusers' `sigmas` before set_timesteps)
        self.train_sigmas = train
        self.sigma_max, self.sigma_min = train[0].item(), train[-1].item()

    @property
    def needs_image_seq_len(self) -> bool:
        """Whether start() needs mu or image_seq_len (it accepts and ignores them otherwise)."""
        return self.config.use_dynamic_shifting

    def mu_for(self, image_seq_len: int) -> float:
        cfg = self.config
        return calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len,
                               cfg.base_shift, cfg.max_shift)

    def sigmas_for(self, num_steps: int, mu: float | None = None, sigmas=None) -> np.ndarray:
        """The schedule in diffusers' own precision (float64, or float32 for given sigmas),
        before its cast to float32 and without the terminal value."""
        cfg, T = self.config, self.config.num_train_timesteps
        if sigmas is None:
            s = np.linspace(self.sigma_max * T, self.sigma_min * T, num_steps) / T
        else:  # diffusers casts user sigmas to float32 first, then shifts them like its own
            s = np.array(sigmas).astype(np.float32)
        if cfg.use_dynamic_shifting:
            e = math.exp(mu) if cfg.time_shift_type == "exponential" else mu
            s = e / (e + (1 / s - 1))  # diffusers' time shift with its exponent fixed at 1
        else:
            s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
        if cfg.shift_terminal:  # stretch so that the last σ is exactly shift_terminal
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
        if cfg.use_karras_sigmas:
            ramp = np.linspace(0, 1, num_steps)
            lo, hi = s[-1].item() ** (1 / 7.0), s[0].item() ** (1 / 7.0)
            s = (hi + ramp * (lo - hi)) ** 7.0
        elif cfg.use_exponential_sigmas:
            s = np.exp(np.linspace(math.log(s[0].item()), math.log(s[-1].item()), num_steps))
        return s

    def start(self, num_steps: int | None = None, *, generators: list[torch.Generator] | None = None,
              device: torch.device | str = "cpu", mu: float | None = None, image_seq_len: int | None = None,
              sigmas=None) -> FlowMatchState:
        """A schedule of `num_steps` (or the custom `sigmas`, before shifting).

        With use_dynamic_shifting the shift depends on the image: give `mu`, or
        `image_seq_len` (number of latent tokens, (H/8/patch)·(W/8/patch)) to compute it as
        diffusers' SD3 pipeline does. Without dynamic shifting both are ignored, as in
        diffusers, so a pipeline may always pass image_seq_len.
        """
        cfg = self.config
        if sigmas is not None:
            if num_steps is not None and num_steps != len(sigmas):
                raise InputError(f"num_steps is {num_steps} but {len(sigmas)} sigmas were given")
            num_steps = len(sigmas)
        if num_steps is None or num_steps < 1:
            raise InputError(f"num_steps must be at least 1, got {num_steps}")
        if cfg.use_dynamic_shifting and mu is None:
            if image_seq_len is None:
                raise InputError("this scheduler uses dynamic shifting: start() needs mu or image_seq_len")
            mu = self.mu_for(image_seq_len)

        s = torch.from_numpy(self.sigmas_for(num_steps, mu, sigmas)).to(torch.float32)
        end = torch.zeros(1)
        if cfg.invert_sigmas:
            s, end = 1.0 - s, torch.ones(1)
        timesteps = s * cfg.num_train_timesteps
        s = torch.cat([s, end])
        # Python floats of the float32 values, so that step() neither syncs with a device nor
        # rounds differently from diffusers' float32 arithmetic.
        extra = {"sigmas": s.tolist(), "dt": (s[1:] - s[:-1]).tolist(), "one_minus": (1.0 - s).tolist()}
        return FlowMatchState(timesteps.to(device), generators, extra=extra, sigmas=s.to(device))

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor,
             state: SchedulerState) -> torch.Tensor:
        sample = sample.to(torch.float32)  # diffusers steps in fp32 and casts back to the model's dtype
        low = _as_dtype_of(model_output)
        if self.config.stochastic_sampling:
            x0 = sample - low(state.extra["sigmas"][step_index]) * model_output
            next_sigma = state.extra["sigmas"][step_index + 1]
            prev = state.extra["one_minus"][step_index + 1] * x0 + next_sigma * state.noise_like(sample)
        else:
            prev = sample + low(state.extra["dt"][step_index]) * model_output
        return prev.to(model_output.dtype)

    def noise_to(self, x0: torch.Tensor, noise: torch.Tensor, state: SchedulerState, index: int) -> torch.Tensor:
        """diffusers' `scale_noise` at step `index`: σ·noise + (1 − σ)·x0."""
        sigma, rest = state.extra["sigmas"][index], state.extra["one_minus"][index]  # float32 values, as diffusers'
        return (sigma * noise.float() + rest * x0.float()).to(x0.dtype)

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "FlowMatchEulerScheduler":
        return cls(config_from_dict(FlowMatchEulerConfig, config))

    def to_diffusers_config(self) -> dict:
        return config_to_dict(self.diffusers_class, self.config)

    def __repr__(self) -> str:
        return f"FlowMatchEulerScheduler({self.config})"
