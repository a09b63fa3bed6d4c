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
    # A scheduler of its own: diffusers' schedulers keep per-call state (begin/step index)
    # that a pipeline sharing it with another call would start from.
    parts = dict(reference.components, scheduler=type(reference.scheduler).from_config(reference.scheduler.config))
    pipe = pipeline(**parts)
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


@pytest.fixture(scope="module")
def sd3_16(sd3, tmp_path_factory):
    """The tiny SD3 with 16 latent channels (the real SD3's): diffusers' SD3 inpainting
    blends latents only for a 16-channel transformer. Same text encoders as `sd3`."""
    from diffusers import StableDiffusion3Pipeline

    from tiny import tiny_diffusers_sd3_transformer, tiny_diffusers_vae
    from tiny_sd3 import DEPTH

    # From the saved folder, not `sd3`'s objects: a diffusers call on those (earlier tests)
    # may leave them differing from what their files say.
    _, base = sd3
    transformer = tiny_diffusers_sd3_transformer(qk_norm="rms_norm", num_layers=DEPTH, channels=16)
    vae = tiny_diffusers_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                             scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline.from_pretrained(base, transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("sd3-16") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.mark.parametrize("guidance, strength", [(5.0, 0.6), (1.0, 1.0)])
def test_sd3_inpainting_matches_diffusers(sd3_16, guidance, strength):
    """Compared on the final latents: diffusers 0.42's StableDiffusion3InpaintPipeline decodes
    them without the VAE's shift_factor (its text-to-image and img2img pipelines add it);
    dite decodes as its text-to-image does, checked against the reference VAE with the shift."""
    reference, folder = sd3_16
    picture, mask = init_picture(seed=1), half_mask()
    negative = "blurry" if guidance > 1 else None
    kw = dict(prompt="a cat", negative_prompt=negative, image=picture, mask_image=mask, strength=strength,
              num_inference_steps=4, guidance_scale=guidance, max_sequence_length=20)
    expected = sd3_reference(reference, "inpaint", height=SIZE[0], width=SIZE[1], output_type="latent",
                             generator=torch.Generator().manual_seed(5), **kw)
    out = load(folder)(seed=5, output_type="pt", progress=False, **kw)
    assert (out.latents - expected).abs().max() <= 1e-4
    vae = reference.vae.config
    with torch.no_grad():
        decoded = reference.vae.decode(expected / vae.scaling_factor + vae.shift_factor).sample
    assert (out.images - (decoded / 2 + 0.5).clamp(0, 1)).abs().max() <= 1e-4


def clean_latents(pipe, picture, seed):
    """The init image's model-space latents as the pipeline draws them (image 0's generator)."""
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        z = pipe.vae.encode(pixels).sample(torch.Generator().manual_seed(seed))
    return pipe.vae.to_model_space(z)


def test_inpainting_keeps_the_masked_out_region(sd3_16):
    _, folder = sd3_16
    pipe, picture = load(folder), init_picture(seed=2)
    clean = clean_latents(pipe, picture, seed=4)
    out = pipe(prompt="a dog", image=picture, mask_image=half_mask(), strength=0.8, num_inference_steps=3,
               seed=4, output_type="latent", progress=False)
    keep = SIZE[1] // 2 // pipe.vae_scale_factor  # latent columns left of the mask
    assert torch.equal(out.latents[..., :keep], clean[..., :keep])
    assert (out.latents[..., keep:] - clean[..., keep:]).abs().max() > 1e-2  # the white half was repainted
    # An all-black mask keeps everything: the image is the VAE's round trip of the init image.
    black = Image.new("L", (SIZE[1], SIZE[0]), 0)
    out = pipe(prompt="a dog", image=picture, mask_image=black, num_inference_steps=3, seed=4, output_type="pt",
               progress=False)
    with torch.no_grad():
        round_trip = (pipe.decode(clean) / 2 + 0.5).clamp(0, 1)
    assert (out.images - round_trip).abs().max() <= 1e-6


def test_sd3_strength_one_is_text_to_image_from_the_same_noise(sd3):
    _, folder = sd3
    pipe = load(folder)
    noise = torch.randn(1, 4, SIZE[0] // 2, SIZE[1] // 2, generator=torch.Generator().manual_seed(9))
    kw = dict(prompt="a boat", num_inference_steps=3, latents=noise, output_type="latent", progress=False)
    text = pipe(height=SIZE[0], width=SIZE[1], **kw)
    image = pipe(image=init_picture(), strength=1.0, **kw)
    assert torch.equal(text.latents, image.latents)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    from tiny import tiny_dit_pipeline

    folder = tmp_path_factory.mktemp("dit-img2img")
    return tiny_dit_pipeline(folder, "ddim", num_layers=6), folder


def test_dit_img2img_follows_diffusers_sd_img2img_math(dit):
    """diffusers has no DiT img2img: its StableDiffusionImg2ImgPipeline's steps (get_timesteps,
    add_noise at the first kept timestep, the remaining DDIM steps) written out with the
    reference DiT's modules."""
    reference, folder = dit
    picture, steps, strength, scale, seed = init_picture((16, 16)), 6, 0.5, 4.0, 3
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    sched = reference.scheduler
    sched.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    timesteps = sched.timesteps[t_start:]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = reference.vae.encode(pixels).latent_dist.sample(gen) * reference.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        x = sched.add_noise(x0, noise, timesteps[:1])
        labels = torch.tensor([3, 1000])
        for t in timesteps:
            out = reference.transformer(torch.cat([x, x]), timestep=t.expand(2), class_labels=labels).sample
            cond, uncond = out[:, :4].chunk(2)
            x = sched.step(uncond + scale * (cond - uncond), t, x).prev_sample
        expected = reference.vae.decode(x / reference.vae.config.scaling_factor).sample
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    out = load(folder)(class_labels=[3], image=picture, strength=strength, num_inference_steps=steps,
                       guidance_scale=scale, seed=seed, output_type="np", progress=False)
    assert np.abs(out.images - expected).max() <= 1e-4


def test_lower_strength_stays_closer_to_the_init_image(dit):
    """Measured on the latents (the tiny random VAE's round trip is far from any picture)."""
    _, folder = dit
    pipe, picture = load(folder), init_picture((16, 16), seed=5)
    clean = clean_latents(pipe, picture, seed=0)
    distance = [(pipe(class_labels=[1], image=picture, strength=s, num_inference_steps=10, seed=0,
                      output_type="latent", progress=False).latents - clean).abs().mean().item()
                for s in (0.1, 0.5, 1.0)]
    assert distance[0] < distance[1] < distance[2]


def test_plans_cover_the_steps_that_run(dit):
    """ditcache + promptgate over img2img's 5 remaining steps of 10: the same plans (block
    counts per step) as a 5-step text-to-image call."""
    _, folder = dit
    pipe = load(folder)
    kw = dict(class_labels=[3], accel="ditcache+promptgate", seed=0, output_type="latent", progress=False)
    image = pipe(image=init_picture((16, 16)), strength=0.5, num_inference_steps=10, **kw).stats
    text = pipe(num_inference_steps=5, **kw).stats
    assert len(image["steps"]) == 5 and image["accel"] == text["accel"]
    assert [(s["rows"], s["blocks"]) for s in image["steps"]] == [(s["rows"], s["blocks"]) for s in text["steps"]]
    assert any(s["blocks"] < 6 for s in image["steps"]) and any(s["rows"] == 1 for s in image["steps"])


def test_cli_records_the_init_image_strength_and_mask(sd3, tmp_path, capsys):
    import hashlib
    import json

    from dite.engine.cli import main

    _, folder = sd3
    init, mask, out = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "edit.png"
    init_picture().save(init)
    half_mask().save(mask)
    assert main(["generate", "--model", str(folder), "a boat", "--init-image", str(init), "--strength", "0.5",
                 "--mask", str(mask), "--steps", "4", "--seed", "2", "-o", str(out), "--quiet"]) == 0
    params = json.loads(Image.open(out).text["dite"])
    assert params["init_image"] == hashlib.sha256(init.read_bytes()).hexdigest()[:10]
    assert params["mask"] == hashlib.sha256(mask.read_bytes()).hexdigest()[:10]
    assert params["strength"] == 0.5 and params["denoise_steps"] == 2 and params["steps"] == 4
    assert Image.open(out).size == (SIZE[1], SIZE[0])
    # Same call through the library: the same image (seeded noise, same image and mask).
    lib = load(folder)(prompt="a boat", image=init, strength=0.5, mask_image=mask, num_inference_steps=4, seed=2,
                       progress=False)
    assert np.array_equal(np.asarray(lib.images[0]), np.asarray(Image.open(out)))
    capsys.readouterr()


def write(path, image):
    image.save(path)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("strength_zero", "strength must be a number in (0, 1]"),
    ("strength_big", "strength must be a number in (0, 1]"),
    ("strength_alone", "strength only applies to image-to-image"),
    ("mask_alone", "mask_image needs an image"),
    ("missing", "cannot read the init image"),
    ("not_image", "is not a readable image"),
    ("size", "height 32 differs from the init image's 16 pixels"),
    ("mask_size", "the mask is 16x16 pixels but the init image is 24x16"),
    ("mask_mode", "the mask is a 'RGBA' image"),
    ("tensor_range", "values in [0, 1]"),
    ("odd_size", "the init image is 18x16 pixels: width 18 must be a positive multiple of 4"),
])
def test_bad_inputs_are_refused_before_work(sd3, tmp_path, case, message):
    _, folder = sd3
    picture = write(tmp_path / "init.png", init_picture())
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    args = {
        "strength_zero": dict(image=picture, strength=0), "strength_big": dict(image=picture, strength=1.5),
        "strength_alone": dict(strength=0.5), "mask_alone": dict(mask_image=half_mask()),
        "missing": dict(image=str(tmp_path / "nope.png")), "not_image": dict(image=str(bad)),
        "size": dict(image=picture, height=32),
        "mask_size": dict(image=picture, mask_image=Image.new("L", (16, 16))),
        "mask_mode": dict(image=picture, mask_image=Image.new("RGBA", (SIZE[1], SIZE[0]))),
        "tensor_range": dict(image=torch.full((3, *SIZE), 2.0)),
        "odd_size": dict(image=init_picture((16, 18))),
    }[case]
    from dite.engine.errors import InputError

    with pytest.raises(InputError) as info:
        load(folder)(prompt="a cat", num_inference_steps=2, progress=False, **args)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dit_refuses_a_mask(dit, tmp_path, capsys):
    from dite.engine.cli import main
    from dite.engine.errors import InputError

    _, folder = dit
    picture = init_picture((16, 16))
    with pytest.raises(InputError, match="inpainting .* is not supported for dit"):
        load(folder)(class_labels=[1], image=picture, mask_image=Image.new("L", (16, 16)), progress=False)
    init, mask = write(tmp_path / "i.png", picture), write(tmp_path / "m.png", Image.new("L", (16, 16)))
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(folder), "--class-label", "1", "--init-image", init, "--mask", mask,
                 "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not supported for dit" in err and len(err.splitlines()) == 1 and not out.exists()


