"""Text-to-image with SD3 / SD3.5: prompts -> CLIP-L, bigG, T5 -> guided flow sampling -> VAE."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dite.engine.families import SD3
from dite.engine.pipelines.output import GenerationOutput
from dite.engine.pipelines import init_image
from dite.engine.pipelines.base import Pipeline, Prompts, Request
from dite.engine.runtime import slg
from dite.engine.pipelines.sd3_prompts import T5_MAX_LENGTH, SD3TextEncoders
from dite.models.denoiser import Conditioning
from dite.models.mmdit import MMDiT
from dite.models.sd3_releases import sd3_release


class SD3Pipeline(Pipeline):
    family = "sd3"
    objective = "flow"
    transformer: MMDiT

    def __init__(self, transformer: MMDiT, vae, scheduler, text: SD3TextEncoders, *, source: str = ""):
        super().__init__(transformer, vae, scheduler, source=source)
        self.text = text

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["variant"] = sd3_release(self.transformer.config)  # key kept: README documents it
        encoders = {"clip_l": self.text.clip_l, "clip_g": self.text.clip_g, "t5": self.text.t5}
        info["text_encoders"] = {name: sum(p.numel() for p in model.parameters()) if model is not None else None
                                 for name, model in encoders.items()}
        return info

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None, max_sequence_length: int) -> Conditioning:
        """Conditioning for the batch; with negatives, the unconditional rows come first."""
        all_prompts = (negatives or []) + prompts
        context, pooled = self.text.encode(all_prompts, max_sequence_length)
        dtype, device = self.dtype, self.device
        return Conditioning(context=context.to(device, dtype), pooled=pooled.to(device, dtype),
                            cfg_row_order="uncond_first" if negatives is not None else "none")

    @property
    def prediction_channels(self) -> int:
        return self.transformer.config.out_channels

    def max_size(self) -> tuple[int, str] | None:
        cfg = self.transformer.config
        side = cfg.pos_embed_max_size
        return (side * cfg.patch_size * self.vae_scale_factor,
                f"the model's position table ({side} x {side} patches of {cfg.patch_size * self.vae_scale_factor} pixels)")

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        max_sequence_length: int | None = None,
        seed: int | None = 0,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        progress: bool = True,
        accel=None,
        plan_hook=None,
        image=None,
        strength: float | None = None,
        mask_image=None,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float = slg.DEFAULT_SCALE,
        skip_layer_guidance_stop: float = slg.DEFAULT_STOP,
        skip_layer_guidance_start: float = slg.DEFAULT_START,
    ) -> GenerationOutput:
        # None: the model's recorded default (model_index.json "_dite"), else SD3's 28 / 7.0 / 256.
        prompts = Prompts.check(self, prompt, negative_prompt, num_images_per_prompt, max_sequence_length,
                                default_length=SD3.default_sequence_length, longest=T5_MAX_LENGTH)
        # image-to-image (strength: 0.6 with an image) and inpainting (mask_image, white = repaint)
        init = init_image.check(image, strength, mask_image, count=len(prompts.per_image), height=height,
                                width=width, masks=True, family=self.family)
        # skip-layer guidance (SD3.5-medium: [7, 8, 9]), diffusers' names and defaults: docs/slg.md
        skip = slg.SkipLayerGuidance.check(skip_guidance_layers, skip_layer_guidance_scale,
                                           skip_layer_guidance_start, skip_layer_guidance_stop,
                                           depth=len(self.transformer.blocks))
        request = Request(
            count=len(prompts.per_image), default_latent=self.transformer.config.sample_size,
            height=height, width=width, records=prompts.records, init=init, slg=skip,
            conditioning=lambda call: self.encode_prompts(prompts.per_image, prompts.negatives_for(call),
                                                          prompts.length),
            recorded={"max_sequence_length": prompts.length, "t5": self.text.t5 is not None})
        return self.generate(request, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             seed=seed, latents=latents, output_type=output_type, progress=progress, accel=accel,
                             plan_hook=plan_hook)
