"""Tiled VAE decoding matches diffusers' `enable_tiling()` decode (tolerance 1e-4, the VAE
tests' contract) on a tiny VAE whose tiles are small enough to need several, and decodes
whole what fits one tile."""

from __future__ import annotations

import pytest
import torch

from dite.engine.errors import InputError
from dite.engine.loading.vae import load_vae
from dite.engine.memory.vae_tiling import enable_vae_tiling, tiled_decode
from tiny import tiny_diffusers_vae

TOL = 1e-4


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    reference = tiny_diffusers_vae(sample_size=16)  # 16-pixel tiles, latent tiles of 8 (factor 2)
    folder = tmp_path_factory.mktemp("vae-tiling")
    reference.save_pretrained(folder, safe_serialization=True)
    return reference, load_vae(folder)


@pytest.mark.parametrize("h, w", [(20, 13), (8, 30), (17, 17)])
@torch.no_grad()
def test_tiled_decode_matches_diffusers(vaes, h, w):
    reference, ours = vaes
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * w))
    reference.enable_tiling()
    expected = reference.decode(z).sample
    got = tiled_decode(ours, z, tile=16)
    assert got.shape == expected.shape == (2, 3, 2 * h, 2 * w)
    assert (got - expected).abs().max() < TOL
    whole = ours.decode(z)
    assert (whole - got).abs().max() > 1e-3  # the tiles are decoded apart: seams are blended, not identical


@torch.no_grad()
def test_enable_tiles_only_what_exceeds_a_tile(vaes, tmp_path):
    _, ours = vaes
    small = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    large = torch.randn(1, 4, 12, 9, generator=torch.Generator().manual_seed(1))
    before_small, before_large = ours.decode(small), ours.decode(large)
    enable_vae_tiling(ours, tile=16)
    try:
        assert torch.equal(ours.decode(small), before_small)
        assert torch.equal(ours.decode(large), tiled_decode(ours, large, tile=16))
        assert not torch.equal(ours.decode(large), before_large)
    finally:
        del ours.decode
    with pytest.raises(InputError, match="multiple of the VAE factor"):
        enable_vae_tiling(ours, tile=15)


def test_low_memory_releases_encoders_and_keeps_images(tmp_path, capsys):
    """--low-memory: the same image, the encoders gone after the run's encoding; a new prompt
    after release is one clear error; --vae-tiling is recorded (it changes pixels)."""
    import numpy as np
    from PIL import Image

    from dite.engine.cli import main
    from dite.engine.loading.loader import load
    from dite.engine.outputs.writers import read_parameters

    argv = ["generate", "--quiet", "a red cube", "--steps", "2", "--dtype", "fp32"]
    assert main(argv + ["-o", str(tmp_path / "plain.png")]) == 0
    assert main(argv + ["--low-memory", "--batch-count", "2", "--seed", "0", "-o", str(tmp_path / "low.png")]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain.png"))
    assert np.array_equal(plain, np.asarray(Image.open(tmp_path / "low-0-0.png")))
    assert main(argv + ["--vae-tiling", "-o", str(tmp_path / "tiled.png")]) == 0
    assert read_parameters(tmp_path / "tiled.png")["vae_tiling"] is True  # 64 px: one tile, decoded whole
    assert np.array_equal(plain, np.asarray(Image.open(tmp_path / "tiled.png")))

    pipe = load("demo-sd3", release_encoders=True)
    first = pipe("a red cube", num_inference_steps=1, output_type="np", progress=False).images
    assert pipe.text.clip_l is None and pipe.text.clip_g is None and pipe.text.t5 is None
    again = pipe("a red cube", num_inference_steps=1, output_type="np", progress=False).images
    assert np.array_equal(first, again)
    with pytest.raises(InputError, match="released after encoding"):
        pipe("a blue ball", num_inference_steps=1, progress=False)
