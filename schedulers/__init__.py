"""Scheduler registry: diffusers `scheduler_config.json` files and CLI names -> schedulers.

A new scheduler registers by adding its class to `_CLASSES`; it needs `diffusers_class`,
`name`, `config_class` (a frozen dataclass named like diffusers' config) and
`from_diffusers_config`.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from dite.engine.errors import ConfigError
from dite.models.config_fields import check_against, json_type, require_object
from dite.schedulers.base import Scheduler, SchedulerState
from dite.schedulers.ddim import DDIMConfig, DDIMScheduler
from dite.schedulers.ddpm import DDPMConfig, DDPMScheduler
from dite.schedulers.dpm_solver import DPMSolverConfig, DPMSolverMultistepScheduler
from dite.schedulers.flow_match import FlowMatchEulerConfig, FlowMatchEulerScheduler, FlowMatchState

_CLASSES: tuple[type[Scheduler], ...] = (DDIMScheduler, DDPMScheduler, FlowMatchEulerScheduler,
                                         DPMSolverMultistepScheduler)

#: diffusers class name -> scheduler class
SCHEDULERS: dict[str, type[Scheduler]] = {cls.diffusers_class: cls for cls in _CLASSES}
#: short (CLI) name -> scheduler class
BY_NAME: dict[str, type[Scheduler]] = {cls.name: cls for cls in _CLASSES}
#: other names people use for a scheduler (ComfyUI and A1111 call flow-matching Euler "euler")
ALIASES: dict[str, str] = {"euler": FlowMatchEulerScheduler.name, "dpm++": DPMSolverMultistepScheduler.name,
                           "dpmsolver": DPMSolverMultistepScheduler.name}

CONFIG_NAME = "scheduler_config.json"

__all__ = ["SCHEDULERS", "BY_NAME", "ALIASES", "Scheduler", "SchedulerState", "DDIMConfig", "DDIMScheduler",
           "DDPMConfig", "DDPMScheduler", "DPMSolverConfig",
           "DPMSolverMultistepScheduler", "FlowMatchEulerConfig", "FlowMatchEulerScheduler", "FlowMatchState",
           "from_diffusers_config", "load_scheduler", "read_scheduler_config", "by_name"]


def from_diffusers_config(config: dict) -> Scheduler:
    """The scheduler a diffusers scheduler config describes (dispatch on `_class_name`).

    Keys the class does not read are ignored, as diffusers ignores them; a value the class
    cannot honour (unknown beta schedule, spacing, prediction type, ...) is a ConfigError.
    """
    require_object(config, "scheduler config")
    class_name = config.get("_class_name")
    if class_name is None:
        raise ConfigError(f"scheduler config has no '_class_name', which is required; dite supports "
                          f"{', '.join(sorted(SCHEDULERS))}")
    if not isinstance(class_name, str) or class_name not in SCHEDULERS:
        raise ConfigError(f"scheduler config: _class_name {class_name!r} is not a scheduler dite supports: "
                          f"{', '.join(sorted(SCHEDULERS))} (or pick one with --scheduler)")
    cls = SCHEDULERS[class_name]
    check_config(cls, config)
    return cls.from_diffusers_config(config)


def check_config(cls: type[Scheduler], config: dict) -> None:
    """The fields of `config` that `cls` reads, checked against its config dataclass's types
    (a string where a number belongs, NaN, a negative or zero step count)."""
    check_against(cls.config_class, config, f"{cls.diffusers_class} config", sizes=POSITIVE_FIELDS)
    for name in ("beta_start", "beta_end"):
        value = config.get(name)
        if name in {f.name for f in fields(cls.config_class)} and value is not None and not 0 <= value < 1:
            raise ConfigError(f"{cls.diffusers_class} config: {name} must be in [0, 1), got {value}")


# Integer fields that must be positive (others may be 0, e.g. steps_offset).
POSITIVE_FIELDS = ("num_train_timesteps", "solver_order", "base_image_seq_len", "max_image_seq_len")


def _read_config(path: str | Path) -> tuple[Path, dict]:
    path = Path(path)
    if path.is_dir():  # a scheduler folder or a whole diffusers pipeline folder
        candidates = [path / CONFIG_NAME, path / "scheduler" / CONFIG_NAME]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read scheduler config {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the "
                          "scheduler config or download it again") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object ({{...}}), not {json_type(config)}; is this the "
                          "scheduler config?")
    return path, config


def load_scheduler(folder_or_json_path: str | Path) -> Scheduler:
    """Read `scheduler_config.json` (a file, its folder, or a pipeline folder holding
    `scheduler/`) and build the scheduler it names; errors name the file."""
    path, config = _read_config(folder_or_json_path)
    try:
        return from_diffusers_config(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_scheduler_config(folder_or_json_path: str | Path) -> dict:
    """The scheduler config dict at a path (as load_scheduler reads it), checked to build."""
    load_scheduler(folder_or_json_path)
    return _read_config(folder_or_json_path)[1]


def by_name(name: str, base_config: dict | None = None, **overrides) -> Scheduler:
    """A scheduler by CLI name ("ddim", "ddpm", "flow_euler" alias "euler") with config overrides.

    `base_config`, a diffusers config of any class (typically the model's own
    scheduler_config.json), supplies the training noise schedule (betas, prediction type,
    ...) the way diffusers' `OtherScheduler.from_config(pipe.scheduler.config)` does; its
    keys the named scheduler does not read are dropped. `overrides` must all be fields of
    the scheduler's config.
    """
    cls = BY_NAME.get(ALIASES.get(name, name))
    if cls is None:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(sorted(BY_NAME))}")
    known = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"scheduler {name!r} has no option {', '.join(unknown)}; "
                          f"its options are {', '.join(sorted(known))}")
    config = {**(base_config or {}), **overrides}
    check_config(cls, config)
    return cls.from_diffusers_config(config)
