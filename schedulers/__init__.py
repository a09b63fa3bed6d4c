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
           "from_diffusers_config", "load_scheduler", "by_name"]


def from_diffusers_config(config: dict) -> Scheduler:
    """The scheduler a diffusers scheduler config describes (dispatch on `_class_name`).

    Keys the class does not read are ignored, as diffusers ignores them; a value the class
    cannot honour (unknown beta schedule, spacing, prediction type, ...) is a ConfigError.
    """
    class_name = config.get("_class_name")
    if class_name not in SCHEDULERS:
        raise ConfigError(f"unsupported scheduler class {class_name!r}; dite supports "
                          f"{', '.join(sorted(SCHEDULERS))} (or pick one with --scheduler)")
    return SCHEDULERS[class_name].from_diffusers_config(config)


def _read_config(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():  # a scheduler folder or a whole diffusers pipeline folder
        candidates = [path / CONFIG_NAME, path / "scheduler" / CONFIG_NAME]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read scheduler config {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"scheduler config {path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ConfigError(f"scheduler config {path} is not a JSON object")
    return config


def load_scheduler(folder_or_json_path: str | Path) -> Scheduler:
    """Read `scheduler_config.json` (a file, its folder, or a pipeline folder holding
    `scheduler/`) and build the scheduler it names."""
    return from_diffusers_config(_read_config(folder_or_json_path))


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
    return cls.from_diffusers_config({**(base_config or {}), **overrides})
