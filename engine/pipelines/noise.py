"""Initial noise, drawn on the CPU image by image so it does not depend on device or batch."""

from __future__ import annotations

import torch

from dite.engine.errors import InputError


def image_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image: image k draws from seed + k."""
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(count)]


def initial_latents(
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    latents: torch.Tensor | None,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[N, *shape] noise from the per-image generators, or the caller's `latents` checked
    against that shape (same meaning as diffusers' `latents=`)."""
    expected = (len(generators), *shape)
    if latents is not None:
        if not isinstance(latents, torch.Tensor):
            raise InputError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if tuple(latents.shape) != expected:
            raise InputError(f"latents have shape {tuple(latents.shape)}, expected {expected}")
        return latents.to(device=device, dtype=dtype)
    rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)
