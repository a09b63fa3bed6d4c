"""Scheduler parity with diffusers: whole sampling loops, every intermediate sample, fp32."""

from __future__ import annotations

import json

import pytest
import torch

from dite.engine.errors import ConfigError, InputError
from dite.schedulers import (SCHEDULERS, DDIMConfig, DDIMScheduler, DDPMConfig, DDPMScheduler, by_name,
                             from_diffusers_config, load_scheduler)
from dite.schedulers.betas import alphas_cumprod

import diffusers
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from tiny_schedulers import SHAPE, FakeModel, assert_same_run, generators, run_diffusers, run_dite, start_noise


def check_ddim(config: dict, num_steps: int, eta: float = 0.0, seeds=(7, 8)):
    model = FakeModel()
    ref = run_diffusers(diffusers.DDIMScheduler(**config), model, start_noise((len(seeds),) + SHAPE[1:]),
                        num_steps, gens=generators(seeds) if eta else None, eta=eta)
    ours = run_dite(DDIMScheduler(DDIMConfig(**config)), model, start_noise((len(seeds),) + SHAPE[1:]),
                    num_steps, gens=generators(seeds) if eta else None, eta=eta)
    assert_same_run(ref, ours)


def check_ddpm(config: dict, num_steps: int, out_channels: int = 4, seeds=(7, 8), ref_config=None):
    model = FakeModel(out_channels=out_channels)
    ref = run_diffusers(diffusers.DDPMScheduler(**(ref_config or config)), model, start_noise(),
                        num_steps, gens=generators(seeds))
    ours = run_dite(DDPMScheduler(DDPMConfig(**config)), model, start_noise(), num_steps, gens=generators(seeds))
    assert_same_run(ref, ours)


# ---------------------------------------------------------------------------- tables

# diffusers' DDIM only knows the first three schedules; DDPM knows all five.
SCHEDULES_BY_CLASS = [("DDIMScheduler", s) for s in ("linear", "scaled_linear", "squaredcos_cap_v2")] + [
    ("DDPMScheduler", s) for s in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")]


@pytest.mark.parametrize("cls, schedule", SCHEDULES_BY_CLASS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_bit_identical(cls, schedule, zero_snr):
    kwargs = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=schedule)
    ref = getattr(diffusers, cls)(**kwargs, rescale_betas_zero_snr=zero_snr).alphas_cumprod
    assert torch.equal(ref, alphas_cumprod(**kwargs, rescale_betas_zero_snr=zero_snr))


def test_trained_betas():
    betas = torch.linspace(1e-4, 3e-2, 100).tolist()
    ref = diffusers.DDIMScheduler(num_train_timesteps=100, trained_betas=betas)
    ours = DDIMScheduler(DDIMConfig(num_train_timesteps=100, trained_betas=betas))
    assert torch.equal(ref.alphas_cumprod, ours.alphas_cumprod)
    with pytest.raises(ConfigError, match="trained_betas has 100 entries"):
        DDIMConfig(trained_betas=betas)  # num_train_timesteps defaults to 1000


# ---------------------------------------------------------------------------- DDIM

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("num_steps", [7, 50])
def test_ddim_spacing_and_prediction(spacing, prediction, num_steps):
    check_ddim(dict(timestep_spacing=spacing, prediction_type=prediction, clip_sample=False), num_steps)


@pytest.mark.parametrize("config", [
    dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False, beta_schedule="scaled_linear",
         beta_start=0.00085, beta_end=0.012),  # Stable Diffusion 1.x/2.x style
    dict(set_alpha_to_one=False, timestep_spacing="linspace", clip_sample=False),
    dict(clip_sample=True, clip_sample_range=1.5, prediction_type="sample"),
    dict(clip_sample=True),
    dict(thresholding=True, sample_max_value=2.0, dynamic_thresholding_ratio=0.9),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
         clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2", clip_sample=False),
], ids=["sd_leading_offset", "alpha_not_one", "clip_range", "clip", "threshold", "zero_snr", "cosine"])
def test_ddim_options(config):
    check_ddim(config, 20)


