"""What a generation call returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class GenerationOutput:
    """images: list of PIL images ("pil"), float32 numpy (N, H, W, 3) in [0, 1] ("np"), a
    tensor (N, 3, H, W) in [0, 1] ("pt"), or None ("latent"). latents: the final latents
    before VAE decoding, in model space (what diffusers returns for output_type="latent").
    parameters: one dict per image of everything needed to reproduce it (seed included).
    timings: wall seconds per stage ("encode", "denoise", "decode").
    stats: what the denoiser ran against the plain call (see engine/runtime/accounting.py): the
    accel methods as resolved, per step rows and blocks, block evaluations, FLOPs; counted
    by `count_stats` when first read (FLOPs are counted on the meta device, which a caller
    who never reads them does not wait for).
    """

    images: Any
    latents: torch.Tensor
    parameters: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    count_stats: Callable[[], dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    @property
    def stats(self) -> dict[str, Any]:
        if "_stats" not in self.__dict__:
            self._stats = self.count_stats() if self.count_stats is not None else {}
        return self._stats
