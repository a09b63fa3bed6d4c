"""The second demo generation (tools/train_demo_v2.py, 128 px, 256 image tokens):

- demo-pixart ships in the wheel, demo-sd3-128 in the checkout's demos/ (too large for the
  wheel's demo budget); diffusers' own pipeline classes load each folder and give dite's
  images from the same latents (fp32, few steps);
- a demo kept outside the wheel is found in the checkout, then in the user cache that
  tools/fetch_demo.py fills, and a missing one is one line saying how to get it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dite.engine import load
from dite.engine.errors import CheckpointError
from dite.engine.loading import hub

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle left of a blue square", "two green triangles"]


def _folder(name: str) -> Path:
    folder = hub.demo_folder(name)
    # The demos are part of the repository: a missing folder is a packaging failure, not a skip.
    assert (folder / "model_index.json").is_file(), f"{name} missing: tools/train_all_demo_v2.sh exports it"
    return folder


def _compare(ours, reference, latents: torch.Tensor, **call):
    mine = ours(prompt=PROMPTS, latents=latents.clone(), output_type="np", progress=False, **call).images
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt=PROMPTS, latents=latents.clone(), output_type="np", **call).images
    assert mine.shape == theirs.shape == (2, 128, 128, 3)
    np.testing.assert_allclose(mine, theirs, atol=2e-4)


def test_demo_pixart_matches_diffusers():
    folder = _folder("demo-pixart")
    assert folder.parent.name == "demo"  # package data, in the wheel
    index = json.loads((folder / "model_index.json").read_text())
    pipe = load("demo-pixart")
    assert pipe.defaults == index["_dite"] and pipe.defaults["use_resolution_binning"] is False
    config = pipe.transformer.config
    assert (config.sample_size // config.patch_size) ** 2 == 256  # image tokens
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = diffusers.PixArtAlphaPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    _compare(pipe, reference, latents, num_inference_steps=3, guidance_scale=4.5, use_resolution_binning=False,
             max_sequence_length=index["_dite"]["max_sequence_length"])


def test_demo_sd3_128_matches_diffusers():
    folder = _folder("demo-sd3-128")
    assert folder == ROOT / "demos" / "sd3_128"
    index = json.loads((folder / "model_index.json").read_text())
    pipe = load("demo-sd3-128")
    config = pipe.transformer.config
    assert config.patch_size == 1 and config.sample_size ** 2 == 256
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
    _compare(pipe, reference, latents, num_inference_steps=3, guidance_scale=5.0,
             max_sequence_length=index["_dite"]["max_sequence_length"])


def test_a_demo_outside_the_wheel_is_fetched_into_the_cache(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import fetch_demo

    monkeypatch.setenv("DITE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "checkout_demos", lambda: tmp_path / "wheel-install-has-no-demos")
    with pytest.raises(CheckpointError, match=r"does not ship in the wheel; .*tools/fetch_demo.py demo-sd3-128"):
        hub.demo_folder("demo-sd3-128")
    # The wrong family is refused before anything is copied; the right folder lands in the cache.
    assert fetch_demo.main(["demo-sd3-128", "--from", str(hub.demo_folder("demo-pixart"))]) == 2
    assert not (tmp_path / "cache" / "demos").exists()
    assert fetch_demo.main(["demo-sd3-128", "--from", str(ROOT / "demos" / "sd3_128")]) == 0
    found = hub.demo_folder("demo-sd3-128")
    assert found == tmp_path / "cache" / "demos" / "sd3_128"
    assert sorted(p.name for p in found.iterdir()) == sorted(p.name for p in (ROOT / "demos" / "sd3_128").iterdir())
    shutil.rmtree(found)
