"""The whole PixArt-α / PixArt-Σ pipeline against diffusers' PixArtAlphaPipeline /
PixArtSigmaPipeline: same initial latents, same images (fp32, ≤ 1e-4), batches of prompts of
different lengths (masks that mask), non-square sizes, DPM-Solver++ and DDIM."""

from __future__ import annotations

import numpy as np
import pytest

from dite.engine import load
from dite.engine.errors import InputError
from dite.models.tokenizers import TruncationWarning
from tiny_pixart import reference_images, tiny_pixart_pipeline

PROMPTS = ["a red circle at the top left", "A small BLUE square, on the right of a green wooden table!"]


@pytest.fixture(scope="module")
def alpha(tmp_path_factory):
    return tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart-alpha"))


@pytest.fixture(scope="module")
def alpha_micro(tmp_path_factory):
    # sample_size 128: the only size at which diffusers passes micro-conditions
    return tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart-alpha-ms"), micro=True, sample_size=128,
                                scheduler="ddim")


@pytest.fixture(scope="module")
def sigma(tmp_path_factory):
    return tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart-sigma"), pixart_version="sigma")


def compare(fixture, size, guidance=4.5, negative=None, steps=4, images_per_prompt=1, **kwargs):
    reference, folder = fixture
    prompts = PROMPTS
    n = len(prompts) * images_per_prompt
    expected, latents = reference_images(reference, prompts, "" if negative is None else negative, steps, guidance, size, seed=3, factor=2,
                                         height=size[0], width=size[1], use_resolution_binning=False,
                                         num_images_per_prompt=images_per_prompt, **kwargs)
    out = load(folder)(prompt=prompts, negative_prompt=negative, height=size[0], width=size[1],
                       num_inference_steps=steps, guidance_scale=guidance, latents=latents[:n].clone(),
                       num_images_per_prompt=images_per_prompt, output_type="np", progress=False,
                       use_resolution_binning=False, **kwargs)
    assert out.images.shape == expected.shape == (n, size[0], size[1], 3)
    assert np.abs(out.images - expected).max() <= 1e-4
    return out


def test_alpha_matches_diffusers_non_square(alpha):
    out = compare(alpha, (16, 24), negative=["blurry", ""], max_sequence_length=40)
    assert out.parameters[0]["variant"] == "alpha" and out.parameters[0]["scheduler"] == "dpm"


def test_alpha_default_length_and_unguided(alpha):
    compare(alpha, (24, 16), guidance=1.0)


def test_alpha_micro_conditions_matches_diffusers(alpha_micro):
    compare(alpha_micro, (16, 24), max_sequence_length=36)


def test_sigma_matches_diffusers(sigma):
    out = compare(sigma, (24, 16), negative="low quality", max_sequence_length=44, steps=5)
    assert out.parameters[0]["max_sequence_length"] == 44


def test_sigma_default_length_is_300(sigma):
    reference, folder = sigma
    pipe = load(folder)
    assert pipe.transformer.config.pixart_version == "sigma" and pipe.describe()["max_sequence_length"] == 300
    out = pipe(prompt="a cat", height=16, width=16, num_inference_steps=1, output_type="latent", progress=False)
    assert out.parameters[0]["max_sequence_length"] == 300


def test_images_per_prompt_and_seeds(alpha):
    _, folder = alpha
    out = load(folder)(prompt=["a", "b"], num_images_per_prompt=2, height=16, width=16, num_inference_steps=2,
                       seed=7, output_type="latent", progress=False)
    assert out.latents.shape[0] == 4
    assert [(p["prompt"], p["seed"]) for p in out.parameters] == [("a", 7), ("a", 8), ("b", 9), ("b", 10)]


def test_long_prompt_is_truncated_with_a_warning(alpha):
    _, folder = alpha
    with pytest.warns(TruncationWarning, match="at most 8"):
        load(folder)(prompt="a red cat " * 20, height=16, width=16, num_inference_steps=1, max_sequence_length=8,
                     output_type="latent", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=18, use_resolution_binning=False), "height 18 must be a positive multiple of 4"),
    (dict(width=0), "width must be a positive integer"),
    (dict(prompt=[]), "prompt must be"),
    (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
    (dict(max_sequence_length=0), "max_sequence_length must be"),
    (dict(num_inference_steps=0), "num_inference_steps must be"),
])
def test_bad_arguments(alpha_micro, kwargs, message):
    _, folder = alpha_micro
    args = dict(prompt="a cat", height=16, width=16, num_inference_steps=1, progress=False, output_type="latent")
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        load(folder)(**args)
