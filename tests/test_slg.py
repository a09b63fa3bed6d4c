"""Skip-layer guidance (engine/runtime/slg.py) against diffusers' StableDiffusion3Pipeline
with skip_guidance_layers, on the tiny SD3 of tests/tiny_sd3.py (3 blocks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dite.engine import load
from dite.engine.errors import InputError
from dite.engine.runtime.slg import SkipLayerGuidance
from tiny_sd3 import reference_images

PROMPTS, NEGATIVE, SIZE = ["a red circle", "A small BLUE square"], ["blurry", ""], (16, 24)


@pytest.mark.parametrize("steps, slg", [
    (10, dict(skip_guidance_layers=[1])),  # diffusers' defaults: scale 2.8, window (0.1, 2): step 1
    (6, dict(skip_guidance_layers=[0, 2], skip_layer_guidance_scale=1.5, skip_layer_guidance_start=0.2,
             skip_layer_guidance_stop=1.0)),  # steps 2..5
    (6, dict(skip_guidance_layers=[2, 1], skip_layer_guidance_scale=4.0, skip_layer_guidance_start=0.0,
             skip_layer_guidance_stop=0.75)),  # steps 1..4
])
def test_matches_diffusers(sd3, steps, slg):
    reference, folder = sd3
    expected, latents = reference_images(reference, PROMPTS, NEGATIVE, steps, 5.0, SIZE, seed=4,
                                         max_sequence_length=20, **slg)
    pipe = load(folder)
    kw = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, height=SIZE[0], width=SIZE[1], num_inference_steps=steps,
              guidance_scale=5.0, max_sequence_length=20, output_type="np", progress=False)
    out = pipe(latents=latents.clone(), **kw, **slg)
    plain = pipe(latents=latents.clone(), **kw)
    assert np.abs(out.images - expected).max() <= 1e-4
    assert np.abs(out.images - plain.images).max() > 1e-3  # SLG changed the images: the check can fail
    window = SkipLayerGuidance.check(slg["skip_guidance_layers"], slg.get("skip_layer_guidance_scale", 2.8),
                                     slg.get("skip_layer_guidance_start", 0.01),
                                     slg.get("skip_layer_guidance_stop", 0.2), depth=3)
    ran = [s["step"] for s in out.stats["steps"] if s.get("slg")]
    assert ran == [i for i in range(steps) if window.active(i, steps)] and ran
    params = out.parameters[0]
    assert params["skip_guidance_layers"] == slg["skip_guidance_layers"]
    assert params["skip_layer_guidance_scale"] == slg.get("skip_layer_guidance_scale", 2.8)
    assert "skip_guidance_layers" not in plain.parameters[0]


def test_skipped_blocks_are_identities(sd3):
    """The extra pass's plan skips exactly the listed blocks: with every block but one
    skipped, the output is prepare -> that block -> finalize."""
    from dite.models.denoiser import Conditioning

    _, folder = sd3
    model = load(folder).transformer
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    cond = Conditioning(context=torch.randn(1, 5, model.config.context_dim),
                        pooled=torch.randn(1, model.config.pooled_dim), cfg_row_order="none")
    skipped = model(x, t, cond, SkipLayerGuidance((0, 2)).plan(3))
    hidden = model.prepare(x, t, cond)
    by_hand = model.finalize(model.blocks[1](hidden, SkipLayerGuidance((0, 2)).plan(3).block(1)))
    assert torch.equal(skipped, by_hand)
    assert not torch.allclose(skipped, model(x, t, cond))


@pytest.mark.parametrize("kwargs, message", [
    (dict(skip_guidance_layers=[3]), r"3 is not a block of this model \(blocks 0 to 2\)"),
    (dict(skip_guidance_layers=[-1]), "-1 is not a block index"),
    (dict(skip_guidance_layers=[]), "non-empty list"),
    (dict(skip_guidance_layers="7"), "non-empty list"),
    (dict(skip_guidance_layers=[1, 1]), "lists a block twice"),
    (dict(skip_guidance_layers=[0, 1, 2]), "skips all 3 blocks"),
    (dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.5, skip_layer_guidance_stop=0.2),
     "0 <= start < stop <= 1"),
    (dict(skip_guidance_layers=[1], skip_layer_guidance_scale=float("nan")), "must be a finite number"),
    (dict(skip_guidance_layers=[1], guidance_scale=1.0), "needs|guided"),
])
def test_refused_before_work(sd3, kwargs, message):
    _, folder = sd3
    pipe = load(folder)
    encode = pipe.encode_prompts
    pipe.encode_prompts = lambda *a, **k: pytest.fail("encoded before refusing")
    args = dict(prompt="a cat", height=16, width=16, num_inference_steps=4, progress=False)
    with pytest.raises(InputError, match=message):
        pipe(**{**args, **kwargs})
    pipe.encode_prompts = encode


def test_with_acceleration(sd3):
    """The extra pass runs its own plain plan: under DiTCache + PromptGate it still runs on the
    guided steps of its window (none after PromptGate drops the unconditional rows)."""
    _, folder = sd3
    pipe = load(folder)
    kw = dict(prompt="a dog", height=16, width=16, num_inference_steps=10, seed=1, accel="ditcache+promptgate",
              output_type="latent", progress=False)
    out = pipe(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0, **kw)
    plain = pipe(**kw)
    steps = out.stats["steps"]
    assert [s["blocks"] for s in steps] == [s["blocks"] for s in plain.stats["steps"]]
    assert [s["step"] for s in steps if s.get("slg")] == [s["step"] for s in steps if s["cfg"] and s["step"] > 0]
    assert any(not s["cfg"] for s in steps) and any(s.get("slg") for s in steps)
    assert not torch.allclose(out.latents, plain.latents)


def test_cli(sd3, tmp_path, capsys):
    from PIL import Image

    from dite.engine.cli import main

    _, folder = sd3
    out = tmp_path / "slg.png"
    base = ["generate", "--model", str(folder), "a red circle", "--size", "16x16", "--steps", "6", "--no-t5",
            "--quiet", "-o", str(out)]
    assert main(base + ["--skip-layers", "0,2", "--slg-scale", "2", "--slg-stop", "0.5"]) == 0
    params = json.loads(Image.open(out).text["dite"])
    assert params["skip_guidance_layers"] == [0, 2] and params["skip_layer_guidance_scale"] == 2.0
    assert params["skip_layer_guidance_start"] == 0.01 and params["skip_layer_guidance_stop"] == 0.5
    capsys.readouterr()
    for extra, message in [(["--slg-scale", "2"], "apply with --skip-layers"),
                           (["--skip-layers", "1", "--guidance", "1"], "needs classifier-free guidance"),
                           (["--skip-layers", "1,x"], "not a comma-separated list"),
                           (["--skip-layers", "1", "--slg-start", "0.3", "--slg-stop", "0.2"], "start < stop"),
                           (["--skip-layers", "5"], "5 is not a block of this model")]:
        assert main(base + ["--overwrite"] + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)


def test_under_the_compiled_executor(sd3):
    """The main pass through a graph executor, the extra pass eager: same images as eager."""
    from dite.engine.runtime.executors import make_executor

    _, folder = sd3
    pipe = load(folder)
    kw = dict(prompt="a dog", height=16, width=16, num_inference_steps=4, seed=1, skip_guidance_layers=[0],
              skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0, output_type="latent", progress=False)
    eager = pipe(**kw).latents
    pipe.executor = make_executor("compiled", backend="aot_eager")
    out = pipe(**kw)
    assert torch.allclose(out.latents, eager, atol=1e-5)
    assert out.stats["executor"]["graphs"] > 0  # the main pass did run as graphs
    assert [s["step"] for s in out.stats["steps"] if s.get("slg")] == [1, 2, 3]


def test_with_an_init_image(sd3):
    """Image-to-image: the window is over the steps that run (diffusers' SD3 img2img pipeline
    has no SLG to compare with): strength 0.5 of 10 steps runs 5, window (0, 0.6) -> 1, 2."""
    _, folder = sd3
    pipe = load(folder)
    picture = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pipe(prompt="a dog", image=picture, strength=0.5, num_inference_steps=10, skip_guidance_layers=[1],
               skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.6, output_type="latent", progress=False)
    assert len(out.stats["steps"]) == 5
    assert [s["step"] for s in out.stats["steps"] if s.get("slg")] == [1, 2]
