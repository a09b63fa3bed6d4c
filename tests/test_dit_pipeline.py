"""The whole DiT class-to-image pipeline against diffusers' DiTPipeline, and its API."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from dite.engine import load
from dite.engine.errors import InputError
from tiny import tiny_diffusers_vae, tiny_dit_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    ddim = tmp_path_factory.mktemp("dit-ddim")
    ddpm = tmp_path_factory.mktemp("dit-ddpm")
    return {"ddim": (tiny_dit_pipeline(ddim, "ddim"), ddim), "ddpm": (tiny_dit_pipeline(ddpm, "ddpm"), ddpm)}


def noise(n, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_pipeline_matches_diffusers(folders, guidance):
    reference, folder = folders["ddim"]
    # DiTPipeline has no latents= argument: it draws (B, C, h, w) from one CPU generator.
    latents = noise(2, seed=0)
    expected = reference(class_labels=[3, 999], guidance_scale=guidance, num_inference_steps=6,
                         output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe = load(folder)
    out = pipe(class_labels=[3, 999], guidance_scale=guidance, num_inference_steps=6,
               output_type="np", latents=latents.clone(), progress=False)
    assert out.images.shape == expected.shape == (2, 16, 16, 3)
    assert out.images.dtype == np.float32
    assert np.abs(out.images - expected).max() <= 1e-4
    assert out.latents.shape == (2, 4, 8, 8)


def test_learned_range_ddpm_matches_a_diffusers_loop(folders):
    """The original DiT sampler: DDPM with the learned-range variance, fed the guided eps and
    the conditional branch's variance channels (DiTPipeline itself drops them)."""
    reference, folder = folders["ddpm"]
    steps, scale, labels = 5, 4.0, torch.tensor([3, 1000])
    latents = noise(1)
    sched = reference.scheduler
    sched.set_timesteps(steps)
    x, gen = latents.clone(), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in sched.timesteps:
            out = reference.transformer(torch.cat([x, x]), timestep=t.expand(2), class_labels=labels).sample
            cond, uncond = out.chunk(2)
            eps = uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4])
            x = sched.step(torch.cat([eps, cond[:, 4:]], 1), t, x, generator=gen).prev_sample
        expected = reference.vae.decode(x / reference.vae.config.scaling_factor).sample
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    pipe = load(folder)
    assert pipe.scheduler.name == "ddpm"
    out = pipe(class_labels=[3], guidance_scale=scale, num_inference_steps=steps, seed=7,
               latents=latents.clone(), output_type="np", progress=False)
    assert np.abs(out.images - expected).max() <= 1e-4


def test_seeded_noise_does_not_depend_on_batch(folders):
    _, folder = folders["ddim"]
    pipe = load(folder)
    both = pipe(class_labels=[1, 2], seed=10, num_inference_steps=3, output_type="latent", progress=False)
    second = pipe(class_labels=[2], seed=11, num_inference_steps=3, output_type="latent", progress=False)
    other = pipe(class_labels=[2], seed=12, num_inference_steps=3, output_type="latent", progress=False)
    assert both.images is None
    # Equal up to the float rounding of a different batch size (GEMM blocking), far from
    # what another seed gives.
    scale = second.latents.abs().max().item()
    assert (both.latents[1:] - second.latents).abs().max().item() <= 1e-5 * scale
    assert (other.latents - second.latents).abs().max().item() > 0.1 * scale
    assert [p["seed"] for p in both.parameters] == [10, 11]


