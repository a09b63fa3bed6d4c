"""Text-to-image with SD3 / SD3.5: prompts -> CLIP-L, bigG, T5 -> guided flow sampling -> VAE."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dite.engine.errors import InputError
from dite.engine.images import check_output_type
from dite.engine.noise import image_generators, initial_latents, resolve_seed
from dite.engine.output import GenerationOutput
from dite.engine.pipeline import Pipeline, timed
from dite.engine.sampling import GenerationState, denoise
from dite.engine.text_sd3 import SD3TextEncoders
from dite.models.denoiser import Conditioning
from dite.models.mmdit import MMDiT
from dite.models.sd3_variants import sd3_variant


def as_prompt_list(prompt: str | Sequence[str], name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{name} must be a string or a non-empty list of strings")
    return prompts


class SD3Pipeline(Pipeline):
    family = "sd3"
    transformer: MMDiT

    def __init__(self, transformer: MMDiT, vae, scheduler, text: SD3TextEncoders, *, source: str = ""):
        super().__init__(transformer, vae, scheduler, source=source)
        self.text = text

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["variant"] = sd3_variant(self.transformer.config)
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

    def _scheduler_start(self, steps: int, generators, image_tokens: int):
        if getattr(self.scheduler, "needs_image_seq_len", False):
            return self.scheduler.start(steps, generators=generators, device=self.device, image_seq_len=image_tokens)
        return self.scheduler.start(steps, generators=generators, device=self.device)

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
        check_output_type(output_type)
        # None: the model's recorded default (model_index.json "_dite"), else SD3's 28 / 7.0 / 256.
        num_inference_steps = self.default("num_inference_steps", num_inference_steps, 28)
        guidance_scale = self.default("guidance_scale", guidance_scale, 7.0)
        max_sequence_length = self.default("max_sequence_length", max_sequence_length, 256)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        prompts = as_prompt_list(prompt, "prompt")
        guided = guidance_scale > 1.0
        methods, plans = self.plan_steps(accel, num_inference_steps, guided)
        negatives = None
        if guided:
            negatives = as_prompt_list(negative_prompt if negative_prompt is not None else "", "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        cfg = self.transformer.config
        h, w = self.latent_size(height, width, cfg.sample_size)
        # Image k of the batch is prompt k // n (copies of one prompt are adjacent).
        per_image = [p for p in prompts for _ in range(num_images_per_prompt)]
        neg_per_image = [p for p in negatives for _ in range(num_images_per_prompt)] if negatives else None
        seed = resolve_seed(seed)
        generators = image_generators(seed, len(per_image))
        timings: dict[str, float] = {}

        with timed(timings, "encode"):
            cond = self.encode_prompts(per_image, neg_per_image, max_sequence_length)
            image_tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
            sched_state = self._scheduler_start(num_inference_steps, generators, image_tokens)
            x = initial_latents((cfg.in_channels, h, w), generators, latents, device=self.device, dtype=self.dtype)
            x = x * self.scheduler.init_noise_sigma(sched_state)

        with timed(timings, "denoise"):
            state = GenerationState(scheduler=sched_state)
            x0_shape = x.shape
            x = denoise(self.transformer, self.scheduler, x, cond, state, plans=plans, plan_hook=plan_hook,
                        executor=self.executor,
                        guidance_scale=guidance_scale, prediction_channels=cfg.out_channels, progress=progress)

        return self.finish(
            x, output_type, timings,
            {"steps": num_inference_steps, "guidance": guidance_scale,
             "max_sequence_length": max_sequence_length, "t5": self.text.t5 is not None},
            [{"prompt": p, "negative_prompt": neg_per_image[k] if neg_per_image else None}
             for k, p in enumerate(per_image)],
            latents is not None, seed, (h, w), self.stats(methods, plans, state, x0_shape, cond))
