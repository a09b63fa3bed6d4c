"""What every family's pipeline shares: components, device/dtype, metadata, decoding."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import Any

import torch

from dite.accel.build import as_methods, build_plans, resolve
from dite.accel.methods import PlanContext
from dite.engine.accounting import accel_stats
from dite.engine.errors import InputError
from dite.engine.executors.eager import EagerExecutor
from dite.models.denoiser import Denoiser
from dite.models.plan import StepPlan
from dite.models.vae import AutoencoderKL
from dite.schedulers.base import Scheduler


def dite_version() -> str:
    try:
        from importlib.metadata import version

        return version("dite")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


class Pipeline:
    """A loaded model: `transformer` (the denoiser, with `.blocks`), `vae`, `scheduler`."""

    family = ""

    def __init__(self, transformer: Denoiser, vae: AutoencoderKL, scheduler: Scheduler, *, source: str = ""):
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.source = source
        # Sampling defaults the model records for itself (model_index.json "_dite": e.g. the
        # demo SD3's T5 length); an argument given explicitly always wins.
        self.defaults: dict = {}
        # How each denoising step runs (engine/executors): eager unless load(executor=...)
        # or an assignment says otherwise. It keeps compiled graphs, never per-call state.
        self.executor = EagerExecutor()

    def default(self, name: str, value, family_default):
        """`value` if given, else the model's recorded default, else the family's."""
        if value is not None:
            return value
        return self.defaults.get(name, family_default)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_size(self, height: int | None, width: int | None, default_latent: int) -> tuple[int, int]:
        """Check a pixel size against the patch x VAE factor; return the latent (h, w)."""
        factor = self.vae_scale_factor * self.transformer.config.patch_size
        height = default_latent * self.vae_scale_factor if height is None else height
        width = default_latent * self.vae_scale_factor if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % factor:
                raise InputError(
                    f"{name} {value!r} must be a positive multiple of {factor} (VAE factor "
                    f"{self.vae_scale_factor} x patch size {self.transformer.config.patch_size})"
                )
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    @property
    def model_id(self) -> str:
        """Fingerprint of the denoiser (calibrated plans are tied to it); computed once."""
        if "_model_id" not in self.__dict__:
            from dite.accel.fastattn import model_fingerprint

            self._model_id = model_fingerprint(self.transformer)
        return self._model_id

    def plan_steps(self, accel, steps: int, guided: bool) -> tuple[list, list[StepPlan]]:
        """The accel methods (resolved for this call) and one plan per step."""
        ctx = PlanContext(self.family, len(self.transformer.blocks), steps, guided, self.model_id)
        methods = resolve(as_methods(accel), ctx)
        return methods, build_plans(methods, ctx)

    def stats(self, methods, plans, state, x_shape, cond) -> dict[str, Any]:
        memo = self.__dict__.setdefault("_flops_memo", {})
        stats = accel_stats(self.transformer, methods, plans, state.steps_run, tuple(x_shape), cond, memo)
        stats["executor"] = state.executor
        return stats

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images in [-1, 1]."""
        z = self.vae.from_model_space(latents.to(next(self.vae.parameters()).dtype))
        return self.vae.decode(z)

    def finish(self, x: torch.Tensor, output_type: str, timings: dict[str, float], base: dict[str, Any],
               per_image: list[dict[str, Any]], latents_given: bool, seed: int, size: tuple[int, int],
               stats: dict[str, Any] | None = None, resize_to: tuple[int, int] | None = None):
        """Decode (unless "latent") and assemble the output with one parameter dict per image.
        `resize_to` (height, width): the decoded images are scaled and centre-cropped to it
        (PixArt's resolution binning generates at a bin size, then returns the requested one)."""
        from dite.engine.images import postprocess
        from dite.engine.output import GenerationOutput

        images = None
        if output_type != "latent":
            with timed(timings, "decode"):
                decoded = self.decode(x)
                if resize_to is not None:
                    from dite.engine.pixart_bins import resize_and_crop

                    decoded = resize_and_crop(decoded, *resize_to)
                images = postprocess(decoded, output_type)
        h, w = size
        out_h, out_w = resize_to if resize_to is not None else (h * self.vae_scale_factor, w * self.vae_scale_factor)
        base = {"model": self.source, "family": self.family, "scheduler": self.scheduler.name,
                "size": f"{out_w}x{out_h}", **base,
                "accel": (stats or {}).get("accel", "none"),
                "dite_version": dite_version()}
        params = [{**base, **extra, "seed": seed + k, "latents": "given" if latents_given else "seeded"}
                  for k, extra in enumerate(per_image)]
        return GenerationOutput(images=images, latents=x, parameters=params, timings=timings, stats=stats or {})

    def describe(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.transformer.parameters())
        return {
            "family": self.family,
            "source": self.source,
            "transformer": self.transformer.config.to_dict(),
            "transformer_parameters": params,
            "vae": dataclasses.asdict(self.vae.config),
            "vae_parameters": sum(p.numel() for p in self.vae.parameters()),
            "scheduler": self.scheduler.to_diffusers_config(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }


@contextmanager
def timed(timings: dict[str, float], stage: str):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
