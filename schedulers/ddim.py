"""DDIM (Song et al. 2021), numerically matching diffusers' DDIMScheduler.

The ᾱ-table helpers it shares with DDPM and DPM-Solver++ (config checks, x0 prediction,
clipping and thresholding) are in schedulers/base.py.

Matches diffusers in one non-obvious way: the "previous" timestep of a step is always
t - T // N, whatever the spacing, not the next entry of the schedule. With linspace (and
trailing when N does not divide T) the two differ: 50 linspace steps visit 999, 979, 958,
... but the step at 979 denoises to ᾱ_959, and the next one starts from 958 as if it were
there. We keep diffusers' rule because parity is the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dite.engine.errors import InputError
from dite.schedulers.base import (Scheduler, SchedulerState, check_common, clip_x0, config_from_dict, config_to_dict,
                                  eps_channels, predict_x0, table_for)
from dite.schedulers.betas import spaced_timesteps


def predict_eps(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
                alpha_prod_t: torch.Tensor) -> torch.Tensor:
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_prod_t ** (0.5) * model_output) / beta_prod_t ** (0.5)
    return (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample  # v_prediction


@dataclass(frozen=True)
class DDIMConfig:
    """diffusers DDIMScheduler's config, same names and defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        check_common(self)


class DDIMScheduler(Scheduler):
    """DDIM; `eta` (0 = deterministic DDIM, 1 = DDPM-like noise) is chosen per generation in start()."""

    diffusers_class = "DDIMScheduler"
    name = "ddim"
    objective = "diffusion"
    config_class = DDIMConfig

    def __init__(self, config: DDIMConfig | None = None) -> None:
        self.config = config or DDIMConfig()
        self.alphas_cumprod = table_for(self.config)
        # ᾱ of the step after the last: 1 means "fully denoised"; SD-style configs use ᾱ_0.
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def start(self, num_steps: int, *, generators: list[torch.Generator] | None = None,
              device: torch.device | str = "cpu", eta: float = 0.0) -> SchedulerState:
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta}")
        cfg = self.config
        ts = spaced_timesteps(num_steps, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset)
        stride = cfg.num_train_timesteps // num_steps
        # Python ints so that step() never reads a device tensor (a GPU sync per step).
        extra = {"timesteps": ts, "prev_timesteps": [t - stride for t in ts], "eta": float(eta)}
        return SchedulerState(torch.tensor(ts, dtype=torch.int64, device=device), generators, extra=extra)

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor,
             state: SchedulerState) -> torch.Tensor:
        cfg, eta = self.config, state.extra["eta"]
        t, prev_t = state.extra["timesteps"][step_index], state.extra["prev_timesteps"][step_index]
        model_output = eps_channels(model_output, sample)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        x0 = predict_x0(cfg.prediction_type, model_output, sample, alpha_prod_t)
        eps = predict_eps(cfg.prediction_type, model_output, sample, alpha_prod_t)  # from the unclipped x0
        x0 = clip_x0(cfg, x0)

        # σ_t of DDIM eq. 16: eta times the DDPM posterior std between t and prev_t.
        variance = ((1 - alpha_prod_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_prev)
        std = eta * variance ** (0.5)
        prev_sample = alpha_prod_prev ** (0.5) * x0 + (1 - alpha_prod_prev - std**2) ** (0.5) * eps
        if eta > 0:
            prev_sample = prev_sample + std * state.noise_like(model_output)
        return prev_sample

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "DDIMScheduler":
        return cls(config_from_dict(DDIMConfig, config))

    def to_diffusers_config(self) -> dict:
        return config_to_dict(self.diffusers_class, self.config)

    def __repr__(self) -> str:
        return f"DDIMScheduler({self.config})"
