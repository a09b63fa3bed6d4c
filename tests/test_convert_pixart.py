"""PixArt conversion: original `.pth` (tests/tiny_pixart.py's own renames) <-> diffusers
folders, bitwise both ways, with the learned null caption kept beside the diffusers weights
so the way back is complete; diffusers loads what dite writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dite.engine import convert
from dite.engine.checkpoints.convert import ConversionNote
from dite.models import pixart
from tiny_pixart import DEPTH, HEADS, pixart_to_original, tiny_pixart_pipeline


@pytest.fixture(scope="module", params=["alpha", "sigma"])
def pixart_pipe(request, tmp_path_factory):
    return tiny_pixart_pipeline(tmp_path_factory.mktemp(request.param), pixart_version=request.param)[1], request.param


def transformer_state(folder):
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_same(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


def test_pth_to_folder_and_back(pixart_pipe, tmp_path):
    from diffusers import PixArtTransformer2DModel

    folder, variant = pixart_pipe
    cfg = pixart.PixArtConfig.from_diffusers(json.loads((folder / "transformer" / "config.json").read_text()), variant)
    null = torch.randn(pixart.CAPTION_LENGTH[variant], cfg.caption_channels)
    original = pixart_to_original(transformer_state(folder), DEPTH, null_caption=null)
    pth = tmp_path / "PixArt-tiny.pth"
    torch.save({"state_dict": original}, pth)
    out = tmp_path / "pipe"
    with pytest.warns(ConversionNote):  # no T5 / VAE beside the .pth: none in the folder
        convert(pth, out, to="diffusers", model_config={"num_heads": HEADS, "sample_size": cfg.sample_size})
    assert_same(transformer_state(out), transformer_state(folder))
    theirs = PixArtTransformer2DModel.from_pretrained(out / "transformer")
    assert_same(dict(theirs.state_dict()), transformer_state(folder))
    written = json.loads((out / "transformer" / "config.json").read_text())
    assert written["interpolation_scale"] == cfg.interpolation_scale and written["use_additional_conditions"] is False
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ("PixArtAlphaPipeline" if variant == "alpha" else "PixArtSigmaPipeline")

    back = tmp_path / "back.pth"
    convert(out, back, to="original")
    state = torch.load(back, weights_only=True)["state_dict"]
    assert torch.equal(state.pop(pixart.NULL_CAPTION_KEY), null)  # kept beside the diffusers weights
    pos_embed = state.pop("pos_embed")
    assert pos_embed.shape == (1, (cfg.sample_size // cfg.patch_size) ** 2, cfg.hidden_size)
    assert_same(state, {k: v for k, v in original.items() if k != pixart.NULL_CAPTION_KEY})


def test_diffusers_born_folder_says_what_is_lost(pixart_pipe, tmp_path):
    folder, _ = pixart_pipe
    with pytest.warns(ConversionNote, match="no null caption to restore"):
        convert(folder, tmp_path / "PixArt.safetensors", to="original")
    state = load_file(tmp_path / "PixArt.safetensors")
    assert pixart.NULL_CAPTION_KEY not in state and "pos_embed" in state
    again = tmp_path / "again"
    convert(folder, again, to="diffusers")  # the whole pipeline: transformer, VAE, T5, tokenizer
    for name in ("transformer", "vae", "text_encoder"):
        assert sorted((again / name).glob("*.safetensors"))
    assert (again / "tokenizer").is_dir()


def test_pth_with_its_folders_becomes_a_pipeline_diffusers_loads(pixart_pipe, tmp_path):
    """T5, tokenizer and VAE folders beside the .pth (where load() finds them) go into the
    folder; `components` converts a subset."""
    import shutil

    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    folder, variant = pixart_pipe
    cfg = pixart.PixArtConfig.from_diffusers(json.loads((folder / "transformer" / "config.json").read_text()), variant)
    release = tmp_path / "release"
    for name in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(folder / name, release / name)
    original = pixart_to_original(transformer_state(folder), DEPTH,
                                  null_caption=torch.randn(pixart.CAPTION_LENGTH[variant], cfg.caption_channels))
    torch.save({"state_dict": original}, release / "PixArt-tiny.pth")
    hints = {"num_heads": HEADS, "sample_size": cfg.sample_size}
    out = tmp_path / "pipe"
    convert(release / "PixArt-tiny.pth", out, to="diffusers", model_config=hints)
    cls = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    theirs = cls.from_pretrained(out)
    reference = cls.from_pretrained(folder)
    for name in ("transformer", "vae", "text_encoder"):
        ours, expected = getattr(theirs, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[k], expected[k]) for k in expected), name
    subset = tmp_path / "subset"
    convert(release / "PixArt-tiny.pth", subset, to="diffusers", model_config=hints, components="transformer,vae")
    index = json.loads((subset / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and not (subset / "text_encoder").exists()
