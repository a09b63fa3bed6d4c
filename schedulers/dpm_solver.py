"""DPM-Solver++ multistep (Lu et al. 2022), numerically matching diffusers'
DPMSolverMultistepScheduler for its data-prediction solver (`algorithm_type="dpmsolver++"`,
PixArt's sampler) at orders 1 and 2.

The solver works in λ = log(α/σ) on the ᾱ table of a DDPM: each step turns the model output
into an x0 prediction and extrapolates from the last one (order 1, DDIM's update) or two
(order 2, midpoint or Heun correction). Its memory, the previous x0 predictions, is the
per-call `SchedulerState.history`, so one scheduler object serves concurrent generations.

Matched choices of diffusers, kept for parity: the schedule's own spacing rules (N + 1
points with the last dropped, unlike DDIM's); the last step is first order whenever the
final σ is zero (`final_sigmas_type="zero"`), `euler_at_final` is set, or
`lower_order_final` with fewer than 15 steps (which also makes the second-to-last step
second order at most); σ, α and λ are computed per step from float32 σ tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dite.engine.errors import ConfigError, InputError
from dite.schedulers.base import (
    Scheduler, SchedulerState, check_common, clip_x0, config_from_dict, config_to_dict, eps_channels, table_for,
)

SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS = ("zero", "sigma_min")
# Options of diffusers' class that change the schedule or the solver in ways not built here.
UNSUPPORTED_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                     "use_flow_sigmas", "use_dynamic_shifting")


@dataclass(frozen=True)
class DPMSolverConfig:
    """diffusers DPMSolverMultistepScheduler's config (the fields dite honours), same names
    and defaults. `variance_type` is accepted and has no effect: learned-variance channels
    are dropped before the update, as PixArt's and DiT's pipelines do."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    use_dynamic_shifting: bool = False

    # clip_x0 reads these two; DPM-Solver has thresholding but no clip_sample.
    clip_sample = False
    clip_sample_range = 1.0

    def __post_init__(self) -> None:
        check_common(self)
        if self.algorithm_type != "dpmsolver++":
            raise ConfigError(f"DPM-Solver algorithm_type {self.algorithm_type!r} is not supported; dite implements "
                              "'dpmsolver++' (PixArt's and most releases' choice)")
        if self.solver_order not in (1, 2):
            raise ConfigError(f"DPM-Solver solver_order {self.solver_order} is not supported; use 1 or 2")
        if self.solver_type not in SOLVER_TYPES:
            raise ConfigError(f"unknown DPM-Solver solver_type {self.solver_type!r}; expected one of {SOLVER_TYPES}")
        if self.final_sigmas_type not in FINAL_SIGMAS:
            raise ConfigError(f"final_sigmas_type must be one of {FINAL_SIGMAS}, got {self.final_sigmas_type!r}")
        on = [flag for flag in UNSUPPORTED_FLAGS if getattr(self, flag)]
        if on:
            raise ConfigError(f"DPM-Solver option {', '.join(on)} is not supported by dite; set it to false")