def test_cli_refuses_before_loading(tmp_path, capsys):
    from dite.engine.cli import main

    missing = tmp_path / "nowhere" / "model"  # never reached: the init image is checked first
    out = tmp_path / "x.png"
    assert main(["generate", "--model", "demo-sd3", "a cat", "--strength", "0.4", "-o", str(out)]) == 2
    assert "strength only applies to image-to-image" in capsys.readouterr().err
    assert main(["generate", "--model", "demo-sd3", "a cat", "--init-image", str(missing), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read the init image" in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    from diffusers import PixArtAlphaPipeline

    from tiny_pixart import tiny_pixart_pipeline

    _, folder = tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart-img2img"))
    reference = PixArtAlphaPipeline.from_pretrained(folder)  # from its files (see sd3_16)
    reference.set_progress_bar_config(disable=True)
    return reference, folder


def test_pixart_img2img_follows_diffusers_img2img_math(pixart):
    """diffusers has no PixArt img2img: StableDiffusionImg2ImgPipeline's steps written out with
    the reference PixArt's modules and its DPM-Solver++ (set_begin_index, add_noise at the
    first kept timestep). 20 steps at strength 0.5: 10 run. (With this config's
    final_sigmas_type "zero" the last step is first order either way; the whole-schedule
    length that lower_order_final reads is told apart in test_schedule_tail_matches_...)"""
    reference, folder = pixart
    picture, steps, strength, scale, seed = init_picture((16, 16), seed=3), 20, 0.5, 4.5, 7
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    sched = reference.scheduler
    sched.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    sched.set_begin_index(t_start)
    timesteps = sched.timesteps[t_start:]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeds, mask, neg, neg_mask = reference.encode_prompt("a cat", negative_prompt="", max_sequence_length=20,
                                                              clean_caption=False)
        context, context_mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
        x0 = reference.vae.encode(pixels).latent_dist.sample(gen) * reference.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        x = sched.add_noise(x0, noise, timesteps[:1])
        for t in timesteps:
            out = reference.transformer(torch.cat([x, x]), encoder_hidden_states=context,
                                        encoder_attention_mask=context_mask, timestep=t.expand(2),
                                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            uncond, cond = out[:, :4].chunk(2)
            x = sched.step(uncond + scale * (cond - uncond), t, x).prev_sample
        expected = reference.vae.decode(x / reference.vae.config.scaling_factor).sample
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    out = load(folder)(prompt="a cat", image=picture, strength=strength, num_inference_steps=steps,
                       guidance_scale=scale, max_sequence_length=20, seed=seed, output_type="np", progress=False)
    assert np.abs(out.images - expected).max() <= 1e-4


def test_pixart_inpainting_keeps_the_masked_out_region(pixart):
    _, folder = pixart
    pipe, picture = load(folder), init_picture((16, 16), seed=4)
    clean = clean_latents(pipe, picture, seed=1)
    out = pipe(prompt="a dog", image=picture, mask_image=half_mask((16, 16)), strength=0.7, num_inference_steps=5,
               seed=1, output_type="latent", progress=False)
    keep = 8 // pipe.vae_scale_factor
    assert torch.equal(out.latents[..., :keep], clean[..., :keep])
    assert (out.latents[..., keep:] - clean[..., keep:]).abs().max() > 1e-2
    assert out.parameters[0]["generated_size"] == "16x16"


def test_sd3_inpainting_with_ditcache_and_promptgate(sd3_16):
    """Accelerated inpainting: plans over the 5 steps that run (as a 5-step text-to-image
    call's), and the masked-out region still exactly the init image's latents."""
    _, folder = sd3_16
    pipe, picture = load(folder), init_picture(seed=6)
    kw = dict(prompt="a dog", accel="ditcache+promptgate", seed=3, output_type="latent", progress=False)
    out = pipe(image=picture, mask_image=half_mask(), strength=0.5, num_inference_steps=10, **kw)
    text = pipe(num_inference_steps=5, height=SIZE[0], width=SIZE[1], **kw).stats
    steps = out.stats["steps"]
    assert len(steps) == 5 and out.stats["accel"] == text["accel"]
    assert [(s["rows"], s["blocks"]) for s in steps] == [(s["rows"], s["blocks"]) for s in text["steps"]]
    assert any(s["rows"] == 1 for s in steps)  # promptgate dropped the unconditional rows
    keep = SIZE[1] // 2 // pipe.vae_scale_factor
    assert torch.equal(out.latents[..., :keep], clean_latents(pipe, picture, seed=3)[..., :keep])


@pytest.mark.parametrize("name, config", [
    ("ddim", dict(beta_schedule="linear", clip_sample=False)),
    ("dpm", dict(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                 final_sigmas_type="sigma_min")),
    ("dpm", dict(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)),
    ("flow_euler", dict(shift=3.0)),
])
def test_schedule_tail_matches_diffusers_begin_index(name, config):
    """`from_step` + `noise_to` against diffusers' set_begin_index + add_noise / scale_noise, on
    a fake model: 16 steps from step 6 (10 run; DPM-Solver's lower_order_final reads the
    16, which with final_sigmas_type="sigma_min" decides the last step's order)."""
    import diffusers

    from dite.schedulers import BY_NAME
    from tiny_schedulers import FakeModel, start_noise

    reference = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler,
                 "flow_euler": diffusers.FlowMatchEulerDiscreteScheduler}[name](**config)
    ours = BY_NAME[name].from_diffusers_config(dict(reference.config))
    model, x0, noise, steps, start = FakeModel(), start_noise(seed=1), start_noise(seed=2), 16, 6
    reference.set_timesteps(steps)
    if hasattr(reference, "set_begin_index"):  # DDIM's steps read only t (diffusers' SD img2img)
        reference.set_begin_index(start)
    t = reference.timesteps[start:]
    if name == "flow_euler":
        x = reference.scale_noise(x0, t[:1], noise)
    else:
        x = reference.add_noise(x0, noise, t[:1])
    for step_t in t:
        x = reference.step(model(x, step_t), step_t, x).prev_sample
    state = ours.from_step(ours.start(steps), start)
    y = ours.noise_to(x0, noise, state, 0)
    for i in range(state.num_steps):
        y = ours.step(model(y, state.timesteps[i]), i, y, state)
    assert torch.equal(state.timesteps.float(), t.float()) and (x - y).abs().max() <= 1e-5


def test_tensor_image_equals_the_same_pil_image(sd3):
    _, folder = sd3
    pipe, picture = load(folder), init_picture(seed=8)
    tensor = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)
    kw = dict(prompt="a cat", strength=0.7, num_inference_steps=3, seed=1, output_type="latent", progress=False)
    a, b = pipe(image=picture, **kw), pipe(image=tensor, **kw)
    assert torch.equal(a.latents, b.latents)
