"""DPM-Solver++ multistep against diffusers' DPMSolverMultistepScheduler: whole schedules,
every intermediate sample, fp32, over the config options PixArt releases and users touch."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler as Reference

from dite.engine.errors import ConfigError
from dite.schedulers import DPMSolverMultistepScheduler, by_name, from_diffusers_config, load_scheduler
from tiny_schedulers import FakeModel, assert_same_run, run_diffusers, run_dite, start_noise

# PixArt-Σ-1024's scheduler_config.json (docs/checkpoints.md §2.5).
PIXART = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", beta_schedule="linear",
              beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000, prediction_type="epsilon",
              timestep_spacing="linspace", steps_offset=0, lower_order_final=True, use_karras_sigmas=False)

CASES = [
    ({}, 20),
    ({}, 7),
    ({}, 25),  # >= 15 steps: lower_order_final no longer forces the last two steps
    ({"final_sigmas_type": "sigma_min"}, 10),
    ({"final_sigmas_type": "sigma_min"}, 20),
    ({"final_sigmas_type": "sigma_min", "euler_at_final": True}, 20),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False}, 10),
    ({"solver_type": "heun"}, 12),
    ({"solver_order": 1}, 10),
    ({"timestep_spacing": "leading", "steps_offset": 1}, 15),
    ({"timestep_spacing": "trailing"}, 9),
    ({"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 8),
    ({"thresholding": True, "sample_max_value": 1.5}, 6),
    ({"rescale_betas_zero_snr": True, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 8),
    ({"lambda_min_clipped": -5.1}, 10),
    ({}, 1),
]


@pytest.mark.parametrize("options, steps", CASES)
def test_whole_schedule_matches_diffusers(options, steps):
    config = {**PIXART, **options}
    reference = Reference(**config)
    ours = from_diffusers_config({"_class_name": "DPMSolverMultistepScheduler", **config})
    model, x = FakeModel(), start_noise()
    assert_same_run(run_diffusers(reference, model, x, steps), run_dite(ours, model, x, steps))


def test_learned_variance_channels_are_dropped():
    """PixArt's 8-channel output: the variance half never reaches the update."""
    ours = DPMSolverMultistepScheduler()
    model4, model8, x = FakeModel(out_channels=4), FakeModel(out_channels=8), start_noise()
    model8.w[:4], model8.b[:4] = model4.w, model4.b
    _, a = run_dite(ours, model4, x, 5)
    _, b = run_dite(ours, model8, x, 5)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_saved_config_loads_and_round_trips(tmp_path):
    Reference(**PIXART).save_config(tmp_path)
    ours = load_scheduler(tmp_path)
    assert isinstance(ours, DPMSolverMultistepScheduler) and ours.name == "dpm"
    again = from_diffusers_config(json.loads(json.dumps(ours.to_diffusers_config())))
    assert again.config == ours.config
    assert isinstance(by_name("dpm++"), DPMSolverMultistepScheduler)
    # --scheduler dpm on a model keeps the model's training schedule (e.g. a DDIM config's betas)
    swapped = by_name("dpm", {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "clip_sample": False})
    assert swapped.config.beta_schedule == "scaled_linear"


def test_state_is_per_call():
    ours, model, x = DPMSolverMultistepScheduler(), FakeModel(), start_noise()
    _, first = run_dite(ours, model, x, 6)
    _, second = run_dite(ours, model, x, 6)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@pytest.mark.parametrize("options, message", [
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ({"solver_order": 3}, "solver_order 3"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"final_sigmas_type": "max"}, "final_sigmas_type"),
])
def test_unsupported_options_are_clear_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        from_diffusers_config({"_class_name": "DPMSolverMultistepScheduler", **options})
