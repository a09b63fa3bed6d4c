"""Image-to-image and inpainting (engine/pipelines/init_image.py) against diffusers'
StableDiffusion3Img2ImgPipeline / StableDiffusion3InpaintPipeline on the tiny SD3, and the
same math for PixArt and DiT (diffusers has no pipelines for them to compare with)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dite.engine import load

SIZE = (16, 24)  # height, width


def init_picture(size=SIZE, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def half_mask(size=SIZE) -> Image.Image:
    """White (repaint) right half, black (keep) left half."""
    mask = np.zeros(size, dtype=np.uint8)
    mask[:, size[1] // 2:] = 255
    return Image.fromarray(mask, mode="L")


def sd3_reference(reference, cls, **kwargs):
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    pipeline = {"img2img": StableDiffusion3Img2ImgPipeline, "inpaint": StableDiffusion3InpaintPipeline}[cls]
    pipe = pipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs).images


@pytest.mark.parametrize("guidance, strength, steps", [(5.0, 0.6, 4), (1.0, 0.3, 5), (4.0, 1.0, 3)])
def test_sd3_img2img_matches_diffusers(sd3, guidance, strength, steps):
    reference, folder = sd3
    picture = init_picture()
    prompt, negative = "a red circle", ("blurry" if guidance > 1 else None)
    expected = sd3_reference(reference, "img2img", prompt=prompt, negative_prompt=negative, image=picture,
                             strength=strength, height=SIZE[0], width=SIZE[1], num_inference_steps=steps,
                             guidance_scale=guidance, max_sequence_length=20, output_type="np",
                             generator=torch.Generator().manual_seed(11))
    out = load(folder)(prompt=prompt, negative_prompt=negative, image=picture, strength=strength,
                       num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=20, seed=11,
                       output_type="np", progress=False)
    assert out.images.shape == expected.shape == (1, *SIZE, 3)
    assert np.abs(out.images - expected).max() <= 1e-4
    kept = steps - int(max(steps - min(steps * strength, steps), 0))
    assert out.parameters[0]["denoise_steps"] == kept and out.parameters[0]["strength"] == strength
