"""The whole SD3 text-to-image pipeline against diffusers' StableDiffusion3Pipeline.

The tiny pipeline (fixture `sd3`) is built in tests/tiny_sd3.py and shared through conftest.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dite.engine import load
from dite.engine.errors import InputError
from tiny_sd3 import reference_images


@pytest.mark.parametrize("guidance, size", [(5.0, (16, 24)), (1.0, (16, 16))])
def test_pipeline_matches_diffusers(sd3, guidance, size):
    reference, folder = sd3
    prompts = ["a red circle at the top left", "A small BLUE square, on the right!"]
    negative = ["blurry", ""] if guidance > 1 else None
    expected, latents = reference_images(reference, prompts, negative, 4, guidance, size, seed=3,
                                         max_sequence_length=20)
    pipe = load(folder)
    out = pipe(prompt=prompts, negative_prompt=negative, height=size[0], width=size[1], num_inference_steps=4,
               guidance_scale=guidance, latents=latents.clone(), max_sequence_length=20, output_type="np",
               progress=False)
    assert out.images.shape == expected.shape == (2, size[0], size[1], 3)
    assert np.abs(out.images - expected).max() <= 1e-4


def test_prompt_embeddings_match(sd3):
    reference, folder = sd3
    prompts = ["", "a green triangle", "x " * 300]
    with torch.no_grad():
        ctx, _, pooled, _ = reference.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                    max_sequence_length=30)
    with pytest.warns(UserWarning, match="77"):
        ours_ctx, ours_pooled = load(folder).text.encode(prompts, 30)
    assert ours_ctx.shape == ctx.shape == (3, 77 + 30, 24)
    assert (ours_ctx - ctx).abs().max().item() <= 1e-5 and (ours_pooled - pooled).abs().max().item() <= 1e-5


def test_without_t5_its_tokens_are_zeros(sd3):
    reference, folder = sd3
    pipe = load(folder, text_encoder_3=None)
    assert pipe.text.t5 is None
    ctx, _ = pipe.text.encode(["a cat"], 16)
    assert ctx.shape == (1, 77 + 16, 24) and torch.count_nonzero(ctx[:, 77:]) == 0
    out = pipe(prompt="a cat", height=16, width=16, num_inference_steps=2, output_type="np", progress=False)
    assert np.isfinite(out.images).all()


def test_images_per_prompt_and_seeds(sd3):
    _, folder = sd3
    out = load(folder)(prompt=["a", "b"], num_images_per_prompt=2, height=16, width=16, num_inference_steps=2,
                       seed=7, output_type="latent", progress=False)
    assert out.latents.shape[0] == 4
    assert [(p["prompt"], p["seed"]) for p in out.parameters] == [("a", 7), ("a", 8), ("b", 9), ("b", 10)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=18), "height 18 must be a positive multiple of 4"),
    (dict(prompt=[]), "prompt must be"),
    (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
])
def test_bad_arguments(sd3, kwargs, message):
    _, folder = sd3
    args = dict(prompt="a cat", height=16, width=16, num_inference_steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        load(folder)(**args)


def test_cli_text_to_image(sd3, tmp_path, capsys):
    from PIL import Image

    from dite.engine.cli import main

    _, folder = sd3
    out = tmp_path / "sd3.png"
    assert main(["generate", "--model", str(folder), "a red circle", "a blue square", "--negative-prompt", "blur",
                 "--size", "24x16", "--steps", "2", "--guidance", "5", "--seed", "3", "--no-t5", "-o", str(out),
                 "--quiet"]) == 0
    paths = [tmp_path / "sd3-0-3.png", tmp_path / "sd3-1-4.png"]  # {stem}-{index}-{seed}
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    params = json.loads(Image.open(paths[1]).text["dite"])
    assert params["prompt"] == "a blue square" and params["negative_prompt"] == "blur" and params["seed"] == 4
    assert params["t5"] is False and params["size"] == "24x16" and params["scheduler"] == "flow_euler"
    assert Image.open(paths[0]).size == (24, 16)
    assert main(["generate", "--model", str(folder), "--class-label", "3"]) == 2
    assert "text-to-image" in capsys.readouterr().err
