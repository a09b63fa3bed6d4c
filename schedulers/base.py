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

Also the helpers the schedulers share: the diffusers config round trip, and for the
ᾱ-table samplers (DDIM, DDPM, DPM-Solver++) the config checks, x0 prediction and clipping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

import torch

from dite.engine.errors import ConfigError
from dite.schedulers.betas import BETA_SCHEDULES, alphas_cumprod, check_spacing


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

    def from_step(self, state: SchedulerState, start: int) -> SchedulerState:
        """The schedule of `state` from step `start` on, for image-to-image (diffusers'
        `get_timesteps` + `set_begin_index`): the timesteps and every per-step table in
        `extra` (a list or 1-D tensor of num_steps or num_steps + 1 entries) lose their first
        `start` entries; `extra["schedule_steps"]` keeps the full schedule's length for
        solvers whose rules depend on it. Step i of the result is step start + i of `state`."""
        n = state.num_steps
        if not 0 <= start < n:
            raise ValueError(f"start step {start} is outside a {n}-step schedule")

        def tail(value):
            if isinstance(value, (list, torch.Tensor)) and (not isinstance(value, torch.Tensor) or value.ndim == 1) \
                    and len(value) in (n, n + 1):
                return value[start:]
            return value

        extra = {key: tail(value) for key, value in state.extra.items()}
        extra["schedule_steps"] = state.extra.get("schedule_steps", n)
        changes = {name: tail(getattr(state, name)) for name in ("sigmas",) if hasattr(state, name)}
        return replace(state, timesteps=state.timesteps[start:], history=[], extra=extra, **changes)

    def noise_to(self, x0: torch.Tensor, noise: torch.Tensor, state: SchedulerState, index: int) -> torch.Tensor:
        """Clean latents `x0` noised to the level of step `index` of `state` (what the model
        sees there): diffusers' `add_noise` at that timestep for the ᾱ-table samplers,
        sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise (DPM-Solver's sigma form is the same value)."""
        table = getattr(self, "alphas_cumprod", None)
        if table is None:
            raise TypeError(f"{type(self).__name__} must define noise_to()")
        t = int(state.timesteps[index])
        alpha = table[t].to(x0.device, x0.dtype)
        return alpha ** 0.5 * x0 + (1 - alpha) ** 0.5 * noise

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "Scheduler":
        raise TypeError(f"{cls.__name__} must define from_diffusers_config()")

    def to_diffusers_config(self) -> dict:
        raise TypeError(f"{type(self).__name__} must define to_diffusers_config()")


# ----------------------------------------------------------------------------- configs


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


# ----------------------------------------------------------------------------- ᾱ-table samplers
# What DDIM, DDPM and DPM-Solver++ share, written once: config checks, the ᾱ table, the x0
# prediction and the clip/threshold rule.

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
