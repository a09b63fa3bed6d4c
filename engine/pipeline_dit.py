"""Class-to-image with DiT: labels -> guided denoising -> VAE decode."""

from __future__ import annotations

from typing import Sequence

import torch

from dite.engine.errors import InputError
from dite.engine.images import check_output_type
from dite.engine.noise import image_generators, initial_latents, resolve_seed
from dite.engine.output import GenerationOutput
from dite.engine.pipeline import Pipeline, timed
from dite.engine.sampling import GenerationState, denoise
from dite.models.denoiser import Conditioning
from dite.models.dit import DiT


class DiTPipeline(Pipeline):
    family = "dit"
    transformer: DiT

    def __init__(self, transformer: DiT, vae, scheduler, *, source: str = "", id2label: dict | None = None):
        super().__init__(transformer, vae, scheduler, source=source)
        # diffusers' DiT folders carry ImageNet's id -> "name, synonym, ..." map.
        self.labels: dict[str, int] = {}
        for index, names in (id2label or {}).items():
            for name in str(names).split(","):
                self.labels[name.strip().lower()] = int(index)

    def label_ids(self, class_labels: int | str | Sequence[int | str]) -> list[int]:
        """Class indices from ints or (with an id2label map) class names; checked in range."""
        if isinstance(class_labels, (int, str)) or (isinstance(class_labels, torch.Tensor) and class_labels.ndim == 0):
            class_labels = [class_labels]
        num_classes = self.transformer.config.num_classes
        ids = []
        for label in list(class_labels):
            if isinstance(label, torch.Tensor):
                label = int(label.item())
            if isinstance(label, str):
                if label.strip().lower() not in self.labels:
                    hint = "this model has no label names" if not self.labels else "see pipe.labels for the names"
                    raise InputError(f"unknown class name {label!r} ({hint})")
                label = self.labels[label.strip().lower()]
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
                raise InputError(f"class label {label!r} is out of range: this model has classes 0..{num_classes - 1}")
            ids.append(label)
        if not ids:
            raise InputError("class_labels is empty: give at least one class index")
        return ids

    @torch.inference_mode()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = 0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
        accel=None,
        plan_hook=None,
        height: int | None = None,
        width: int | None = None,
    ) -> GenerationOutput:
        check_output_type(output_type)
        # None: the model's recorded default (model_index.json "_dite"), else DiT's 50 / 4.0.
        num_inference_steps = self.default("num_inference_steps", num_inference_steps, 50)
        guidance_scale = self.default("guidance_scale", guidance_scale, 4.0)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        cfg = self.transformer.config
        labels = self.label_ids(class_labels)
        methods, plans = self.plan_steps(accel, num_inference_steps, guidance_scale > 1.0)
        h, w = self.latent_size(height, width, cfg.input_size)
        seed = resolve_seed(seed)
        generators = image_generators(seed, len(labels))
        device, dtype = self.device, self.dtype
        timings: dict[str, float] = {}

        with timed(timings, "encode"):
            guided = guidance_scale > 1.0
            rows = labels + [self.transformer.null_class] * len(labels) if guided else labels
            cond = Conditioning(
                class_labels=torch.tensor(rows, device=device),
                cfg_layout="cond_first" if guided else "none",
            )
            sched_state = self.scheduler.start(num_inference_steps, generators=generators, device=device)
            x = initial_latents((cfg.in_channels, h, w), generators, latents, device=device, dtype=dtype)
            x = x * self.scheduler.init_noise_sigma(sched_state)

        with timed(timings, "denoise"):
            state = GenerationState(scheduler=sched_state)
            x0_shape = x.shape
            x = denoise(
                self.transformer, self.scheduler, x, cond, state, plans=plans, plan_hook=plan_hook,
                guidance_scale=guidance_scale,
                prediction_channels=cfg.in_channels,
                pass_model_variance=cfg.learned_sigma and getattr(self.scheduler, "uses_model_variance", False),
                progress=progress, executor=self.executor,
            )

        return self.finish(x, output_type, timings,
                           {"steps": num_inference_steps, "guidance": guidance_scale},
                           [{"class_label": label} for label in labels], latents is not None, seed, (h, w),
                           self.stats(methods, plans, state, x0_shape, cond))
