"""Text-to-image with PixArt-α / PixArt-Σ: T5 with its mask -> guided DPM-Solver++ -> VAE.

The call is SD3's (prompt, negative_prompt, height, width, steps, guidance, T5 length,
seed, latents, images per prompt, output type, accel) plus diffusers' PixArt option
`use_resolution_binning` (default True: generate at the nearest trained aspect-ratio bin,
return the requested size).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dite.engine.errors import InputError
from dite.engine.images import check_output_type
from dite.engine.noise import image_generators, initial_latents, resolve_seed
from dite.engine.output import GenerationOutput
from dite.engine.pipeline import Pipeline, timed
from dite.engine.pipeline_sd3 import as_prompt_list
from dite.engine.pixart_bins import bins_for, nearest_bin
from dite.engine.sampling import GenerationState, denoise
from dite.engine.text_pixart import PixArtText
from dite.models.denoiser import Conditioning
from dite.models.pixart import PixArt


class PixArtPipeline(Pipeline):
    family = "pixart"
    transformer: PixArt

    def __init__(self, transformer: PixArt, vae, scheduler, text: PixArtText, *, null_caption: torch.Tensor | None = None,
                 source: str = ""):
        super().__init__(transformer, vae, scheduler, source=source)
        self.text = text
        # The original release's learned unconditional caption [L, caption_channels] (`.pth`
        # files only; diffusers drops it). Set to None to encode "" with T5 instead.
        self.null_caption = null_caption

    @property
    def variant(self) -> str:
        return self.transformer.config.variant

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        cfg = self.transformer.config
        bins = bins_for(cfg.sample_size, cfg.variant)
        info.update(variant=cfg.variant, resolution=cfg.sample_size * self.vae_scale_factor,
                    max_sequence_length=cfg.max_sequence_length, micro_conditions=cfg.micro_conditions,
                    resolution_bins=len(bins) if bins else None, null_caption=self.null_caption is not None,
                    text_encoder_parameters=sum(p.numel() for p in self.text.t5.parameters()))
        return info

    def resolve_size(self, height, width, use_resolution_binning: bool) -> tuple[int, int, tuple[int, int] | None]:
        """(height, width) to generate at, and the (height, width) to return if it differs."""
        cfg = self.transformer.config
        default = cfg.sample_size * self.vae_scale_factor
        height = default if height is None else height
        width = default if width is None else width
        bins = bins_for(cfg.sample_size, cfg.variant) if use_resolution_binning else None
        if bins is None:
            return height, width, None
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        bin_h, bin_w = nearest_bin(height, width, bins)
        return bin_h, bin_w, ((height, width) if (bin_h, bin_w) != (height, width) else None)

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None, length: int) -> Conditioning:
        """Context and mask for the batch; with guidance the unconditional rows come first.
        The unconditional rows are T5(negative) with its own mask (diffusers), or, for an
        original release asked for no negative prompt, its learned null caption with each
        prompt's mask (as the original inference script does)."""
        dtype, device = self.dtype, self.device
        states, mask = self.text.encode(prompts, length)
        if negatives is None:
            return Conditioning(context=states.to(device, dtype), context_mask=mask.to(device), cfg_layout="none")
        null = self.null_caption
        if null is not None and negatives.count("") == len(negatives) and null.shape[0] == length:
            neg_states = null.float().to(states.device).expand(len(prompts), -1, -1)
            neg_mask = mask
        else:
            neg_states, neg_mask = self.text.encode(negatives, length)
        context = torch.cat([neg_states.to(states.device), states]).to(device, dtype)
        return Conditioning(context=context, context_mask=torch.cat([neg_mask, mask]).to(device),
                            cfg_layout="uncond_first")

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
        use_resolution_binning: bool = True,
        plan_hook=None,
    ) -> GenerationOutput:
        check_output_type(output_type)
        cfg = self.transformer.config
        # None: the model's recorded default, else PixArt's 20 / 4.5 / 120 (α) or 300 (Σ).
        num_inference_steps = self.default("num_inference_steps", num_inference_steps, 20)
        guidance_scale = self.default("guidance_scale", guidance_scale, 4.5)
        max_sequence_length = self.default("max_sequence_length", max_sequence_length, cfg.max_sequence_length)
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
        gen_h, gen_w, resize_to = self.resolve_size(height, width, use_resolution_binning)
        h, w = self.latent_size(gen_h, gen_w, cfg.sample_size)
        per_image = [p for p in prompts for _ in range(num_images_per_prompt)]
        neg_per_image = [p for p in negatives for _ in range(num_images_per_prompt)] if negatives else None
        seed = resolve_seed(seed)
        generators = image_generators(seed, len(per_image))
        timings: dict[str, float] = {}

        with timed(timings, "encode"):
            cond = self.encode_prompts(per_image, neg_per_image, max_sequence_length)
            if cfg.micro_conditions:
                # α-1024's micro-conditions: the generated size in pixels and its aspect ratio.
                sizes = torch.tensor([[float(gen_h), float(gen_w), float(gen_h / gen_w)]]).to(self.device, self.dtype)
                rows = cond.context.shape[0]
                cond = Conditioning(context=cond.context, context_mask=cond.context_mask,
                                    pooled=sizes.expand(rows, -1), cfg_layout=cond.cfg_layout)
            sched_state = self.scheduler.start(num_inference_steps, generators=generators, device=self.device)
            x = initial_latents((cfg.in_channels, h, w), generators, latents, device=self.device, dtype=self.dtype)
            x = x * self.scheduler.init_noise_sigma(sched_state)

        with timed(timings, "denoise"):
            state = GenerationState(scheduler=sched_state)
            x0_shape = x.shape
            x = denoise(self.transformer, self.scheduler, x, cond, state, plans=plans, guidance_scale=guidance_scale,
                        prediction_channels=cfg.in_channels, progress=progress, executor=self.executor,
                        plan_hook=plan_hook)

        return self.finish(
            x, output_type, timings,
            {"steps": num_inference_steps, "guidance": guidance_scale, "max_sequence_length": max_sequence_length,
             "variant": cfg.variant, "generated_size": f"{gen_w}x{gen_h}"},
            [{"prompt": p, "negative_prompt": neg_per_image[k] if neg_per_image else None}
             for k, p in enumerate(per_image)],
            latents is not None, seed, (h, w), self.stats(methods, plans, state, x0_shape, cond), resize_to=resize_to)