class DPMSolverMultistepScheduler(Scheduler):
    diffusers_class = "DPMSolverMultistepScheduler"
    name = "dpm"
    objective = "diffusion"
    config_class = DPMSolverConfig

    def __init__(self, config: DPMSolverConfig | None = None) -> None:
        self.config = cfg = config or DPMSolverConfig()
        alphas_cumprod = table_for(cfg)
        if cfg.rescale_betas_zero_snr:
            alphas_cumprod[-1] = 2**-24  # diffusers' guard: a zero ᾱ would make σ infinite
        self.alphas_cumprod = alphas_cumprod
        # λ_t = log α_t − log σ_t of the training table, for lambda_min_clipped.
        self.lambdas = torch.log(alphas_cumprod.sqrt()) - torch.log((1 - alphas_cumprod).sqrt())

    def timestep_schedule(self, num_steps: int) -> list[int]:
        cfg = self.config
        if not 1 <= num_steps <= cfg.num_train_timesteps:
            raise InputError(f"num_steps must be between 1 and {cfg.num_train_timesteps}, got {num_steps}")
        clipped = int(torch.searchsorted(torch.flip(self.lambdas, [0]), cfg.lambda_min_clipped))
        last = cfg.num_train_timesteps - clipped
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = last // (num_steps + 1)
            ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        else:  # trailing
            ts = np.arange(last, 0, -cfg.num_train_timesteps / num_steps).round().astype(np.int64) - 1
        if ts.max() >= cfg.num_train_timesteps or ts.min() < 0:
            raise InputError(f"{num_steps} {cfg.timestep_spacing} steps with steps_offset={cfg.steps_offset} reach "
                             f"timestep {int(ts.max())}, outside the {cfg.num_train_timesteps} training timesteps")
        return [int(t) for t in ts]

    def start(self, num_steps: int, *, generators: list[torch.Generator] | None = None,
              device: torch.device | str = "cpu") -> SchedulerState:
        cfg = self.config
        ts = self.timestep_schedule(num_steps)
        table = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()  # float32
        sigmas = np.interp(ts, np.arange(0, len(table)), table)
        last = float(table[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
        sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        extra = {"sigmas": sigmas}
        return SchedulerState(torch.tensor(ts, dtype=torch.int64, device=device), generators, extra=extra)

    @staticmethod
    def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # σ here is the VE noise level sqrt((1-ᾱ)/ᾱ); the VP pair is α = 1/sqrt(σ²+1), σ_t = σ·α.
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def _x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        if cfg.prediction_type == "epsilon":
            x0 = (sample - sigma_t * model_output) / alpha_t
        elif cfg.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = alpha_t * sample - sigma_t * model_output
        return clip_x0(cfg, x0)

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor,
             state: SchedulerState) -> torch.Tensor:
        cfg = self.config
        sigmas = state.extra["sigmas"]
        n = state.num_steps
        if len(state.history) != min(step_index, cfg.solver_order):
            raise ValueError(f"DPM-Solver steps must run in order from 0; step {step_index} came after "
                             f"{len(state.history)} recorded steps")
        # diffusers' rule reads the whole schedule's length, also when img2img runs its tail.
        short = cfg.lower_order_final and state.extra.get("schedule_steps", n) < 15
        first_order = (step_index == n - 1) and (cfg.euler_at_final or short or cfg.final_sigmas_type == "zero")
        model_output = eps_channels(model_output, sample)
        x0 = self._x0(model_output, sample, sigmas[step_index])
        history = state.history
        history.append(x0)
        if len(history) > cfg.solver_order:
            history.pop(0)
        out_dtype = x0.dtype
        sample = sample.to(torch.float32)
        sigma_t, sigma_s0 = sigmas[step_index + 1], sigmas[step_index]
        alpha_t, sigma_t = self._alpha_sigma(sigma_t)
        alpha_s0, sigma_s0 = self._alpha_sigma(sigma_s0)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        if cfg.solver_order == 1 or step_index < 1 or first_order:
            prev = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(sigmas[step_index - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            m0, m1 = history[-1], history[-2]
            r0 = (lambda_s0 - lambda_s1) / h
            d0, d1 = m0, (1.0 / r0) * (m0 - m1)
            if cfg.solver_type == "midpoint":
                prev = ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                        - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
            else:  # heun
                prev = ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                        + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1)
        return prev.to(out_dtype)

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "DPMSolverMultistepScheduler":
        config = dict(config)
        if config.get("algorithm_type") == "deis":  # diffusers maps it to dpmsolver++ the same way
            config["algorithm_type"] = "dpmsolver++"
        if config.get("solver_type") in ("logrho", "bh1", "bh2"):
            config["solver_type"] = "midpoint"
        return cls(config_from_dict(DPMSolverConfig, config))

    def to_diffusers_config(self) -> dict:
        out = config_to_dict(self.diffusers_class, self.config)
        out.pop("clip_sample", None)
        out.pop("clip_sample_range", None)
        return out

    def __repr__(self) -> str:
        return f"DPMSolverMultistepScheduler({self.config})"