@pytest.mark.parametrize("eta,seeds", [(1.0, (7, 8)), (0.5, (3,))])
def test_ddim_eta_noise(eta, seeds):
    check_ddim(dict(clip_sample=False), 20, eta=eta, seeds=seeds)


def test_noise_matches_diffusers_randn_tensor():
    # Row k of our noise comes from generators[k], exactly as diffusers' randn_tensor draws it.
    for seeds in [(5,), (5, 6, 7)]:
        shape = (len(seeds), 4, 8, 8)
        gens = generators(seeds)
        ref = randn_tensor(shape, generator=gens if len(gens) > 1 else gens[0], dtype=torch.float32)
        ours = DDIMScheduler().start(3, generators=generators(seeds)).noise_like(torch.zeros(shape))
        assert torch.equal(ref, ours)


def test_ddim_ignores_variance_half():
    # A learned-sigma model's 2·C output: DDIM uses the ε half, like DiTPipeline's own cut.
    model8, sched = FakeModel(out_channels=8), DDIMScheduler(DDIMConfig(clip_sample=False))
    state, x = sched.start(5), start_noise()
    out = model8(x, state.timesteps[0])
    assert torch.equal(sched.step(out, 0, x, state), sched.step(out[:, :4], 0, x, state))


# ---------------------------------------------------------------------------- DDPM

@pytest.mark.parametrize("variance", ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_ddpm_variance_types(variance, spacing):
    out_channels = 8 if variance.startswith("learned") else 4
    check_ddpm(dict(variance_type=variance, timestep_spacing=spacing, clip_sample=False), 250, out_channels)


def test_ddpm_dit_original_sampler():
    # DiT sample.py: 250 respaced IDDPM steps, learned-range variance, no clipping.
    check_ddpm(dict(variance_type="learned_range", timestep_spacing="linspace", clip_sample=False), 250, 8)


def test_ddpm_fixed_large_log_is_fixed_large():
    # diffusers takes sqrt(log β) and returns NaN; we give exp(½ log β) = sqrt(β).
    model, sched = FakeModel(), diffusers.DDPMScheduler(variance_type="fixed_large_log")
    _, broken = run_diffusers(sched, model, start_noise(), 10, gens=generators((1, 2)))
    assert torch.isnan(broken[0]).all()
    check_ddpm(dict(variance_type="fixed_large_log", clip_sample=False), 50,
               ref_config=dict(variance_type="fixed_large", clip_sample=False))


@pytest.mark.parametrize("config,num_steps", [
    (dict(), 1000),  # the full training chain, default clip_sample=True
    (dict(timestep_spacing="trailing", clip_sample=False), 30),  # ends at t > 0: noise on the last step
    (dict(prediction_type="v_prediction", clip_sample=False, steps_offset=1), 40),
    (dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.5), 40),
    (dict(thresholding=True, sample_max_value=1.5), 40),
    (dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_small_log", timestep_spacing="linspace"), 33),
], ids=["full_chain", "trailing", "v_offset", "sample_clip", "threshold", "cosine"])
def test_ddpm_options(config, num_steps):
    check_ddpm(config, num_steps)


def test_ddpm_learned_needs_variance_channels():
    sched = DDPMScheduler(DDPMConfig(variance_type="learned_range"))
    state, x = sched.start(10), start_noise()
    with pytest.raises(InputError, match="variance channels"):
        sched.step(x, 0, x, state)


# ---------------------------------------------------------------------------- sharing

@pytest.mark.parametrize("sched,kwargs_a,kwargs_b", [
    (DDPMScheduler(DDPMConfig(variance_type="learned_range", clip_sample=False)), {}, {}),
    (DDIMScheduler(DDIMConfig(clip_sample=False)), {"eta": 1.0}, {"eta": 0.0}),
], ids=["ddpm", "ddim"])
def test_shared_scheduler_interleaved(sched, kwargs_a, kwargs_b):
    model = FakeModel(out_channels=8)
    runs = [(start_noise(seed=1), 12, (1, 2), kwargs_a), (start_noise(seed=2), 20, (3, 4), kwargs_b)]
    alone = [run_dite(sched, model, x, n, generators(s), **kw)[1][-1] for x, n, s, kw in runs]

    states = [sched.start(n, generators=generators(s), **kw) for _, n, s, kw in runs]
    xs = [x for x, *_ in runs]
    for i in range(max(st.num_steps for st in states)):
        for k, st in enumerate(states):
            if i < st.num_steps:
                xs[k] = sched.step(model(xs[k], st.timesteps[i]), i, xs[k], st)
    for a, b in zip(alone, xs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- configs

@pytest.mark.parametrize("cls,kwargs", [
    ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                           set_alpha_to_one=False, prediction_type="v_prediction", timestep_spacing="trailing",
                           rescale_betas_zero_snr=True, clip_sample=False)),
    ("DDPMScheduler", dict(variance_type="learned_range", timestep_spacing="linspace", thresholding=True,
                           dynamic_thresholding_ratio=0.9, sample_max_value=3.0, clip_sample_range=2.0)),
])
def test_config_round_trip(tmp_path, cls, kwargs):
    ref = getattr(diffusers, cls)(**kwargs)
    ref.save_config(tmp_path)
    ours = load_scheduler(tmp_path)
    assert type(ours) is SCHEDULERS[cls]
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    exported = ours.to_diffusers_config()
    assert exported["_class_name"] == cls
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(saved) == public(exported)
    # ... and diffusers reads our export back into the same config.
    back = getattr(diffusers, cls).from_config(exported)
    assert public(back.config) == public(ref.config)
    assert load_scheduler(tmp_path / "scheduler_config.json").config == ours.config


