"""Text-to-image with PixArt-α / PixArt-Σ: T5 with its mask -> guided DPM-Solver++ -> VAE.

The call is SD3's (prompt, negative_prompt, height, width, steps, guidance, T5 length,
seed, latents, images per prompt, output type, accel) plus diffusers' PixArt option
`use_resolution_binning` (default True: generate at the nearest trained aspect-ratio bin,
return the requested size).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dite.engine.pipelines import arguments, init_image
from dite.engine.pipelines.output import GenerationOutput
from dite.engine.pipelines.base import Pipeline, Prompts, Request
from dite.engine.pipelines.pixart_bins import bins_for, nearest_bin
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
            return Conditioning(context=states.to(device, dtype), context_mask=mask.to(device), cfg_row_order="none")
        null = self.null_caption
        if null is not None and negatives.count("") == len(negatives) and null.shape[0] == length:
            neg_states = null.float().to(states.device).expand(len(prompts), -1, -1)
            neg_mask = mask
        else:
            neg_states, neg_mask = self.text.encode(negatives, length)
        context = torch.cat([neg_states.to(states.device), states]).to(device, dtype)
        return Conditioning(context=context, context_mask=torch.cat([neg_mask, mask]).to(device),
                            cfg_row_order="uncond_first")

    def micro_conditioned(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """α-1024's micro-conditions: the generated size in pixels and its aspect ratio, one
        row per batch row; other models' conditioning unchanged."""
        if not self.transformer.config.micro_conditions:
            return cond
        sizes = torch.tensor([[float(height), float(width), float(height / width)]]).to(self.device, self.dtype)
        return Conditioning(context=cond.context, context_mask=cond.context_mask,
                            pooled=sizes.expand(cond.context.shape[0], -1), cfg_row_order=cond.cfg_row_order)

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
        use_resolution_binning: bool | None = None,
        plan_hook=None,
        image=None,
        strength: float | None = None,
        mask_image=None,
    ) -> GenerationOutput:
        cfg = self.transformer.config
        # None: the model's recorded default, else PixArt's 20 / 4.5 / 120 (α) or 300 (Σ).
        prompts = Prompts.check(self, prompt, negative_prompt, num_images_per_prompt, max_sequence_length,
                                default_length=cfg.max_sequence_length, longest=T5_MAX_LENGTH)
        # None: the model's recorded choice (a demo trained at its own size records false), else
        # diffusers' default, True.
        if use_resolution_binning is None:
            use_resolution_binning = self.defaults.get("use_resolution_binning", True)
        arguments.flag("use_resolution_binning", use_resolution_binning)
        # image-to-image / inpainting: generated at the image's own size, never binned
        init = init_image.check(image, strength, mask_image, count=len(prompts.per_image), height=height,
                                width=width, masks=True, family=self.family)
        if init is not None:
            gen_h, gen_w, resize_to = init.height, init.width, None
        else:
            gen_h, gen_w, resize_to = self.resolve_size(height, width, use_resolution_binning)

        def conditioning(call) -> Conditioning:
            cond = self.encode_prompts(prompts.per_image, prompts.negatives_for(call), prompts.length)
            return self.micro_conditioned(cond, gen_h, gen_w)

        request = Request(
            count=len(prompts.per_image), default_latent=cfg.sample_size, height=gen_h, width=gen_w,
            resize_to=resize_to, records=prompts.records, conditioning=conditioning, init=init,
            recorded={"max_sequence_length": prompts.length, "variant": cfg.pixart_version,
                      "generated_size": f"{gen_w}x{gen_h}"})
        return self.generate(request, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             seed=seed, latents=latents, output_type=output_type, progress=progress, accel=accel,
                             plan_hook=plan_hook)
