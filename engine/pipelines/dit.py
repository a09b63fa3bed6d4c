"""Class-to-image with DiT: labels -> guided denoising -> VAE decode."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dite.engine.errors import InputError
from dite.engine.pipelines import arguments, init_image
from dite.engine.pipelines.output import GenerationOutput
from dite.engine.pipelines.base import Call, Pipeline, Request
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

    @property
    def passes_model_variance(self) -> bool:
        return self.transformer.config.learned_sigma

    def label_ids(self, class_labels) -> list[int]:
        """Class indices from ints or (with an id2label map) class names, one or a list /
        tuple / 1-D tensor or array of them; each checked in range."""
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            raise InputError("class_labels is required: give a class index or name, or a list of them")
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            if class_labels.ndim > 1:
                raise InputError(f"class_labels must be one label or a list of labels, got "
                                 f"{arguments.shown(class_labels)}")
            class_labels = class_labels.tolist() if class_labels.ndim == 1 else [class_labels.item()]
        elif not isinstance(class_labels, (list, tuple)):
            class_labels = [class_labels]
        if not class_labels:
            raise InputError("class_labels is empty: give at least one class index")
        ids = []
        for k, label in enumerate(class_labels):
            if isinstance(label, str):
                if label.strip().lower() not in self.labels:
                    hint = "this model has no label names" if not self.labels else "see pipe.labels for the names"
                    raise InputError(f"unknown class name {label!r} ({hint})")
                label = self.labels[label.strip().lower()]
            try:
                label = arguments.integer(f"class_labels[{k}]", label)
            except InputError:
                raise InputError(f"class_labels[{k}] is {arguments.shown(label)}: a class label is a class index "
                                 f"0..{num_classes - 1} or a class name") from None
            if not 0 <= label < num_classes:
                raise InputError(f"class label {label!r} is out of range: this model has classes 0..{num_classes - 1}")
            ids.append(label)
        return ids

    def encode_labels(self, labels: list[int], call: Call) -> Conditioning:
        """The class labels; guided, followed by as many null-class rows (conditional first)."""
        rows = labels + [self.transformer.null_class] * len(labels) if call.guided else labels
        return Conditioning(class_labels=torch.tensor(rows, device=self.device),
                            cfg_row_order="cond_first" if call.guided else "none")

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
        image=None,
        strength: float | None = None,
        mask_image=None,
    ) -> GenerationOutput:
        # None: the model's recorded default (model_index.json "_dite"), else DiT's 50 / 4.0.
        labels = self.label_ids(class_labels)
        # image-to-image with a class label; DiT does not inpaint (mask_image is refused)
        init = init_image.check(image, strength, mask_image, count=len(labels), height=height, width=width,
                                masks=False, family=self.family)
        request = Request(
            count=len(labels), default_latent=self.transformer.config.input_size, height=height, width=width,
            init=init,
            conditioning=lambda call: self.encode_labels(labels, call),
            records=lambda call: [{"class_label": label} for label in labels])
        return self.generate(request, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             seed=seed, latents=latents, output_type=output_type, progress=progress, accel=accel,
                             plan_hook=plan_hook)
