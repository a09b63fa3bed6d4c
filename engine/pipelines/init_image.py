"""Image-to-image and inpainting inputs: the init image, `strength` and the mask, checked
before any work starts, and the latent arithmetic the call skeleton (base.Pipeline.generate)
runs with them.

The math is diffusers' (StableDiffusion3Img2ImgPipeline / StableDiffusion3InpaintPipeline,
and StableDiffusionImg2ImgPipeline for the ᾱ-table schedulers): the image is VAE-encoded
(a sample of the posterior, drawn from image k's generator), moved to model space, noised to
the first step that runs (`start_step`, diffusers' `get_timesteps`) and the remaining steps
run. With a mask (white = repaint) the known region is put back after every step, noised
to the next step's level (clean after the last), as diffusers does for a transformer whose
input is the plain latents.

Sizes: an image is never resized. Without height/width the image's own size is generated;
given ones must equal it (diffusers would resample the image silently; dite refuses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dite.engine.errors import InputError
from dite.engine.pipelines import arguments

DEFAULT_STRENGTH = 0.6  # diffusers' default
MASK_MODES = ("1", "L", "RGB")


@dataclasses.dataclass
class InitImage:
    """A checked init image: `pixels` [B, 3, H, W] in [-1, 1] (B = 1, or one per image),
    `strength` in (0, 1], `mask` [B, 1, H, W] of 0 (keep) / 1 (repaint) or None, and what
    every image records (hashes: sha256 of a file's bytes, or of the pixels given in memory,
    first 10 hex digits)."""

    pixels: torch.Tensor
    strength: float
    mask: torch.Tensor | None = None
    recorded: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[-2])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[-1])


def start_step(steps: int, strength: float) -> int:
    """The first step that runs, as diffusers' `get_timesteps` (scheduler order 1): the last
    `steps * strength` steps run (at least one for any strength > 0)."""
    kept = min(steps * strength, steps)
    return int(max(steps - kept, 0))


def check(image, strength, mask_image, *, count: int, height, width, masks: bool, family: str
          ) -> InitImage | None:
    """Check the image-to-image arguments of one call; None for text-to-image. `masks`:
    whether this family inpaints. `count`: the images the call makes (a tensor image may
    give one per image)."""
    if image is None:
        if strength is not None:
            raise InputError("strength only applies to image-to-image: give image= (CLI: --init-image PATH) "
                             "or leave strength out")
        if mask_image is not None:
            raise InputError("mask_image needs an image to repaint: give image= too (CLI: --init-image PATH "
                             "with --mask PATH)")
        return None
    strength = DEFAULT_STRENGTH if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise InputError(f"strength must be a number in (0, 1] (how much of the schedule runs; 1: all of it), "
                         f"got {arguments.shown(strength)}")
    if mask_image is not None and not masks:
        raise InputError(f"inpainting (mask_image / --mask) is not supported for {family} models; "
                         "use SD3 or PixArt, or leave the mask out for image-to-image")
    pixels, image_hash = _image(image, count)
    h, w = pixels.shape[-2:]
    for name, asked, own in (("height", height, h), ("width", width, w)):
        if asked is not None and asked != own:
            raise InputError(f"{name} {asked} differs from the init image's {own} pixels ({w}x{h}); dite does not "
                             f"resize the init image: resize it yourself or leave height/width out")
    recorded = {"init_image": image_hash, "strength": float(strength)}
    mask = None
    if mask_image is not None:
        mask, recorded["mask"] = _mask(mask_image, (h, w))
    return InitImage(pixels=pixels, strength=float(strength), mask=mask, recorded=recorded)


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:10]


def _open(value, what: str) -> tuple[Image.Image, str]:
    """A PIL image from a path or a PIL image, with its hash (of the file's bytes, or of the
    image's mode, size and pixels)."""
    if isinstance(value, (str, Path)):
        path = Path(value)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read the {what} {str(path)!r}: {exc.strerror or exc}") from None
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(f"the {what} {str(path)!r} is not a readable image ({exc}); give a PNG or JPEG "
                             "file") from None
        return img, _short_hash(data)
    if isinstance(value, Image.Image):
        return value, _short_hash(f"{value.mode}{value.size}".encode() + value.tobytes())
    raise InputError(f"the {what} must be a file path, a PIL image or a tensor, got {arguments.shown(value)}")


def _image(value, count: int) -> tuple[torch.Tensor, str]:
    """[B, 3, H, W] in [-1, 1] and the image's hash. A tensor is [3, H, W] or [B, 3, H, W] in
    [0, 1] (what output_type="pt" returns), B = 1 or one per image."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 3 or not t.is_floating_point():
            raise InputError(f"a tensor init image must be float [3, H, W] or [N, 3, H, W], got "
                             f"{t.dtype} {tuple(value.shape)}")
        if t.shape[0] not in (1, count):
            raise InputError(f"the init image tensor holds {t.shape[0]} images for a call making {count}: give one "
                             f"image, or one per image")
        t = t.float().cpu()
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise InputError("a tensor init image must hold values in [0, 1] (as output_type='pt' gives)")
        return t * 2 - 1, _short_hash(t.numpy().tobytes())
    img, image_hash = _open(value, "init image")
    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1, image_hash


def _mask(value, size: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """[1, 1, H, W] of 0 / 1 (diffusers binarizes at 0.5) and the mask's hash."""
    if isinstance(value, torch.Tensor):
        t = value.detach().float().cpu()
        while t.ndim < 4:
            t = t[None]
        if t.ndim != 4 or t.shape[:2] != (1, 1):
            raise InputError(f"a tensor mask must be [H, W], [1, H, W] or [1, 1, H, W], got {tuple(value.shape)}")
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise InputError("a tensor mask must hold values in [0, 1] (1: repaint)")
        mask_hash = _short_hash(t.numpy().tobytes())
    else:
        img, mask_hash = _open(value, "mask")
        if img.mode not in MASK_MODES:
            raise InputError(f"the mask is a {img.mode!r} image; give a black-and-white mask (mode 1, L or RGB; "
                             "white = repaint), e.g. saved with PIL's convert('L')")
        t = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None, None]
    if tuple(t.shape[-2:]) != size:
        raise InputError(f"the mask is {t.shape[-1]}x{t.shape[-2]} pixels but the init image is "
                         f"{size[1]}x{size[0]}: they must be the same size")
    return (t >= 0.5).float(), mask_hash