def test_two_threads_generate_at_once(folders):
    _, folder = folders["ddpm"]  # stochastic steps: per-call generators must not be shared
    pipe = load(folder)
    kwargs = dict(num_inference_steps=4, output_type="latent", progress=False)
    alone = [pipe(class_labels=[c], seed=c, **kwargs).latents for c in (5, 6)]
    results = {}

    def run(c):
        results[c] = pipe(class_labels=[c], seed=c, **kwargs).latents

    threads = [threading.Thread(target=run, args=(c,)) for c in (5, 6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert torch.equal(results[5], alone[0]) and torch.equal(results[6], alone[1])


def test_output_types_and_label_names(folders):
    _, folder = folders["ddim"]
    pipe = load(folder)
    out = pipe(class_labels=["goldfish", 0], num_inference_steps=2, output_type="pil", progress=False)
    assert len(out.images) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in out.images)
    assert [p["class_label"] for p in out.parameters] == [1, 0]
    pt = pipe(class_labels=[1], num_inference_steps=2, output_type="pt", progress=False)
    assert pt.images.shape == (1, 3, 16, 16) and 0 <= pt.images.min() and pt.images.max() <= 1
    assert set(out.timings) == {"encode", "denoise", "decode"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_labels=[1000]), r"class label 1000 is out of range.*0\.\.999"),
        (dict(class_labels=[-1]), "out of range"),
        (dict(class_labels=["unicorn"]), "unknown class name 'unicorn'"),
        (dict(class_labels=[]), "empty"),
        (dict(class_labels=[1], height=18), r"height 18 must be a positive multiple of 4"),
        (dict(class_labels=[1], output_type="jpeg"), "output_type"),
        (dict(class_labels=[1], num_inference_steps=0), "num_inference_steps"),
        (dict(class_labels=[1], latents=torch.zeros(1, 4, 4, 4)), r"latents have shape \(1, 4, 4, 4\), expected \(1, 4, 8, 8\)"),
        (dict(class_labels=[1], seed=-3), "seed"),
    ],
)
def test_bad_call_arguments(folders, kwargs, message):
    _, folder = folders["ddim"]
    pipe = load(folder)
    with pytest.raises(InputError, match=message):
        pipe(progress=False, **kwargs)


def test_non_default_size_runs(folders):
    _, folder = folders["ddim"]
    out = load(folder)(class_labels=[1], height=24, width=16, num_inference_steps=2, output_type="np", progress=False)
    assert out.images.shape == (1, 24, 16, 3)


def test_initial_noise_is_drawn_per_image_on_cpu():
    from dite.engine.pipelines.noise import image_generators, initial_latents

    x = initial_latents((4, 8, 8), image_generators(3, 2), None, device="cpu", dtype=torch.float32)
    assert torch.equal(x[1], torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(folders, dtype):
    _, folder = folders["ddim"]
    kwargs = dict(class_labels=[3], num_inference_steps=3, output_type="np", progress=False, seed=1)
    full = load(folder)(**kwargs).images
    pipe = load(folder, dtype=dtype)
    assert pipe.dtype == dtype and next(pipe.vae.parameters()).dtype == dtype
    half = pipe(**kwargs).images
    assert half.dtype == np.float32 and np.isfinite(half).all()
    assert np.abs(half - full).max() < 0.1


def test_describe(folders):
    _, folder = folders["ddim"]
    info = load(folder).describe()
    assert info["family"] == "dit" and info["scheduler"]["_class_name"] == "DDIMScheduler"
    assert info["transformer"]["depth"] == 3 and info["vae"]["latent_channels"] == 4


def test_untied_embedders_pipeline_matches_diffusers(tmp_path):
    """A DiTPipeline whose transformer diffusers initialised itself (per-block embedders
    untied) loads and gives diffusers' image; the embedders are kept one per block."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(5)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    reference = DiTPipeline(transformer=transformer, vae=tiny_diffusers_vae(), scheduler=scheduler)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp_path)
    expected = reference(class_labels=[3, 999], guidance_scale=4.0, num_inference_steps=5, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images
    pipe = load(tmp_path)
    assert pipe.transformer.config.per_block_embedders and len(pipe.transformer.block_embedders) == 3
    out = pipe(class_labels=[3, 999], guidance_scale=4.0, num_inference_steps=5, output_type="np",
               latents=noise(2, seed=0), progress=False)
    assert np.abs(out.images - expected).max() <= 1e-5
