"""One record per model family: what loading, conversion, inspection, acceleration defaults,
calibration and the CLI need to know about it, in one place.

A record holds names and numbers only; the code it points at (the family's loader module,
its model module) is named by dotted path and imported on use, so reading a record imports
no torch module and no pipeline. Adding a family is: a model file under `models/`, a loader
under `engine/loading/`, a pipeline under `engine/pipelines/`, and a record here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Family:
    name: str
    # diffusers' model_index.json `_class_name`s of this family's pipelines.
    pipeline_classes: tuple[str, ...]
    # diffusers' transformer class names (transformer/config.json `_class_name`).
    transformer_classes: tuple[str, ...]
    # dite.models.<...>: the nn.Module, its config, key maps and `detect_layout(keys)`, by which
    # engine/checkpoints/recognise.py tells a file's family.
    model_module: str
    loader_module: str  # dite.engine.loading.<...>: load_folder, load_file
    # Row order of a guided batch: which CFG half comes first.
    cfg_row_order: str
    default_steps: int
    default_guidance: float
    # T5 tokens by default (None: no text encoder); PixArt-Σ overrides α's 120 with 300.
    default_sequence_length: int | None
    # The scheduler a file without a scheduler config is sampled with (diffusers config);
    # None where it depends on the checkpoint (DiT: `original_scheduler_config`).
    default_scheduler: dict | None

    def loader(self) -> ModuleType:
        return importlib.import_module(self.loader_module)

    def model(self) -> ModuleType:
        return importlib.import_module(self.model_module)


# The scheduler_config.json of every SD3 / SD3.5 diffusers release; single files carry none.
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# PixArt's diffusers pipeline class of each PixArt version (α, Σ: `pixart_version`).
PIXART_VERSION_OF_PIPELINE = {"PixArtAlphaPipeline": "alpha", "PixArtSigmaPipeline": "sigma"}
# PixArt's original sampler setting (DPM-Solver++ 2M, linear betas), as its diffusers releases.
PIXART_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2,
                    "solver_type": "midpoint", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                    "num_train_timesteps": 1000, "prediction_type": "epsilon", "timestep_spacing": "linspace",
                    "lower_order_final": True}


def original_dit_scheduler_config(learned_sigma: bool) -> dict:
    """The original DiT sampler: 1000-step linear-beta DDPM, learned-range variance when the
    model predicts it, respaced evenly (IDDPM's space_timesteps == diffusers' "linspace")."""
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
            "beta_start": 0.0001, "beta_end": 0.02, "timestep_spacing": "linspace", "clip_sample": False,
            "variance_type": "learned_range" if learned_sigma else "fixed_small", "prediction_type": "epsilon"}


DIT = Family("dit", ("DiTPipeline",), ("DiTTransformer2DModel", "Transformer2DModel"), "dite.models.dit",
             "dite.engine.loading.dit", cfg_row_order="cond_first", default_steps=50, default_guidance=4.0,
             default_sequence_length=None, default_scheduler=None)
SD3 = Family("sd3", ("StableDiffusion3Pipeline",), ("SD3Transformer2DModel",), "dite.models.mmdit",
             "dite.engine.loading.sd3", cfg_row_order="uncond_first", default_steps=28, default_guidance=7.0,
             default_sequence_length=256, default_scheduler=SD3_SCHEDULER)
PIXART = Family("pixart", tuple(PIXART_VERSION_OF_PIPELINE), ("PixArtTransformer2DModel", "Transformer2DModel"),
                "dite.models.pixart", "dite.engine.loading.pixart", cfg_row_order="uncond_first", default_steps=20,
                default_guidance=4.5, default_sequence_length=120, default_scheduler=PIXART_SCHEDULER)

FAMILIES: tuple[Family, ...] = (DIT, SD3, PIXART)
BY_NAME = {f.name: f for f in FAMILIES}


def by_pipeline_class(class_name: str) -> Family | None:
    return next((f for f in FAMILIES if class_name in f.pipeline_classes), None)


def supported_pipelines() -> list[str]:
    return [name for f in FAMILIES for name in f.pipeline_classes]
