"""VAE decoding under a parallel plan: each rank decodes the images of its data share and
the data group all-gathers them. Ranks that split a share by CFG branch or by tokens
decode the same images (the decode is cheap next to the denoising loop; splitting it
further is not built)."""

from __future__ import annotations

import torch

from dite.engine.parallel.rows import image_share


class ParallelDecode:
    def __init__(self, inner, ctx):
        self.inner, self.ctx = inner, ctx

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        plan = self.ctx.plan
        if plan.data == 1:
            return self.inner(latents)
        share = image_share(plan, latents.shape[0], self.ctx.coords[0])
        images = self.inner(latents[share.start:share.stop])
        return torch.cat(self.ctx.comm.all_gather(images, self.ctx.data))