def test_load_from_pipeline_folder_and_foreign_keys(tmp_path):
    # Stable Diffusion 2.1's DDIM config carries PNDM's skip_prk_steps, which DDIM ignores.
    config = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
              "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    ours = load_scheduler(tmp_path)
    assert ours.config == DDIMConfig(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                                     clip_sample=False, prediction_type="v_prediction",
                                     set_alpha_to_one=False, steps_offset=1)


def test_unknown_class_lists_supported():
    with pytest.raises(ConfigError) as info:
        from_diffusers_config({"_class_name": "KarrasVeScheduler"})
    message = str(info.value)
    assert "KarrasVeScheduler" in message and "DDIMScheduler" in message and "DDPMScheduler" in message


@pytest.mark.parametrize("config,match", [
    ({"_class_name": "DDIMScheduler", "beta_schedule": "cubic"}, "beta_schedule"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}, "timestep_spacing"),
    ({"_class_name": "DDPMScheduler", "prediction_type": "flow"}, "prediction_type"),
    ({"_class_name": "DDPMScheduler", "variance_type": "fixed_medium"}, "variance_type"),
])
def test_unsupported_values(config, match):
    with pytest.raises(ConfigError, match=match):
        from_diffusers_config(config)


def test_by_name():
    assert by_name("ddim").config == DDIMConfig()
    ddpm = by_name("ddpm", timestep_spacing="linspace", variance_type="learned_range")
    assert isinstance(ddpm, DDPMScheduler) and ddpm.config.variance_type == "learned_range"
    # The model's own config (any class) supplies the betas; foreign keys are dropped.
    pixart = {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 2, "beta_schedule": "linear",
              "beta_start": 0.0001, "beta_end": 0.02, "timestep_spacing": "linspace", "use_karras_sigmas": False}
    assert by_name("ddim", pixart, clip_sample=False).config == \
        DDIMConfig(timestep_spacing="linspace", clip_sample=False)
    with pytest.raises(ConfigError, match="ddim, ddpm"):
        by_name("heun")
    with pytest.raises(ConfigError, match="no option variance_type"):
        by_name("ddim", variance_type="learned")


def test_too_many_steps():
    with pytest.raises(InputError, match="num_steps"):
        DDIMScheduler().start(1001)
    with pytest.raises(InputError, match="outside"):
        DDIMScheduler(DDIMConfig(steps_offset=1)).start(1000)
