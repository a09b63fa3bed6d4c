"""Tiled VAE decoding: the latents cut into overlapping tiles, each decoded alone, the seams
blended linearly, so the decoder's activations are those of one tile, not of the image.

The same tiling as diffusers' `AutoencoderKL.enable_tiling()` (so the images match it within
its tolerance): latent tiles of `tile // factor` starting every 75% of that, decoded tiles
blended over 25% of `tile` pixels (the tile above first, then the one to the left, each
into the tile in place), then each cropped to 75% of `tile` and the rows and columns
joined. Latents no larger than one tile are decoded whole.
"""

from __future__ import annotations

import types

import torch

from dite.engine.errors import InputError

DEFAULT_TILE = 512  # pixels a side (diffusers uses the VAE config's sample_size)
OVERLAP = 0.25


def _blend_rows(above: torch.Tensor, below: torch.Tensor, extent: int) -> None:
    """The first `extent` rows of `below` fade in from the last rows of `above` (in place)."""
    extent = min(above.shape[2], below.shape[2], extent)
    for y in range(extent):
        weight = y / extent
        below[:, :, y, :] = above[:, :, y - extent, :] * (1 - weight) + below[:, :, y, :] * weight


def _blend_columns(left: torch.Tensor, right: torch.Tensor, extent: int) -> None:
    extent = min(left.shape[3], right.shape[3], extent)
    for x in range(extent):
        weight = x / extent
        right[:, :, :, x] = left[:, :, :, x - extent] * (1 - weight) + right[:, :, :, x] * weight


def tiled_decode(vae, z: torch.Tensor, tile: int = DEFAULT_TILE, overlap: float = OVERLAP) -> torch.Tensor:
    """Decode VAE-space latents `z` [N, C, h, w] tile by tile (see the module docstring)."""
    latent_tile = tile // vae.downscale
    stride = int(latent_tile * (1 - overlap))
    blend = int(tile * overlap)
    keep = tile - blend
    grid = []
    for top in range(0, z.shape[2], stride):
        row = []
        for left in range(0, z.shape[3], stride):
            piece = z[:, :, top:top + latent_tile, left:left + latent_tile]
            if vae.post_quant_conv is not None:
                piece = vae.post_quant_conv(piece)
            row.append(vae.decoder(piece))
        grid.append(row)
    rows = []
    for i, row in enumerate(grid):
        kept = []
        for j, decoded in enumerate(row):
            if i > 0:
                _blend_rows(grid[i - 1][j], decoded, blend)
            if j > 0:
                _blend_columns(row[j - 1], decoded, blend)
            kept.append(decoded[:, :, :keep, :keep])
        rows.append(torch.cat(kept, dim=3))
    return torch.cat(rows, dim=2)


def enable_vae_tiling(vae, tile: int = DEFAULT_TILE, overlap: float = OVERLAP):
    """Make `vae.decode` tile latents larger than one tile (an instance attribute: other VAEs
    are untouched); returns the VAE."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 2 * vae.downscale or tile % vae.downscale:
        raise InputError(f"VAE tile size {tile!r} must be a multiple of the VAE factor {vae.downscale} "
                         f"of at least {2 * vae.downscale} pixels")
    if not 0 < overlap < 1:
        raise InputError(f"VAE tile overlap {overlap!r} must be between 0 and 1")
    whole = type(vae).decode
    latent_tile = tile // vae.downscale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] > latent_tile or z.shape[-2] > latent_tile:
            return tiled_decode(self, z, tile, overlap)
        return whole(self, z)

    vae.decode = types.MethodType(decode, vae)
    return vae
