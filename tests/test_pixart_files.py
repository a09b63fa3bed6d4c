"""PixArt beyond the diffusers folder: original `.pth` releases (written here from the tiny
folder's weights with the test's own rename), aspect-ratio binning against diffusers,
acceleration on a PixArt pipeline, and the command line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dite.engine import load
from dite.engine.cli import main
from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.pipelines.pixart_bins import bins_for, nearest_bin, resize_and_crop
from tiny_pixart import DEPTH, HEADS, pixart_to_original, reference_images, tiny_pixart_pipeline

PROMPTS = ["a red circle", "a small blue square on a green wooden table"]


@pytest.fixture(scope="module")
def alpha(tmp_path_factory):
    return tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart-files"))


def write_pth(folder, out, *, rows=120, beside=True, seed=5):
    """An original release: {"state_dict": ...} with pos_embed and the null caption, and
    (beside) the text_encoder/, tokenizer/ and vae/ folders next to it."""
    state = load_file(next((folder / "transformer").glob("*.safetensors")))
    null = torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed))
    original = pixart_to_original(state, DEPTH, null_caption=null, pos_embed=torch.zeros(1, 16, 24))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "PixArt-XL-2-tiny.pth"
    torch.save({"state_dict": original}, path)
    if beside:
        for name in ("text_encoder", "tokenizer", "vae"):
            shutil.copytree(folder / name, out / name, dirs_exist_ok=True)
    return path, null


def test_original_pth_gives_the_folder_images(alpha, tmp_path):
    reference, folder = alpha
    path, null = write_pth(folder, tmp_path / "release")
    pipe = load(path, model_config={"num_heads": HEADS})
    info = pipe.describe()
    assert info["variant"] == "alpha" and info["null_caption"] and pipe.scheduler.name == "dpm"
    assert pipe.vae.config.scaling_factor == 0.18215
    kw = dict(height=16, width=24, num_inference_steps=3, output_type="np", progress=False,
              use_resolution_binning=False, max_sequence_length=120)
    expected, latents = reference_images(reference, PROMPTS, "blurry", 3, 4.5, (16, 24), seed=1, factor=2,
                                         height=16, width=24, use_resolution_binning=False)
    out = pipe(prompt=PROMPTS, negative_prompt="blurry", latents=latents.clone(), **kw)
    assert np.abs(out.images - expected).max() <= 1e-4
    # Without a negative prompt the null caption is the unconditional caption, under each
    # prompt's own mask (the original inference); without it, T5("") as in diffusers.
    cond = pipe.encode_prompts(["a cat"], [""], 120)
    assert torch.equal(cond.context[0], null) and torch.equal(cond.context_mask[0], cond.context_mask[1])
    with_null = pipe(prompt=PROMPTS, latents=latents.clone(), **kw).images
    pipe.null_caption = None
    plain = pipe(prompt=PROMPTS, latents=latents.clone(), **kw).images
    expected_plain, _ = reference_images(reference, PROMPTS, "", 3, 4.5, (16, 24), seed=1, factor=2,
                                         height=16, width=24, use_resolution_binning=False)
    assert np.abs(plain - expected_plain).max() <= 1e-4 and np.abs(with_null - plain).max() > 1e-3


def test_sigma_file_forced_as_alpha_is_refused(alpha, tmp_path):
    _, folder = alpha
    path, _ = write_pth(folder, tmp_path / "sigma", rows=300)
    with pytest.raises(ConfigError, match="PixArt-Σ .*300 rows"):
        load(path, model_config={"num_heads": HEADS, "variant": "alpha"})
    pipe = load(path, model_config={"num_heads": HEADS})
    assert pipe.pixart_version == "sigma" and pipe.vae.config.scaling_factor == 0.13025


def test_pth_without_its_parts_says_what_is_missing(alpha, tmp_path):
    _, folder = alpha
    path, _ = write_pth(folder, tmp_path / "bare", beside=False)
    with pytest.raises(CheckpointError, match="no text_encoder and no tokenizer and no vae found beside it"):
        load(path, model_config={"num_heads": HEADS})
    pipe = load(path, model_config={"num_heads": HEADS}, vae=folder / "vae", text_encoder=folder / "text_encoder",
                tokenizers=folder)
    assert pipe.describe()["null_caption"]


def test_bins_are_pixarts():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    for ours, theirs in ((bins_for(32, "alpha"), ASPECT_RATIO_256_BIN), (bins_for(64, "sigma"), ASPECT_RATIO_512_BIN),
                         (bins_for(128, "alpha"), ASPECT_RATIO_1024_BIN), (bins_for(256, "sigma"), ASPECT_RATIO_2048_BIN)):
        assert {k: tuple(map(int, v)) for k, v in theirs.items()} == ours
    assert bins_for(256, "alpha") is None and bins_for(8, "alpha") is None
    assert nearest_bin(1000, 1500, bins_for(128, "alpha")) == (832, 1216)


def test_resize_and_crop_matches_diffusers():
    from diffusers.image_processor import PixArtImageProcessor

    images = torch.randn(2, 3, 208, 304, generator=torch.Generator().manual_seed(0))
    for h, w in ((200, 300), (208, 290), (256, 256)):
        assert torch.equal(resize_and_crop(images, h, w), PixArtImageProcessor.resize_and_crop_tensor(images, w, h))


def test_resolution_binning_matches_diffusers(tmp_path):
    reference, folder = tiny_pixart_pipeline(tmp_path, sample_size=32, vae_levels=4)
    expected, latents = reference_images(reference, PROMPTS[:1], "", 2, 4.5, (208, 304), seed=2, factor=8,
                                         height=200, width=300, max_sequence_length=30)
    out = load(folder)(prompt=PROMPTS[:1], height=200, width=300, num_inference_steps=2, latents=latents.clone(),
                       max_sequence_length=30, output_type="np", progress=False)
    assert out.images.shape == expected.shape == (1, 200, 300, 3)
    assert np.abs(out.images - expected).max() <= 1e-4
    assert out.parameters[0]["size"] == "300x200" and out.parameters[0]["generated_size"] == "304x208"


def test_accel_runs_and_saves_block_evaluations(tmp_path):
    _, folder = tiny_pixart_pipeline(tmp_path, depth=6)
    pipe = load(folder)
    kw = dict(prompt="a red circle", height=16, width=16, num_inference_steps=10, output_type="np", progress=False)
    plain = pipe(**kw)
    fast = pipe(accel="ditcache+promptgate+todo", **kw)
    s = fast.stats
    assert s["accel"].startswith("ditcache(blocks=1:5") and "promptgate" in s["accel"] and "todo" in s["accel"]
    assert s["block_evaluations"] < s["plain_block_evaluations"] == plain.stats["block_evaluations"] == 10 * 2 * 6
    assert s["flops_ratio"] < 1 and np.isfinite(fast.images).all() and fast.images.shape == plain.images.shape


def test_cli_generates_with_a_pixart_folder(alpha, tmp_path, capsys):
    from PIL import Image

    _, folder = alpha
    out = tmp_path / "pixart.png"
    assert main(["generate", "--model", str(folder), "a red circle", "--size", "24x16", "--steps", "2",
                 "--seed", "3", "--scheduler", "ddim", "-o", str(out), "--quiet"]) == 0
    params = json.loads(Image.open(out).text["dite"])
    assert params["family"] == "pixart" and params["scheduler"] == "ddim" and params["variant"] == "alpha"
    assert Image.open(out).size == (24, 16)
    capsys.readouterr()
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "pixart" and info["variant"] == "alpha"


def test_pixart_config_recorded_as_variant_still_reads():
    """Files converted before `variant` became `pixart_version` in PixArtConfig keep loading."""
    from dite.engine.checkpoints.recorded import config_from_dict
    from dite.models.pixart import PixArtConfig

    old = PixArtConfig(pixart_version="sigma").to_dict()
    old["variant"] = old.pop("pixart_version")
    assert config_from_dict("pixart", old, "config of transformer") == PixArtConfig(pixart_version="sigma")
