"""Text-to-image with SD3 / SD3.5: prompts -> CLIP-L, bigG, T5 -> guided flow sampling -> VAE."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dite.engine.families import SD3
from dite.engine.pipelines import arguments
from dite.engine.pipelines.noise import initial_latents
from dite.engine.pipelines.output import GenerationOutput
from dite.engine.pipelines.base import Pipeline, timed
from dite.engine.runtime.sampling import GenerationState, denoise
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
                            cfg_layout="uncond_first" if negatives is not None else "none")

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
    ) -> GenerationOutput:
        # None: the model's recorded default (model_index.json "_dite"), else SD3's 28 / 7.0 / 256.
        prompts = arguments.prompt_list("prompt", prompt)
        negatives = arguments.negative_prompts(negative_prompt, len(prompts))
        max_sequence_length = self.given_or_default(
            "max_sequence_length", max_sequence_length, SD3.default_sequence_length,
            lambda v: arguments.max_sequence_length(v, T5_MAX_LENGTH))
        per_prompt = arguments.integer("num_images_per_prompt", num_images_per_prompt, minimum=1,
                                       maximum=arguments.MAX_IMAGES)
        cfg = self.transformer.config
        # Image k of the batch is prompt k // n (copies of one prompt are adjacent).
        per_image = [p for p in prompts for _ in range(per_prompt)]
        call = self.check_call(images=len(per_image), height=height, width=width, default_latent=cfg.sample_size,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                               latents=latents, output_type=output_type, accel=accel, progress=progress,
                               plan_hook=plan_hook)
        # Unguided, the negative prompts (checked all the same) play no part.
        neg_per_image = [p for p in negatives for _ in range(per_prompt)] if call.guided else None
        h, w = call.size
        timings: dict[str, float] = {}

        with timed(timings, "encode"):
            cond = self.encode_prompts(per_image, neg_per_image, max_sequence_length)
            x = initial_latents((cfg.in_channels, h, w), call.generators, call.latents, device=self.device,
                                dtype=self.dtype)
            x = x * self.scheduler.init_noise_sigma(call.scheduler)

        with timed(timings, "denoise"):
            state = GenerationState(scheduler=call.scheduler)
            x0_shape = x.shape
            x = denoise(self.transformer, self.scheduler, x, cond, state, plans=call.plans, plan_hook=plan_hook,
                        executor=self.executor, guidance_scale=call.guidance, prediction_channels=cfg.out_channels,
                        progress=progress)

        return self.finish(
            x, call.output_type, timings,
            {"steps": call.steps, "guidance": call.guidance,
             "max_sequence_length": max_sequence_length, "t5": self.text.t5 is not None},
            [{"prompt": p, "negative_prompt": neg_per_image[k] if neg_per_image else None}
             for k, p in enumerate(per_image)],
            latents is not None, call.seed, (h, w), self.stats(call.methods, call.plans, state, x0_shape, cond))
