"""Text-to-image with PixArt-α / PixArt-Σ: T5 with its mask -> guided DPM-Solver++ -> VAE.

The call is SD3's (prompt, negative_prompt, height, width, steps, guidance, T5 length,
seed, latents, images per prompt, output type, accel) plus diffusers' PixArt option
`use_resolution_binning` (default True: generate at the nearest trained aspect-ratio bin,
return the requested size).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dite.engine.pipelines import arguments
from dite.engine.pipelines.noise import initial_latents
from dite.engine.pipelines.output import GenerationOutput
from dite.engine.pipelines.base import Pipeline, timed
from dite.engine.pipelines.pixart_bins import bins_for, nearest_bin
from dite.engine.runtime.sampling import GenerationState, denoise
from dite.engine.pipelines.pixart_prompts import MAX_LENGTH as T5_MAX_LENGTH, PixArtText
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
    def pixart_version(self) -> str:
        """"alpha" (PixArt-α) or "sigma" (PixArt-Σ)."""
        return self.transformer.config.pixart_version

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        cfg = self.transformer.config
        bins = bins_for(cfg.sample_size, cfg.pixart_version)
        info.update(variant=cfg.pixart_version, resolution=cfg.sample_size * self.vae_scale_factor,
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
        bins = bins_for(cfg.sample_size, cfg.pixart_version) if use_resolution_binning else None
        if bins is None:
            return height, width, None
        height = arguments.integer("height", height, minimum=1)
        width = arguments.integer("width", width, minimum=1)
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
        cfg = self.transformer.config
        # None: the model's recorded default, else PixArt's 20 / 4.5 / 120 (α) or 300 (Σ).
        prompts = arguments.prompt_list("prompt", prompt)
        negatives = arguments.negative_prompts(negative_prompt, len(prompts))
        max_sequence_length = self.given_or_default(
            "max_sequence_length", max_sequence_length, cfg.max_sequence_length,
            lambda v: arguments.max_sequence_length(v, T5_MAX_LENGTH))
        per_prompt = arguments.integer("num_images_per_prompt", num_images_per_prompt, minimum=1,
                                       maximum=arguments.MAX_IMAGES)
        arguments.flag("use_resolution_binning", use_resolution_binning)
        gen_h, gen_w, resize_to = self.resolve_size(height, width, use_resolution_binning)
        per_image = [p for p in prompts for _ in range(per_prompt)]
        call = self.check_call(images=len(per_image), height=gen_h, width=gen_w, default_latent=cfg.sample_size,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                               latents=latents, output_type=output_type, accel=accel, progress=progress,
                               plan_hook=plan_hook)
        # Unguided, the negative prompts (checked all the same) play no part.
        neg_per_image = [p for p in negatives for _ in range(per_prompt)] if call.guided else None
        h, w = call.size
        timings: dict[str, float] = {}

        with timed(timings, "encode"):
            cond = self.encode_prompts(per_image, neg_per_image, max_sequence_length)
            if cfg.micro_conditions:
                # α-1024's micro-conditions: the generated size in pixels and its aspect ratio.
                sizes = torch.tensor([[float(gen_h), float(gen_w), float(gen_h / gen_w)]]).to(self.device, self.dtype)
                rows = cond.context.shape[0]
                cond = Conditioning(context=cond.context, context_mask=cond.context_mask,
                                    pooled=sizes.expand(rows, -1), cfg_layout=cond.cfg_layout)
            x = initial_latents((cfg.in_channels, h, w), call.generators, call.latents, device=self.device,
                                dtype=self.dtype)
            x = x * self.scheduler.init_noise_sigma(call.scheduler)

        with timed(timings, "denoise"):
            state = GenerationState(scheduler=call.scheduler)
            x0_shape = x.shape
            x = denoise(self.transformer, self.scheduler, x, cond, state, plans=call.plans,
                        guidance_scale=call.guidance, prediction_channels=cfg.in_channels, progress=progress,
                        executor=self.executor, plan_hook=plan_hook)

        return self.finish(
            x, call.output_type, timings,
            {"steps": call.steps, "guidance": call.guidance, "max_sequence_length": max_sequence_length,
             "variant": cfg.pixart_version, "generated_size": f"{gen_w}x{gen_h}"},
            [{"prompt": p, "negative_prompt": neg_per_image[k] if neg_per_image else None}
             for k, p in enumerate(per_image)],
            latents is not None, call.seed, (h, w), self.stats(call.methods, call.plans, state, x0_shape, cond),
            resize_to=resize_to)
