"""DDPM ancestral sampling (Ho et al. 2020; Nichol & Dhariwal 2021), matching diffusers'
DDPMScheduler.

With N < T steps the sampler walks the respaced chain: a step from t goes to the *next
entry of the schedule* (or to "clean" after the last one), and the step's β is
1 - ᾱ_t / ᾱ_prev. That is exactly IDDPM's timestep respacing, so uneven schedules work.

DiT's original sampler (facebookresearch/DiT `sample.py`: 250 respaced IDDPM steps, linear
betas 1e-4..0.02, learned-range variance, no clipping) is

    DDPMScheduler(DDPMConfig(timestep_spacing="linspace", variance_type="learned_range",
                             clip_sample=False))   with start(250)

fed the model's full 2·C-channel output (ε, then the variance interpolation v in [-1, 1]).
IDDPM's `space_timesteps(1000, "250")` picks the same 250 timesteps as linspace; it does its
tables in float64 where diffusers (and we) use float32, so the two agree only to ~1e-6.

variance_type picks the std of the noise added at each step (σ² = posterior variance
β̃_t, β_t = the step's beta):
  fixed_small       sqrt(β̃_t)            fixed_small_log  exp(½ log β̃_t)
  fixed_large       sqrt(β_t)             fixed_large_log  exp(½ log β_t)
  learned           sqrt(model's value)   learned_range    exp(½ (f log β_t + (1-f) log β̃_t)),
                                                           f = (v + 1) / 2
fixed_large_log deviates from diffusers on purpose: diffusers takes the square root of
log β_t (negative) and returns NaN; we give the value its name promises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dite.engine.errors import ConfigError, InputError
from dite.schedulers.base import (Scheduler, SchedulerState, check_common, clip_x0, config_from_dict, config_to_dict,
                                  eps_channels, predict_x0, table_for)
from dite.schedulers.betas import spaced_timesteps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED = ("learned", "learned_range")


@dataclass(frozen=True)
class DDPMConfig:
    """diffusers DDPMScheduler's config, same names and defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        check_common(self)
        if self.variance_type not in VARIANCE_TYPES:
            raise ConfigError(f"unknown variance_type {self.variance_type!r}; "
                              f"expected one of {', '.join(VARIANCE_TYPES)}")


class DDPMScheduler(Scheduler):
    diffusers_class = "DDPMScheduler"
    name = "ddpm"
    objective = "diffusion"
    config_class = DDPMConfig

    def __init__(self, config: DDPMConfig | None = None) -> None:
        self.config = config or DDPMConfig()
        self.alphas_cumprod = table_for(self.config)
        self.one = torch.tensor(1.0)  # ᾱ after the last step: fully denoised

    @property
    def uses_model_variance(self) -> bool:
        return self.config.variance_type in LEARNED

    def start(self, num_steps: int, *, generators: list[torch.Generator] | None = None,
              device: torch.device | str = "cpu") -> SchedulerState:
        cfg = self.config
        ts = spaced_timesteps(num_steps, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset)
        # Python ints so that step() never reads a device tensor (a GPU sync per step).
        extra = {"timesteps": ts, "prev_timesteps": ts[1:] + [-1]}
        return SchedulerState(torch.tensor(ts, dtype=torch.int64, device=device), generators, extra=extra)

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor,
             state: SchedulerState) -> torch.Tensor:
        cfg = self.config
        t, prev_t = state.extra["timesteps"][step_index], state.extra["prev_timesteps"][step_index]
        learned = cfg.variance_type in LEARNED
        if learned:
            if model_output.shape[1] != 2 * sample.shape[1]:
                raise InputError(f"variance_type={cfg.variance_type} needs the model's variance channels: "
                                 f"model output has {model_output.shape[1]} channels, expected "
                                 f"2 x {sample.shape[1]}")
            model_output, model_var = torch.split(model_output, sample.shape[1], dim=1)
        else:
            model_output = eps_channels(model_output, sample)

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
        alpha_t = alpha_prod_t / alpha_prod_prev  # this step's alpha on the respaced chain
        beta_t = 1 - alpha_t

        x0 = clip_x0(cfg, predict_x0(cfg.prediction_type, model_output, sample, alpha_prod_t))
        # Posterior mean μ̃(x_t, x0), DDPM eq. 7.
        x0_coeff = (alpha_prod_prev ** (0.5) * beta_t) / beta_prod_t
        xt_coeff = alpha_t ** (0.5) * beta_prod_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + xt_coeff * sample
        if t == 0:  # diffusers adds no noise at t = 0 only (trailing spacing ends at t > 0)
            return prev_sample

        noise = state.noise_like(model_output)
        # β̃_t; the clamp keeps log() finite when prev is "clean" (β̃ = 0).
        posterior_var = torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod_t) * beta_t, min=1e-20)
        kind = cfg.variance_type
        if kind == "fixed_small":
            std = posterior_var**0.5
        elif kind == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(posterior_var))
        elif kind == "fixed_large":
            std = beta_t**0.5
        elif kind == "fixed_large_log":
            std = torch.exp(0.5 * torch.log(beta_t))
        elif kind == "learned":  # diffusers reads the raw output as a variance, not a log-variance
            std = model_var**0.5
        else:  # learned_range: the model interpolates log-variance between β̃_t and β_t
            frac = (model_var + 1) / 2
            std = torch.exp(0.5 * (frac * torch.log(beta_t) + (1 - frac) * torch.log(posterior_var)))
        return prev_sample + std * noise

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "DDPMScheduler":
        return cls(config_from_dict(DDPMConfig, config))

    def to_diffusers_config(self) -> dict:
        return config_to_dict(self.diffusers_class, self.config)

    def __repr__(self) -> str:
        return f"DDPMScheduler({self.config})"
