"""The discrete-time noise schedule shared by DDPM-family samplers.

`alphas_cumprod` turns a diffusers beta-schedule config into the [T] table ᾱ_t, and
`spaced_timesteps` picks which of the T training timesteps an N-step sampler visits. Both
repeat diffusers' arithmetic op for op (float32 torch for the betas, float64 numpy for
the spacing) so the tables are bit-identical to the reference, not merely close.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from dite.engine.errors import ConfigError, InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
SPACINGS = ("leading", "trailing", "linspace")


def _alpha_bar_betas(num_train_timesteps: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    # Discretise a continuous ᾱ(t), t in [0, 1]; diffusers does this in Python floats.
    betas = []
    for i in range(num_train_timesteps):
        t1, t2 = i / num_train_timesteps, (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(t: float) -> float:  # Nichol & Dhariwal's cosine schedule
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas: Sequence[float] | None = None) -> torch.Tensor:
    """The [T] float32 betas for a diffusers beta-schedule config."""
    if trained_betas is not None:  # diffusers lets an explicit list win over the schedule name
        return torch.tensor(list(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _alpha_bar_betas(num_train_timesteps, _cosine_alpha_bar)
    if beta_schedule == "laplace":
        return _alpha_bar_betas(num_train_timesteps, _laplace_alpha_bar)
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    raise ConfigError(f"unknown beta_schedule {beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ᾱ) so the last step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab -= last
    sqrt_ab *= first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                   trained_betas: Sequence[float] | None = None,
                   rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """ᾱ_t = prod_{s<=t} (1 - β_s) as a [T] float32 CPU tensor."""
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def check_spacing(timestep_spacing: str) -> None:
    if timestep_spacing not in SPACINGS:
        raise ConfigError(f"unknown timestep_spacing {timestep_spacing!r}; expected one of {', '.join(SPACINGS)}")


def spaced_timesteps(num_steps: int, num_train_timesteps: int, timestep_spacing: str,
                     steps_offset: int = 0) -> list[int]:
    """The training timesteps an N-step sampler visits, in sampling (descending) order.

    leading:  0, r, 2r, ... with r = T // N, plus steps_offset (the only rule that uses it).
    trailing: T-1 down in strides of T / N, so the first step is always the noisiest one.
    linspace: N rounded points evenly covering [0, T-1], both ends included.
    """
    check_spacing(timestep_spacing)
    if not 1 <= num_steps <= num_train_timesteps:
        raise InputError(f"num_steps must be between 1 and num_train_timesteps={num_train_timesteps}, got {num_steps}")
    if timestep_spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    elif timestep_spacing == "leading":
        ts = (np.arange(0, num_steps) * (num_train_timesteps // num_steps)).round()[::-1].astype(np.int64)
        ts = ts + steps_offset
    else:
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64) - 1
    if ts.max() >= num_train_timesteps or ts.min() < 0:
        raise InputError(f"{num_steps} {timestep_spacing} steps with steps_offset={steps_offset} reach timestep "
                         f"{int(ts.max())}, outside the {num_train_timesteps} training timesteps; use fewer steps")
    return [int(t) for t in ts]
