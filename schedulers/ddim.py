"""DDIM (Song et al. 2021), numerically matching diffusers' DDIMScheduler.

Also home of the x0/ε conversions and the clip/threshold rule that every ᾱ-table sampler
(DDPM here, DPM-Solver later) shares, so they are written once.

Matches diffusers in one non-obvious way: the "previous" timestep of a step is always
t - T // N, whatever the spacing, not the next entry of the schedule. With linspace (and
trailing when N does not divide T) the two differ: 50 linspace steps visit 999, 979, 958,
... but the step at 979 denoises to ᾱ_959, and the next one starts from 958 as if it were
there. We keep diffusers' rule because parity is the contract.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from dite.engine.errors import ConfigError, InputError
from dite.schedulers.base import Scheduler, SchedulerState
from dite.schedulers.betas import BETA_SCHEDULES, alphas_cumprod, check_spacing, spaced_timesteps

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_common(cfg: Any) -> None:
    """Validate the fields every ᾱ-table config shares; freeze trained_betas into a tuple."""
    if cfg.trained_betas is not None:
        object.__setattr__(cfg, "trained_betas", tuple(float(b) for b in cfg.trained_betas))
        if len(cfg.trained_betas) != cfg.num_train_timesteps:
            raise ConfigError(f"trained_betas has {len(cfg.trained_betas)} entries but "
                              f"num_train_timesteps is {cfg.num_train_timesteps}")
    elif cfg.beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"unknown beta_schedule {cfg.beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unknown prediction_type {cfg.prediction_type!r}; "
                          f"expected one of {', '.join(PREDICTION_TYPES)}")
    check_spacing(cfg.timestep_spacing)
    if cfg.num_train_timesteps < 1:
        raise ConfigError(f"num_train_timesteps must be positive, got {cfg.num_train_timesteps}")
    if cfg.thresholding and not 0 < cfg.dynamic_thresholding_ratio <= 1:
        raise ConfigError(f"dynamic_thresholding_ratio must be in (0, 1], got {cfg.dynamic_thresholding_ratio}")


def table_for(cfg: Any) -> torch.Tensor:
    return alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                          cfg.trained_betas, cfg.rescale_betas_zero_snr)


def config_from_dict(config_cls: type, config: dict) -> Any:
    """Build a config dataclass from a diffusers config, ignoring the keys it does not know:
    diffusers' own class ignores them too (keys of sibling schedulers, `_class_name`, ...)."""
    names = {f.name for f in fields(config_cls)}
    try:
        return config_cls(**{k: v for k, v in config.items() if k in names})
    except TypeError as e:  # e.g. a string where a number belongs
        raise ConfigError(f"bad value in {config_cls.__name__}: {e}") from e


def config_to_dict(diffusers_class: str, cfg: Any) -> dict:
    out = {"_class_name": diffusers_class, **asdict(cfg)}
    if out.get("trained_betas") is not None:
        out["trained_betas"] = list(out["trained_betas"])
    return out


def eps_channels(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Drop a learned-variance half (DiT outputs 2·C channels) that this sampler does not use;
    diffusers' DiTPipeline makes the same cut before it calls step()."""
    channels = sample.shape[1]
    return model_output[:, :channels] if model_output.shape[1] == 2 * channels else model_output


def predict_x0(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
               alpha_prod_t: torch.Tensor) -> torch.Tensor:
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    if prediction_type == "sample":
        return model_output
    return (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output  # v_prediction


def predict_eps(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
                alpha_prod_t: torch.Tensor) -> torch.Tensor:
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_prod_t ** (0.5) * model_output) / beta_prod_t ** (0.5)
    return (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample  # v_prediction


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: per row, s = the `ratio` quantile of |x0| clamped to
    [1, max_value]; clamp x0 to [-s, s] and divide by s."""
    dtype, shape = x0.dtype, x0.shape
    flat = x0.reshape(shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs fp32; CPU clamp has no half kernel
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)


def clip_x0(cfg: Any, x0: torch.Tensor) -> torch.Tensor:
    if cfg.thresholding:  # thresholding wins over clip_sample, as in diffusers
        return dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
    if cfg.clip_sample:
        return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return x0


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
